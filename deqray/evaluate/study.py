"""After a sweep: the best trial (or every Pareto trial) on the test split, beside its validation.

The test metrics join the study's rows as `<split>_<metric>` columns: in
`results.csv` / `results.parquet` (rewritten), in the summary table, and in
`evaluation.json` in the experiment directory, which `load_results` (and so
`deqray compare`) reads back.
"""

from __future__ import annotations

import json
import math

from deqray.data._fs import locate

from .runs import EvaluateError
from .split import Evaluation, evaluate_run

EVALUATION_FILE = "evaluation.json"


def evaluate_study(
    experiment: str, *, pareto: bool = False, split: str = "test", **kwargs
) -> tuple[object, list[Evaluation]]:
    """(the StudyResult with test columns, one Evaluation per trial evaluated)."""
    from deqray.tune.runner import load_results, write_outputs

    result = load_results(experiment)
    if not result.front:
        raise EvaluateError(f"{experiment}: no trial finished, so there is no best one to evaluate")
    chosen = list(result.front) if pareto else [_best(result)]
    evaluations = []
    record = read_evaluations(result.experiment)
    for i in chosen:
        row = result.rows[i]
        run = row["run"]  # <experiment>/runs/<trial name>
        ev = evaluate_run(run, split=split, **kwargs)
        metrics = ev.points[0].metrics
        scalars = {k: v for k, v in metrics.items() if f"{split}_iou_" not in k}
        row.update(scalars)
        record[row["trial_id"]] = {
            "split": split,
            "checkpoint": ev.checkpoint,
            "step": ev.step,
            **scalars,
        }
        evaluations.append(ev)
    locate(result.experiment).join(EVALUATION_FILE).write_bytes(
        json.dumps(record, indent=1, default=str).encode()
    )
    write_outputs(result)
    return result, evaluations


def read_evaluations(experiment: str) -> dict[str, dict]:
    """{trial_id: test metrics} of the trials evaluated so far ({} when none)."""
    loc = locate(experiment).join(EVALUATION_FILE)
    return json.loads(loc.read_bytes()) if loc.exists() else {}


def _best(result) -> int:
    """The best trial on the first objective among the front (the front of one objective is it)."""
    key = result.study.metric_names()[0]
    sign = 1.0 if result.study.objectives[key] == "min" else -1.0
    return min(
        result.front,
        key=lambda i: sign * v if math.isfinite(v := result.rows[i][key]) else math.inf,
    )
