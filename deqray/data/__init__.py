"""deqray.data: raw data -> parquet shards (Ray Data) -> training workers.

Preprocessing writes a directory of parquet shards and a `manifest.json`
(see `manifest`); readers turn a manifest directory into Ray Datasets for
`TorchTrainer(datasets=...)`. Embedded data sets need no download.

`preprocess(dataset, src, out, **options)` runs one of PREPROCESSORS.
"""

from __future__ import annotations

import importlib
import inspect

from ._fs import DataError, Location, locate
from .manifest import Manifest, Shard, Split, load_manifest, prepare_output, write_manifest

# name -> "module:function"; each function is
#   fn(src: str | None, out: str, *, overwrite=False, strict=False, **options) -> Manifest
PREPROCESSORS = {
    "wikitext-103": "deqray.data.wikitext:preprocess_wikitext",
    "wikitext-2": "deqray.data.wikitext:preprocess_wikitext",
    "markov": "deqray.data.markov:write_markov_corpus",
    "imagenet": "deqray.data.images:preprocess_imagenet",
    "cifar10": "deqray.data.images:preprocess_cifar10",
    "digits": "deqray.data.digits:write_digits",
    "cityscapes": "deqray.data.cityscapes:preprocess_cityscapes",
    "shapes": "deqray.data.shapes:write_shapes",
}


def resolve(dataset: str, options: dict):
    """The preprocessing function for `dataset`, after checking `options` against it."""
    from deqray.core._errors import suggest

    if dataset not in PREPROCESSORS:
        raise DataError(
            f"unknown data set {dataset!r}{suggest(dataset, PREPROCESSORS)}; "
            f"known: {', '.join(PREPROCESSORS)}"
        )
    module, fn = PREPROCESSORS[dataset].split(":")
    func = getattr(importlib.import_module(module), fn)
    valid = [
        p.name for p in inspect.signature(func).parameters.values() if p.kind is p.KEYWORD_ONLY
    ]
    for key in options:
        if key not in valid:
            raise DataError(
                f"{dataset}: unknown option {key!r}{suggest(key, valid)}; "
                f"options: {', '.join(valid)}"
            )
    return func


def preprocess(dataset: str, src: str | None, out: str, **options) -> Manifest:
    if dataset.startswith("wikitext"):
        options.setdefault("name", dataset)
    return resolve(dataset, options)(src, out, **options)


def __getattr__(name: str):
    # readers import Ray: load them on first use, so `import deqray.data` stays light
    lazy = {
        "lm_ingest": "lm",
        "lm_datasets": "lm",
        "LMDataConfig": "lm",
        "LMBatch": "lm",
        "iter_lm_batches": "lm",
        "load_vocab": "wikitext",
        "vision_datasets": "vision",
        "vision_data_config": "vision",
        "segmentation_datasets": "segmentation",
        "segmentation_data_config": "segmentation",
    }
    if name in lazy:
        return getattr(importlib.import_module(f"deqray.data.{lazy[name]}"), name)
    raise AttributeError(f"module 'deqray.data' has no attribute {name!r}")


__all__ = [
    "DataError",
    "Location",
    "Manifest",
    "PREPROCESSORS",
    "Shard",
    "Split",
    "load_manifest",
    "locate",
    "prepare_output",
    "preprocess",
    "resolve",
    "write_manifest",
]
