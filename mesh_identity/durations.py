"""Durations written the way operators write them: ``90s``, ``30m``, ``24h``, ``7d``, ``1h30m``."""

from __future__ import annotations

import math
import re
from datetime import timedelta

_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}
_PART = re.compile(r"(\d+(?:\.\d+)?)(ms|s|m|h|d)")
HINT = "use 30m, 24h, 7d"
LONGEST = timedelta(days=36_500)  # a century: beyond any certificate lifetime, and far inside timedelta's range


def parse_duration(text: str) -> timedelta:
    """Parse ``1h30m`` into a :class:`timedelta`; raise ValueError with a hint on anything else."""
    if not isinstance(text, str) or not text:
        raise ValueError(f"{text!r} is not a duration ({HINT})")
    position = 0
    seconds = 0.0
    for match in _PART.finditer(text):
        if match.start() != position:
            break
        seconds += float(match.group(1)) * _UNITS[match.group(2)]
        position = match.end()
    if position != len(text):
        raise ValueError(f"{text!r} is not a duration ({HINT})")
    if seconds <= 0:
        raise ValueError(f"{text!r} is not a positive duration ({HINT})")
    if not math.isfinite(seconds) or seconds > LONGEST.total_seconds():
        raise ValueError(f"{_shown(text)} is longer than {LONGEST.days} days ({HINT})")
    return timedelta(seconds=seconds)


def _shown(text: str, limit: int = 40) -> str:
    return repr(text) if len(text) <= limit else repr(text[:limit]) + "..."


def format_duration(value: timedelta) -> str:
    """Format a timedelta compactly: ``1d2h``, ``45m``, ``3s``; negative values get a leading ``-``."""
    total = int(value.total_seconds())
    sign = "-" if total < 0 else ""
    total = abs(total)
    parts = []
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60), ("s", 1)):
        count, total = divmod(total, size)
        if count:
            parts.append(f"{count}{unit}")
    return sign + ("".join(parts[:2]) or "0s")
