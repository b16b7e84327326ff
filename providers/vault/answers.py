"""Typed readers for Vault's answers: every value the provider takes from Vault's JSON goes through one of these.

hvac hands back whatever came: the decoded JSON of a 200 (an object, but also a list, a string, a number or
null), or a ``requests.Response`` for a 204 or a 200 that is not JSON. :func:`answer_of` and :func:`data_of` check
that it is an object and give a :class:`Fields`, whose readers (:meth:`Fields.string`, :meth:`Fields.integer`,
:meth:`Fields.seconds`, :meth:`Fields.strings`, ...) check each value's type. Anything else raises
:class:`~providers.vault.errors.VaultAnswerError` naming the API path and the field, e.g.
``vault: pki/sign/web: answer has no data.certificate (got a list, not PEM text)``.

Messages say what kind of value came, never the value itself: an answer may carry a token.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, TypeVar, overload

import requests

from providers.vault.errors import VaultAnswerError

NAME = "vault"
D = TypeVar("D")

# Vault's durations are Go's time.Duration: nothing it sends is longer than 2**63 ns (about 292 years)
LONGEST_SECONDS = (2**63 - 1) // 10**9
_MICRO = ("us", "\u00b5s", "\u03bcs")  # Go writes microseconds with the micro sign; it also reads the Greek mu
_UNIT_SECONDS = {"ns": 1e-9, **dict.fromkeys(_MICRO, 1e-6), "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}
_DURATION_PART = re.compile(r"(\d+(?:\.\d*)?|\.\d+)(" + "|".join(sorted(_UNIT_SECONDS, key=len, reverse=True)) + ")")


class _Missing:
    """The default of a reader when the field is required."""


_REQUIRED: Any = _Missing()


def kind(value: object) -> str:
    """What ``value`` is, for a message (never the value: it may be a secret)."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int | float):
        return "a number"
    if isinstance(value, str):
        return "an empty string" if not value else "a string"
    if isinstance(value, list | tuple):
        return "a list"
    if isinstance(value, Mapping):
        return "an object"
    if isinstance(value, requests.Response):
        if not value.content:
            return f"an empty answer, HTTP {value.status_code}"
        content_type = value.headers.get("Content-Type") or "an untyped body"
        return f"{content_type} that is not JSON, HTTP {value.status_code}"
    return type(value).__name__


def parse_seconds(value: str) -> float | None:
    """Seconds of a Vault duration: ``3600`` or a Go duration (``1h``, ``1h0m0s``, ``90s``, ``1.5h``, ``7d``);
    None when ``value`` is neither."""
    if value.isascii() and value.isdigit():
        return float(value)  # inf past float's range, never an error
    position, total = 0, 0.0
    for match in _DURATION_PART.finditer(value):
        if match.start() != position:
            return None
        total += float(match.group(1)) * _UNIT_SECONDS[match.group(2)]
        position = match.end()
    return total if value and position == len(value) else None


def answer_of(answer: object, path: str) -> Fields:
    """The whole of Vault's answer to ``path`` (``pki/sign/web``, with the namespace label) as fields."""
    if not isinstance(answer, Mapping):
        raise VaultAnswerError(NAME, f"{path}: answer is not a JSON object (got {kind(answer)})", path=path)
    return Fields(path, "", answer)


def data_of(answer: object, path: str) -> Fields:
    """The ``data`` object of Vault's answer to ``path`` (where the result of a read or a write is)."""
    return answer_of(answer, path).fields("data")


@dataclass(frozen=True, slots=True)
class Fields:
    """One JSON object of Vault's answer to ``path``; ``name`` is where it is in the answer (``data``, ``auth``;
    empty for the whole answer)."""

    path: str
    name: str
    items: Mapping[str, object]

    def field(self, key: str) -> str:
        """``data.certificate``: how a field is named in messages."""
        return f"{self.name}.{key}" if self.name else key

    def malformed(self, key: str, got: str | None = None, wanted: str | None = None) -> VaultAnswerError:
        """The error for field ``key``: missing (``got`` None), or ``got`` instead of ``wanted``."""
        field = self.field(key)
        shown = "" if got is None else f" (got {got}, not {wanted})" if wanted else f" (got {got})"
        return VaultAnswerError(NAME, f"{self.path}: answer has no {field}{shown}", path=self.path, key=field)

    def _value(self, key: str, default: object) -> tuple[bool, object]:
        """``(True, value)``; ``(False, default)`` when the field is missing or null and has a default."""
        value = self.items.get(key)
        if value is not None:
            return True, value
        if default is not _REQUIRED:
            return False, default
        raise self.malformed(key, None if key not in self.items else "null")

    def has(self, key: str) -> bool:
        """The field is there and not null."""
        return self.items.get(key) is not None

    def fields(self, key: str) -> Fields:
        """A nested object (required)."""
        _, value = self._value(key, _REQUIRED)
        if not isinstance(value, Mapping):
            raise self.malformed(key, kind(value), "an object")
        return Fields(self.path, self.field(key), value)

    @overload
    def string(self, key: str, *, nonempty: bool = False) -> str: ...
    @overload
    def string(self, key: str, default: D, *, nonempty: bool = False) -> str | D: ...
    def string(self, key: str, default: object = _REQUIRED, *, nonempty: bool = False) -> object:
        present, value = self._value(key, default)
        if not present:
            return value
        if not isinstance(value, str) or (nonempty and not value):
            raise self.malformed(key, kind(value), "a non-empty string" if nonempty else "a string")
        return value

    @overload
    def boolean(self, key: str) -> bool: ...
    @overload
    def boolean(self, key: str, default: D) -> bool | D: ...
    def boolean(self, key: str, default: object = _REQUIRED) -> object:
        present, value = self._value(key, default)
        if present and not isinstance(value, bool):
            raise self.malformed(key, kind(value), "true or false")
        return value

    @overload
    def integer(self, key: str) -> int: ...
    @overload
    def integer(self, key: str, default: D) -> int | D: ...
    def integer(self, key: str, default: object = _REQUIRED) -> object:
        present, value = self._value(key, default)
        if present and (isinstance(value, bool) or not isinstance(value, int)):
            raise self.malformed(key, kind(value), "an integer")
        return value

    @overload
    def seconds(self, key: str) -> float: ...
    @overload
    def seconds(self, key: str, default: D) -> float | D: ...
    def seconds(self, key: str, default: object = _REQUIRED) -> object:
        """A duration in seconds: Vault's integer seconds, or a duration string (``"1h"``, ``"768h0m0s"``)."""
        present, value = self._value(key, default)
        if not present:
            return value
        if isinstance(value, str):
            seconds = parse_seconds(value)
            if seconds is None:
                raise self.malformed(key, "a string that is not a duration")
        elif isinstance(value, int | float) and not isinstance(value, bool):
            seconds = float(min(value, LONGEST_SECONDS + 1))  # float() of a huge int overflows
            if not math.isfinite(seconds):
                raise self.malformed(key, "a number that is not finite")
        else:
            raise self.malformed(key, kind(value), "a duration")
        if seconds < 0:
            raise self.malformed(key, "a negative duration")
        if seconds > LONGEST_SECONDS:
            raise self.malformed(key, "a duration longer than Go's longest, 292 years")
        return seconds

    def strings(self, key: str, default: tuple[str, ...] = (), *, comma: bool = False) -> tuple[str, ...]:
        """A list of strings (``default`` when missing or null); with ``comma`` also one comma-separated string."""
        present, value = self._value(key, default)
        if not present:
            return default
        if comma and isinstance(value, str):
            return tuple(value.split(",")) if value else ()
        if not isinstance(value, list):
            raise self.malformed(key, kind(value), "a list of strings")
        for item in value:
            if not isinstance(item, str):
                raise self.malformed(key, f"a list holding {kind(item)}", "a list of strings")
        return tuple(value)

    @overload
    def pem(self, key: str) -> str: ...
    @overload
    def pem(self, key: str, default: D) -> str | D: ...
    def pem(self, key: str, default: object = _REQUIRED) -> object:
        """PEM text: one string, or a list of strings (Vault's ``ca_chain``), joined with newlines."""
        present, value = self._value(key, default)
        if not present:
            return value
        if isinstance(value, str):
            return value
        if isinstance(value, list):
            for item in value:
                if not isinstance(item, str):
                    raise self.malformed(key, f"a list holding {kind(item)}", "PEM text")
            return "\n".join(value)
        raise self.malformed(key, kind(value), "PEM text")
