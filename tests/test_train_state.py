"""deqray.train.state: optimisers, the LR schedule, the Jacobian loss schedule, RNG and checkpoints.

Everything here runs in-process on the CPU, without Ray.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import random
import subprocess
import sys

import numpy as np
import pytest
import torch
from torch import nn

from deqray.config import Experiment, Optim
from deqray.train.state import (
    STATE_FILE,
    Progress,
    jac_this_step,
    jac_weight,
    load_state,
    lr_factor,
    make_optimizer,
    make_scheduler,
    rng_state,
    save_state,
    set_rng_state,
)

# --------------------------------------------------------------------------- #
# the learning-rate schedule
# --------------------------------------------------------------------------- #


def torch_oracle(o: Optim, total: int) -> list[float]:
    """LR factors of torch's own schedulers: LinearLR warmup, then CosineAnnealingLR to min_lr."""
    p = nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([p], lr=o.lr)
    w = o.warmup_steps
    cosine = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=total - w, eta_min=o.min_lr)
    if w == 0:
        sched = cosine
    else:
        # (step + 1) / w over the w warmup steps: 1/w at step 0, 1 at step w - 1
        assert w >= 2, "LinearLR needs total_iters >= 1"
        warm = torch.optim.lr_scheduler.LinearLR(
            opt, start_factor=1 / w, end_factor=1.0, total_iters=w - 1
        )
        sched = torch.optim.lr_scheduler.SequentialLR(opt, [warm, cosine], milestones=[w])
    out = []
    for _ in range(total):
        out.append(opt.param_groups[0]["lr"] / o.lr)
        opt.step()
        sched.step()
    return out


def closed_form(step: int, lr: float, min_lr: float, warmup: int, total: int) -> float:
    """The schedule written out: warmup to lr at step warmup-1, half a cosine to min_lr at total."""
    if step < warmup:
        return (step + 1) / warmup
    t = min(step - warmup, total - warmup) / (total - warmup)
    return (min_lr + (lr - min_lr) * (1 + math.cos(math.pi * t)) / 2) / lr


SCHEDULES = [
    dict(lr=1e-2, min_lr=1e-4, warmup_steps=5, total=40),
    dict(lr=2.5e-4, min_lr=0.0, warmup_steps=16, total=100),
    dict(lr=1e-3, min_lr=0.0, warmup_steps=0, total=30),
    dict(lr=3e-3, min_lr=1e-5, warmup_steps=0, total=7),
    dict(lr=1e-3, min_lr=1e-3, warmup_steps=3, total=12),  # floor == lr: flat after warmup
]


@pytest.mark.parametrize("s", SCHEDULES, ids=lambda s: f"w{s['warmup_steps']}-n{s['total']}")
def test_lr_factor_matches_torch_schedulers(s):
    o = Optim(lr=s["lr"], min_lr=s["min_lr"], warmup_steps=s["warmup_steps"], schedule="cosine")
    total = s["total"]
    got = [lr_factor(k, o, total) for k in range(total)]
    want = torch_oracle(o, total)
    assert got == pytest.approx(want, rel=1e-9, abs=1e-12)
    written = [closed_form(k, o.lr, o.min_lr, o.warmup_steps, total) for k in range(total)]
    assert got == pytest.approx(written, rel=1e-12, abs=1e-15)


@pytest.mark.parametrize("s", SCHEDULES, ids=lambda s: f"w{s['warmup_steps']}-n{s['total']}")
def test_make_scheduler_sets_these_rates_on_the_optimizer(s):
    o = Optim(lr=s["lr"], min_lr=s["min_lr"], warmup_steps=s["warmup_steps"])
    total = s["total"]
    p = nn.Parameter(torch.zeros(2))
    opt = make_optimizer([p], o)
    sched = make_scheduler(opt, o, total)
    assert isinstance(sched, torch.optim.lr_scheduler.LambdaLR)
    seen = []
    for _ in range(total):
        seen.append(opt.param_groups[0]["lr"])
        p.grad = torch.ones_like(p)
        opt.step()
        sched.step()
    assert seen == pytest.approx([o.lr * f for f in torch_oracle(o, total)], rel=1e-9, abs=1e-15)


def test_lr_warmup_of_one_step_and_the_end_of_the_schedule():
    o = Optim(lr=0.1, min_lr=0.001, warmup_steps=1)
    total = 11
    assert lr_factor(0, o, total) == pytest.approx(1.0)  # the warmup's one step is at lr
    assert lr_factor(1, o, total) == pytest.approx(1.0)  # the cosine starts at lr
    assert lr_factor(6, o, total) == pytest.approx((0.001 + 0.099 * 0.5) / 0.1)  # half way
    # past the planned length (a run continued longer) the rate stays at the floor
    for step in (total, total + 1, 10 * total):
        assert lr_factor(step, o, total) == pytest.approx(0.01)


def test_lr_warmup_rises_linearly_from_near_zero():
    o = Optim(lr=1.0, warmup_steps=10)
    f = [lr_factor(k, o, 100) for k in range(10)]
    assert f == pytest.approx([(k + 1) / 10 for k in range(10)])
    assert all(0 < a < b for a, b in zip(f, f[1:], strict=False))


@pytest.mark.parametrize("warmup", [0, 4])
def test_constant_schedule(warmup):
    o = Optim(lr=0.5, min_lr=0.01, warmup_steps=warmup, schedule="constant")
    total = 20
    got = [lr_factor(k, o, total) for k in range(total + 5)]
    assert got[:warmup] == pytest.approx([(k + 1) / warmup for k in range(warmup)])
    assert got[warmup:] == [1.0] * (total + 5 - warmup)


def test_cosine_is_monotone_down_to_min_lr():
    o = Optim(lr=1e-3, min_lr=1e-5, warmup_steps=3)
    f = [lr_factor(k, o, 50) for k in range(3, 60)]
    assert all(a >= b for a, b in zip(f, f[1:], strict=False))
    assert f[0] == 1.0 and f[-1] == pytest.approx(1e-2)


# --------------------------------------------------------------------------- #
# optimisers
# --------------------------------------------------------------------------- #


def params():
    return [nn.Parameter(torch.zeros(3))]


def test_make_optimizer_sgd():
    o = Optim(name="sgd", lr=0.05, momentum=0.8, nesterov=True, weight_decay=5e-5)
    opt = make_optimizer(params(), o)
    assert type(opt) is torch.optim.SGD
    g = opt.param_groups[0]
    assert (g["lr"], g["momentum"], g["nesterov"], g["weight_decay"]) == (0.05, 0.8, True, 5e-5)
    plain = make_optimizer(params(), Optim(name="sgd", lr=0.1))
    assert plain.param_groups[0]["momentum"] == 0.9 and plain.param_groups[0]["nesterov"] is False


@pytest.mark.parametrize("name, cls", [("adam", torch.optim.Adam), ("adamw", torch.optim.AdamW)])
def test_make_optimizer_adam_family(name, cls):
    o = Optim(name=name, lr=2.5e-4, betas=[0.8, 0.99], weight_decay=0.01)
    opt = make_optimizer(params(), o)
    assert type(opt) is cls
    g = opt.param_groups[0]
    assert (g["lr"], tuple(g["betas"]), g["weight_decay"]) == (2.5e-4, (0.8, 0.99), 0.01)


def test_make_optimizer_takes_parameter_groups():
    a, b = nn.Parameter(torch.zeros(1)), nn.Parameter(torch.zeros(1))
    opt = make_optimizer([{"params": [a]}, {"params": [b], "weight_decay": 0.0}], Optim(lr=0.1))
    assert len(opt.param_groups) == 2
    assert [g["lr"] for g in opt.param_groups] == [0.1, 0.1]


# --------------------------------------------------------------------------- #
# the Jacobian loss weight
# --------------------------------------------------------------------------- #


def experiment(**reg) -> Experiment:
    return Experiment.from_dict(
        {"model": {"preset": "deq-transformer-tiny"}, "optim": {"steps": 10}, "reg": reg}
    )


def test_jac_weight_pretraining_then_incremental():
    cfg = experiment(
        jac_loss_weight=1.9, jac_incremental=50, pretrain_jac_loss_weight=0.3, jac_loss_freq=0.35
    )
    pre = 100
    for step in (0, 1, 50, 99):
        assert jac_weight(step, pre, cfg) == 0.3
    # +0.1 every 50 DEQ steps, counted from the end of pretraining
    for step, want in [
        (100, 1.9),
        (149, 1.9),
        (150, 2.0),
        (199, 2.0),
        (200, 2.1),
        (100 + 50 * 10, 2.9),
        (100 + 50 * 10 + 49, 2.9),
    ]:
        assert jac_weight(step, pre, cfg) == pytest.approx(want), step


def test_jac_weight_stop_step():
    cfg = experiment(jac_loss_weight=0.4, jac_incremental=10, jac_stop_step=100)
    assert jac_weight(99, 20, cfg) == pytest.approx(0.4 + 0.1 * 7)
    for step in (100, 101, 10_000):
        assert jac_weight(step, 20, cfg) == 0.0
    # a stop inside pretraining ends the pretraining weight too
    cfg = experiment(pretrain_jac_loss_weight=0.5, jac_loss_weight=0.4, jac_stop_step=10)
    assert jac_weight(9, 100, cfg) == 0.5
    assert jac_weight(10, 100, cfg) == 0.0
    assert jac_weight(150, 100, cfg) == 0.0


def test_jac_weight_without_increments_stays_put():
    cfg = experiment(jac_loss_weight=1.9, jac_incremental=0)
    assert {jac_weight(s, 10, cfg) for s in (10, 11, 1000, 35_000, 10**7)} == {1.9}
    assert jac_weight(5, 10, cfg) == 0.0  # pretraining weight defaults to 0


def test_jac_weight_without_pretraining():
    cfg = experiment(jac_loss_weight=1.0, jac_incremental=3, pretrain_jac_loss_weight=0.7)
    assert [jac_weight(s, 0, cfg) for s in range(7)] == pytest.approx(
        [1.0, 1.0, 1.0, 1.1, 1.1, 1.1, 1.2]
    )


def test_jac_weight_of_the_wt103_recipe():
    from deqray.config import load_config

    cfg = load_config("wt103-deq-jac")
    pre = cfg.pretrain_steps()
    assert jac_weight(pre - 1, pre, cfg) == 0.0
    assert jac_weight(pre, pre, cfg) == pytest.approx(1.9)
    assert jac_weight(pre + 35_000 - 1, pre, cfg) == pytest.approx(1.9)
    assert jac_weight(pre + 35_000, pre, cfg) == pytest.approx(2.0)
    assert jac_weight(cfg.optim.steps - 1, pre, cfg) == pytest.approx(1.9 + 0.1 * 7)


# --------------------------------------------------------------------------- #
# which steps compute the Jacobian loss
# --------------------------------------------------------------------------- #


@pytest.mark.parametrize("freq", [0.02, 0.35, 0.5, 0.9])
def test_jac_this_step_frequency(freq):
    n = 20_000
    hits = sum(jac_this_step(step, 7, freq) for step in range(n))
    sigma = math.sqrt(n * freq * (1 - freq))
    assert abs(hits - n * freq) < 5 * sigma, (hits, n * freq, sigma)


def test_jac_this_step_is_a_function_of_seed_and_step():
    steps = range(2000)
    a = [jac_this_step(s, 3, 0.35) for s in steps]
    assert a == [jac_this_step(s, 3, 0.35) for s in steps]
    assert a == [jac_this_step(s, 3, 0.35) for s in reversed(steps)][::-1]  # order free
    # the global random state neither matters nor moves
    random.seed(123)
    before = random.getstate()
    assert a == [jac_this_step(s, 3, 0.35) for s in steps]
    assert random.getstate() == before
    # another seed, another sequence
    b = [jac_this_step(s, 4, 0.35) for s in steps]
    assert a != b
    agree = sum(x == y for x, y in zip(a, b, strict=True)) / len(a)
    assert agree == pytest.approx(0.35**2 + 0.65**2, abs=0.06)  # independent draws


def test_jac_this_step_edge_frequencies():
    assert not any(jac_this_step(s, 0, 0.0) for s in range(1000))
    assert all(jac_this_step(s, 0, 1.0) for s in range(1000))


def test_jac_this_step_is_the_same_in_another_process():
    """Every rank is a separate process with its own PYTHONHASHSEED: the draws must agree."""
    here = [jac_this_step(s, 11, 0.35) for s in range(300)]
    code = (
        "import json; from deqray.train.state import jac_this_step; "
        "print(json.dumps([jac_this_step(s, 11, 0.35) for s in range(300)]))"
    )
    env = {**os.environ, "PYTHONHASHSEED": "12345"}
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120
    )
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout) == here


# --------------------------------------------------------------------------- #
# RNG state and checkpoints
# --------------------------------------------------------------------------- #


def draw():
    return torch.rand(4).tolist(), np.random.rand(4).tolist(), [random.random() for _ in range(4)]


def test_rng_state_round_trip():
    torch.manual_seed(5)
    np.random.seed(5)
    random.seed(5)
    state = rng_state()
    assert {"python", "numpy", "torch"} <= set(state)
    first = draw()
    assert draw() != first  # the generators moved on
    set_rng_state(state)
    assert draw() == first


class Wrapped(nn.Module):
    """What DDP looks like from outside: the model under `.module`."""

    def __init__(self, module: nn.Module):
        super().__init__()
        self.module = module


def small_model(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.Tanh(), nn.Linear(8, 2))


def train_step(model, opt, sched, seed):
    g = torch.Generator().manual_seed(seed)
    x, y = torch.randn(6, 4, generator=g), torch.randn(6, 2, generator=g)
    opt.zero_grad()
    loss = ((model(x) - y) ** 2).mean()
    loss.backward()
    opt.step()
    sched.step()
    return float(loss.detach())


OPTIM = Optim(name="adam", lr=1e-2, warmup_steps=2, min_lr=1e-4, steps=20)


def fresh(seed: int):
    model = small_model(seed)
    opt = make_optimizer(model.parameters(), OPTIM)
    sched = make_scheduler(opt, OPTIM, 20)
    return model, opt, sched


def state_tensors(opt) -> list[torch.Tensor]:
    return [t for s in opt.state_dict()["state"].values() for t in s.values()]


def test_checkpoint_round_trip(tmp_path):
    model, opt, sched = fresh(0)
    for k in range(3):
        train_step(model, opt, sched, k)
    progress = Progress(step=3, epoch=1, batch_in_epoch=2, bad_evals=1, best={"loss": 0.5})

    # two fake ranks, each with its own RNG streams and Transformer-XL memory
    rngs, draws = [], []
    for rank in range(2):
        torch.manual_seed(100 + rank)
        np.random.seed(100 + rank)
        random.seed(100 + rank)
        rngs.append(rng_state())
        draws.append(draw())
    mems = [tuple(torch.randn(3, 2, 4) for _ in range(2)) for _ in range(2)]
    per_rank = [{"rng": rngs[r], "state": mems[r]} for r in range(2)]
    config = {"optim": dataclasses.asdict(OPTIM)}
    save_state(
        str(tmp_path),
        model=Wrapped(model),  # saved without the wrapper's "module." prefix
        optimizer=opt,
        scheduler=sched,
        progress=progress,
        per_rank=per_rank,
        config=config,
    )
    assert (tmp_path / STATE_FILE).is_file()

    model2, opt2, sched2 = fresh(1)
    assert not torch.equal(model2[0].weight, model[0].weight)
    got_progress, mine = load_state(
        str(tmp_path), model=model2, optimizer=opt2, scheduler=sched2, rank=1, device="cpu"
    )

    for (k1, a), (k2, b) in zip(
        model.state_dict().items(), model2.state_dict().items(), strict=True
    ):
        assert k1 == k2 and torch.equal(a, b), k1  # parameters and BatchNorm buffers
    assert len(state_tensors(opt)) > 0
    for a, b in zip(state_tensors(opt), state_tensors(opt2), strict=True):
        assert torch.equal(a, b)
    assert opt2.param_groups[0]["lr"] == opt.param_groups[0]["lr"]
    assert sched2.last_epoch == sched.last_epoch == 3
    assert got_progress == progress
    assert len(mine["state"]) == 2
    for a, b in zip(mine["state"], mems[1], strict=True):
        assert torch.equal(a, b)

    # rank 1's RNG streams continue where they were when its state was taken
    set_rng_state(mine["rng"])
    assert draw() == draws[1]

    # and the run continues on the same trajectory: same losses, rates, weights
    for k in range(3, 6):
        assert train_step(model2, opt2, sched2, k) == train_step(model, opt, sched, k)
        assert opt2.param_groups[0]["lr"] == opt.param_groups[0]["lr"]
    for a, b in zip(model.parameters(), model2.parameters(), strict=True):
        assert torch.equal(a, b)


def test_checkpoint_rank_zero_and_no_task_state(tmp_path):
    model, opt, sched = fresh(0)
    train_step(model, opt, sched, 0)
    save_state(
        str(tmp_path),
        model=model,
        optimizer=opt,
        scheduler=sched,
        progress=Progress(step=1),
        per_rank=[{"rng": rng_state(), "state": None}],
        config={},
    )
    model2, opt2, sched2 = fresh(1)
    progress, mine = load_state(
        str(tmp_path), model=Wrapped(model2), optimizer=opt2, scheduler=sched2, rank=0, device="cpu"
    )
    assert progress == Progress(step=1)
    assert mine["state"] is None
    assert torch.equal(model2[0].weight, model[0].weight)


def test_checkpoint_from_fewer_workers_fails_clearly(tmp_path):
    model, opt, sched = fresh(0)
    train_step(model, opt, sched, 0)
    save_state(
        str(tmp_path),
        model=model,
        optimizer=opt,
        scheduler=sched,
        progress=Progress(step=1),
        per_rank=[{"rng": rng_state(), "state": None} for _ in range(2)],
        config={},
    )
    model2, opt2, sched2 = fresh(1)
    with pytest.raises(RuntimeError) as e:
        load_state(
            str(tmp_path), model=model2, optimizer=opt2, scheduler=sched2, rank=2, device="cpu"
        )
    message = str(e.value)
    assert "2 workers" in message and "rank 2" in message and str(tmp_path) in message


class _RunsCode:
    """Unpickling this runs a shell command: what a planted checkpoint would do."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        import os

        return (os.system, (f"touch {self.marker}",))


def test_a_checkpoint_that_would_run_code_is_refused(tmp_path):
    from deqray.train.state import CheckpointError

    marker = tmp_path / "ran"
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    torch.save({"model": {}, "progress": _RunsCode(str(marker))}, ckpt / STATE_FILE)
    model, opt, sched = fresh(0)
    with pytest.raises(CheckpointError) as e:
        load_state(str(ckpt), model=model, optimizer=opt, scheduler=sched, rank=0, device="cpu")
    message = str(e.value)
    assert str(ckpt / STATE_FILE) in message and "refused" in message
    assert "posix.system" in message or "os.system" in message  # names what it would call
    assert not marker.exists()  # nothing ran
    with pytest.raises(CheckpointError, match="no such checkpoint file"):
        load_state(str(tmp_path), model=model, optimizer=opt, scheduler=sched, rank=0, device="cpu")
