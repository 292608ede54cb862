"""The Pareto front of a multi-objective study's trials."""

from __future__ import annotations

import math
import numbers


def pareto_front(rows: list[dict], objectives: dict[str, str]) -> list[int]:
    """Indices (ascending) of the rows that no other row dominates.

    `objectives` maps each metric to "min" or "max" ("minimize"/"maximize"
    too). Row a dominates row b when a is at least as good in every
    objective and better in one; so equal rows do not dominate each other,
    and a duplicate of a front point is on the front too. A row lacking an
    objective, or with a value that is not a finite number, is never on the
    front (and dominates nothing).

    Sorting the rows lexicographically (every objective as a minimisation)
    puts any dominating row before the rows it dominates, so one pass that
    compares each row with the front found so far is enough; transitivity
    covers the rows already left out.
    """
    if not objectives:
        raise ValueError("pareto_front: no objectives")
    signs = []
    for key, d in objectives.items():
        if d in ("min", "minimize"):
            signs.append(1.0)
        elif d in ("max", "maximize"):
            signs.append(-1.0)
        else:
            raise ValueError(
                f"pareto_front: objective {key}: direction must be min or max, got {d!r}"
            )
    keys = list(objectives)
    points: list[tuple[tuple[float, ...], int]] = []
    for i, row in enumerate(rows):
        values = []
        for key, sign in zip(keys, signs, strict=True):
            v = row.get(key) if isinstance(row, dict) else None
            if isinstance(v, bool) or not isinstance(v, numbers.Real) or not math.isfinite(v):
                break
            values.append(sign * float(v))
        else:
            points.append((tuple(values), i))
    points.sort()
    front: list[tuple[tuple[float, ...], int]] = []
    for values, i in points:
        dominated = any(
            all(a <= b for a, b in zip(f, values, strict=True)) and f != values for f, _ in front
        )
        if not dominated:
            front.append((values, i))
    return sorted(i for _, i in front)


__all__ = ["pareto_front"]
