"""The Ray Train worker function (TorchTrainer's `train_loop_per_worker`), for any task.

`train_loop_per_worker` reads top to bottom: build the model (the same
initial weights on every rank) and wrap it for DDP, restore a checkpoint if
Ray hands one over, then take steps (`deqray.train.step.train_step`:
pretraining, the weight-tied unrolled network, before `pretrain_steps`; DEQ
mode after), and every `eval_every` steps evaluate
(`deqray.train.evaluation.evaluate`), log and checkpoint. Divergence ends the
run with status "diverged" and no new checkpoint, so the last good one stays
the latest. The task (`run.task`) is the only part that knows what is learned.

Every rank makes the same collective calls in the same order: the DDP
all-reduce of each step (whose averaged gradients also tell every rank
alike about a non-finite loss anywhere), the metric reductions and the
checkpoint gathers at evaluations, and one `ray.train.report` per
evaluation. Instrumentation subscribes through `deqray.train.hooks`.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import shutil
import tempfile
import time
from typing import Any

import torch

from deqray.data._fs import locate
from deqray.tasks import RunContext
from deqray.tracking import MLflowRun

from . import files
from .console import progress_line, say
from .evaluation import evaluate
from .hooks import HookList
from .reduce import TrainStats
from .state import (
    Progress,
    gather_to_rank0,
    jac_weight,
    load_state,
    make_optimizer,
    make_scheduler,
    rng_state,
    save_state,
    set_rng_state,
    to_device,
)
from .step import StepResult, train_step
from .tensorboard import TensorBoardWriter, TrialBoard

_END = object()  # the end of an epoch's batches


def train_loop_per_worker(loop_config: dict) -> dict | None:
    import ray.train

    run: RunContext = loop_config["run"]
    hooks = HookList(loop_config.get("hooks") or [])
    hooks.on_event("start", run_uri=run.run_uri)
    _quiet_library_logs()
    worker = Worker(run, hooks, board=loop_config.get("board"))
    worker.restore(ray.train.get_checkpoint())
    shard = ray.train.get_dataset_shard(run.train_split)
    while worker.status == "running":
        for batch in worker.epoch(shard):
            result = worker.step(batch)
            if result.diverged:
                worker.report("diverged", result.diverged, save=False)
            elif worker.due():
                worker.report(worker.end_status())
            if worker.status != "running":
                break
    return worker.finish()


class Worker:
    """One rank's run: the model and optimiser, where the run is, and its reports."""

    def __init__(self, run: RunContext, hooks: HookList, board: TrialBoard | None = None) -> None:
        import ray.train
        import ray.train.torch

        self.run, self.hooks, self.task, self.exp = run, hooks, run.task, run.experiment
        ctx = ray.train.get_context()
        self.rank, self.world = ctx.get_world_rank(), ctx.get_world_size()
        self.device = ray.train.torch.get_device()
        self.autocast = _autocast_factory(self.exp.train.amp, self.device)
        # The same initial weights on every rank (DDP would broadcast rank 0's
        # anyway); then a per-rank stream for dropout and f_thres jitter.
        torch.manual_seed(self.exp.train.seed)
        model = self.task.build_model(run)
        hooks.on_event("model_built")
        torch.manual_seed(self.exp.train.seed * 1000 + self.rank + 1)
        self.model = ray.train.torch.prepare_model(model)
        hooks.on_event("model_prepared")
        self.optimizer = make_optimizer(self.model.parameters(), self.exp.optim)
        self.scheduler = make_scheduler(self.optimizer, self.exp.optim, run.total_steps)
        self.progress = Progress()
        self.state: Any = None  # the task's per-rank state (segment memory)
        self.stats = TrainStats()
        self.stop_at = min(run.total_steps, self.exp.train.stop_at_step or run.total_steps)
        self.status = "running" if self.progress.step < self.stop_at else "finished"
        self.last_eval: dict[str, float] = {}
        self.end: dict | None = None
        self.primary = "val_" + self.task.primary(self.exp).name
        self.writer = None
        self.board = board  # a study's trial: HParams and objectives for TensorBoard
        self.mlflow: MLflowRun | None = None  # rank 0's, with tracking.mlflow

    # ---- start ------------------------------------------------------------------------ #

    def restore(self, checkpoint) -> None:
        self.hooks.on_event("checkpoint_found", restored=checkpoint is not None)
        if checkpoint is not None:
            self.hooks.on_event("restore_start")
            self.progress, mine = load_state(
                files.checkpoint_uri(self.run.run_uri, checkpoint),  # read with retries
                model=self.model,
                optimizer=self.optimizer,
                scheduler=self.scheduler,
                rank=self.rank,
                device=self.device,
            )
            set_rng_state(mine["rng"])
            self.state = mine.get("state")
            self.last_eval = dict(self.progress.best)
            self.hooks.on_event("restored", step=self.progress.step)
            if self.rank == 0:
                say(f"[deqray] resumed at step {self.progress.step} (epoch {self.progress.epoch})")
        if self.progress.step >= self.stop_at:
            self.status = "finished"
        if self.rank == 0:
            files.check_storage(self.run.run_uri)  # where its checkpoints will go
        if self.rank == 0 and self.exp.logging.tensorboard:
            self.writer = TensorBoardWriter(self.run.run_uri, board=self.board)
            if self.progress.step == 0:
                text = json.dumps(self.exp.to_dict(), indent=1)
                self.writer.text("config", "```\n" + text + "\n```", 0)
                self.writer.hparams()
        if self.rank == 0:
            # a study's trial (it has a board) is named by its run's directory
            trial = self.run.run_uri.rstrip("/").rsplit("/", 1)[-1] if self.board else None
            self.mlflow = MLflowRun.start(self.exp, self.run.run_uri, self.progress.step, trial)

    # ---- steps ------------------------------------------------------------------------ #

    def epoch(self, shard):
        """The rest of the current epoch's batches: those read before a resume are skipped,
        and every rank stops after `steps_per_epoch` (equal step counts everywhere)."""
        p = self.progress
        if p.batch_in_epoch == 0:
            self.state = self.task.state_at_epoch_start()
        batches = self._batches(shard, skip=p.batch_in_epoch)
        while True:
            with self.hooks.phase("data"):
                batch = next(batches, _END)
            if batch is _END:
                self.hooks.on_event("data_end")
                break
            yield batch
            if self.status != "running":
                return
        p.epoch += 1
        p.batch_in_epoch = 0

    def _batches(self, shard, skip: int):
        for i, batch in enumerate(self.task.train_batches(shard, self.run, self.device)):
            if i >= self.run.steps_per_epoch:
                break
            if i >= skip:
                yield batch

    def step(self, batch) -> StepResult:
        p = self.progress
        self._fault(p.step)
        result = train_step(
            self.run,
            self.model,
            self.optimizer,
            self.scheduler,
            batch,
            self.state,
            step=p.step,
            autocast=self.autocast,
        )
        if result.diverged:
            return result
        pretrain = p.step < self.run.pretrain_steps
        self.state = result.state
        p.step += 1
        p.batch_in_epoch += 1
        with self.hooks.phase("metrics"):
            m = result.metrics()
        with self.hooks.phase("stats_add"):
            self.stats.add(
                loss=result.loss,
                items=result.items,
                seconds=result.seconds,
                info_metrics=m,
                jac_loss=result.jac_loss,
                residuals=result.residuals(),
            )
        self.hooks.on_step(p.step, result, m)
        if self.rank == 0 and self.exp.logging.progress and p.step % self.exp.train.log_every == 0:
            with self.hooks.phase("progress_line"):
                rate = result.items * self.world / max(result.seconds, 1e-9)
                line = progress_line(
                    step=p.step,
                    total=self.run.total_steps,
                    pretrain=pretrain,
                    loss=result.loss,
                    metrics=m,
                    primary=self.primary,
                    last_eval=self.last_eval,
                    rate=rate,
                    unit=self.task.unit,
                )
                say(line)
        return result

    def due(self) -> bool:
        step = self.progress.step
        return step % self.exp.train.eval_every == 0 or step >= self.stop_at

    def end_status(self) -> str | None:
        if self.progress.step < self.stop_at:
            return None
        return "finished" if self.progress.step >= self.run.total_steps else "stopped"

    # ---- reports ---------------------------------------------------------------------- #

    def report(self, final: str | None, reason: str = "", save: bool = True) -> None:
        """Evaluate, reduce, log, checkpoint (rank 0), and ray.train.report on every rank."""
        import ray.train
        from ray.train import CheckpointUploadMode

        with self.hooks.phase("stats_reduce"):
            metrics = self.stats.reduce()
        histograms = self.stats.histograms()
        self.stats.reset()
        if final != "diverged":
            with self.hooks.phase("evaluate"):
                self.last_eval = self._evaluate()
        metrics.update(self.last_eval)
        metrics.update(self._position(final, reason))
        self.progress.best = {k: v for k, v in self.last_eval.items() if isinstance(v, float)}
        if final is None:
            final, reason = self._residual_check(metrics)
        save = save and final != "diverged"
        with self.hooks.phase("gather"):
            mine = {"rng": rng_state(), "state": to_device(self.state, "cpu")}
            per_rank = gather_to_rank0(mine)
        checkpoint = None
        if self.rank == 0:
            self._log(metrics, histograms, final, reason)
            if save:
                with self.hooks.phase("save_state"):
                    tmp = tempfile.mkdtemp(prefix="deqray-ckpt-")
                    try:
                        save_state(
                            tmp,
                            model=self.model,
                            optimizer=self.optimizer,
                            scheduler=self.scheduler,
                            progress=self.progress,
                            per_rank=per_rank,
                            config=self.exp.to_dict(),
                            model_config=self.run.model,
                        )
                        # uploaded by deqray's retrying layer, not by Ray (files.py says why)
                        checkpoint = files.persist_checkpoint(tmp, self.run.run_uri)
                    finally:
                        shutil.rmtree(tmp, ignore_errors=True)
            if final is not None:
                step = self.progress.step
                self.end = files.write_status(self.run.run_uri, final, reason, step, metrics)
                # before the final report: Tune may stop a trial as soon as it has it
                # (ASHA at max_t), and the MLflow run would be left RUNNING
                self._close_logs()
        with self.hooks.phase("report"):
            mode = CheckpointUploadMode.NO_UPLOAD  # already in the run's storage
            ray.train.report(metrics, checkpoint=checkpoint, checkpoint_upload_mode=mode)
        if final is not None:
            self.status = final

    def _evaluate(self) -> dict[str, float]:
        import ray.train

        shard = ray.train.get_dataset_shard(self.run.eval_split)
        return evaluate(
            self.task,
            self.model,
            self.task.eval_batches(shard, self.run, self.device),
            sradius=self.exp.train.eval_sradius,
            autocast=self.autocast,
        )

    def _position(self, final: str | None, reason: str) -> dict[str, Any]:
        p, pre = self.progress, self.run.pretrain_steps
        return dict(
            step=p.step,
            epoch=p.epoch + p.batch_in_epoch / self.run.steps_per_epoch,
            lr=self.optimizer.param_groups[0]["lr"],
            phase=1.0 if p.step > pre else 0.0,
            jac_loss_weight=jac_weight(max(p.step - 1, 0), pre, self.exp),
            status=final or "running",
            reason=reason,
            time=time.time(),
        )

    def _residual_check(self, metrics: dict) -> tuple[str | None, str]:
        """Divergence of a forward that stopped converging (DEQ-mode intervals only)."""
        res, limit = metrics.get("fwd_rel_residual"), self.exp.train.max_residual
        if self.progress.step <= self.run.pretrain_steps or res is None or limit is None:
            return None, ""
        bad = not math.isfinite(res) or res > limit
        self.progress.bad_evals = self.progress.bad_evals + 1 if bad else 0
        if self.progress.bad_evals < self.exp.train.diverge_patience:
            return None, ""
        reason = (
            f"the forward solver stopped converging: mean relative residual {res:.3g} "
            f"> train.max_residual={limit} for {self.progress.bad_evals} evaluations in a row"
        )
        metrics.update(status="diverged", reason=reason)
        return "diverged", reason

    def _log(self, metrics: dict, histograms: dict, final: str | None, reason: str) -> None:
        step = self.progress.step
        with self.hooks.phase("append_metrics"):
            files.append_metrics(self.run.run_uri, metrics)
        if self.mlflow is not None:
            with self.hooks.phase("mlflow"):
                self.mlflow.log(metrics, step)
        if self.writer is None:
            return
        with self.hooks.phase("tensorboard"):
            self.writer.scalars(metrics, step)
            if self.exp.logging.histograms and histograms:
                self.writer.histograms(histograms, step)
            if final == "diverged":
                self.writer.text("status", f"diverged at step {step}: {reason}", step)
            self.writer.flush()

    # ---- end -------------------------------------------------------------------------- #

    def finish(self) -> dict | None:
        self._close_logs()
        self.hooks.on_end()
        return self.end  # rank 0's: Result.return_value

    def _close_logs(self) -> None:
        """TensorBoard's writer closed and the MLflow run ended (tagged with how the run
        ended, if it did), once."""
        if self.writer is not None:
            self.writer.close()
            self.writer = None
        if self.mlflow is not None:
            self.mlflow.end(self.end["status"] if self.end else None)
            self.mlflow = None

    def _fault(self, step: int) -> None:
        """Test-only: die like a crashed worker at `debug.fail_at_step` (counted in the run)."""
        d = self.exp.debug
        if d.fail_at_step is None or step != d.fail_at_step or self.rank != d.fail_rank:
            return
        marker = locate(self.run.run_uri).join("_faults", f"step-{step}")
        done = int(marker.read_bytes()) if marker.exists() else 0
        if done >= d.fail_times:
            return
        marker.write_bytes(str(done + 1).encode())
        say(f"[deqray] debug.fail_at_step: rank {self.rank} exits at step {step}")
        os._exit(1)


def _autocast_factory(amp: str, device):
    use = amp == "bf16" or (amp == "auto" and device.type == "cuda")
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
