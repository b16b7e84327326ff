"""The ``/status`` document of a running server, as typed values: written by the server, read back by the CLI.

:class:`StatusDocument` mirrors the JSON key for key. :meth:`StatusDocument.to_json` writes it;
:meth:`StatusDocument.from_json` checks every key and raises :class:`StatusDocumentError` naming the key path of
the first one that is wrong (keys it does not know are ignored, so an older CLI reads a newer server's document).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Self, TypeVar

from mesh_identity.errors import MeshIdentityError
from mesh_identity.provider import Mode
from mesh_identity.svid import Fingerprint

T = TypeVar("T")


class StatusDocumentError(MeshIdentityError, ValueError):
    """A ``/status`` document with a key missing or a value of the wrong type; the message names the key path.

    ``detail`` is the message without its ``status document: `` prefix (``ca.roots[1].serial: expected a string,
    got 3``)."""

    def __init__(self, detail: str) -> None:
        super().__init__(f"status document: {detail}")
        self.detail = detail


# -- the /status document -----------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ProviderStatus:
    """The CA provider and its last health check (``healthy`` and ``checked_at`` None: not checked yet)."""

    name: str
    mode: Mode
    healthy: bool | None
    detail: str
    checked_at: datetime | None

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "mode": self.mode.value,
            "healthy": self.healthy,
            "detail": self.detail,
            "checked_at": _iso(self.checked_at),
        }

    @classmethod
    def from_json(cls, data: object) -> Self:
        return cls._read(data, "")

    @classmethod
    def _read(cls, data: object, path: str) -> Self:
        obj = _Object(data, path)
        return cls(
            name=obj.get("name", _string),
            mode=obj.get("mode", _mode),
            healthy=obj.optional("healthy", _boolean),
            detail=obj.get("detail", _string),
            checked_at=obj.optional("checked_at", _time),
        )


@dataclass(frozen=True, slots=True)
class CertStatus:
    """One identity's certificate, or the signing intermediate, as the rotation engine sees it."""

    subject: str
    serial: str | None
    not_after: datetime | None
    seconds_left: float | None
    next_rotation: datetime | None
    provider: str
    failures: int
    last_error: str | None

    def to_json(self) -> dict[str, Any]:
        return {
            "subject": self.subject,
            "serial": self.serial,
            "not_after": _iso(self.not_after),
            "seconds_left": self.seconds_left,
            "next_rotation": _iso(self.next_rotation),
            "provider": self.provider,
            "failures": self.failures,
            "last_error": self.last_error,
        }

    @classmethod
    def from_json(cls, data: object) -> Self:
        return cls._read(data, "")

    @classmethod
    def _read(cls, data: object, path: str) -> Self:
        obj = _Object(data, path)
        return cls(
            subject=obj.get("subject", _string),
            serial=obj.optional("serial", _string),
            not_after=obj.optional("not_after", _time),
            seconds_left=obj.optional("seconds_left", _number),
            next_rotation=obj.optional("next_rotation", _time),
            provider=obj.get("provider", _string),
            failures=obj.get("failures", _integer),
            last_error=obj.optional("last_error", _string),
        )


@dataclass(frozen=True, slots=True)
class RootStatus:
    """One root of the trust bundle: is it the signing one, the new one of a rotation, how many leaves chain to it."""

    serial: str
    fingerprint: Fingerprint
    not_before: datetime
    not_after: datetime
    seconds_left: float
    signing: bool
    new: bool
    leaves: int

    def to_json(self) -> dict[str, Any]:
        return {
            "serial": self.serial,
            "fingerprint": self.fingerprint,
            "not_before": iso_time(self.not_before),
            "not_after": iso_time(self.not_after),
            "seconds_left": self.seconds_left,
            "signing": self.signing,
            "new": self.new,
            "leaves": self.leaves,
        }

    @classmethod
    def from_json(cls, data: object) -> Self:
        return cls._read(data, "")

    @classmethod
    def _read(cls, data: object, path: str) -> Self:
        obj = _Object(data, path)
        return cls(
            serial=obj.get("serial", _string),
            fingerprint=Fingerprint(obj.get("fingerprint", _string)),
            not_before=obj.get("not_before", _time),
            not_after=obj.get("not_after", _time),
            seconds_left=obj.get("seconds_left", _number),
            signing=obj.get("signing", _boolean),
            new=obj.get("new", _boolean),
            leaves=obj.get("leaves", _integer),
        )


@dataclass(frozen=True, slots=True)
class CaStatus:
    """The CA chain and the root rotation with its evidence. The proxy lists are None when the server has no xDS
    server to ask; ``proxies_lagging``: proxies that rejected their config or have not acknowledged a change for
    longer than ``xds.ack_timeout`` (``node: what``)."""

    phase: str
    next_step: str
    roots: tuple[RootStatus, ...]
    intermediate: CertStatus | None
    leaves_outside_bundle: int
    proxies_missing_bundle: tuple[str, ...] | None
    proxies_on_old_roots: tuple[str, ...] | None
    proxies_lagging: tuple[str, ...] | None

    def to_json(self) -> dict[str, Any]:
        return {
            "phase": self.phase,
            "next_step": self.next_step,
            "roots": [root.to_json() for root in self.roots],
            "intermediate": self.intermediate.to_json() if self.intermediate is not None else None,
            "leaves_outside_bundle": self.leaves_outside_bundle,
            "proxies_missing_bundle": _list(self.proxies_missing_bundle),
            "proxies_on_old_roots": _list(self.proxies_on_old_roots),
            "proxies_lagging": _list(self.proxies_lagging),
        }

    @classmethod
    def from_json(cls, data: object) -> Self:
        return cls._read(data, "")

    @classmethod
    def _read(cls, data: object, path: str) -> Self:
        obj = _Object(data, path)
        return cls(
            phase=obj.get("phase", _string),
            next_step=obj.get("next_step", _string),
            roots=obj.items("roots", RootStatus._read),
            intermediate=obj.optional("intermediate", CertStatus._read),
            leaves_outside_bundle=obj.get("leaves_outside_bundle", _integer),
            proxies_missing_bundle=obj.optional_items("proxies_missing_bundle", _string),
            proxies_on_old_roots=obj.optional_items("proxies_on_old_roots", _string),
            proxies_lagging=obj.optional_items("proxies_lagging", _string),
        )


@dataclass(frozen=True, slots=True)
class StatusDocument:
    """The ``/status`` document: what ``mesh-identity status`` shows. ``outage_budget_seconds`` is None when no
    certificate is in use."""

    generated_at: datetime
    trust_domain: str
    provider: ProviderStatus
    ready: bool
    ready_detail: str
    outage_budget_seconds: float | None
    ca: CaStatus
    identities: tuple[CertStatus, ...]

    def to_json(self) -> dict[str, Any]:
        return {
            "generated_at": iso_time(self.generated_at),
            "trust_domain": self.trust_domain,
            "provider": self.provider.to_json(),
            "ready": self.ready,
            "ready_detail": self.ready_detail,
            "outage_budget_seconds": self.outage_budget_seconds,
            "ca": self.ca.to_json(),
            "identities": [identity.to_json() for identity in self.identities],
        }

    @classmethod
    def from_json(cls, data: object) -> Self:
        """The document in ``data`` (parsed JSON); StatusDocumentError naming the first key that is wrong."""
        return cls._read(data, "")

    @classmethod
    def _read(cls, data: object, path: str) -> Self:
        obj = _Object(data, path)
        return cls(
            generated_at=obj.get("generated_at", _time),
            trust_domain=obj.get("trust_domain", _string),
            provider=obj.get("provider", ProviderStatus._read),
            ready=obj.get("ready", _boolean),
            ready_detail=obj.get("ready_detail", _string),
            outage_budget_seconds=obj.optional("outage_budget_seconds", _number),
            ca=obj.get("ca", CaStatus._read),
            identities=obj.items("identities", CertStatus._read),
        )


def iso_time(value: datetime) -> str:
    """``value`` as the status document writes it: ISO 8601, ``Z`` for UTC."""
    return value.isoformat().replace("+00:00", "Z")


def _iso(value: datetime | None) -> str | None:
    return iso_time(value) if value is not None else None


def _list(values: tuple[str, ...] | None) -> list[str] | None:
    return list(values) if values is not None else None


# -- reading a document back --------------------------------------------------------------------------------

_SHOWN_CHARS = 60


def _shown(value: object) -> str:
    """``value`` in an error message: a JSON scalar as JSON, a list or object by its kind."""
    if isinstance(value, list):
        return "a list"
    if isinstance(value, dict):
        return "an object"
    try:
        text = json.dumps(value)
    except (TypeError, ValueError):
        text = repr(value)
    return text if len(text) <= _SHOWN_CHARS else text[: _SHOWN_CHARS - 3] + "..."


def _error(path: str, problem: str) -> StatusDocumentError:
    return StatusDocumentError(f"{path}: {problem}" if path else problem)


def _expected(path: str, what: str, value: object) -> StatusDocumentError:
    return _error(path, f"expected {what}, got {_shown(value)}")


def _string(value: object, path: str) -> str:
    if not isinstance(value, str):
        raise _expected(path, "a string", value)
    return value


def _boolean(value: object, path: str) -> bool:
    if not isinstance(value, bool):
        raise _expected(path, "true or false", value)
    return value


def _integer(value: object, path: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise _expected(path, "an integer", value)
    return value


def _number(value: object, path: str) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise _expected(path, "a number", value)
    return float(value)


def _time(value: object, path: str) -> datetime:
    what = "an ISO 8601 timestamp with a time zone"
    if not isinstance(value, str):
        raise _expected(path, what, value)
    try:
        parsed = datetime.fromisoformat(value)
    except ValueError:
        raise _expected(path, what, value) from None
    if parsed.tzinfo is None:
        raise _expected(path, what, value)
    return parsed


def _mode(value: object, path: str) -> Mode:
    if isinstance(value, str) and value in {mode.value for mode in Mode}:
        return Mode(value)
    raise _expected(path, "one of " + ", ".join(json.dumps(mode.value) for mode in Mode), value)


class _Object:
    """A JSON object of the document being read, with its key path (``""`` at the top) for the errors."""

    __slots__ = ("_data", "_path")

    def __init__(self, data: object, path: str) -> None:
        if not isinstance(data, dict):
            raise _expected(path, "an object", data)
        self._data: dict[object, object] = data
        self._path = path

    def at(self, key: str) -> str:
        return f"{self._path}.{key}" if self._path else key

    def _value(self, key: str) -> object:
        if key not in self._data:
            raise _error(self.at(key), "missing")
        return self._data[key]

    def get(self, key: str, read: Callable[[object, str], T]) -> T:
        return read(self._value(key), self.at(key))

    def optional(self, key: str, read: Callable[[object, str], T]) -> T | None:
        value = self._value(key)
        return None if value is None else read(value, self.at(key))

    def items(self, key: str, read: Callable[[object, str], T]) -> tuple[T, ...]:
        value, path = self._value(key), self.at(key)
        if not isinstance(value, list):
            raise _expected(path, "a list", value)
        return tuple(read(item, f"{path}[{index}]") for index, item in enumerate(value))

    def optional_items(self, key: str, read: Callable[[object, str], T]) -> tuple[T, ...] | None:
        return None if self._value(key) is None else self.items(key, read)
