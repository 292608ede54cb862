"""Image classification with MDEQ: decoded and augmented images, top-1 and top-5 accuracy.

Images are decoded (and the training split augmented) by Ray Data actors
(deqray.data.vision); the training split is divided among the workers, and so
is the evaluation split. Small splits that are the same on every pass (the
evaluation split; the training split without augmentation) are decoded once
by the driver, because every pass would otherwise start its decode actors
afresh (seconds each: they import torch).

Metrics: `acc` (top-1 accuracy; primary, higher is better), `top5` (with 5
classes or more), `loss` (mean cross-entropy per image), `images`.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any, ClassVar

from deqray.config import ConfigError, DataSection

from . import _data, _presets
from .base import (
    Batching,
    DataPlan,
    EvalOutput,
    Metric,
    RunContext,
    StepOutput,
    Task,
    snapshot_info,
)

MATERIALIZE_BYTES = 256 << 20  # decoded image splits up to this size are decoded once


@dataclass
class ImageData(DataSection):
    owner: ClassVar[str] = "image_classification"

    source: str = "digits"
    image_size: int | None = None  # training crop (default: the model's image_size)
    augment: bool = True  # random-resized crop and flip on the training split
    shuffle: bool = True  # random block order per epoch
    # Same batches in the same order on every run (no shuffle or augmentation,
    # ordered decoding): what bitwise resume checks need.
    deterministic: bool = False
    decode_actors: int = 1  # Ray tasks at once decoding a split decoded once
    decode_cpus: float = 0.25  # CPUs per decode task


@dataclass(frozen=True)
class ImageDetails:
    image_size: tuple[int, int]
    num_classes: int
    rows: dict[str, int]  # images per split


class ImageClassification(Task):
    name = "image_classification"
    unit = "img"
    model_selectors: ClassVar[dict[str, type]] = _presets.SELECTORS
    data_section = ImageData
    embedded: ClassVar[dict[str, str]] = {"digits": "deqray.data.digits:write_digits"}

    # ---- driver ------------------------------------------------------------------------ #

    @staticmethod
    def accepts_model(model: Any) -> bool:
        return _presets.accepts(model, "mdeq", "classification")

    def model_config(self, exp):
        return _presets.preset_model(
            exp, "mdeq", self.name, "classification", default="mdeq-cifar-tiny"
        )

    def metrics(self, exp) -> list[Metric]:
        out = [Metric("acc", "max", "top-1 accuracy")]
        if exp.model_config().num_classes >= 5:
            out.append(Metric("top5", "max", "top-5 accuracy"))
        out += [
            Metric("loss", "min", "mean cross-entropy per image"),
            Metric("images", None, "images scored"),
        ]
        return out

    def check(self, exp) -> None:
        d = exp.data
        _data.check_source(d, self.embedded, self.name)
        for key in ("image_size", "decode_actors"):
            v = getattr(d, key)
            if v is not None and v < 1:
                raise ConfigError(f"data.{key}: must be >= 1, got {v}")
        if d.decode_cpus <= 0:
            raise ConfigError(f"data.decode_cpus: must be > 0, got {d.decode_cpus}")

    def plan(self, exp, batching: Batching) -> DataPlan:
        from deqray.models import make_config

        manifest = _data.load_data(exp.data, self.embedded, "vision", verbose=exp.logging.progress)
        train, ev = _data.pick_splits(manifest, exp.data, ("test", "val", "valid"))
        changes: dict[str, Any] = {}
        classes = int(manifest.meta.get("num_classes", 0))
        if classes:
            changes["num_classes"] = classes
        if exp.data.image_size is not None:
            changes["image_size"] = (exp.data.image_size, exp.data.image_size)
        model = make_config(exp.model_config(), **changes) if changes else exp.model_config()
        rows = manifest.splits[train].rows
        steps = (rows // batching.workers) // batching.batch_per_worker
        if steps < 1:
            raise ConfigError(
                f"optim.batch_size: {exp.optim.batch_size} is larger than the "
                f"{rows}-image training split"
            )
        return DataPlan(
            model=model,
            train_split=train,
            eval_split=ev,
            steps_per_epoch=steps,
            items_per_step=exp.optim.batch_size,
            root=manifest.root,
            details=ImageDetails(
                tuple(model.image_size),
                model.num_classes,
                {s: manifest.splits[s].rows for s in (train, ev)},
            ),
        )

    def datasets(self, run: RunContext):
        return image_datasets(run, self._read)

    def _read(self, run: RunContext, augment: bool, once: list[str]):
        from deqray.data.vision import decoded_by_tasks, vision_datasets

        d, exp = run.experiment.data, run.experiment
        aug: dict[str, Any] = (
            {} if augment else {"scale": (1.0, 1.0), "ratio": (1.0, 1.0), "flip": 0.0}
        )
        # Encoded: the workers decode and augment (no actors to start with each
        # epoch). A split decoded once (image_datasets keeps it) is decoded by
        # Ray tasks here, as uint8, and only normalised on the workers.
        datasets = vision_datasets(
            run.plan.root,
            splits=[run.train_split, run.eval_split],
            train_split=run.train_split,
            output="encoded",
            size=run.plan.details.image_size,
            shuffle=d.shuffle and not d.deterministic,
            seed=exp.train.seed,
            **aug,
        )
        for split, ds in datasets.items():
            if split in once:
                datasets[split] = decoded_by_tasks(
                    ds, tasks=d.decode_actors, task_cpus=d.decode_cpus
                )
        return datasets

    def split_batches(self, run: RunContext, split: str, device):
        """The whole split with the evaluation transform (never the training augmentation)."""
        from deqray.data.vision import vision_datasets

        ds = vision_datasets(
            run.plan.root,
            splits=[split],
            train_split="(none: every split evaluated)",  # no split gets the augmentation
            output="encoded",  # decoded in this process, by the iterator's threads
            size=run.plan.details.image_size,
            shuffle=False,
        )[split]
        return self.eval_batches(ds, run, device)

    def count_batches(self, run: RunContext, split: str) -> int | None:
        from deqray.data import load_manifest

        rows = load_manifest(run.plan.root).splits[split].rows
        return -(-rows // run.batching.eval_batch_per_worker)

    # ---- worker ------------------------------------------------------------------------ #

    def train_batches(self, shard, run: RunContext, device):
        from deqray.data.vision import vision_batches

        # decoded (or, when decoded once, only normalised) on this worker and its device
        for b in vision_batches(
            shard, batch_size=run.batching.batch_per_worker, drop_last=True, device=device
        ):
            yield b["image"], b["label"]

    def eval_batches(self, shard, run: RunContext, device):
        from deqray.data.vision import vision_batches

        # capped on the data side (image_datasets): a split iterator is read to its end
        for b in vision_batches(
            shard, batch_size=run.batching.eval_batch_per_worker, device=device
        ):
            yield b["image"], b["label"]

    def loss(self, model, batch, state, *, pretrain: bool, jac_loss: bool) -> StepOutput:
        images, labels = batch
        logits, info = model(images, pretrain=pretrain, jac_loss=jac_loss)
        return StepOutput(_unwrap(model).loss(logits, labels), info, images.shape[0])

    curve_from_one_solve = True

    def eval_curve_step(self, model, batch, state, budgets) -> dict[int, EvalOutput]:
        images, labels = batch
        by_budget, info = model.snapshot_logits(images, budgets)
        return {
            k: self._scored(model, logits.float(), labels, snapshot_info(info.snapshots[k]))
            for k, logits in by_budget.items()
        }

    def eval_step(self, model, batch, state, *, sradius: bool) -> EvalOutput:
        images, labels = batch
        logits, info = model(images, sradius=sradius)
        out = self._scored(model, logits.float(), labels, info)
        out.extra["logits"] = logits.float()
        return out

    def eval_metrics(self, model) -> dict:
        from torchmetrics.classification import MulticlassAccuracy

        from .metrics import mean_metric

        classes = _unwrap(model).config.num_classes
        out = {
            "acc": MulticlassAccuracy(classes, top_k=1, average="micro"),
            "loss": mean_metric(),  # per image: each batch's mean weighted by its size
        }
        if classes >= 5:
            out["top5"] = MulticlassAccuracy(classes, top_k=5, average="micro")
        return out

    @staticmethod
    def _scored(model, logits, labels, info) -> EvalOutput:
        scored = (logits, labels)
        updates = {"acc": scored, "loss": (model.loss(logits, labels), float(labels.shape[0]))}
        if logits.shape[1] >= 5:
            updates["top5"] = scored
        return EvalOutput({"images": float(labels.shape[0])}, info, updates=updates)

    def summarize(self, sums) -> dict[str, float]:
        n = float(sums.get("images", 0.0))
        if n <= 0:
            return {"images": n}
        out = {"loss": sums["loss"], "acc": sums["acc"], "images": n}
        if "top5" in sums:
            out["top5"] = sums["top5"]
        return out


def image_datasets(run: RunContext, read) -> tuple[dict[str, Any], Any]:
    """(datasets, DataConfig) of an image task: `read(run, augment, once)` builds the Ray
    Datasets, those of the splits in `once` to be decoded once (by tasks); the evaluation
    cap, keeping those splits decoded and the deterministic order are added here."""
    from ray.data import DataContext, ExecutionOptions
    from ray.train import DataConfig

    d = run.experiment.data
    train, ev = run.train_split, run.eval_split
    augment = d.augment and not d.deterministic
    # Datasets keep a copy of the context they were made in: no per-epoch
    # progress bars in the training log, without changing the caller's context.
    # With deterministic data, the splits decoded once below must also keep
    # the read order (a materialised split is executed here, not by Train).
    context = DataContext.get_current()
    saved = context.enable_progress_bars, context.execution_options
    context.enable_progress_bars = False
    if d.deterministic:
        context.execution_options = copy.deepcopy(saved[1])
        context.execution_options.preserve_order = True
    once = [s for s in (train, ev) if _decoded_once(run, s, augment)]
    try:
        datasets = read(run, augment, once)
    finally:
        context.enable_progress_bars, context.execution_options = saved
    if run.eval_batches is not None:
        # A split iterator must be read to its end: cap the data, not the loop.
        per_eval = run.eval_batches * run.batching.eval_batch_per_worker * run.batching.workers
        datasets[ev] = datasets[ev].limit(per_eval)
    if ev in once:
        datasets[ev] = datasets[ev].materialize()
    if train in once:
        datasets[train] = datasets[train].materialize()
        if d.shuffle and not d.deterministic:
            datasets[train] = datasets[train].randomize_block_order()
    options = None
    if d.deterministic:
        options = ExecutionOptions()
        options.preserve_order = True
    return datasets, DataConfig(datasets_to_split=[train, ev], execution_options=options)


def _decoded_once(run: RunContext, split: str, augment: bool) -> bool:
    """A split that is the same on every pass and small enough to keep decoded (as float32)."""
    if split == run.train_split and augment:
        return False
    h, w = run.plan.details.image_size
    return run.plan.details.rows[split] * 3 * h * w * 4 <= MATERIALIZE_BYTES


def _unwrap(model):
    return model.module if hasattr(model, "module") else model
