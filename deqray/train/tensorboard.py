"""Rank 0's TensorBoard event files, and the tags that group a run's metrics."""

from __future__ import annotations

import logging
import math
import numbers
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from deqray.data._fs import locate

log = logging.getLogger(__name__)

# TensorBoard folds tags by the part before "/": related curves sit together, and
# the solver curves of training and evaluation (val_ prefix kept) share a section.
_SOLVER = ("fwd_", "bwd_", "val_fwd_", "val_bwd_")
_JACOBIAN = ("jac", "sradius", "val_jac", "val_sradius")
_OPTIM = ("lr", "grad_norm")
_PERF = ("step_time", "items_per_s", "tokens_per_s", "images_per_s", "steps")
_STRIPPED = ("train_", "val_", "optim_", "perf_")
# Schedules that stay put for most of a run: a point when they change, not a flat
# card of one value per report.
ON_CHANGE = ("jac_loss_weight", "phase")
# A study's objectives, as their own group: TensorBoard orders groups by tag,
# code point by code point, so an upper-case name comes before every other group.
OBJECTIVES = "Objectives"


@dataclass
class TrialBoard:
    """What a study's trial adds to its TensorBoard run: the sampled values as
    HParams, and its objectives as the first group (`Objectives/<key>`)."""

    hparams: dict[str, float | int | str | bool] = field(default_factory=dict)
    objectives: list[str] = field(default_factory=list)

    def tag(self, key: str) -> str | None:
        return f"{OBJECTIVES}/{key}" if key in self.objectives else None


def tag_for(key: str, prefix_map: dict[str, str] | None = None) -> str:
    """TensorBoard tag of a metric key, first match wins.

    `prefix_map` {key prefix: group} (longest first), stripping the prefix:
    {"eval2_": "eval2"} sends eval2_loss to eval2/loss. Then: a key holding "/"
    is kept; [val_]fwd_*, [val_]bwd_* -> solver/<key>; [val_]jac*, [val_]sradius*
    -> jacobian/<key>; lr, grad_norm -> optim/<key>; step_time, items_per_s,
    tokens_per_s, images_per_s, steps -> perf/<key>; train_x, val_x, optim_x,
    perf_x -> train/x, val/x, optim/x, perf/x; anything else -> other/<key>.
    """
    for prefix, group in sorted((prefix_map or {}).items(), key=lambda kv: -len(kv[0])):
        if key.startswith(prefix):
            return f"{group}/{key[len(prefix) :] or key}"
    if "/" in key:
        return key
    if key.startswith(_SOLVER):
        return f"solver/{key}"
    if key.startswith(_JACOBIAN):
        return f"jacobian/{key}"
    if key in _OPTIM or key in _PERF:
        return f"{'optim' if key in _OPTIM else 'perf'}/{key}"
    for prefix in _STRIPPED:
        if key.startswith(prefix):
            return f"{prefix[:-1]}/{key[len(prefix) :]}"
    return f"other/{key}"


class TensorBoardWriter:
    """Rank 0's TensorBoard event files under `<run_uri>/<subdir>`.

    A local path is written in place. A URI (anything with "://", file://
    included) is written to a local temporary directory, and each event file is
    copied whole to the URI on `flush()` and `close()`: object stores cannot
    append, and SummaryWriter writes local files only.
    """

    def __init__(
        self,
        run_uri: str | os.PathLike,
        subdir: str = "tensorboard",
        board: TrialBoard | None = None,
    ) -> None:
        from torch.utils.tensorboard import SummaryWriter

        run_uri = os.fspath(run_uri)
        self._dest = locate(run_uri).join(subdir) if "://" in run_uri else None
        if self._dest is not None:
            self.local_dir, self.logdir = tempfile.mkdtemp(prefix="deqray-tb-"), self._dest.uri
        else:
            self.local_dir = self.logdir = os.path.join(run_uri, subdir)
        self._writer = SummaryWriter(log_dir=self.local_dir)
        self._closed = False
        self.board = board
        self._last: dict[str, float] = {}  # the ON_CHANGE keys' last values

    def scalars(self, metrics: dict, step: int, prefix_map: dict[str, str] | None = None):
        """One scalar per numeric value (NaN and inf included); strings and the like skipped.
        The ON_CHANGE keys only when their value changed; the board's objectives under
        `Objectives/`."""
        for key, value in metrics.items():
            if isinstance(value, Tensor) and value.numel() == 1:
                value = value.item()
            if not isinstance(value, numbers.Real):
                continue
            value = float(value)
            if key in ON_CHANGE:
                if self._last.get(key) == value:
                    continue
                self._last[key] = value
            tag = (self.board and self.board.tag(key)) or tag_for(key, prefix_map)
            self._writer.add_scalar(tag, value, step)

    def hparams(self) -> None:
        """The board's HParams in this run itself (SummaryWriter.add_hparams would make
        another run), its objectives as the HParams metrics."""
        from torch.utils.tensorboard.summary import hparams

        if self.board is None:
            return
        metrics = {self.board.tag(k): math.nan for k in self.board.objectives}
        # the values are not written: the metrics are the run's own curves
        for summary in hparams(dict(self.board.hparams), metrics):
            self._writer._get_file_writer().add_summary(summary)

    def histograms(self, values: dict[str, Tensor], step: int) -> None:
        """`solver/<key>` histograms of the finite values (a histogram has no bin for the
        others); a key with none is skipped."""
        for key, v in values.items():
            v = v.detach().flatten().to("cpu", torch.float64)
            v = v[torch.isfinite(v)]
            if v.numel():
                self._writer.add_histogram(f"solver/{key}", v.numpy(), step)

    def text(self, tag: str, text: str, step: int) -> None:
        self._writer.add_text(tag, text, step)

    def flush(self) -> None:
        self._writer.flush()
        self._upload()

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._writer.close()
        if self._upload() and self._dest is not None:
            shutil.rmtree(self.local_dir, ignore_errors=True)

    def _upload(self) -> bool:
        """Copy the event files to the URI (whole: they are small); False if that failed.

        A failed upload is a warning, not the end of a run: the files stay in
        `local_dir` and the next flush or close tries again.
        """
        if self._dest is None:
            return True
        try:
            for root, _, files in os.walk(self.local_dir):
                for name in files:
                    path = os.path.join(root, name)
                    rel = os.path.relpath(path, self.local_dir).replace(os.sep, "/")
                    with open(path, "rb") as fh:
                        self._dest.join(rel).write_bytes(fh.read())
        except OSError as err:
            log.warning("TensorBoard upload to %s failed (%s)", self.logdir, err)
            return False
        return True

    def __enter__(self) -> TensorBoardWriter:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()
