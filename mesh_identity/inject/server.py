"""The webhook's HTTPS server: ``POST /mutate`` answers an AdmissionReview (:mod:`~mesh_identity.inject.review`).

TLS 1.2 or newer (the ``ssl`` module), with a certificate and key read from two files: :class:`TlsFiles` looks at
them (``stat``: device, inode, size, modification time, through links, so kubelet's ``..data`` swap of a Secret
volume counts) before each new connection and loads them again when either changed, so a rotated serving
certificate is used from the next handshake on, with no restart. A pair that does not load (a half-written
swap, a key that does not match the certificate) keeps the previous context in use, logged, until the files
change again; at start a pair that does not load is an error (fail closed: no plaintext fallback).

What a request gets::

    POST /mutate, application/json, Content-Length <= max_body   200, the AdmissionReview answering it
    ... a body that is not JSON, or a malformed review             400, a one-line message naming the field
    ... no Content-Length (or chunked)                             411
    ... a body larger than max_body                                413 (the body is not read)
    ... another Content-Type                                       415
    GET /healthz                                                   200 ok
    another path                                                   404; another method on /mutate: 405

Every connection has a deadline (``timeout``) for its handshake and each read, so a slow client holds one
thread for that long at most.
"""

from __future__ import annotations

import http.server
import json
import logging
import os
import socket
import ssl
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from mesh_identity.inject.review import Injector, InvalidReviewError

log = logging.getLogger(__name__)

MUTATE_PATH = "/mutate"
HEALTH_PATH = "/healthz"
MAX_BODY = 3 * 1024 * 1024  # a Pod is at most ~1.5 MiB in etcd; its review carries it once (oldObject is null)
TIMEOUT = 10.0


def _signature(path: Path) -> tuple[int, int, int, int]:
    found = os.stat(path)
    return (found.st_dev, found.st_ino, found.st_size, found.st_mtime_ns)


@dataclass(frozen=True, slots=True)
class _Loaded:
    signature: tuple[tuple[int, int, int, int], tuple[int, int, int, int]]
    context: ssl.SSLContext


class TlsFiles:
    """The serving certificate (PEM chain) and key files, and the SSL context made of them, reloaded on change."""

    def __init__(self, cert_file: Path, key_file: Path) -> None:
        self.cert_file = cert_file
        self.key_file = key_file
        self._lock = threading.Lock()
        self._failed: object = None  # the signature of a pair that did not load: not tried again
        self.reloads = 0  # how many times a changed pair was loaded
        signature = self._signature()
        self._loaded = _Loaded(signature, self._context())

    def _signature(self) -> tuple[tuple[int, int, int, int], tuple[int, int, int, int]]:
        return (_signature(self.cert_file), _signature(self.key_file))

    def _context(self) -> ssl.SSLContext:
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.minimum_version = ssl.TLSVersion.TLSv1_2
        context.load_cert_chain(self.cert_file, self.key_file)
        return context

    def context(self) -> ssl.SSLContext:
        """The context of the files as they are now (or the last pair that loaded, if they do not)."""
        with self._lock:
            try:
                signature = self._signature()
            except OSError as err:
                log.warning("webhook TLS files: %s; serving with the certificate loaded before", err)
                return self._loaded.context
            if signature in (self._loaded.signature, self._failed):
                return self._loaded.context
            try:
                context = self._context()
                if self._signature() != signature:  # changed while being read: take it again next time
                    return self._loaded.context
            except (OSError, ssl.SSLError) as err:
                self._failed = signature
                log.warning(
                    "webhook TLS files %s, %s do not load (%s); serving with the certificate loaded before",
                    self.cert_file, self.key_file, err,
                )  # fmt: skip
                return self._loaded.context
            self._loaded = _Loaded(signature, context)
            self._failed = None
            self.reloads += 1
            log.info("webhook TLS certificate reloaded from %s", self.cert_file)
            return context


class _Handler(http.server.BaseHTTPRequestHandler):
    server: _HttpsServer
    protocol_version = "HTTP/1.1"
    # TCP_NODELAY: the headers and the body leave as two TLS records; with Nagle's algorithm the body waited for
    # the client's delayed ACK (40 ms on Linux) on every answer (bench/inject_webhook.py measured it)
    disable_nagle_algorithm = True
    server_version = "mesh-identity-injector"
    sys_version = ""

    def log_message(self, format: str, *args: Any) -> None:
        log.debug("%s %s", self.address_string(), format % args)

    def _reply(self, code: int, body: bytes, content_type: str = "text/plain; charset=utf-8", **headers: str) -> None:
        self.send_response(code)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        for name, value in headers.items():
            self.send_header(name.replace("_", "-"), value)
        if code >= 400:
            self.send_header("Connection", "close")
            self.close_connection = True
        self.end_headers()
        self.wfile.write(body)

    def _error(self, code: int, message: str, **headers: str) -> None:
        self._reply(code, (message + "\n").encode(), **headers)

    @property
    def route(self) -> str:
        """The request's path without its query (the API server calls ``/mutate?timeout=10s``)."""
        return urlsplit(self.path).path

    def do_GET(self) -> None:
        if self.route == HEALTH_PATH:
            self._reply(200, b"ok\n")
        elif self.route == MUTATE_PATH:
            self._error(405, f"{MUTATE_PATH} takes POST (an AdmissionReview)", Allow="POST")
        else:
            self._error(404, f"{self.path[:100]!r}: not found (the webhook serves POST {MUTATE_PATH})")

    def do_POST(self) -> None:
        body = self._body()  # read before any answer: closing on an unread body would reset the connection
        if body is None:
            return
        if self.route != MUTATE_PATH:
            self._error(404, f"{self.path[:100]!r}: not found (the webhook serves POST {MUTATE_PATH})")
            return
        kind = (self.headers.get("Content-Type") or "").split(";")[0].strip().lower()
        if kind != "application/json":
            self._error(415, f"Content-Type {kind[:100]!r} is not application/json")
            return
        try:
            document = json.loads(body)
        except (ValueError, RecursionError) as err:
            self._error(400, f"the body is not JSON: {str(err)[:200]}")
            return
        try:
            answer = self.server.injector.review(document)
        except InvalidReviewError as err:
            self._error(400, f"malformed AdmissionReview: {err}")
            return
        except Exception:  # a bug or a failing documents callable: 500, so the failurePolicy decides
            log.exception("the webhook failed to answer an admission review")
            self._error(500, "internal error: the webhook could not answer this review")
            return
        self._reply(200, json.dumps(answer, separators=(",", ":")).encode(), "application/json")

    def _body(self) -> bytes | None:
        """The request's body, or None after answering 411, 400 or 413 (a body that large is never read)."""
        if self.headers.get("Transfer-Encoding") or self.headers.get("Content-Length") is None:
            self._error(411, "Content-Length is required (no chunked body)")
            return None
        text = self.headers["Content-Length"].strip()
        if not text.isascii() or not text.isdigit():
            self._error(400, f"Content-Length {text[:40]!r} is not a number of bytes")
            return None
        size = int(text)
        if size > self.server.max_body:
            self._error(413, f"the body is {size} bytes, more than the {self.server.max_body} allowed")
            return None
        body = self.rfile.read(size)
        if len(body) != size:
            self._error(400, f"the body ended after {len(body)} of {size} bytes")
            return None
        return body

    def do_PUT(self) -> None:
        self._not_allowed()

    def do_DELETE(self) -> None:
        self._not_allowed()

    def do_PATCH(self) -> None:
        self._not_allowed()

    def _not_allowed(self) -> None:
        if self.route == MUTATE_PATH:
            self._error(405, f"{MUTATE_PATH} takes POST (an AdmissionReview)", Allow="POST")
        else:
            self._error(404, f"{self.path[:100]!r}: not found (the webhook serves POST {MUTATE_PATH})")


class _HttpsServer(http.server.ThreadingHTTPServer):
    daemon_threads = True
    injector: Injector
    tls: TlsFiles
    max_body: int
    connection_timeout: float

    def finish_request(self, request: Any, client_address: Any) -> None:
        """In the connection's thread: the handshake with the current certificate, then HTTP over it."""
        request.settimeout(self.connection_timeout)
        try:
            connection = self.tls.context().wrap_socket(request, server_side=True)
        except (OSError, ssl.SSLError) as err:
            log.debug("webhook TLS handshake with %s failed: %s", client_address, err)
            return
        try:
            _Handler(connection, client_address, self)
        finally:
            connection.close()


class _HttpsServer6(_HttpsServer):
    address_family = socket.AF_INET6


class WebhookServer:
    """The HTTPS server of ``injector`` on ``host:port`` (port 0: a free one, see :attr:`address`), its
    certificate from ``cert_file``/``key_file``. :meth:`start` serves in a thread; :meth:`stop` ends it."""

    def __init__(
        self,
        injector: Injector,
        cert_file: Path,
        key_file: Path,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        max_body: int = MAX_BODY,
        timeout: float = TIMEOUT,
    ) -> None:
        if max_body < 1024:
            raise ValueError(f"max_body: {max_body} bytes is too small for an AdmissionReview (1024 at least)")
        if timeout <= 0:
            raise ValueError(f"timeout: {timeout} is not a positive number of seconds")
        self.tls = TlsFiles(cert_file, key_file)
        kind = _HttpsServer6 if ":" in host else _HttpsServer
        self._server = kind((host, port), _Handler, bind_and_activate=True)
        self._server.injector = injector
        self._server.tls = self.tls
        self._server.max_body = max_body
        self._server.connection_timeout = timeout
        self._thread: threading.Thread | None = None

    @property
    def address(self) -> tuple[str, int]:
        host, port = self._server.server_address[:2]
        return (str(host), int(port))

    def start(self) -> WebhookServer:
        if self._thread is None:
            self._thread = threading.Thread(target=self._server.serve_forever, args=(0.1,), name="webhook", daemon=True)
            self._thread.start()
        return self

    def stop(self) -> None:
        if self._thread is not None:
            self._server.shutdown()
            self._thread.join()
            self._thread = None
        self._server.server_close()

    def __enter__(self) -> WebhookServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
