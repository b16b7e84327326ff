"""The monitoring and admin listener (``metrics.listen``, loopback by default).

=====================================  ========================================================================
``GET /metrics``                       Prometheus text format
``GET /healthz``                       200 while the server runs
``GET /readyz``                        200 when the authority can really sign, else 503 with the reason
``GET /status``                        JSON: identities, CA chain, root rotation, provider health
``POST /admin/root/<step>``            root rotation step (``prepare``, ``activate``, ``retire``); needs
                                       ``Authorization: Bearer <token>`` (the token is in
                                       ``<state_dir>/admin.token``); 401 without it, 409 when refused. An
                                       optional JSON body ``{"exclude": ["node-a", ...], "force": "reason"}``
                                       gives up on some proxies' evidence (see
                                       :class:`~mesh_identity.rotation.roots.StepOverride`); 400 when it is
                                       not valid, naming the key
=====================================  ========================================================================

Hardening (the listener may face the network):

* every request (its head and its body) must arrive within ``request_timeout`` (10 s) of when the server
  starts waiting for it, however slowly its bytes drip; an idle keep-alive connection is closed after as long;
  a reply must be taken within 10 s;
* at most ``max_connections`` (32) connections are served at once; more are answered 503 and closed at once,
  holding no thread;
* bad framing (a ``Content-Length`` that is not a decimal number, given twice, or any ``Transfer-Encoding``)
  is answered 400 and the connection closed; a body over 512 KiB 413, likewise;
* on a listener beyond loopback (``metrics.listen`` not 127.0.0.1, ::1 or localhost) the bearer token would
  cross the network in clear text, so admin requests are refused (403) unless the operator opted in with
  ``metrics.admin_beyond_loopback: true`` (for when TLS is in front of the endpoint, or the network is
  trusted). The endpoint itself speaks plain HTTP.
"""

from __future__ import annotations

import hmac
import io
import json
import logging
import socket
import sys
import threading
import time
import unicodedata
from dataclasses import dataclass
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Protocol

from prometheus_client.exposition import CONTENT_TYPE_PLAIN_0_0_4

from mesh_identity.errors import MeshIdentityError, RotationError
from mesh_identity.ports import is_loopback
from mesh_identity.rotation.roots import RootStep, StepOverride

log = logging.getLogger(__name__)
ADMIN_PREFIX = "/admin/root/"
MAX_BODY = 512 * 1024  # an override at its limits (1,000 node ids of 253 characters) is about 260 KiB
MAX_CONNECTIONS = 32
REQUEST_TIMEOUT = 10.0  # seconds for a request's head and body to arrive (and for an idle connection)
WRITE_TIMEOUT = 10.0  # seconds for a client to take a reply
OPT_IN = "metrics.admin_beyond_loopback"  # the config key that allows admin requests beyond loopback

MAX_EXCLUDE = 1000
MAX_NODE_ID = 253
MAX_REASON = 500
OVERRIDE_KEYS = ("exclude", "force")


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


def _bad_framing(text: str) -> Reply:
    return _text(HTTPStatus.BAD_REQUEST, text, Connection="close")


class BadOverride(ValueError):
    """The body of a root step is not a valid override; the message names the key."""


def parse_override(body: bytes) -> StepOverride | None:
    """The override a root step's body asks for; None for an empty body or one that overrides nothing.
    BadOverride naming the key when the body is not ``{"exclude": [node id, ...], "force": "reason"}``."""
    if not body.strip():
        return None
    try:
        data = json.loads(body.decode("utf-8"))
    except UnicodeDecodeError:
        raise BadOverride("the request body is not JSON: it is not UTF-8") from None
    except RecursionError:
        raise BadOverride("the request body is not JSON: it is nested too deeply") from None
    except ValueError as err:
        raise BadOverride(f"the request body is not JSON: {err}") from None
    if not isinstance(data, dict):
        raise BadOverride(f"the request body must be a JSON object with the keys {', '.join(OVERRIDE_KEYS)}")
    for key in data:
        if key not in OVERRIDE_KEYS:
            raise BadOverride(f"unknown key {key!r} in the request body (use {', '.join(OVERRIDE_KEYS)})")
    exclude = data.get("exclude", [])
    if not isinstance(exclude, list):
        raise BadOverride("'exclude' must be a list of node ids")
    if len(exclude) > MAX_EXCLUDE:
        raise BadOverride(f"'exclude' names more than {MAX_EXCLUDE:,} node ids")
    for index, node in enumerate(exclude):
        if not isinstance(node, str) or not node or len(node) > MAX_NODE_ID:
            raise BadOverride(f"'exclude'[{index}] must be a non-empty string of at most {MAX_NODE_ID} characters")
        if _has_control(node):
            raise BadOverride(f"'exclude'[{index}] must not contain control characters")
    force = data.get("force")
    if "force" in data:
        if not isinstance(force, str) or not force.strip() or len(force) > MAX_REASON:
            raise BadOverride(f"'force' must be a non-empty reason of at most {MAX_REASON} characters")
        if _has_control(force):
            raise BadOverride("'force' must not contain control characters")
    override = StepOverride(frozenset(exclude), force)
    return None if override.empty else override


def _has_control(text: str) -> bool:
    """Control characters (C0, DEL, C1) and line separators: they could forge lines in logs."""
    return any(unicodedata.category(char) in ("Cc", "Zl", "Zp") for char in text)


class Endpoint:
    """A threaded HTTP server on ``host:port`` (port 0 picks a free one) in a daemon thread.

    ``admin_beyond_loopback`` allows admin requests when ``host`` is not loopback (see the module docstring);
    ``max_connections`` and ``request_timeout`` bound what clients can hold (tests lower them)."""

    def __init__(
        self,
        app: App,
        host: str,
        port: int,
        token: str,
        *,
        admin_beyond_loopback: bool = False,
        max_connections: int = MAX_CONNECTIONS,
        request_timeout: float = REQUEST_TIMEOUT,
    ) -> None:
        self.app = app
        self.token = token
        self.host = host
        self.admin_allowed = is_loopback(host) or admin_beyond_loopback
        self.request_timeout = request_timeout
        self.write_timeout = WRITE_TIMEOUT
        endpoint = self

        class Handler(_Handler):
            owner = endpoint

        self._server = _Server((host, port), Handler, max_connections)
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

    def post(self, path: str, authorization: str | None, body: bytes = b"") -> Reply:
        if not path.startswith(ADMIN_PREFIX):
            if path in ("/metrics", "/healthz", "/readyz", "/status"):
                return _text(HTTPStatus.METHOD_NOT_ALLOWED, f"{path} takes GET", Allow="GET")
            return _text(HTTPStatus.NOT_FOUND, f"no such endpoint: {path}")
        if not self.admin_allowed:  # before the token is even looked at
            return _text(
                HTTPStatus.FORBIDDEN,
                f"admin requests are refused: the endpoint listens on {self.host}, beyond loopback, where the bearer "
                f"token would cross the network in clear text; listen on loopback (metrics.listen: "
                f"127.0.0.1:{self.address[1]}), or put TLS in front of it and set {OPT_IN}: true",
            )
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
            override = parse_override(body)
        except BadOverride as err:
            return _json(HTTPStatus.BAD_REQUEST, {"error": str(err)})
        try:
            message = self.app.root_step(step, override)
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


class _Server(ThreadingHTTPServer):
    """One thread per connection, at most ``max_connections`` of them; a connection beyond is answered 503
    from the accepting thread, without blocking (its send buffer is empty), and closed."""

    daemon_threads = True
    # The kernel's queue of connections not yet accepted: socketserver's default of 5 drops the SYNs of a burst
    # (clients retry after a second); with room for a burst, the ones beyond the bound get their 503 at once.
    request_queue_size = 128

    def __init__(self, address: tuple[str, int], handler: type[_Handler], max_connections: int) -> None:
        self.max_connections = max_connections
        self._slots = threading.BoundedSemaphore(max_connections)
        super().__init__(address, handler)

    def process_request(self, request: Any, client_address: Any) -> None:
        if not self._slots.acquire(blocking=False):
            self._refuse(request)
            return
        try:
            super().process_request(request, client_address)
        except BaseException:
            self._slots.release()
            raise

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            self._slots.release()

    def handle_error(self, request: Any, client_address: Any) -> None:
        error = sys.exc_info()[1]
        if isinstance(error, OSError):  # the client went away (reset, broken pipe): theirs, not a fault of ours
            log.debug("connection from %s ended: %s", client_address, error)
            return
        log.exception("serving %s failed", client_address)

    def _refuse(self, request: socket.socket) -> None:
        body = f"too many connections (at most {self.max_connections} at once); try again\n".encode()
        head = (
            "HTTP/1.1 503 Service Unavailable\r\nContent-Type: text/plain; charset=utf-8\r\n"
            f"Content-Length: {len(body)}\r\nConnection: close\r\nRetry-After: 1\r\nCache-Control: no-store\r\n\r\n"
        )
        try:
            request.setblocking(False)
            request.send(head.encode() + body)
        except OSError:
            pass
        self.shutdown_request(request)


class _DeadlineReader(io.RawIOBase):
    """The connection's reads, each allowed only what is left of the current request's deadline: a client
    dripping one byte at a time gets no more time than one sending the request at once."""

    def __init__(self, sock: socket.socket, handler: _Handler) -> None:
        self._sock = sock
        self._handler = handler

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        left = self._handler.deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError("the request did not arrive in time")
        self._sock.settimeout(left)
        return self._sock.recv_into(buffer)


class _Handler(BaseHTTPRequestHandler):
    owner: Endpoint
    server_version = "mesh-identity"
    sys_version = ""
    protocol_version = "HTTP/1.1"
    deadline = 0.0

    def setup(self) -> None:
        super().setup()
        self.rfile.close()
        self.rfile = io.BufferedReader(_DeadlineReader(self.connection, self))

    def handle_one_request(self) -> None:
        # a time-out anywhere in reading the request (head or body) ends the connection, without a reply
        self.deadline = time.monotonic() + self.owner.request_timeout
        super().handle_one_request()

    def flush_headers(self) -> None:
        self.connection.settimeout(self.owner.write_timeout)  # replies, including the base class's errors
        super().flush_headers()

    def do_GET(self) -> None:
        body = self._read_body()
        if isinstance(body, Reply):
            self._reply(body)
            return
        self._reply(self._safe(lambda: self.owner.get(self._path())))

    def do_POST(self) -> None:
        body = self._read_body()
        if isinstance(body, Reply):
            self._reply(body)
            return
        authorization = self.headers.get("Authorization")
        self._reply(self._safe(lambda: self.owner.post(self._path(), authorization, body)))

    def _read_body(self) -> bytes | Reply:
        """The request's body, or the reply refusing its framing (after which the connection closes: what
        follows on it cannot be told apart from a next request)."""
        if "Transfer-Encoding" in self.headers:
            return _bad_framing("Transfer-Encoding is not supported: send Content-Length")
        values = self.headers.get_all("Content-Length") or []
        if len(values) > 1:
            return _bad_framing("more than one Content-Length")
        if not values:
            return b""
        text = values[0].strip()
        if not (text.isascii() and text.isdigit()):
            return _bad_framing(f"bad Content-Length {text!r}: a decimal number of bytes is needed")
        if len(text) > len(str(MAX_BODY)) or int(text) > MAX_BODY:
            return _text(
                HTTPStatus.REQUEST_ENTITY_TOO_LARGE,
                f"request body too large (at most {MAX_BODY} bytes)",
                Connection="close",
            )
        length = int(text)
        body = self.rfile.read(length) if length else b""
        if len(body) < length:
            return _bad_framing("the request body ended before its Content-Length")
        return body

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
