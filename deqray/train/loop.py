"""The per-worker training loop that Ray Train runs (TorchTrainer's train_loop_per_worker).

Read top to bottom: build the model (same init on every rank), wrap it for
DDP, restore a checkpoint if Ray hands one over, then take steps:
pretraining (the weight-tied unrolled network) before `pretrain_steps`,
DEQ mode after; the Jacobian loss on a step with probability
`jac_loss_freq`; evaluation, metrics, TensorBoard and a checkpoint every
`eval_every` steps. Divergence ends the run with status "diverged" and no
new checkpoint, so the last good one stays the latest.

Every rank makes the same collective calls in the same order: the DDP
all-reduce of each step (whose averaged gradients also tell every rank
alike about a non-finite loss anywhere), the metric reductions and the
checkpoint gathers at evaluations, and one `ray.train.report` per
evaluation.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import sys
import tempfile
import time
from typing import Any

import torch

from deqray.config import Experiment
from deqray.data._fs import locate

from .metrics import EvalStats, TensorBoardWriter, TrainStats
from .state import (
    Progress,
    gather_to_rank0,
    jac_this_step,
    jac_weight,
    load_state,
    make_optimizer,
    make_scheduler,
    rng_state,
    save_state,
    set_rng_state,
    unwrap,
)

STATUS_FILE = "status.json"
METRICS_FILE = "metrics.jsonl"


def _fault(cfg: Experiment, run: Any, step: int, rank: int) -> None:
    """Test-only: die like a crashed worker at `debug.fail_at_step` (counted in the run dir)."""
    d = cfg.debug
    if d.fail_at_step is None or step != d.fail_at_step or rank != d.fail_rank:
        return
    marker = run.join("_faults", f"step-{step}")
    done = int(marker.read_bytes()) if marker.exists() else 0
    if done >= d.fail_times:
        return
    marker.write_bytes(str(done + 1).encode())
    say(f"[deqray] debug.fail_at_step: rank {rank} exits at step {step}")
    os._exit(1)


class Batches:
    """The training split as batches, epoch after epoch, from a given data position."""

    def __init__(self, cfg: Experiment, ctx: dict, device):
        import ray.train

        self.cfg, self.ctx, self.device = cfg, ctx, device
        self.lm = ctx["family"] == "lm"
        self.shard = ray.train.get_dataset_shard(cfg.data.train_split)

    def epoch(self, skip: int):
        """One epoch's batches, the first `skip` of them read and dropped (a resume)."""
        if self.lm:
            from deqray.data.lm import iter_lm_batches

            it = iter_lm_batches(self.shard, self.ctx["tgt_len"], device=self.device)
        else:
            it = (
                (b["image"], b["label"])
                for b in self.shard.iter_torch_batches(
                    batch_size=self.ctx["batch_per_worker"], drop_last=True, device=self.device
                )
            )
        for i, batch in enumerate(it):
            if i >= self.ctx["steps_per_epoch"]:
                break  # equal step counts on every rank
            if i >= skip:
                yield batch


def _forward(model, batch, lm: bool, mems, **kw):
    """(loss, info, new mems, items) for one batch."""
    if lm:
        out = model(batch.tokens, batch.targets, mems, **kw)
        return out.loss, out.info, out.mems, batch.tokens.numel()
    images, labels = batch
    logits, info = model(images, **kw)
    return unwrap(model).loss(logits, labels), info, None, images.shape[0]


def evaluate(model, cfg: Experiment, ctx: dict, device, autocast) -> dict[str, float]:
    """Metrics on the evaluation split, at the evaluation f_thres, reduced over the ranks.

    The unwrapped module runs it: DDP's forward would broadcast buffers, a
    collective that ranks with different batch counts could not match.
    """
    import ray.train

    net = unwrap(model)
    net.eval()
    lm = ctx["family"] == "lm"
    task = "lm" if lm else ctx["task"]
    stats = EvalStats(task, num_classes=ctx.get("num_classes"), ignore_index=ctx["ignore_index"])
    shard = ray.train.get_dataset_shard(ctx["eval_split"])
    limit = cfg.train.eval_batches
    try:
        with torch.no_grad(), autocast():
            if lm:
                from deqray.data.lm import iter_lm_batches

                mems = None
                for i, b in enumerate(iter_lm_batches(shard, ctx["eval_tgt_len"], device=device)):
                    if limit is not None and i >= limit:
                        break
                    out = net(b.tokens, b.targets, mems, sradius=cfg.train.eval_sradius)
                    mems = out.mems
                    stats.add_lm(float(out.nll.float().sum()), int(b.targets.numel()))
                    stats.add_solver(out.info.metrics())
            else:
                batches = shard.iter_torch_batches(
                    batch_size=ctx["eval_batch_per_worker"], device=device
                )
                for b in batches:  # capped by the driver (Dataset.limit) when eval_batches is set
                    x, y = b["image"], b["label"]
                    logits, info = net(x, sradius=cfg.train.eval_sradius)
                    logits = logits.float()
                    mean_loss = float(net.loss(logits, y))
                    if task == "segmentation":
                        valid = int((y != ctx["ignore_index"]).sum())
                        stats.add_segmentation(logits, y, mean_loss * valid, valid)
                    else:
                        stats.add_classification(logits, y, mean_loss * y.shape[0])
                    stats.add_solver(info.metrics())
    finally:
        net.train()
    return stats.reduce()


def _autocast_factory(cfg: Experiment, device):
    use = cfg.train.amp == "bf16" or (cfg.train.amp == "auto" and device.type == "cuda")
    if not use:
        return contextlib.nullcontext
    return lambda: torch.autocast(device.type, dtype=torch.bfloat16)


def _quiet_library_logs() -> None:
    """Keep the worker's own output readable: Ray Train logs every report with
    its whole metrics dict, and Ray Data announces each pass over a split.
    Warnings and errors still come through."""
    from ray.data import DataContext

    DataContext.get_current().print_on_execution_start = False
    logging.getLogger("ray.data").setLevel(logging.WARNING)
    try:  # Ray Train v2 names this logger after its file
        from ray.train.v2._internal.execution import context as train_context

        logging.getLogger(train_context.__file__).setLevel(logging.WARNING)
    except ImportError:  # pragma: no cover - another Ray layout
        pass


def train_loop_per_worker(loop_config: dict) -> dict | None:
    import ray.train
    import ray.train.torch

    _quiet_library_logs()
    cfg = Experiment.from_dict(loop_config["experiment"], "run config")
    ctx = loop_config["context"]
    run = locate(loop_config["run_uri"])
    tctx = ray.train.get_context()
    rank, world = tctx.get_world_rank(), tctx.get_world_size()
    device = ray.train.torch.get_device()
    lm = ctx["family"] == "lm"
    autocast = _autocast_factory(cfg, device)

    # The same initial weights on every rank (DDP would broadcast rank 0's
    # anyway); then a per-rank stream for dropout and f_thres jitter.
    torch.manual_seed(cfg.train.seed)
    model = ctx_model_config(ctx).build()
    torch.manual_seed(cfg.train.seed * 1000 + rank + 1)
    model = ray.train.torch.prepare_model(model)
    optimizer = make_optimizer(model.parameters(), cfg.optim)
    total = ctx["total_steps"]
    scheduler = make_scheduler(optimizer, cfg.optim, total)
    pretrain_steps = ctx["pretrain_steps"]

    progress, mems = Progress(), None
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as d:
            progress, mine = load_state(
                d, model=model, optimizer=optimizer, scheduler=scheduler, rank=rank, device=device
            )
        set_rng_state(mine["rng"])
        mems = mine.get("mems")
        if rank == 0:
            say(f"[deqray] resumed at step {progress.step} (epoch {progress.epoch})")

    writer = None
    if rank == 0 and cfg.logging.tensorboard:
        writer = TensorBoardWriter(run.uri)
        if progress.step == 0:
            writer.text("config", "```\n" + json.dumps(cfg.to_dict(), indent=1) + "\n```", 0)

    batches = Batches(cfg, ctx, device)
    stats = TrainStats()
    stop_at = min(total, cfg.train.stop_at_step or total)
    status = "running"
    last_eval: dict[str, float] = dict(progress.best)
    end: dict[str, Any] = {}

    def report(final_status: str | None = None, reason: str = "", save: bool = True) -> None:
        """Evaluate, reduce, log, checkpoint (rank 0), and ray.train.report on every rank."""
        nonlocal last_eval, end
        metrics = stats.reduce()
        stats_hist = stats.histograms()
        stats.reset()
        if final_status != "diverged":
            last_eval = evaluate(model, cfg, ctx, device, autocast)
        metrics.update(last_eval)
        metrics.update(
            step=progress.step,
            epoch=progress.epoch + progress.batch_in_epoch / ctx["steps_per_epoch"],
            lr=optimizer.param_groups[0]["lr"],
            phase=1.0 if progress.step > pretrain_steps else 0.0,
            jac_loss_weight=jac_weight(max(progress.step - 1, 0), pretrain_steps, cfg),
            status=final_status or "running",
            reason=reason,
            time=time.time(),
        )
        progress.best = {k: v for k, v in last_eval.items() if isinstance(v, float)}
        # divergence by a forward that stopped converging (DEQ steps only)
        res = metrics.get("fwd_rel_residual")
        limit = cfg.train.max_residual
        deq_interval = progress.step > pretrain_steps
        if final_status is None and deq_interval and res is not None and limit is not None:
            bad = not math.isfinite(res) or res > limit
            progress.bad_evals = progress.bad_evals + 1 if bad else 0
            if progress.bad_evals >= cfg.train.diverge_patience:
                final_status = "diverged"
                reason = (
                    f"the forward solver stopped converging: mean relative residual {res:.3g} "
                    f"> train.max_residual={limit} for {progress.bad_evals} evaluations in a row"
                )
                metrics.update(status="diverged", reason=reason)
        save = save and final_status != "diverged"
        per_rank = gather_to_rank0(
            {"rng": rng_state(), "mems": None if mems is None else tuple(t.cpu() for t in mems)}
        )
        ckpt = None
        tmp = None
        if rank == 0:
            _append_metrics(run, metrics)
            if writer is not None:
                writer.scalars(metrics, progress.step)
                if cfg.logging.histograms and stats_hist:
                    writer.histograms(stats_hist, progress.step)
                if final_status == "diverged":
                    writer.text(
                        "status", f"diverged at step {progress.step}: {reason}", progress.step
                    )
                writer.flush()
            if save:
                tmp = tempfile.mkdtemp(prefix="deqray-ckpt-")
                save_state(
                    tmp,
                    model=model,
                    optimizer=optimizer,
                    scheduler=scheduler,
                    progress=progress,
                    per_rank=per_rank,
                    config=cfg.to_dict(),
                )
                ckpt = ray.train.Checkpoint.from_directory(tmp)
            if final_status is not None:
                end = _write_status(run, final_status, reason, progress.step, metrics)
        try:
            ray.train.report(metrics, checkpoint=ckpt)
        finally:
            if tmp is not None:
                import shutil

                shutil.rmtree(tmp, ignore_errors=True)
        return final_status

    while progress.step < stop_at and status == "running":
        if progress.batch_in_epoch == 0 and lm:
            mems = None  # a new pass over the stream
        for batch in batches.epoch(progress.batch_in_epoch):
            step = progress.step
            _fault(cfg, run, step, rank)
            pretrain = step < pretrain_steps
            w = jac_weight(step, pretrain_steps, cfg)
            want_jac = w > 0 and jac_this_step(step, cfg.train.seed, cfg.reg.jac_loss_freq)
            t0 = time.perf_counter()
            with autocast():
                loss, info, mems, items = _forward(
                    model, batch, lm, mems, pretrain=pretrain, jac_loss=want_jac
                )
            total_loss = loss.float()
            if want_jac and info.jac_loss is not None:
                total_loss = total_loss + w * info.jac_loss.float()
            if cfg.debug.nan_at_step is not None and step >= cfg.debug.nan_at_step:
                total_loss = total_loss * float("nan")
            optimizer.zero_grad(set_to_none=True)
            if bool(torch.isfinite(total_loss.detach())):
                total_loss.backward()
            else:
                # No backward through a non-finite loss (the implicit solver
                # refuses a NaN start), but NaN gradients for every parameter:
                # DDP's all-reduce then hands them to every rank alike.
                params = [p for p in model.parameters() if p.requires_grad]
                (sum((p * 0).sum() for p in params) * float("nan")).backward()
            grads = [p for p in model.parameters() if p.grad is not None]
            if cfg.optim.clip_grad_norm:
                norm = torch.nn.utils.clip_grad_norm_(grads, cfg.optim.clip_grad_norm)
            else:
                norm = torch.nn.utils.get_total_norm([p.grad for p in grads])
            # DDP has averaged the gradients: a non-finite loss or gradient on any
            # rank shows here on every rank alike, with no collective of its own.
            if not bool(torch.isfinite(norm)):
                value = float(total_loss.detach())
                what = (
                    f"non-finite loss ({value:g})"
                    if not math.isfinite(value)
                    else ("non-finite gradients")
                )
                status = report("diverged", f"{what} at step {step}", save=False)
                break
            optimizer.step()
            scheduler.step()
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            seconds = time.perf_counter() - t0
            progress.step += 1
            progress.batch_in_epoch += 1
            m = info.metrics()
            m["grad_norm"] = float(norm)
            residuals = {"fwd_rel_residual": info.rel_residual, "fwd_nstep": info.nstep}
            if info.backward.result is not None:
                residuals["bwd_rel_residual"] = info.backward.result.rel_residual
            stats.add(
                loss=float(loss.detach()),
                items=items,
                seconds=seconds,
                info_metrics=m,
                jac_loss=float(info.jac_loss.detach()) if want_jac else None,
                residuals=residuals,
            )
            if rank == 0 and cfg.logging.progress and progress.step % cfg.train.log_every == 0:
                _progress_line(
                    progress,
                    total,
                    float(loss.detach()),
                    m,
                    last_eval,
                    seconds,
                    items,
                    world,
                    lm,
                    pretrain,
                )
            done = progress.step >= stop_at
            if progress.step % cfg.train.eval_every == 0 or done:
                end = None
                if done:
                    end = "finished" if progress.step >= total else "stopped"
                status = report(end) or "running"
                if status != "running":
                    break
        else:
            progress.epoch += 1
            progress.batch_in_epoch = 0
            continue
    if writer is not None:
        writer.close()
    return end or None  # rank 0's: Result.return_value


def ctx_model_config(ctx: dict):
    from deqray.models import make_config

    return make_config(ctx["model"], where="model")


def _progress_line(progress, total, loss, m, last_eval, seconds, items, world, lm, pretrain):
    unit = "tok/s" if lm else "img/s"
    metric = ""
    if "val_ppl" in last_eval:
        metric = f" | val ppl {last_eval['val_ppl']:.2f}"
    elif "val_acc" in last_eval:
        metric = f" | val acc {last_eval['val_acc']:.3f}"
    elif "val_miou" in last_eval:
        metric = f" | val mIoU {last_eval['val_miou']:.3f}"
    solver = f"fwd {m['fwd_nstep']:.1f} steps, rel {m['fwd_rel_residual']:.1e}"
    if "bwd_nstep" in m:
        solver += f", bwd {m['bwd_nstep']:.1f}"
    say(
        f"[deqray] step {progress.step}/{total} {'pretrain' if pretrain else 'deq'} | "
        f"loss {loss:.4f}{metric} | {solver} | {items * world / max(seconds, 1e-9):,.0f} {unit}"
    )


def say(line: str) -> None:
    # Ray Train patches print() into a logger that also echoes it: one write, one line.
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


def _append_metrics(run, metrics: dict) -> None:
    """One JSON line per report in <run>/metrics.jsonl (re-uploaded whole on remote storage)."""
    target = run.join(METRICS_FILE)
    line = json.dumps({k: _jsonable(v) for k, v in metrics.items()}) + "\n"
    if "://" not in run.uri:
        with open(target.path, "a") as fh:
            fh.write(line)
        return
    old = target.read_bytes() if target.exists() else b""
    target.write_bytes(old + line.encode())


def _write_status(run, status: str, reason: str, step: int, metrics: dict) -> dict:
    body = {"status": status, "reason": reason, "step": step}
    body["metrics"] = {k: _jsonable(v) for k, v in metrics.items()}
    run.join(STATUS_FILE).write_bytes(json.dumps(body, indent=1).encode())
    return body


def _jsonable(v):
    if isinstance(v, float) and not math.isfinite(v):
        return str(v)
    return v
