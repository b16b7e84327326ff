"""Talking to a running server from the CLI: its URL, ``/status``, and root rotation steps with the token.

The server writes the URL it listens on to ``<state_dir>/admin.addr`` and a fresh admin token to
``<state_dir>/admin.token`` (0600) at start (see :mod:`mesh_identity.server.service`).
"""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from typing import Any

from mesh_identity.config import Config
from mesh_identity.errors import MeshIdentityError
from mesh_identity.rotation.roots import RootStep, StepOverride
from mesh_identity.server.document import StatusDocument, StatusDocumentError
from mesh_identity.server.service import ADMIN_ADDR, ADMIN_TOKEN, DEFAULT_LISTEN

GET_TIMEOUT = 30.0
STEP_TIMEOUT = 900.0  # activating renews every identity at once


class ServerError(MeshIdentityError):
    """The server could not be reached, or answered with an error."""


def server_url(config: Config) -> str:
    """The URL of the running server: ``<state_dir>/admin.addr`` when present, else ``metrics.listen``."""
    try:
        return (config.state_dir / ADMIN_ADDR).read_text().strip()
    except OSError:
        listen = config.metrics_listen or DEFAULT_LISTEN
        host = f"[{listen.host}]" if ":" in listen.host else listen.host
        return f"http://{host}:{listen.port}"


def _request(
    url: str, *, token: str | None = None, body: bytes = b"", timeout: float = GET_TIMEOUT
) -> tuple[int, bytes]:
    method = "GET" if token is None else "POST"
    request = urllib.request.Request(url, method=method, data=body if token is not None else None)  # noqa: S310
    if token is not None:
        request.add_header("Authorization", f"Bearer {token}")
        if body:
            request.add_header("Content-Type", "application/json")
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:  # noqa: S310 - http(s) URL we built
            return int(response.status), bytes(response.read())
    except urllib.error.HTTPError as err:
        return int(err.code), err.read()
    except (urllib.error.URLError, OSError) as err:
        reason = getattr(err, "reason", err)
        raise ServerError(f"cannot reach the server at {url}: {reason} (is 'mesh-identity serve' running?)") from None


def fetch_status(config: Config) -> StatusDocument:
    """The server's ``/status`` document; ServerError naming its URL when it cannot be had or read."""
    url = server_url(config) + "/status"
    code, body = _request(url)
    if code != 200:
        raise ServerError(f"{url} answered {code}: {body.decode(errors='replace').strip()}")
    try:
        data = json.loads(body)
    except ValueError as err:
        raise ServerError(f"{url} answered with something that is not JSON: {err}") from None
    try:
        return StatusDocument.from_json(data)
    except StatusDocumentError as err:
        raise ServerError(f"{url} answered a bad status document: {err.detail}") from None


def admin_token(config: Config) -> str:
    path = config.state_dir / ADMIN_TOKEN
    try:
        token = path.read_text().strip()
    except OSError as err:
        raise ServerError(
            f"cannot read the admin token {path}: {err.strerror} (it is written by a running 'mesh-identity serve')"
        ) from None
    if not token:
        raise ServerError(f"the admin token file {path} is empty")
    return token


def override_body(override: StepOverride | None) -> bytes:
    """The JSON body of a root step with ``override`` (empty for none): ``{"exclude": [...], "force": "..."}``."""
    if override is None or override.empty:
        return b""
    data: dict[str, Any] = {}
    if override.exclude:
        data["exclude"] = sorted(override.exclude)
    if override.force is not None:
        data["force"] = override.force
    return json.dumps(data).encode()


def root_step(config: Config, step: RootStep, override: StepOverride | None = None) -> str:
    """Ask the server to take a root rotation step (giving up on the proxies ``override`` names); its message,
    or ServerError with its refusal."""
    url = f"{server_url(config)}/admin/root/{step.value}"
    code, body = _request(url, token=admin_token(config), body=override_body(override), timeout=STEP_TIMEOUT)
    try:
        reply: dict[str, Any] = json.loads(body)
    except ValueError:
        reply = {"error": body.decode(errors="replace").strip()}
    if code == 200:
        return str(reply["message"])
    if code == 401:
        raise ServerError(f"the server refused the admin token from {config.state_dir / ADMIN_TOKEN} (401)")
    raise ServerError(reply.get("error") or f"{url} answered {code}")
