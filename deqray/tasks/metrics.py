"""torchmetrics aggregators as the evaluation uses them: float64, NaN kept.

A task's `eval_metrics` may use them (a mean loss per image, token or pixel)
beside torchmetrics' own classification metrics; the platform uses them for
the sums and the solver's statistics. A diverged model's NaN must reach the
report, so an aggregator's `nan_strategy` is a float, NaN: it "imputes" NaN
with NaN and keeps the weights. ("disable" keeps NaN too, but in torchmetrics
1.9 it also replaces MeanMetric's weights by ones.)
"""

from __future__ import annotations

import math
from typing import Any

import torch

_KEEP_NAN = math.nan


def mean_metric(device: Any = "cpu"):
    """MeanMetric: `update(value, weight)` adds value * weight and weight."""
    from torchmetrics.aggregation import MeanMetric

    return MeanMetric(nan_strategy=_KEEP_NAN).set_dtype(torch.float64).to(device)


def max_metric(device: Any = "cpu"):
    from torchmetrics.aggregation import MaxMetric

    return MaxMetric(nan_strategy=_KEEP_NAN).set_dtype(torch.float64).to(device)


def sum_metric(device: Any = "cpu"):
    from torchmetrics.aggregation import SumMetric

    return SumMetric(nan_strategy=_KEEP_NAN).set_dtype(torch.float64).to(device)
