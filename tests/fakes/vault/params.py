"""Vault's parameter types, as its HTTP API reads them: durations (seconds or Go duration strings), booleans,
integers, comma-separated lists, strings, and Vault's glob; a value of the wrong type is a 400."""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

from tests.fakes.vault.api import ApiError

_GO_DURATION_PART = re.compile(r"(\d+(?:\.\d*)?|\.\d+)(ns|us|µs|ms|s|m|h|d)")
_GO_UNITS = {"ns": 1e-9, "us": 1e-6, "µs": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}


def go_duration(seconds: float) -> str:
    """Format whole seconds the way Go's ``time.Duration.String`` does: ``768h0m0s``, ``10m0s``, ``30s``."""
    if seconds == 0:
        return "0s"
    sign = "-" if seconds < 0 else ""
    hours, rest = divmod(abs(round(seconds)), 3600)
    minutes, secs = divmod(rest, 60)
    if hours:
        return f"{sign}{hours}h{minutes}m{secs}s"
    if minutes:
        return f"{sign}{minutes}m{secs}s"
    return f"{sign}{secs}s"


def parse_seconds(value: object, name: str) -> int:
    """A Vault duration field: seconds as a number or digits, or a Go duration string (``1h30m``, ``7d``)."""
    if value is None or value == "":
        return 0
    if isinstance(value, int | float) and not isinstance(value, bool) and value >= 0:
        return int(value)
    if isinstance(value, str):
        text = value.strip()
        if text.isdigit():
            return int(text)
        position, total = 0, 0.0
        for match in _GO_DURATION_PART.finditer(text):
            if match.start() != position:
                break
            total += float(match.group(1)) * _GO_UNITS[match.group(2)]
            position = match.end()
        if position == len(text) and position > 0:
            return int(total)
    raise ApiError(400, f'error converting input {value} for field "{name}": time: invalid duration "{value}"')


def parse_bool(value: object, name: str, default: bool) -> bool:
    if value is None:
        return default
    if isinstance(value, bool):
        return value
    if isinstance(value, int):
        return value != 0
    if isinstance(value, str) and value.lower() in ("true", "t", "1"):
        return True
    if isinstance(value, str) and value.lower() in ("false", "f", "0", ""):
        return False
    raise ApiError(400, f'error converting input {value} for field "{name}": invalid boolean')


def parse_int(value: object, name: str, default: int) -> int:
    if value is None or value == "":
        return default
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    if isinstance(value, str) and re.fullmatch(r"-?\d+", value.strip()):
        return int(value)
    raise ApiError(400, f'error converting input {value} for field "{name}": invalid integer')


def parse_list(value: object, name: str) -> list[str]:
    """A Vault comma-separated-string-or-list field."""
    if value is None or value == "":
        return []
    if isinstance(value, str):
        return [part.strip() for part in value.split(",") if part.strip()]
    if isinstance(value, list) and all(isinstance(v, str) for v in value):
        return [v.strip() for v in value if v.strip()]
    raise ApiError(400, f'error converting input {value} for field "{name}": not a list of strings')


def parse_string(value: object, name: str) -> str:
    if value is None:
        return ""
    if isinstance(value, str):
        return value
    raise ApiError(400, f'error converting input {value} for field "{name}": not a string')


def glob_match(pattern: str, value: str) -> bool:
    """Vault's glob (ryanuber/go-glob): ``*`` matches any run of characters, ``/`` included."""
    if pattern == "*":
        return True
    regex = ".*".join(re.escape(part) for part in pattern.split("*"))
    return re.fullmatch(regex, value, flags=re.DOTALL) is not None


def unknown_params_warning(params: Mapping[str, Any], known: frozenset[str]) -> list[str]:
    unknown = sorted(set(params) - known)
    return [f"Endpoint ignored these unrecognized parameters: [{' '.join(unknown)}]"] if unknown else []
