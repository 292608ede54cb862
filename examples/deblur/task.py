"""A task deqray does not ship: deblurring 1-D signals with a DEQ (a small inverse problem).

The data are generated: piecewise-constant signals x in [0, 1]^n, blurred by
a known Gaussian kernel A (circular) plus noise, y = A x + s e. The DEQ is a
learned proximal-gradient iteration whose fixed point is the reconstruction:

    z* = f(z*, y),   f(z, y) = z - eta (A^T (A z - y) + lam z + R(z))

with R a small learned convolutional regulariser (weight-normed) and lam a
learned Tikhonov weight. The loss is the mean squared error to the clean x;
the task reports `mse` (primary) and `psnr` (peak 1).

    deqray train examples/deblur/experiment.yaml          # from the project root
    deqray tune examples/deblur/study.yaml

Everything deqray needs is in this file: `DeblurTask` (the `deqray.tasks.Task`
interface), its data section, its model config and its model.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import numpy as np
import torch
from torch import nn

from deqray.config import ConfigError, DataSection, parse_section
from deqray.core import DEQ, DEQConfig, apply_weight_norm
from deqray.tasks import Batching, DataPlan, EvalOutput, Metric, RunContext, StepOutput, Task

# ----------------------------------------------------------------------- the data


@dataclass
class DeblurData(DataSection):
    owner: ClassVar[str] = "examples.deblur.task:DeblurTask"

    source: str = "generated"  # the only source: signals made from the seed below
    length: int = 32  # samples per signal
    blur: float = 1.5  # standard deviation of the Gaussian kernel, in samples
    noise: float = 0.01  # standard deviation of the observation noise
    train_size: int = 2048
    eval_size: int = 512
    seed: int = 0


def blur_matrix(length: int, sigma: float) -> torch.Tensor:
    """The circular Gaussian blur A (rows sum to 1, so ||A||_2 <= 1)."""
    d = torch.arange(length, dtype=torch.float64)
    dist = torch.minimum(d, length - d)
    kernel = torch.exp(-0.5 * (dist / sigma) ** 2)
    kernel = kernel / kernel.sum()
    return torch.stack([torch.roll(kernel, i) for i in range(length)]).float()


def make_signals(d: DeblurData, n: int, seed: int) -> dict[str, np.ndarray]:
    """n clean signals (2 to 5 constant pieces each) and their blurred, noisy observations."""
    rng = np.random.default_rng(seed)
    x = np.empty((n, d.length), np.float32)
    for i in range(n):
        cuts = np.sort(rng.choice(np.arange(1, d.length), rng.integers(1, 5), replace=False))
        levels = rng.uniform(0, 1, len(cuts) + 1)
        x[i] = np.repeat(levels, np.diff([0, *cuts, d.length]))
    A = blur_matrix(d.length, d.blur).numpy()
    y = x @ A.T + d.noise * rng.standard_normal(x.shape).astype(np.float32)
    return {"x": x, "y": y.astype(np.float32)}


# ---------------------------------------------------------------------- the model


@dataclass
class DeblurModel:
    channels: int = 16  # width of the learned regulariser
    kernel: int = 5  # its convolution kernel
    step: float = 0.9  # eta
    tikhonov: float = 0.1  # initial lam
    length: int = 32  # filled in from the data
    blur: float = 1.5  # filled in from the data
    deq: dict | None = None  # DEQConfig settings (the experiment's deq section)

    def build(self) -> nn.Module:
        return DeblurDEQ(self)


class Step(nn.Module):
    """f(z, y): one proximal-gradient step with the learned regulariser."""

    def __init__(self, cfg: DeblurModel):
        super().__init__()
        self.register_buffer("A", blur_matrix(cfg.length, cfg.blur))
        pad = cfg.kernel // 2
        self.reg = nn.Sequential(
            nn.Conv1d(1, cfg.channels, cfg.kernel, padding=pad, padding_mode="circular"),
            nn.Tanh(),
            nn.Conv1d(cfg.channels, 1, cfg.kernel, padding=pad, padding_mode="circular"),
        )
        nn.init.normal_(self.reg[2].weight, std=1e-3)
        apply_weight_norm(self)
        self.log_lam = nn.Parameter(torch.tensor(math.log(cfg.tikhonov)))
        self.step = cfg.step

    def forward(self, z: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        residual = (z @ self.A.T - y) @ self.A  # A^T (A z - y), rows of a batch
        r = self.reg(z[:, None, :])[:, 0, :]
        return z - self.step * (residual + self.log_lam.exp() * z + r)


class DeblurDEQ(nn.Module):
    def __init__(self, cfg: DeblurModel):
        super().__init__()
        self.config = cfg
        self.deq = DEQ(Step(cfg), DEQConfig.build(cfg.deq or {}, where="deq"))

    def forward(self, y, *, pretrain=False, jac_loss=False, sradius=False, f_thres=None):
        z0 = y @ self.deq.f.A  # A^T y: the back-projection as the first guess
        return self.deq(
            y, z0, pretrain=pretrain, jac_loss=jac_loss, sradius=sradius, f_thres=f_thres
        )


# ----------------------------------------------------------------------- the task


class DeblurTask(Task):
    name = "deblur"
    unit = "signal"
    data_section = DeblurData
    # solver settings of this task, under the experiment's deq section
    DEQ_DEFAULTS: ClassVar[dict] = {"f_solver": "anderson", "f_thres": 30, "b_thres": 30}

    def model_config(self, exp) -> DeblurModel:
        spec = dict(exp.model or {})
        cfg = parse_section(DeblurModel, spec, "model")
        cfg.deq = {**self.DEQ_DEFAULTS, **exp.deq}
        DEQConfig.build(cfg.deq, where="deq")
        if cfg.channels < 1 or cfg.kernel < 1 or cfg.kernel % 2 == 0:
            raise ConfigError("model.kernel: must be an odd number >= 1 (and channels >= 1)")
        if not 0 < cfg.step <= 1:
            raise ConfigError(f"model.step: must be in (0, 1], got {cfg.step}")
        return cfg

    def metrics(self, exp) -> list[Metric]:
        return [
            Metric("mse", "min", "mean squared error of the reconstruction"),
            Metric("psnr", "max", "peak signal-to-noise ratio (dB, peak 1)"),
            Metric("signals", None, "signals scored"),
        ]

    def check(self, exp) -> None:
        d = exp.data
        if d.source != "generated":
            raise ConfigError(
                f"data.source: this task generates its data: use 'generated', got {d.source!r}"
            )
        if d.length < 4 or d.train_size < 1 or d.eval_size < 1 or d.blur <= 0 or d.noise < 0:
            raise ConfigError("data.length: need length >= 4, sizes >= 1, blur > 0, noise >= 0")

    def plan(self, exp, batching: Batching) -> DataPlan:
        d = exp.data
        steps = (d.train_size // batching.workers) // batching.batch_per_worker
        if steps < 1:
            raise ConfigError(f"optim.batch_size: larger than data.train_size={d.train_size}")
        model = self.model_config(exp)
        model.length, model.blur = d.length, d.blur
        return DataPlan(
            model=model,
            train_split="train",
            eval_split="eval",
            steps_per_epoch=steps,
            items_per_step=exp.optim.batch_size,
        )

    def datasets(self, run: RunContext):
        import ray.data
        from ray.data import ExecutionOptions
        from ray.train import DataConfig

        d = run.experiment.data
        out = {}
        for split, n, seed in (("train", d.train_size, d.seed), ("eval", d.eval_size, d.seed + 1)):
            arrays = make_signals(d, n, seed)
            out[split] = ray.data.from_numpy(np.stack([arrays["x"], arrays["y"]], axis=1))
        if run.eval_batches is not None:  # a split iterator is read to its end: cap the data
            per_eval = run.eval_batches * run.batching.eval_batch_per_worker * run.batching.workers
            out["eval"] = out["eval"].limit(per_eval)
        order = ExecutionOptions()
        order.preserve_order = True  # the same batches after a resume
        return out, DataConfig(datasets_to_split=["train", "eval"], execution_options=order)

    def train_batches(self, shard, run: RunContext, device):
        for b in shard.iter_torch_batches(
            batch_size=run.batching.batch_per_worker, drop_last=True, device=device
        ):
            yield b["data"][:, 0], b["data"][:, 1]  # clean x, observed y

    def eval_batches(self, shard, run: RunContext, device):
        for b in shard.iter_torch_batches(
            batch_size=run.batching.eval_batch_per_worker, device=device
        ):
            yield b["data"][:, 0], b["data"][:, 1]

    def loss(self, model, batch, state, *, pretrain: bool, jac_loss: bool) -> StepOutput:
        x, y = batch
        x_hat, info = model(y, pretrain=pretrain, jac_loss=jac_loss)
        return StepOutput(nn.functional.mse_loss(x_hat, x), info, x.shape[0])

    def eval_step(self, model, batch, state, *, sradius: bool) -> EvalOutput:
        x, y = batch
        x_hat, info = model(y, sradius=sradius)
        err = float(((x_hat - x) ** 2).sum())
        return EvalOutput(
            {"sq_err": err, "values": float(x.numel()), "signals": float(len(x))}, info
        )

    def summarize(self, sums) -> dict[str, float]:
        n = float(sums.get("values", 0.0))
        if n <= 0:
            return {"signals": 0.0}
        mse = float(sums["sq_err"]) / n
        psnr = 10 * math.log10(1 / mse) if mse > 0 else math.inf
        return {"mse": mse, "psnr": psnr, "signals": float(sums["signals"])}
