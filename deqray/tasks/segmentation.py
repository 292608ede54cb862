"""Semantic segmentation with MDEQ: per-pixel classes, the ignore label, mIoU.

Metrics: `miou` (mean over the classes present of TP / (TP + FP + FN), from
the confusion matrix summed over every batch and rank: torchmetrics'
MulticlassJaccardIndex, the ignore label left out; primary, higher is better),
`pixel_acc`, `loss` (mean cross-entropy per labelled pixel), `pixels`, and
`iou_<class>` for each class (NaN for a class in neither target nor prediction).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, ClassVar

import torch

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


@dataclass
class SegmentationData(DataSection):
    owner: ClassVar[str] = "segmentation"

    source: str = "shapes"
    # Training augmentation (default: the data set's, recorded in its manifest;
    # Cityscapes: the reference's): the long side scaled to base_size x s, s from
    # `scales`, then a random crop [H, W] (padded with the ignore label), a flip.
    crop_size: list[int] | None = None
    base_size: int | None = None
    scales: list[float] | None = None
    flip: float | None = None
    eval_size: list[int] | None = None  # [H, W] evaluation (default: the manifest's size)
    augment: bool = True
    shuffle: bool = True
    deterministic: bool = False  # no augmentation or shuffling, ordered decoding
    decode_actors: int = 1  # Ray tasks at once decoding a split (deqray.data.segmentation)
    decode_cpus: float = 0.25  # CPUs per decode task


@dataclass(frozen=True)
class SegmentationDetails:
    image_size: tuple[int, int]
    num_classes: int
    ignore_index: int
    classes: list[str]
    rows: dict[str, int]


class Segmentation(Task):
    name = "segmentation"
    unit = "img"
    model_selectors: ClassVar[dict[str, type]] = _presets.SELECTORS
    data_section = SegmentationData
    embedded: ClassVar[dict[str, str]] = {"shapes": "deqray.data.shapes:write_shapes"}

    # ---- driver ------------------------------------------------------------------------ #

    @staticmethod
    def accepts_model(model: Any) -> bool:
        return _presets.accepts(model, "mdeq", "segmentation")

    def model_config(self, exp):
        return _presets.preset_model(
            exp, "mdeq", self.name, "segmentation", default="mdeq-cityscapes-small"
        )

    def metrics(self, exp) -> list[Metric]:
        classes = exp.model_config().num_classes  # the data's count replaces the model's
        return [
            Metric("miou", "max", "mean intersection over union of the classes present"),
            Metric("pixel_acc", "max", "accuracy over labelled pixels"),
            Metric("loss", "min", "mean cross-entropy per labelled pixel"),
            Metric("pixels", None, "labelled pixels scored"),
            *(Metric(f"iou_{c}", "max", f"IoU of class {c}") for c in range(classes)),
        ]

    def check(self, exp) -> None:
        d = exp.data
        _data.check_source(d, self.embedded, self.name)
        for key in ("crop_size", "eval_size"):
            v = getattr(d, key)
            if v is not None and (len(v) != 2 or min(v) < 1):
                raise ConfigError(f"data.{key}: expected [height, width] >= 1, got {v}")
        if d.decode_actors < 1:
            raise ConfigError(f"data.decode_actors: must be >= 1, got {d.decode_actors}")
        if d.flip is not None and not 0 <= d.flip <= 1:
            raise ConfigError(f"data.flip: a probability, got {d.flip}")

    def plan(self, exp, batching: Batching) -> DataPlan:
        from deqray.models import make_config

        manifest = _data.load_data(
            exp.data, self.embedded, "segmentation", verbose=exp.logging.progress
        )
        train, ev = _data.pick_splits(manifest, exp.data, ("val", "valid", "test"))
        meta = manifest.meta
        model = exp.model_config()
        changes = {"num_classes": int(meta.get("num_classes", model.num_classes))}
        changes["ignore_index"] = int(meta.get("ignore_index", model.ignore_index))
        if exp.data.crop_size is not None:
            changes["image_size"] = tuple(exp.data.crop_size)
        model = make_config(model, **changes)
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
            details=SegmentationDetails(
                tuple(model.image_size),
                model.num_classes,
                model.ignore_index,
                list(meta.get("classes", [])),
                {s: manifest.splits[s].rows for s in (train, ev)},
            ),
        )

    def datasets(self, run: RunContext):
        # the evaluation cap, small splits decoded once and the deterministic order: as
        # for classification (the reader applies the augmentation rules itself)
        from .image_classification import image_datasets

        return image_datasets(
            run,
            lambda run, augment, once: self._read(
                run, [run.train_split, run.eval_split], decode_once=once
            ),
        )

    def _read(
        self,
        run: RunContext,
        splits: list[str],
        train_split: str | None = None,
        decode_once: list[str] | None = None,
    ):
        from deqray.data.segmentation import segmentation_datasets

        d = run.experiment.data
        return segmentation_datasets(
            run.plan.root,
            splits=splits,
            train_split=train_split or run.train_split,
            augment=d.augment,
            deterministic=d.deterministic,
            crop_size=d.crop_size,
            base_size=d.base_size,
            scales=d.scales,
            flip=d.flip,
            eval_size=d.eval_size,
            actors=d.decode_actors,
            actor_cpus=d.decode_cpus,
            shuffle=d.shuffle,
            seed=run.experiment.train.seed,
            decode_once=decode_once or (),
        )

    def split_batches(self, run: RunContext, split: str, device):
        """The whole split at the evaluation resolution (never the training augmentation)."""
        ds = self._read(run, [split], train_split="(none: every split evaluated)")[split]
        return self.eval_batches(ds, run, device)

    def count_batches(self, run: RunContext, split: str) -> int | None:
        from deqray.data import load_manifest

        rows = load_manifest(run.plan.root).splits[split].rows
        return -(-rows // run.batching.eval_batch_per_worker)

    # ---- worker ------------------------------------------------------------------------ #

    def train_batches(self, shard, run: RunContext, device):
        for b in shard.iter_torch_batches(
            batch_size=run.batching.batch_per_worker, drop_last=True, device=device
        ):
            yield b["image"], b["mask"].long()

    def eval_batches(self, shard, run: RunContext, device):
        for b in shard.iter_torch_batches(
            batch_size=run.batching.eval_batch_per_worker, device=device
        ):
            yield b["image"], b["mask"].long()

    def loss(self, model, batch, state, *, pretrain: bool, jac_loss: bool) -> StepOutput:
        images, masks = batch
        logits, info = model(images, pretrain=pretrain, jac_loss=jac_loss)
        net = model.module if hasattr(model, "module") else model
        return StepOutput(net.loss(logits, masks), info, images.shape[0])

    curve_from_one_solve = True

    def eval_curve_step(self, model, batch, state, budgets) -> dict[int, EvalOutput]:
        images, masks = batch
        by_budget, info = model.snapshot_logits(images, budgets)
        return {
            k: self._scored(model, logits.float(), masks, snapshot_info(info.snapshots[k]))
            for k, logits in by_budget.items()
        }

    def eval_step(self, model, batch, state, *, sradius: bool) -> EvalOutput:
        images, masks = batch
        logits, info = model(images, sradius=sradius)
        return self._scored(model, logits.float(), masks, info)

    def eval_metrics(self, model) -> dict:
        from torchmetrics.classification import MulticlassAccuracy, MulticlassJaccardIndex

        from .metrics import mean_metric

        c, ignore = model.config.num_classes, model.config.ignore_index
        checked = {"ignore_index": ignore, "validate_args": False}  # _scored checks the labels
        return {
            # a class absent from both target and prediction has no IoU (0/0): NaN,
            # and the macro average leaves it out
            "iou": MulticlassJaccardIndex(c, average="none", zero_division=math.nan, **checked),
            "miou": MulticlassJaccardIndex(c, average="macro", **checked),
            "pixel_acc": MulticlassAccuracy(c, average="micro", **checked),
            "loss": mean_metric(),  # per labelled pixel
        }

    @staticmethod
    def _scored(model, logits, masks, info) -> EvalOutput:
        c, ignore = logits.shape[1], model.config.ignore_index
        labelled = masks != ignore
        # torchmetrics only counts the distinct labels, and a wrong num_classes would skew mIoU
        bad = labelled & ((masks < 0) | (masks >= c))
        if bool(bad.any()):
            raise ValueError(
                f"target has class {int(masks[bad][0])} outside [0, {c}) (ignore_index={ignore})"
            )
        valid = labelled.sum()
        # a batch without a labelled pixel has a NaN mean loss: it weighs 0, and adds 0
        loss = torch.where(valid > 0, model.loss(logits, masks), 0.0)
        scored = (logits.argmax(1), masks)
        updates = {"iou": scored, "miou": scored, "pixel_acc": scored, "loss": (loss, valid)}
        return EvalOutput({"pixels": valid}, info, updates=updates)

    def summarize(self, sums) -> dict[str, float]:
        n = float(sums.get("pixels", 0.0))
        if n <= 0:
            return {"pixels": n}
        out = {k: sums[k] for k in ("loss", "pixel_acc", "miou")}
        out["pixels"] = n
        for c, v in enumerate(sums["iou"].tolist()):
            out[f"iou_{c}"] = v
        return out
