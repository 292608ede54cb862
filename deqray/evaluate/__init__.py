"""deqray.evaluate: a finished run as a result. `deqray evaluate`, `deqray.load`.

* `load(run, checkpoint="latest", device=None) -> (model, config)`: the trained
  model in eval mode, rebuilt from its checkpoint alone (runs.py).
* `evaluate_run(run, split="test", budgets=[...])`: the task's metrics and the
  solver's on a whole split, at each forward budget (split.py); `output` prints,
  saves and plots it; `evaluate_study` evaluates a sweep's best or Pareto trials.
"""

from .runs import EvaluateError, load
from .split import Evaluation, Point, evaluate_run
from .study import evaluate_study

__all__ = ["EvaluateError", "Evaluation", "Point", "evaluate_run", "evaluate_study", "load"]
