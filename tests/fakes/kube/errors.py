"""The Kubernetes fake's errors: :class:`ApiError` is answered as a ``kind: Status`` body with the real API
server's ``reason``, ``message`` and ``details`` (NotFound, AlreadyExists, Conflict, Invalid, BadRequest, Expired
and whatever a test injects)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from tests.fakes.kube.kinds import Kind

JsonObj = dict[str, Any]

STALE = "the object has been modified; please apply your changes to the latest version and try again"


class ApiError(Exception):
    """An error answered as a ``kind: Status`` body."""

    def __init__(self, code: int, reason: str, message: str, details: JsonObj | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.reason = reason
        self.message = message
        self.details = details

    def status(self) -> JsonObj:
        body: JsonObj = {
            "kind": "Status",
            "apiVersion": "v1",
            "metadata": {},
            "status": "Failure",
            "message": self.message,
            "reason": self.reason,
            "code": self.code,
        }
        if self.details is not None:
            body["details"] = self.details
        return body


def details(kind: Kind, name: str | None) -> JsonObj:
    found: JsonObj = {"kind": kind.plural}
    if name:
        found["name"] = name
    if kind.group:
        found["group"] = kind.group
    return found


def not_found(kind: Kind, name: str) -> ApiError:
    return ApiError(404, "NotFound", f'{kind.qualified} "{name}" not found', details(kind, name))


def already_exists(kind: Kind, name: str) -> ApiError:
    return ApiError(409, "AlreadyExists", f'{kind.qualified} "{name}" already exists', details(kind, name))


def conflict(kind: Kind, name: str, why: str) -> ApiError:
    return ApiError(
        409, "Conflict", f'Operation cannot be fulfilled on {kind.qualified} "{name}": {why}', details(kind, name)
    )


def invalid(kind: Kind, name: str, errors: Sequence[str]) -> ApiError:
    shown = errors[0] if len(errors) == 1 else "[" + ", ".join(errors) + "]"
    qualified_kind = f"{kind.kind}.{kind.group}" if kind.group else kind.kind
    found = details(kind, name)
    found["kind"] = kind.kind
    found["causes"] = [{"reason": "FieldValueInvalid", "message": e} for e in errors]
    return ApiError(422, "Invalid", f'{qualified_kind} "{name}" is invalid: {shown}', found)


def bad_request(message: str) -> ApiError:
    return ApiError(400, "BadRequest", message)


def method_not_allowed(message: str = "the server does not allow this method on the requested resource") -> ApiError:
    return ApiError(405, "MethodNotAllowed", message)


def expired(resource_version: int, oldest: int) -> ApiError:
    return ApiError(410, "Expired", f"too old resource version: {resource_version} ({oldest})")
