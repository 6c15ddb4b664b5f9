"""Wall-time budgets as people write them: ``90s``, ``10m``, ``1.5h``, ``1h30m``, or plain seconds."""

from __future__ import annotations

import re

from gradtune.runtime.errors import GradtuneError

_UNIT_S = {"s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}
_PART = re.compile(r"(\d+(?:\.\d+)?)([smhd])")


def parse_duration(text: str | float | int, key: str = "max_time") -> float:
    """Seconds in ``text``; a one-line GradtuneError naming ``key`` otherwise."""
    if isinstance(text, (int, float)) and not isinstance(text, bool):
        seconds = float(text)
    else:
        s = str(text).strip().lower().replace(" ", "")
        try:
            seconds = float(s)
        except ValueError:
            parts = _PART.findall(s)
            if not parts or "".join(n + u for n, u in parts) != s:
                raise GradtuneError(
                    f"config: {key}={text!r}: write a duration such as 90s, 10m, 1.5h or 1h30m"
                ) from None
            seconds = sum(float(n) * _UNIT_S[u] for n, u in parts)
    if not seconds > 0:
        raise GradtuneError(f"config: {key}={text!r} must be a positive duration")
    return seconds
