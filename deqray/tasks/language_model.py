"""Language modelling with the DEQ-Transformer: ordered token lanes, segment memory, perplexity.

Each worker reads its own lanes of the token stream (deqray.data.lm), so row b
of a batch continues row b of the one before and the Transformer-XL memory
(`mems`, this task's per-rank state) carries over from batch to batch; a new
pass over the stream starts without memory. The evaluation runs the split
the same way, at `data.eval_tgt_len`, its memory starting empty.

Metrics: `ppl` (exp of the mean NLL per token; primary, lower is better),
`loss` (the mean NLL per token), `tokens` (how many were scored).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, ClassVar

from deqray.config import ConfigError, DataSection

from . import _data, _presets
from .base import Batching, DataPlan, EvalOutput, Metric, RunContext, StepOutput, Task

_EXP_OVERFLOW = 700.0  # exp(709.8) overflows a float64


@dataclass
class LMData(DataSection):
    owner: ClassVar[str] = "language_model"

    source: str = "markov"
    tgt_len: int | None = None  # segment length (default: the model's tgt_len)
    eval_tgt_len: int | None = None  # evaluation segment length (default: tgt_len)
    read_cpus: float = 0.25  # CPUs per piece read (Ray Data tasks beside the workers)


@dataclass(frozen=True)
class LMDetails:
    tgt_len: int
    eval_tgt_len: int


class LanguageModel(Task):
    name = "language_model"
    unit = "tok"
    model_selectors: ClassVar[dict[str, type]] = _presets.SELECTORS
    data_section = LMData
    embedded: ClassVar[dict[str, str]] = {"markov": "deqray.data.markov:write_markov_corpus"}

    # ---- driver ------------------------------------------------------------------------ #

    @staticmethod
    def accepts_model(model: Any) -> bool:
        return _presets.accepts(model, "deq_transformer")

    def model_config(self, exp):
        return _presets.preset_model(
            exp, "deq_transformer", self.name, default="deq-transformer-tiny"
        )

    def metrics(self, exp) -> list[Metric]:
        return [
            Metric("ppl", "min", "perplexity: exp of the mean negative log-likelihood per token"),
            Metric("loss", "min", "mean negative log-likelihood per token (nats)"),
            Metric("tokens", None, "tokens scored"),
        ]

    def check(self, exp) -> None:
        d = exp.data
        _data.check_source(d, self.embedded, self.name)
        for key in ("tgt_len", "eval_tgt_len"):
            v = getattr(d, key)
            if v is not None and v < 1:
                raise ConfigError(f"data.{key}: must be >= 1, got {v}")
        if d.read_cpus < 0:
            raise ConfigError(f"data.read_cpus: must be >= 0, got {d.read_cpus}")

    def plan(self, exp, batching: Batching) -> DataPlan:
        from deqray.models import make_config

        manifest = _data.load_data(exp.data, self.embedded, "lm", verbose=exp.logging.progress)
        train, ev = _data.pick_splits(manifest, exp.data, ("valid", "test"))
        vocab = int(manifest.meta.get("vocab_size", 0))
        model = exp.model_config()
        cutoffs = list(getattr(model, "cutoffs", []) or [])
        if cutoffs and max(cutoffs) >= vocab:
            raise ConfigError(
                f"model.cutoffs: {cutoffs} do not fit the data's vocabulary of {vocab} "
                f"({manifest.root})"
            )
        model = make_config(model, vocab_size=vocab)
        tgt = exp.data.tgt_len or model.tgt_len
        W, B = batching.workers, batching.batch_per_worker
        tokens = manifest.splits[train].rows
        lane = (tokens - 1) // (W * B)
        if lane < 2:
            raise ConfigError(
                f"optim.batch_size: {exp.optim.batch_size} rows leave lanes of {lane} tokens in "
                f"the {tokens:,}-token training split"
            )
        return DataPlan(
            model=model,
            train_split=train,
            eval_split=ev,
            steps_per_epoch=math.ceil(lane / tgt),
            items_per_step=exp.optim.batch_size * tgt,
            root=manifest.root,
            details=LMDetails(tgt, exp.data.eval_tgt_len or tgt),
        )

    def datasets(self, run: RunContext):
        from deqray.data.lm import lm_ingest

        b = run.batching
        return lm_ingest(
            run.plan.root,
            {run.train_split: b.batch_per_worker, run.eval_split: b.eval_batch_per_worker},
            splits=(run.train_split, run.eval_split),
            read_cpus=run.experiment.data.read_cpus,
        )

    def split_batches(self, run: RunContext, split: str, device):
        """The split as `eval_batch_per_worker` lanes read in stream order by one process,
        in segments of `eval_tgt_len`: each lane's memory carries over the whole split."""
        from deqray.data.lm import LMDataConfig, iter_lm_batches

        b = run.batching.eval_batch_per_worker
        config = LMDataConfig(run.plan.root, {split: b}, splits=(split,), read_cpus=0.0)
        return iter_lm_batches(config.dataset(split), run.plan.details.eval_tgt_len, device=device)

    def count_batches(self, run: RunContext, split: str) -> int | None:
        from deqray.data import load_manifest

        tokens = load_manifest(run.plan.root).splits[split].rows
        lane = (tokens - 1) // run.batching.eval_batch_per_worker
        return math.ceil(lane / run.plan.details.eval_tgt_len)

    # ---- worker ------------------------------------------------------------------------ #

    def train_batches(self, shard, run: RunContext, device):
        from deqray.data.lm import iter_lm_batches

        return iter_lm_batches(shard, run.plan.details.tgt_len, device=device)

    def eval_batches(self, shard, run: RunContext, device):
        from deqray.data.lm import iter_lm_batches

        # The lanes of each worker are its own dataset (no streaming split), so
        # stopping early leaves no other rank waiting.
        limit = run.eval_batches
        for i, batch in enumerate(
            iter_lm_batches(shard, run.plan.details.eval_tgt_len, device=device)
        ):
            if limit is not None and i >= limit:
                return
            yield batch

    def loss(self, model, batch, state, *, pretrain: bool, jac_loss: bool) -> StepOutput:
        out = model(batch.tokens, batch.targets, state, pretrain=pretrain, jac_loss=jac_loss)
        return StepOutput(out.loss, out.info, batch.tokens.numel(), tuple(out.mems))

    def eval_metrics(self, model) -> dict:
        from .metrics import mean_metric

        # The adaptive softmax gives each token's NLL, not logits (torchmetrics'
        # Perplexity wants those): the mean NLL per token, and its exp
        return {"loss": mean_metric()}

    def eval_step(self, model, batch, state, *, sradius: bool) -> EvalOutput:
        out = model(batch.tokens, batch.targets, state, sradius=sradius)
        sums = {"tokens": float(batch.targets.numel())}
        return EvalOutput(sums, out.info, tuple(out.mems), updates={"loss": out.nll.detach()})

    def summarize(self, sums) -> dict[str, float]:
        n = float(sums.get("tokens", 0.0))
        if n <= 0:
            return {"tokens": n}
        loss = float(sums["loss"])
        return {
            "loss": loss,
            "ppl": math.inf if loss > _EXP_OVERFLOW else math.exp(loss),
            "tokens": n,
        }
