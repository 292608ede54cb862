"""Error helpers shared by the core: unknown names fail with the nearest valid one."""

from __future__ import annotations

import difflib
from collections.abc import Iterable


def suggest(name: object, valid: Iterable[str]) -> str:
    """' (did you mean 'x'?)' for the closest valid name, or '' when none is close.

    `name` may be anything a YAML mapping holds as a key (`0:`, `true:`)."""
    close = difflib.get_close_matches(str(name), list(valid), n=1, cutoff=0.5)
    return f" (did you mean {close[0]!r}?)" if close else ""


def reject_unknown(what: str, unknown: Iterable[str], valid: Iterable[str]) -> None:
    """Raise ValueError naming each unknown key, the nearest valid key and the valid ones."""
    unknown = sorted(unknown, key=str)  # YAML keys need not be strings
    if not unknown:
        return
    valid = sorted(valid)
    parts = [f"{k!r}{suggest(k, valid)}" for k in unknown]
    raise ValueError(
        f"{what}: unknown option {', '.join(parts)}; valid options: {', '.join(valid)}"
    )
