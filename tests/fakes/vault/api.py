"""What every endpoint of the Vault fake shares: the parsed request, the response, Vault's response envelope
(``request_id``, ``lease_id``, ``data``, ``auth``, ``warnings``...) and :class:`ApiError`, which the router
turns into Vault's error reply (``{"errors": [...]}``)."""

from __future__ import annotations

import json
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any


class ApiError(Exception):
    """An error answer: HTTP ``status`` with ``{"errors": errors}``."""

    def __init__(self, status: int, *errors: str) -> None:
        super().__init__(f"{status}: {'; '.join(errors)}")
        self.status = status
        self.errors = list(errors)


def denied() -> ApiError:
    return ApiError(403, "permission denied")


def no_route(rel: str) -> ApiError:
    return ApiError(404, f'no handler for route "{rel}". route entry not found.')


@dataclass
class Request:
    method: str
    rel: str  # the path after /v1/, without slashes at either end
    query: dict[str, list[str]]
    body: dict[str, Any]
    namespace: str
    token: str


@dataclass
class Response:
    status: int
    body: bytes = b""
    content_type: str = "application/json"


def envelope(
    data: Mapping[str, Any] | None = None,
    *,
    auth: Mapping[str, Any] | None = None,
    warnings: Sequence[str] = (),
    mount_type: str = "",
) -> Response:
    body = {
        "request_id": str(uuid.uuid4()),
        "lease_id": "",
        "renewable": False,
        "lease_duration": 0,
        "data": dict(data) if data is not None else None,
        "wrap_info": None,
        "warnings": list(warnings) or None,
        "auth": dict(auth) if auth is not None else None,
        "mount_type": mount_type,
    }
    return Response(200, json.dumps(body).encode())


def no_content() -> Response:
    return Response(204)


def json_response(status: int, body: Mapping[str, Any]) -> Response:
    """A bare JSON body, without the envelope (``sys/health``, ``sys/seal-status``)."""
    return Response(status, json.dumps(body).encode())
