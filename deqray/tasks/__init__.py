"""deqray.tasks: what is learned. One module per task; `train` and `tune` run any of them.

Shipped: `language_model` (DEQ-Transformer on token streams), `image_classification`
(MDEQ), `segmentation` (MDEQ). A task of your own subclasses `Task` and is named
in the experiment file by import path: `task: mypkg.tasks:FlowTask`.
"""

from .base import (
    Batching,
    DataPlan,
    EvalOutput,
    Metric,
    RunContext,
    StepOutput,
    Task,
)
from .registry import load_task, shipped_tasks, task_for

__all__ = [
    "Batching",
    "DataPlan",
    "EvalOutput",
    "Metric",
    "RunContext",
    "StepOutput",
    "Task",
    "load_task",
    "shipped_tasks",
    "task_for",
]
