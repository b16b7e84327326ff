"""HTTP for the Vault fake: parsing a request (``/v1/`` path, JSON body, ``X-Vault-Token`` and
``X-Vault-Namespace``), dispatching it by path to ``sys``, token auth, the other auth methods or a PKI mount,
turning :class:`~tests.fakes.vault.api.ApiError` into Vault's error reply (``{"errors": [...]}``), and the
request handler that applies injected faults, logs every request and writes the answer."""

from __future__ import annotations

import contextlib
import json
import re
import socket
import ssl
from collections.abc import Mapping, Sequence
from http.server import BaseHTTPRequestHandler
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qs, urlsplit

from tests.fakes.vault import auth, pki, sys
from tests.fakes.vault.api import ApiError, Request, Response, no_route
from tests.fakes.vault.state import VaultState, normalize_namespace

if TYPE_CHECKING:
    from tests.fakes.vault.server import Httpd


def error(status: int, errors: Sequence[str]) -> Response:
    """Vault's error reply."""
    return Response(status, json.dumps({"errors": list(errors)}).encode())


def handle(state: VaultState, method: str, raw_path: str, headers: Mapping[str, str], raw_body: bytes) -> Response:
    """Answer one HTTP request (the transport-independent part of the server)."""
    parts = urlsplit(raw_path)
    path = parts.path
    lowered = {k.lower(): v for k, v in headers.items()}
    if not path.startswith("/v1/"):
        return error(404, ["404 page not found"])
    body: dict[str, Any] = {}
    if raw_body.strip():
        try:
            loaded = json.loads(raw_body)
        except ValueError as err:
            return error(400, [f"failed to parse JSON input: {err}"])
        if not isinstance(loaded, dict):
            return error(400, ["failed to parse JSON input: not an object"])
        body = loaded
    req = Request(
        method=method,
        rel=re.sub(r"/+", "/", path[len("/v1/") :]).strip("/"),
        query=parse_qs(parts.query),
        body=body,
        namespace=normalize_namespace(lowered.get("x-vault-namespace", "")),
        token=lowered.get("x-vault-token", ""),
    )
    try:
        return route(state, req)
    except ApiError as err:
        return error(err.status, err.errors)


def route(state: VaultState, req: Request) -> Response:
    if req.rel == "sys/health":
        return sys.health(state, req)
    if req.rel == "sys/seal-status":
        return sys.seal_status(state)
    with state.lock:
        if state.sealed:
            raise ApiError(503, "Vault is sealed")
        ns = state.namespaces.get(req.namespace)
    if ns is None:
        raise no_route(req.rel)
    if req.rel.startswith("sys/"):
        return sys.handle(state, req, ns)
    if req.rel.startswith("auth/token/"):
        return auth.token_api(state, req, ns)
    if req.rel.startswith("auth/"):
        return auth.auth_api(state, req, ns)
    return pki.handle(state, req, ns)


class Handler(BaseHTTPRequestHandler):
    server: Httpd
    protocol_version = "HTTP/1.1"
    disable_nagle_algorithm = True  # headers and body go out in two writes: no 40 ms delayed-ACK stalls
    server_version = "Vault"
    sys_version = ""

    def setup(self) -> None:
        self.tls_failed = False
        if isinstance(self.request, ssl.SSLSocket):
            self.request.settimeout(10)
            try:
                self.request.do_handshake()
            except (ssl.SSLError, OSError):
                self.tls_failed = True
            self.request.settimeout(None)
        super().setup()

    def handle(self) -> None:
        if not self.tls_failed:
            with contextlib.suppress(ConnectionError, ssl.SSLError, TimeoutError):
                super().handle()

    def log_message(self, format: str, *args: Any) -> None:
        return

    def _serve(self) -> None:
        state = self.server.state
        length = int(self.headers.get("Content-Length") or 0)
        raw = self.rfile.read(length) if length else b""
        path = urlsplit(self.path).path
        namespace = normalize_namespace(self.headers.get("X-Vault-Namespace", ""))
        fault = state.take_fault(path)
        if fault is not None and fault.status is None:
            state.record(self.command, path, namespace, 0)
            self.close_connection = True
            with contextlib.suppress(OSError):
                self.connection.shutdown(socket.SHUT_RDWR)
            return
        if fault is not None and fault.status is not None:
            response = error(fault.status, fault.errors)
        else:
            response = handle(state, self.command, self.path, dict(self.headers.items()), raw)
        state.record(self.command, path, namespace, response.status)
        self.send_response(response.status)
        if response.status != 204:
            self.send_header("Content-Type", response.content_type)
            self.send_header("Content-Length", str(len(response.body)))
        self.send_header("Cache-Control", "no-store")
        self.end_headers()
        if self.command != "HEAD" and response.status != 204:
            self.wfile.write(response.body)

    do_GET = do_POST = do_PUT = do_DELETE = do_HEAD = do_LIST = do_PATCH = _serve
