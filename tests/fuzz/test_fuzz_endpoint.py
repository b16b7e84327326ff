"""Fuzz target: the metrics and admin HTTP endpoint (``mesh_identity.server.endpoint``) of a running service,
with raw requests over a socket.

Inputs: request lines (methods, targets, versions, separators), headers (Content-Length values, chunked
bodies, Authorization with and without the admin token, huge and many headers), bodies, pipelined requests,
and partial requests (cut anywhere). The rule:

* a complete request gets an HTTP answer (not a 500 from a crash) or the connection is closed, within
  ``ANSWER_BOUND``; a partial one may also be left waiting (the client gives up after a short while);
* no handler thread dies with an exception, no log line holds the admin token or a private key;
* afterwards the server answers ``GET /healthz`` with 200, also while many partial requests are held open.
"""

from __future__ import annotations

import contextlib
import re
import socket
import sys
import threading
import time
import traceback
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from mesh_identity.assembly import build_service
from mesh_identity.server.service import Service
from tests.fuzz.harness import (
    PRODUCT,
    ROOT,
    Rule,
    Watch,
    corpus_cases,
    count,
    fuzz_settings,
    outcome,
    secret_markers,
)
from tests.rotation.helpers import Recorder, ids, make_config, provider_for

TARGET = "endpoint"
ANSWER_BOUND = 3.0  # seconds for a complete request's answer (or close): far more than a loopback answer takes
REQUEST_TIMEOUT = 1.0  # the endpoint's request_timeout for these tests (10 s in production)
IDLE_BOUND = REQUEST_TIMEOUT + 2.0  # seconds a silent client may hold a connection with half a request
PARTIAL_WAIT = 0.05  # how long the client waits on a partial request before it gives up
ALLOWED_5XX = {501, 503, 505}  # not implemented (a method), not ready, HTTP version: answers, not crashes


@dataclass
class Server:
    service: Service
    address: tuple[str, int]
    token: str
    crashes: list[BaseException]


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    config = make_config(tmp_path_factory.mktemp("endpoint"), identities=ids("web", "api"))
    service = build_service(config, provider_for(config), events=Recorder())
    service.start(paused=True)
    endpoint = service.endpoint
    assert endpoint is not None
    crashes: list[BaseException] = []

    def handle_error(request: Any, client_address: Any) -> None:  # socketserver's: an exception in a handler
        err = sys.exc_info()[1]
        if err is not None and not isinstance(err, ConnectionError | TimeoutError):
            crashes.append(err)

    endpoint._server.handle_error = handle_error  # type: ignore[method-assign]
    endpoint.request_timeout = REQUEST_TIMEOUT  # type: ignore[attr-defined]  # lowered, as the endpoint's tests do
    try:
        yield Server(service, endpoint.address, endpoint.token, crashes)
    finally:
        service.stop()


@pytest.fixture(scope="module")
def rule(server: Server) -> Iterator[Rule]:
    with Watch() as watch:
        yield Rule(TARGET, secrets=secret_markers(server.token), timeout=ANSWER_BOUND + 5, watch=watch)


# -- one exchange --------------------------------------------------------------------------------------------


@dataclass
class Exchange:
    answer: bytes  # what came back before the client stopped reading
    closed: bool  # the server closed the connection
    complete: bool  # an answer whose length is known arrived whole


def _answer_complete(data: bytes) -> bool:
    while data.startswith(b"HTTP/1.1 100 "):  # an interim answer (Expect: 100-continue): the real one follows
        data = data.partition(b"\r\n\r\n")[2]
    head, sep, body = data.partition(b"\r\n\r\n")
    if not sep:
        return False
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length" and value.strip().isdigit():
            return len(body) >= int(value.strip())
    return False


def exchange(address: tuple[str, int], request: bytes, wait: float) -> Exchange:
    """Send ``request`` and read until the answer is whole, the server closes, or ``wait`` passes."""
    deadline = time.monotonic() + wait
    received = b""
    closed = False
    with socket.create_connection(address, timeout=wait) as sock:
        with contextlib.suppress(OSError):  # the server closed early (refused a huge head): read what it said
            sock.sendall(request)
        while not _answer_complete(received):
            left = deadline - time.monotonic()
            if left <= 0:
                break
            sock.settimeout(left)
            try:
                chunk = sock.recv(65536)
            except TimeoutError:
                break
            except OSError:
                closed = True
                break
            if not chunk:
                closed = True
                break
            received += chunk
    return Exchange(received, closed, _answer_complete(received))


_HTML_ERROR = re.compile(rb"<p>Error code: (\d{3})</p>")


def status_of(answer: bytes, request: bytes) -> int:
    """The status of an answer: its status line; or, where the request was too broken for its HTTP version to
    be known, the stdlib's HTTP/0.9-style error page (no status line, the code in the page); or 200 for the
    body of an HTTP/0.9 ``GET``."""
    if answer.startswith(b"HTTP/1.") and answer[9:12].isdigit():
        return int(answer[9:12])
    page = _HTML_ERROR.search(answer[:1000])
    if answer.startswith(b"<!DOCTYPE HTML>") and page:
        return int(page[1])
    if request.startswith(b"GET ") and request.split(b"\n", 1)[0].strip().count(b" ") == 1:
        return 200
    raise AssertionError(f"the answer to {request[:200]!r} is not HTTP: {answer[:200]!r}")


def hang_signature() -> tuple[str, str]:
    """Where a handler thread is stuck: ``("Hang", innermost product function)`` of the threads that are in
    product code now (a complete request that got no answer)."""
    frames = sys._current_frames()
    for thread in threading.enumerate():
        frame = frames.get(thread.ident or -1)
        stack = traceback.extract_stack(frame) if frame is not None else []
        inside = [f for f in stack if f.filename.startswith(PRODUCT)]
        if inside and thread.name.startswith("Thread-"):
            last = inside[-1]
            return "Hang", f"{Path(last.filename).relative_to(ROOT)}:{last.name}"
    return "Hang", "outside the product"


def check(server: Server, rule: Rule, request: bytes, *, partial: bool) -> None:
    ok, result = rule.call(
        lambda: exchange(server.address, request, PARTIAL_WAIT if partial else ANSWER_BOUND), "the exchange"
    )
    assert ok, result
    answer: Exchange = result
    if answer.answer:
        status = status_of(answer.answer, request)
        body = answer.answer.partition(b"\r\n\r\n")[2]
        if status >= 500 and status not in ALLOWED_5XX and not body.startswith(b'{\n  "error"'):
            raise AssertionError(f"{request[:300]!r} was answered {status}: {answer.answer[:300]!r}")
        outcome(f"answered {status}")
        rule.check_text("an answer", answer.answer.decode("latin-1"))
    elif answer.closed:
        outcome("closed without an answer")
    elif partial:
        outcome("partial request left waiting")
    else:
        _report_hang(rule, hang_signature(), request)
    while server.crashes:
        rule.crash(server.crashes.pop(0), f"the handler of {request[:300]!r}")
    rule.settle(f"the request {request[:200]!r}")
    wait_until_healthy(server)


def _report_hang(rule: Rule, sig: tuple[str, str], request: bytes) -> None:
    rule.violation(
        sig,
        f"{TARGET}: no answer and no close within {ANSWER_BOUND}s to the complete request {request[:300]!r}; "
        f"a handler is stuck in {sig[1]}",
    )


def check_idle(server: Server, request: bytes) -> None:
    """A client that sends ``request`` and then nothing: the server must drop it within ``IDLE_BOUND``."""
    started = time.monotonic()
    answer = exchange(server.address, request, IDLE_BOUND + 1)
    assert answer.closed and time.monotonic() - started <= IDLE_BOUND, (
        f"a connection idle after {request!r} was still open after {IDLE_BOUND}s: the server does not time a "
        "client out (slowloris: each such connection holds a thread)"
    )
    wait_until_healthy(server)


# -- the seed corpus: one raw request per file (``{token}`` stands for the admin token); ``partial-*`` files
# are cut short on purpose; ``idle-*`` files are sent by a client that then stays silent -------------------


@pytest.mark.parametrize("path", corpus_cases(TARGET))
def test_corpus(server: Server, rule: Rule, path: Path) -> None:
    count(TARGET, corpus=True)
    request = path.read_bytes().replace(b"{token}", server.token.encode())
    if path.name.startswith("idle-"):
        check_idle(server, request)
        return
    with rule.strictly():
        check(server, rule, request, partial=path.name.startswith("partial-"))


# -- generated requests --------------------------------------------------------------------------------------

METHODS = ["GET", "POST", "HEAD", "PUT", "DELETE", "OPTIONS", "PATCH", "CONNECT", "TRACE", "get", "G\x00T", ""]
TARGETS = [
    "/healthz", "/readyz", "/metrics", "/status", "/admin/root/prepare", "/admin/root/activate",
    "/admin/root/retire", "/admin/root/", "/admin/root/nope", "/admin/root/../../etc/passwd", "/", "*",
    "http://127.0.0.1/healthz", "//healthz", "/healthz?x=1", "/status#frag", "/%2e%2e/", "/\xff", "",
    "/" + "a" * 70000,
]  # fmt: skip
VERSIONS = ["HTTP/1.1", "HTTP/1.0", "HTTP/0.9", "HTTP/2.0", "HTTP/1.1x", "HTTP/11.1", "http/1.1", "", "HTTP/1.1 x"]
LENGTHS = ["0", "5", "-1", "-100", "abc", "1e3", " 5", "5, 5", "99999999999999999999", "65537", "0x10", ""]
AUTHS = ["Bearer {token}", "Bearer wrong", "bearer {token}", "Basic Zm9vOmJhcg==", "Bearer", "Bearer  {token} ", ""]

header_names = st.sampled_from(["Host", "Content-Type", "Connection", "Expect", "X-Forwarded-For", "Accept"])
header = st.one_of(
    st.tuples(st.just("Content-Length"), st.sampled_from(LENGTHS)),
    st.tuples(st.just("Authorization"), st.sampled_from(AUTHS)),
    st.tuples(st.just("Transfer-Encoding"), st.sampled_from(["chunked", "gzip, chunked", "identity"])),
    st.tuples(st.just("Connection"), st.sampled_from(["close", "keep-alive", "upgrade"])),
    st.tuples(st.just("Expect"), st.just("100-continue")),
    st.tuples(header_names, st.text(alphabet=st.characters(max_codepoint=0xFF), max_size=20)),
    st.tuples(st.text(alphabet=st.characters(max_codepoint=0xFF), max_size=10), st.text(max_size=10)),
    st.tuples(st.just("X-Big"), st.integers(60000, 70000).map(lambda n: "b" * n)),
)


@st.composite
def requests(draw: st.DrawFn) -> tuple[bytes, bool]:
    """A raw request (maybe two, pipelined) and whether it was cut short."""
    eol = draw(st.sampled_from(["\r\n", "\r\n", "\n"]))
    sep = draw(st.sampled_from([" ", " ", "  ", "\t"]))
    method = draw(st.sampled_from(METHODS) | st.text(alphabet=st.characters(max_codepoint=0x7F), max_size=8))
    target = draw(st.sampled_from(TARGETS) | st.text(max_size=20))
    version = draw(st.sampled_from(VERSIONS))
    line = sep.join(part for part in (method, target, version) if part or draw(st.booleans()))
    headers = draw(st.lists(header, max_size=5))
    if draw(st.integers(0, 20)) == 0:
        headers += [(f"X-{i}", "v") for i in range(draw(st.integers(90, 120)))]
    body = draw(st.binary(max_size=64))
    if draw(st.booleans()):  # a Content-Length that matches the body
        headers.append(("Content-Length", str(len(body))))
    text = (
        line + eol + "".join(f"{name}:{draw(st.sampled_from([' ', '', '  ']))}{value}{eol}" for name, value in headers)
    )
    raw = (text + eol).encode("utf-8", "surrogateescape") + body
    if draw(st.integers(0, 5)) == 0:  # pipelined: a second, well-formed request behind it
        raw += b"GET /readyz HTTP/1.1\r\nHost: x\r\n\r\n"
    partial = draw(st.integers(0, 6)) == 0
    if partial:
        raw = raw[: draw(st.integers(0, max(0, len(raw) - 1)))]
    return raw, partial


@fuzz_settings(200)
@given(request=requests())
def test_generated_requests(server: Server, rule: Rule, request: tuple[bytes, bool]) -> None:
    count(TARGET)
    raw, partial = request
    check(server, rule, raw.replace(b"{token}", server.token.encode()), partial=partial)


def test_many_held_partial_requests_do_not_stop_the_server(server: Server, rule: Rule) -> None:
    """Slowloris: 40 connections each holding half a request. Every new connection is still answered at once
    (200, or 503 while the connection limit is reached); the server drops the held ones within its request
    time-out, and then answers ``/healthz`` with 200 again."""
    count(TARGET)
    held = []
    try:
        for i in range(40):  # beyond the endpoint's connection limit (32)
            sock = socket.create_connection(server.address, timeout=5)
            sock.sendall(HALF_REQUESTS[i % len(HALF_REQUESTS)])
            held.append(sock)
            time.sleep(0.005)  # the listen backlog is 5: a faster burst waits for SYN retransmits (1 s)
        healthy = exchange(server.address, b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n", 5.0)
        assert healthy.complete and status_of(healthy.answer, b"") in (200, 503), healthy
        deadline = time.monotonic() + IDLE_BOUND
        for sock in held:  # each is answered (503: over the limit) or dropped, within the bound
            sock.settimeout(max(0.01, deadline - time.monotonic()))
            try:
                while sock.recv(65536):
                    pass
            except ConnectionError:
                pass
            except TimeoutError:
                raise AssertionError(
                    f"a connection holding half a request was still open after {IDLE_BOUND}s"
                ) from None
    finally:
        for sock in held:
            with contextlib.suppress(OSError):
                sock.close()
    wait_until_healthy(server)
    rule.settle("held partial requests")


HALF_REQUESTS = (
    b"GET /healthz HTTP/1.1\r\nHost: x\r\n",
    b"POST /admin/root/prepare HTTP/1.1\r\nContent-Length: 10\r\n\r\nab",
    b"GE",
)


def wait_until_healthy(server: Server, timeout: float = 10.0) -> None:
    """``GET /healthz`` answers 200 (retried while the connection limit still answers 503)."""
    deadline = time.monotonic() + timeout
    while True:
        answer = exchange(server.address, b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n", 5.0)
        if answer.answer.startswith(b"HTTP/1.1 200 ") and answer.answer.endswith(b"ok\n"):
            return
        assert time.monotonic() < deadline and answer.answer.startswith(b"HTTP/1.1 503 "), answer
        time.sleep(0.05)
