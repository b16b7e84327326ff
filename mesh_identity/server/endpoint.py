"""The monitoring and admin listener (``metrics.listen``, loopback by default).

=====================================  ========================================================================
``GET /metrics``                       Prometheus text format
``GET /healthz``                       200 while the server runs
``GET /readyz``                        200 when the authority can really sign, else 503 with the reason
``GET /status``                        JSON: identities, CA chain, root rotation, provider health
``POST /admin/root/<step>``            root rotation step (``prepare``, ``activate``, ``retire``); needs
                                       ``Authorization: Bearer <token>`` (the token is in
                                       ``<state_dir>/admin.token``); 401 without it, 409 when refused
=====================================  ========================================================================
"""

from __future__ import annotations

import hmac
import json
import logging
import threading
from dataclasses import dataclass
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Protocol

from prometheus_client.exposition import CONTENT_TYPE_PLAIN_0_0_4

from mesh_identity.errors import MeshIdentityError, RotationError
from mesh_identity.rotation.roots import RootStep, StepOverride

log = logging.getLogger(__name__)
ADMIN_PREFIX = "/admin/root/"
MAX_BODY = 64 * 1024


class App(Protocol):
    """What the endpoint serves (the :class:`~mesh_identity.server.service.Service` implements it)."""

    def metrics_text(self) -> bytes: ...

    def health_problem(self) -> str | None: ...

    def ready_problem(self) -> str | None: ...

    def status_json(self) -> dict[str, Any]: ...

    def root_step(self, step: RootStep, override: StepOverride | None = None) -> str: ...


@dataclass(frozen=True, slots=True)
class Reply:
    status: HTTPStatus
    body: bytes
    content_type: str = "text/plain; charset=utf-8"
    headers: tuple[tuple[str, str], ...] = ()


def _text(status: HTTPStatus, text: str, **headers: str) -> Reply:
    return Reply(status, (text + "\n").encode(), headers=tuple(headers.items()))


def _json(status: HTTPStatus, value: Any) -> Reply:
    return Reply(status, json.dumps(value, indent=2).encode() + b"\n", "application/json")


class Endpoint:
    """A threaded HTTP server on ``host:port`` (port 0 picks a free one) in a daemon thread."""

    def __init__(self, app: App, host: str, port: int, token: str) -> None:
        self.app = app
        self.token = token
        endpoint = self

        class Handler(_Handler):
            owner = endpoint

        self._server = ThreadingHTTPServer((host, port), Handler)
        self._server.daemon_threads = True
        self._thread: threading.Thread | None = None

    @property
    def address(self) -> tuple[str, int]:
        host, port = self._server.server_address[:2]
        return str(host), int(port)

    @property
    def url(self) -> str:
        host, port = self.address
        return f"http://{f'[{host}]' if ':' in host else host}:{port}"

    def start(self) -> None:
        self._thread = threading.Thread(target=self._server.serve_forever, name="mesh-identity-http", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        if self._thread is not None:
            self._server.shutdown()
            self._thread.join()
            self._thread = None
        self._server.server_close()

    # -- routing -------------------------------------------------------------------------------------------

    def get(self, path: str) -> Reply:
        if path == "/metrics":
            return Reply(HTTPStatus.OK, self.app.metrics_text(), CONTENT_TYPE_PLAIN_0_0_4)  # every Prometheus reads it
        if path == "/healthz":
            problem = self.app.health_problem()
            return _text(HTTPStatus.OK, "ok") if problem is None else _text(HTTPStatus.SERVICE_UNAVAILABLE, problem)
        if path == "/readyz":
            problem = self.app.ready_problem()
            if problem is None:
                return _text(HTTPStatus.OK, "ready")
            return _text(HTTPStatus.SERVICE_UNAVAILABLE, f"not ready: {problem}")
        if path == "/status":
            return _json(HTTPStatus.OK, self.app.status_json())
        if path.startswith(ADMIN_PREFIX):
            return _text(HTTPStatus.METHOD_NOT_ALLOWED, f"{path} takes POST", Allow="POST")
        return _text(HTTPStatus.NOT_FOUND, f"no such endpoint: {path}")

    def post(self, path: str, authorization: str | None) -> Reply:
        if not path.startswith(ADMIN_PREFIX):
            if path in ("/metrics", "/healthz", "/readyz", "/status"):
                return _text(HTTPStatus.METHOD_NOT_ALLOWED, f"{path} takes GET", Allow="GET")
            return _text(HTTPStatus.NOT_FOUND, f"no such endpoint: {path}")
        if not self._authorized(authorization):
            return _text(
                HTTPStatus.UNAUTHORIZED,
                "admin requests need 'Authorization: Bearer <token>' with the token from <state_dir>/admin.token",
                **{"WWW-Authenticate": 'Bearer realm="mesh-identity admin"'},
            )
        name = path[len(ADMIN_PREFIX) :]
        try:
            step = RootStep(name)
        except ValueError:
            steps = ", ".join(RootStep)
            return _text(HTTPStatus.NOT_FOUND, f"no root rotation step {name!r} (use {steps})")
        try:
            message = self.app.root_step(step)
        except RotationError as err:
            return _json(HTTPStatus.CONFLICT, {"error": str(err)})
        except MeshIdentityError as err:
            log.warning("root rotation step %s failed: %s", step, err)
            return _json(HTTPStatus.INTERNAL_SERVER_ERROR, {"error": str(err)})
        return _json(HTTPStatus.OK, {"message": message})

    def _authorized(self, authorization: str | None) -> bool:
        if not authorization:
            return False
        scheme, _, credentials = authorization.partition(" ")
        if scheme.lower() != "bearer" or not credentials.strip():
            return False
        return hmac.compare_digest(credentials.strip().encode(), self.token.encode())


class _Handler(BaseHTTPRequestHandler):
    owner: Endpoint
    server_version = "mesh-identity"
    sys_version = ""
    protocol_version = "HTTP/1.1"

    def do_GET(self) -> None:
        self._reply(self._safe(lambda: self.owner.get(self._path())))

    def do_POST(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        if length > MAX_BODY:
            self._reply(_text(HTTPStatus.REQUEST_ENTITY_TOO_LARGE, "request body too large"))
            return
        if length:
            self.rfile.read(length)
        authorization = self.headers.get("Authorization")
        self._reply(self._safe(lambda: self.owner.post(self._path(), authorization)))

    def _path(self) -> str:
        return self.path.split("?", 1)[0]

    def _safe(self, handle: Any) -> Reply:
        try:
            reply: Reply = handle()
        except Exception:
            log.exception("%s %s failed", self.command, self._path())
            return _text(HTTPStatus.INTERNAL_SERVER_ERROR, "internal error (see the server log)")
        return reply

    def _reply(self, reply: Reply) -> None:
        self.send_response(reply.status)
        self.send_header("Content-Type", reply.content_type)
        self.send_header("Content-Length", str(len(reply.body)))
        self.send_header("Cache-Control", "no-store")
        for name, value in reply.headers:
            self.send_header(name, value)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(reply.body)

    def log_message(self, format: str, *args: Any) -> None:
        log.debug("%s " + format, self.address_string(), *args)
