"""The cert-manager provider against API answers of the wrong shape.

Every such answer must be a MalformedAnswerError that names the object and the key, never a TypeError, and no
message may show a Secret's value. The provider's watch must also survive a line it cannot read.

:class:`Relay` is a tiny HTTP server on loopback between the real provider (the ``kubernetes`` client) and the
Kubernetes API test server, on which the cert-manager stand-in signs. It forwards every request, watch streams
too, except on the routes a test gives another answer.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import logging
import ssl
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, cast
from urllib.parse import parse_qsl, urlsplit

import pytest
import yaml
from kubernetes.client.exceptions import ApiValueError
from kubernetes.client.models import VersionInfo

from mesh_identity.authority import workload_csr
from mesh_identity.errors import ProviderRejectedError
from mesh_identity.keys import KeyType, generate_key
from mesh_identity.provider import Mode, ProviderContext, SignedCertificate
from mesh_identity.spiffe import SpiffeId, TrustDomain
from providers.cert_manager.errors import MalformedAnswerError, RequestTimeoutError
from providers.cert_manager.provider import SPEC, CertManagerProvider
from providers.cert_manager.request import read_request, state_of
from providers.cert_manager.shapes import conditions, items, mapping, obj, parse_json, string, string_map, text
from providers.cert_manager.watcher import RequestWatcher
from tests.fakes.cert_manager import CERTIFICATE_REQUEST, Behaviour, CertManagerSigner
from tests.fakes.kube import KubeServer
from tests.pki import TestCa

TD = TrustDomain("example.org")
NS = "mesh-identity"
WEB = SpiffeId.for_kubernetes(TD, "shop", "web")
CREATE = 'the answer to create a CertificateRequest in namespace "mesh-identity"'
LIST = 'the answer to list CertificateRequests in namespace "mesh-identity"'
EVENT = 'an event of the watch of CertificateRequests in namespace "mesh-identity"'


# ------------------------------------------------------------------------------------------- the readers


@pytest.mark.parametrize(
    ("read", "message"),
    [
        (lambda: obj(5, "CertificateRequest mesh/web-abc", "status.conditions[0]"),
         "cert-manager: CertificateRequest mesh/web-abc: status.conditions[0] is not an object (got 5)"),
        (lambda: obj([1], "the answer to x"), "cert-manager: the answer to x is not an object (got [1])"),
        (lambda: mapping({"status": [1]}, "status", "X a/b"), "cert-manager: X a/b: status is not an object (got [1])"),
        (lambda: string({"metadata": {}}, "metadata", "X a/b"),
         "cert-manager: X a/b: metadata is not a string (got {})"),
        (lambda: string({}, "name", "X a/b", "metadata", required=True), "cert-manager: X a/b: metadata.name is missing"),
        (lambda: string({"name": ""}, "name", "X a/b", "metadata", required=True),
         "cert-manager: X a/b: metadata.name is empty"),
        (lambda: items({"items": 5}, "items", "L"), "cert-manager: L: items is not a list (got 5)"),
        (lambda: items({"items": ["a"]}, "items", "L"), "cert-manager: L: items[0] is not an object (got 'a')"),
        (lambda: string_map({"data": {"ca.crt": 12345678}}, "data", "Secret a/b", secret=True),
         "cert-manager: Secret a/b: data['ca.crt'] is not a string (got a number)"),
        (lambda: mapping({"data": ["s3cr3t"]}, "data", "Secret a/b", secret=True),
         "cert-manager: Secret a/b: data is not an object (got a list)"),
        (lambda: conditions({"status": {"conditions": [{"type": "Ready", "reason": ["x"]}]}}, "Issuer a/b"),
         "cert-manager: Issuer a/b: status.conditions[0].reason is not a string (got ['x'])"),
        (lambda: conditions({"status": {"conditions": [{"status": "True"}]}}, "Issuer a/b"),
         "cert-manager: Issuer a/b: status.conditions[0].type is missing"),
        (lambda: parse_json(b"", "the answer to x"), "cert-manager: the answer to x is empty"),
        (lambda: parse_json(b'{"a": "\xff"}', "the answer to x"),
         "cert-manager: the answer to x is not UTF-8 text (byte 7 of 10)"),
        (lambda: parse_json(b"{'a': 1}", "the answer to x"),
         "cert-manager: the answer to x is not JSON (Expecting property name enclosed in double quotes: line 1 column 2)"),
        (lambda: parse_json(b"[" * 100_000, "the answer to x"), "cert-manager: the answer to x nests its lists or objects too deeply"),
        (lambda: read_request({"metadata": {"name": "x"}, "status": {"conditions": [5]}}, "A", "mesh"),
         "cert-manager: CertificateRequest mesh/x: status.conditions[0] is not an object (got 5)"),
        (lambda: read_request({"items": [{"metadata": []}]}["items"][0], "L", "mesh", "items[0]"),
         "cert-manager: L: items[0].metadata is not an object (got [])"),
        (lambda: read_request({"metadata": {"name": "x", "namespace": "other", "uid": 7}}, "A", "mesh"),
         "cert-manager: A: metadata.uid is not a string (got 7)"),
        (lambda: read_request({"metadata": {"name": "x"}, "status": {"ca": False}}, "A", "mesh"),
         "cert-manager: CertificateRequest mesh/x: status.ca is not a string (got False)"),
        (lambda: state_of({"metadata": {"name": "x"}, "status": {"conditions": "Ready"}}),
         "cert-manager: CertificateRequest /x: status.conditions is not a list (got 'Ready')"),
    ],
)  # fmt: skip
def test_readers_name_the_object_and_the_key(read: Callable[[], Any], message: str) -> None:
    with pytest.raises(MalformedAnswerError) as info:
        read()
    assert str(info.value) == message
    assert isinstance(info.value, ProviderRejectedError)
    assert not info.value.retryable


def test_readers_read_what_the_api_omits_as_empty() -> None:
    assert mapping({}, "status", "X") == {} == mapping({"status": None}, "status", "X")
    assert string({}, "uid", "X") == "" == string({"uid": None}, "uid", "X")
    assert items({"items": None}, "items", "L") == []
    assert conditions({}, "X") == []
    assert state_of({"metadata": {"name": "x"}}).detail == "not approved or denied yet (no approver running?)"


def test_answer_text_is_escaped_and_bounded() -> None:
    assert text("Waiting on issuance: é ok") == "Waiting on issuance: é ok"
    assert text("evil\nINFO forged line\x1b[31m\u202e") == "evil\\nINFO forged line\\x1b[31m\\u202e"
    assert text("x" * 600) == "x" * 512 + "...(88 more characters)"
    with pytest.raises(MalformedAnswerError) as info:
        obj(["y" * 10_000] * 1000, "A")
    assert len(str(info.value)) < 600  # of 10 MB
    ready = {"type": "Ready", "status": "False", "reason": "Pending", "message": "a\nb" + "z" * 1000}
    detail = state_of({"metadata": {"name": "x"}, "status": {"conditions": [ready]}}).detail
    assert detail == "Ready=False (Pending): a\\nb" + "z" * 509 + "...(491 more characters)"


# ------------------------------------------------------------------------------------- the relay server


@dataclass(frozen=True)
class Answer:
    """What the relay answers instead of the API server; ``lines``: a watch stream of these lines, then its end."""

    status: int = 200
    body: bytes = b""
    content_type: str | None = "application/json"
    lines: tuple[bytes, ...] | None = None


def document(value: Any, status: int = 200) -> Answer:
    return Answer(status, json.dumps(value).encode())


def events(*lines: Any) -> Answer:
    """A watch stream: each line given as bytes as it is, anything else as JSON."""
    return Answer(lines=tuple(x if isinstance(x, bytes) else json.dumps(x).encode() for x in lines))


def route_of(method: str, path: str) -> str:
    """``verb resource``: ``create certificaterequests``, ``watch certificaterequests``, ``get issuers``..."""
    parts = urlsplit(path)
    segments = [s for s in parts.path.split("/") if s]
    if segments[:1] == ["version"]:
        return "get version"
    if "namespaces" in segments:
        rest = segments[segments.index("namespaces") + 2 :]
    else:
        rest = segments[3:] if segments[0] == "apis" else segments[2:]
    watching = dict(parse_qsl(parts.query)).get("watch") in ("true", "1")
    verb = {"POST": "create", "DELETE": "delete", "PUT": "update", "PATCH": "patch"}.get(method)
    verb = verb or ("watch" if watching else "get" if len(rest) > 1 else "list")
    return f"{verb} {rest[0]}"


class Relay:
    """Forwards to ``kube`` what no plan answers. ``plan(route, *answers)``: the next requests of that route get
    these answers, one each; ``always(route, answer)``: every one does, until ``forward(route)``."""

    def __init__(self, kube: KubeServer) -> None:
        self.kube = kube
        self.context = ssl.create_default_context(cafile=str(kube.ca_path))
        self.token = next(iter(kube.tokens))
        self.seen: list[str] = []  # every route asked for, in order
        self._lock = threading.Lock()
        self._plans: dict[str, list[Answer]] = {}
        self._always: dict[str, Answer] = {}
        self.server = _Server(self)
        self.port = self.server.server_address[1]
        threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()

    def plan(self, route: str, *answers: Answer) -> None:
        with self._lock:
            self._plans.setdefault(route, []).extend(answers)

    def always(self, route: str, answer: Answer) -> None:
        with self._lock:
            self._always[route] = answer

    def forward(self, route: str) -> None:
        with self._lock:
            self._always.pop(route, None)
            self._plans.pop(route, None)

    def count(self, route: str) -> int:
        with self._lock:
            return self.seen.count(route)

    def wait_for(self, route: str, times: int, timeout: float = 10.0) -> bool:
        deadline = time.monotonic() + timeout
        while self.count(route) < times:
            if time.monotonic() > deadline:
                return False
            time.sleep(0.01)
        return True

    def take(self, route: str) -> Answer | None:
        with self._lock:
            self.seen.append(route)
            planned = self._plans.get(route)
            if planned:
                return planned.pop(0)
            return self._always.get(route)

    def upstream(self, method: str, path: str, headers: dict[str, str], body: bytes) -> http.client.HTTPSConnection:
        """A connection to the API server that has sent ``method path`` (read ``getresponse()``, then close it)."""
        connection = http.client.HTTPSConnection("127.0.0.1", self.kube.port, timeout=30, context=self.context)
        connection.request(
            method, path, body=body or None, headers={**headers, "Authorization": f"Bearer {self.token}"}
        )
        return connection

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


class _Server(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, relay: Relay) -> None:
        self.relay = relay
        super().__init__(("127.0.0.1", 0), _Handler)

    def handle_error(self, request: Any, client_address: Any) -> None:
        pass  # a provider that hangs up on a stream


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def _any(self) -> None:
        relay = cast(_Server, self.server).relay
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length) if length else b""
        route = route_of(self.command, self.path)
        planned = relay.take(route)
        if planned is not None:
            self._send(planned)
            return
        skip = {"host", "content-length", "connection", "authorization", "accept-encoding"}
        headers = {k: v for k, v in self.headers.items() if k.lower() not in skip}
        connection = relay.upstream(self.command, self.path, headers, body)
        try:
            response = connection.getresponse()
            if route.startswith("watch ") and response.status == 200:
                self._relay_stream(response)
            else:
                self._send(Answer(response.status, response.read(), response.getheader("Content-Type")))
        finally:
            connection.close()

    def _send(self, answer: Answer) -> None:
        self.send_response_only(answer.status)
        if answer.content_type is not None:
            self.send_header("Content-Type", answer.content_type)
        if answer.lines is None:
            self.send_header("Content-Length", str(len(answer.body)))
            self.end_headers()
            self.wfile.write(answer.body)
            return
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        for line in answer.lines:
            self._chunk(line + b"\n")
        self._chunk(b"")
        self.close_connection = True

    def _relay_stream(self, response: http.client.HTTPResponse) -> None:
        self.send_response_only(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        self.close_connection = True
        with contextlib.suppress(OSError):
            while data := response.read1(65536):
                self._chunk(data)
            self._chunk(b"")

    def _chunk(self, data: bytes) -> None:
        self.wfile.write(b"%x\r\n%s\r\n" % (len(data), data))
        self.wfile.flush()

    do_GET = do_POST = do_PUT = do_PATCH = do_DELETE = _any

    def log_message(self, format: str, *args: Any) -> None:
        pass


# ------------------------------------------------------------------------------------------------ fixtures


@pytest.fixture(scope="module")
def root() -> TestCa:
    return TestCa.create("cert-manager answer-shape root", lifetime=timedelta(days=30))


@pytest.fixture
def signer(cert_manager_signer: CertManagerSigner, root: TestCa) -> CertManagerSigner:
    cert_manager_signer.add_ca_issuer("mesh-ca", root, namespace=NS)
    return cert_manager_signer


@pytest.fixture
def relay(kube_server: KubeServer) -> Iterator[Relay]:
    relay = Relay(kube_server)
    yield relay
    relay.close()


MakeProvider = Callable[..., CertManagerProvider]


@pytest.fixture
def make_provider(relay: Relay, root: TestCa, tmp_path: Path) -> Iterator[MakeProvider]:
    kubeconfig = tmp_path / "kubeconfig"
    kubeconfig.write_text(
        yaml.safe_dump(
            {
                "apiVersion": "v1",
                "kind": "Config",
                "current-context": "relay",
                "clusters": [{"name": "relay", "cluster": {"server": f"http://127.0.0.1:{relay.port}"}}],
                "users": [{"name": "relay", "user": {"token": "relay-token-not-the-server-one"}}],
                "contexts": [{"name": "relay", "context": {"cluster": "relay", "user": "relay", "namespace": NS}}],
            }
        )
    )
    (tmp_path / "root.pem").write_bytes(root.pem())
    made: list[CertManagerProvider] = []

    def make(**options: Any) -> CertManagerProvider:
        raw: dict[str, Any] = {
            "kubeconfig": str(kubeconfig),
            "issuer_name": "mesh-ca",
            "timeout": "10s",
            "api_timeout": "5s",
            "trust_bundle_file": str(tmp_path / "root.pem"),
            **options,
        }
        raw = {k: v for k, v in raw.items() if v is not None}
        context = ProviderContext(
            TD, tmp_path / "state", KeyType.ECDSA_P256, Mode.PER_WORKLOAD, lambda: datetime.now(UTC)
        )
        provider = CertManagerProvider(context, SPEC.validate_options(raw), environ={})
        made.append(provider)
        return provider

    yield make
    for provider in made:
        provider.close()


def sign(provider: CertManagerProvider) -> SignedCertificate:
    return provider.sign_workload(workload_csr(generate_key(KeyType.ECDSA_P256), WEB), WEB, timedelta(minutes=5))


def in_background(call: Callable[[], Any]) -> tuple[threading.Thread, list[Any]]:
    result: list[Any] = []

    def run() -> None:
        try:
            result.append(call())
        except Exception as err:
            result.append(err)

    worker = threading.Thread(target=run, daemon=True)
    worker.start()
    return worker, result


def warnings_of(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING and r.name.startswith("providers")]


# ------------------------------------------------------------------------- malformed answers to one call

PENDING_X = {"kind": "CertificateRequest", "metadata": {"name": "x", "uid": "u"}}

CREATE_ANSWERS = [
    ("a list", Answer(201, b"[1, 2]"), f"{CREATE} is not an object (got [1, 2])"),
    ("null", Answer(201, b"null"), f"{CREATE} is not an object (got None)"),
    ("no metadata", document({"kind": "CertificateRequest"}, 201), f"{CREATE}: metadata.name is missing"),
    ("metadata a list", document({"metadata": [1]}, 201), f"{CREATE}: metadata is not an object (got [1])"),
    ("name a number", document({"metadata": {"name": 5}}, 201), f"{CREATE}: metadata.name is not a string (got 5)"),
    (
        "status a list",
        document({**PENDING_X, "status": [1]}, 201),
        "CertificateRequest mesh-identity/x: status is not an object (got [1])",
    ),
    (
        "a condition that is a number",
        document({**PENDING_X, "status": {"conditions": [5]}}, 201),
        "CertificateRequest mesh-identity/x: status.conditions[0] is not an object (got 5)",
    ),
    (
        "conditions an object",
        document({**PENDING_X, "status": {"conditions": {"type": "Ready"}}}, 201),
        "CertificateRequest mesh-identity/x: status.conditions is not a list (got {'type': 'Ready'})",
    ),
    (
        "a condition message that is a list",
        document({**PENDING_X, "status": {"conditions": [{"type": "Ready", "message": ["no"]}]}}, 201),
        "CertificateRequest mesh-identity/x: status.conditions[0].message is not a string (got ['no'])",
    ),
    (
        "certificate a number",
        document({**PENDING_X, "status": {"certificate": 5, "conditions": [{"type": "Ready", "status": "True"}]}}, 201),
        "CertificateRequest mesh-identity/x: status.certificate is not a string (got 5)",
    ),
    ("not JSON", Answer(201, b"<html>", "text/html"), f"{CREATE} is not JSON (Expecting value: line 1 column 1)"),
    ("not UTF-8", Answer(201, b'{"kind": "\xff\xfe"}'), f"{CREATE} is not UTF-8 text (byte 10 of 14)"),
    ("empty", Answer(201, b""), f"{CREATE} is empty"),
]


@pytest.mark.parametrize(("answer", "message"), [c[1:] for c in CREATE_ANSWERS], ids=[c[0] for c in CREATE_ANSWERS])
def test_a_malformed_create_answer_is_a_provider_error(
    relay: Relay, signer: CertManagerSigner, make_provider: MakeProvider, answer: Answer, message: str
) -> None:
    provider = make_provider()
    relay.plan("create certificaterequests", answer)
    with pytest.raises(MalformedAnswerError) as info:
        sign(provider)
    assert str(info.value) == f"cert-manager: {message}"
    assert sign(provider).certificate is not None  # the next answer is read as usual


def test_an_issued_certificate_that_is_not_base64_pem(
    relay: Relay, signer: CertManagerSigner, make_provider: MakeProvider
) -> None:
    provider = make_provider()
    issued = {**PENDING_X, "status": {"certificate": "!!!", "conditions": [{"type": "Ready", "status": "True"}]}}
    relay.plan("create certificaterequests", document(issued, 201))
    with pytest.raises(MalformedAnswerError) as info:
        sign(provider)
    assert str(info.value) == (
        "cert-manager: Issuer mesh-identity/mesh-ca answered CertificateRequest /x with status.certificate is not "
        "base64 PEM certificates (Unable to load PEM file. See https://cryptography.io/en/latest/faq/#why-can-t-i-"
        "import-my-pem-file for more details. MalformedFraming)"
    )
    assert isinstance(info.value, ProviderRejectedError)  # as before: the existing error, refined


def _health(provider: CertManagerProvider) -> str:
    health = provider.health()
    assert not health.healthy
    return health.detail


def _doctor(name: str) -> Callable[[CertManagerProvider], str]:
    def check(provider: CertManagerProvider) -> str:
        [found] = [c for c in provider.doctor() if c.name == name]
        assert not found.ok
        return found.detail

    return check


OTHER_ANSWERS: list[tuple[str, str, Answer, Callable[[CertManagerProvider], str], str]] = [
    ("items a number", "list certificaterequests", document({"items": 5}), _health, f"{LIST}: items is not a list (got 5)"),
    (
        "items of strings",
        "list certificaterequests",
        document({"items": ["a", "b"], "metadata": {"resourceVersion": "1"}}),
        _health,
        f"{LIST}: items[0] is not an object (got 'a')",
    ),
    (
        "an item without a name",
        "list certificaterequests",
        document({"items": [{"metadata": {"uid": "u"}}]}),
        _health,
        f"{LIST}: items[0].metadata.name is missing",
    ),
    (
        "an item whose condition type is a number",
        "list certificaterequests",
        document({"items": [{"metadata": {"name": "y"}, "status": {"conditions": [{"type": 5}]}}]}),
        _health,
        "CertificateRequest mesh-identity/y: status.conditions[0].type is not a string (got 5)",
    ),
    (
        "listing metadata a string",
        "list certificaterequests",
        document({"items": [], "metadata": "x"}),
        _health,
        f"{LIST}: metadata is not an object (got 'x')",
    ),
    (
        "issuer status a list",
        "get issuers",
        document({"status": [1]}),
        _health,
        "Issuer mesh-identity/mesh-ca: status is not an object (got [1])",
    ),
    (
        "issuer conditions of strings",
        "get issuers",
        document({"status": {"conditions": ["Ready"]}}),
        _doctor("issuer"),
        "Issuer mesh-identity/mesh-ca: status.conditions[0] is not an object (got 'Ready')",
    ),
    (
        "version a list",
        "get version",
        document([1]),
        _doctor("kubernetes api"),
        "the answer to read the server version is not an object (got [1])",
    ),
    (
        "version without gitVersion",
        "get version",
        document({"major": "1"}),
        _doctor("kubernetes api"),
        "the answer to read the server version: gitVersion is missing",
    ),
]  # fmt: skip


@pytest.mark.parametrize(
    ("route", "answer", "outcome", "message"), [c[1:] for c in OTHER_ANSWERS], ids=[c[0] for c in OTHER_ANSWERS]
)
def test_malformed_listings_issuers_and_versions_are_reported(
    relay: Relay,
    signer: CertManagerSigner,
    make_provider: MakeProvider,
    route: str,
    answer: Answer,
    outcome: Callable[[CertManagerProvider], str],
    message: str,
) -> None:
    provider = make_provider()
    relay.always(route, answer)
    assert outcome(provider) == f"cert-manager: {message}"


def test_a_malformed_listing_at_start_is_logged_by_the_sweep(
    relay: Relay, signer: CertManagerSigner, make_provider: MakeProvider, caplog: pytest.LogCaptureFixture
) -> None:
    relay.always("list certificaterequests", document({"items": ["a"]}))
    with caplog.at_level(logging.WARNING):
        make_provider()
    assert warnings_of(caplog) == [
        f"cert-manager: could not clean up old CertificateRequests: cert-manager: {LIST}: items[0] is not an object "
        "(got 'a')"
    ]


SECRET_VALUE = "s3cr3t-value-that-must-not-show"

SECRET_ANSWERS = [
    (
        "a value that is a number",
        document({"data": {"ca.crt": 1234567890123, "token": SECRET_VALUE}}),
        "Secret mesh-identity/bundle: data['ca.crt'] is not a string (got a number)",
    ),
    (
        "a value that is a list",
        document({"data": {"token": [SECRET_VALUE]}}),
        "Secret mesh-identity/bundle: data.token is not a string (got a list)",
    ),
    ("data a list", document({"data": [SECRET_VALUE]}), "Secret mesh-identity/bundle: data is not an object (got a list)"),
    ("the answer a list", document([SECRET_VALUE]), "the answer to read Secret mesh-identity/bundle is not an object (got a list)"),
    ("not base64", document({"data": {"ca.crt": "abc"}}), "Secret mesh-identity/bundle: data['ca.crt'] is not base64"),
    (
        "no such key",
        document({"data": {"token": SECRET_VALUE}}),
        "Secret mesh-identity/bundle has no key 'ca.crt' (it has: token)",
    ),
]  # fmt: skip


@pytest.mark.parametrize(("answer", "message"), [c[1:] for c in SECRET_ANSWERS], ids=[c[0] for c in SECRET_ANSWERS])
def test_a_malformed_secret_is_reported_without_its_values(
    relay: Relay, signer: CertManagerSigner, make_provider: MakeProvider, answer: Answer, message: str
) -> None:
    provider = make_provider(trust_bundle_file=None, trust_bundle_secret="bundle")
    relay.always("get secrets", answer)
    with pytest.raises(ProviderRejectedError) as info:
        provider.trust_bundle()
    assert str(info.value) == f"cert-manager: {message}"
    assert SECRET_VALUE not in str(info.value)


def test_what_the_client_cannot_read_is_a_malformed_answer(
    signer: CertManagerSigner, make_provider: MakeProvider
) -> None:
    provider = make_provider()

    def raising(err: Exception) -> Callable[..., Any]:
        def call(*args: Any, **kwargs: Any) -> Any:
            assert kwargs["_preload_content"] is False  # the body is read by the provider, not by the models
            raise err

        return call

    try:
        VersionInfo.from_dict({"gitVersion": SECRET_VALUE, "major": 1})
    except ValueError as err:
        invalid = err
    cases: list[tuple[Exception, str]] = [
        (json.JSONDecodeError("Expecting value", SECRET_VALUE, 0), "it is not JSON: Expecting value"),
        (UnicodeDecodeError("utf-8", b"\xff", 0, 1, "invalid start byte"), "it is not UTF-8 text"),
        (LookupError("unknown encoding: x-secret"), "its charset is unknown"),
        (invalid, "ValidationError from the kubernetes client"),
    ]
    for err, problem in cases:
        with pytest.raises(MalformedAnswerError) as info:
            provider.api._call("read the server version", raising(err))
        assert str(info.value) == f"cert-manager: the answer to read the server version cannot be read: {problem}"
    with pytest.raises(ApiValueError):  # our own arguments refused: a bug, let out as it is
        provider.api._call("read the server version", raising(ApiValueError("Missing the required parameter")))


# ----------------------------------------------------------------------------------------------- the watch


JUNK_STREAMS = [
    ("a line that is not JSON", events(b"not json"), f"{EVENT} is not JSON (Expecting value: line 1 column 1)"),
    ("an event without an object", events({"type": "ADDED"}), f"{EVENT}: object is not an object (got None)"),
    ("an event that is a list", events([1]), f"{EVENT} is not an object (got [1])"),
    ("an object that is a list", events({"type": "MODIFIED", "object": [1, 2]}), f"{EVENT}: object is not an object (got [1, 2])"),
    (
        "an object whose metadata is a string",
        events({"type": "MODIFIED", "object": {"metadata": "x"}}),
        f"{EVENT}: object.metadata is not an object (got 'x')",
    ),
    (
        "an unknown event type, with a newline",
        events({"type": "EVIL\nINFO forged", "object": {}}),
        f"{EVENT}: type is not one of ADDED, MODIFIED, DELETED, BOOKMARK, ERROR (got 'EVIL\\nINFO forged')",
    ),
    ("an ERROR event without a code", events({"type": "ERROR", "object": {"kind": "Status"}}), f"{EVENT}: object.code is not an HTTP error status (got None)"),
    ("a bookmark without a version", events({"type": "BOOKMARK", "object": {"metadata": {"resourceVersion": 7}}}), f"{EVENT}: object.metadata.resourceVersion is not a string (got 7)"),
    ("bytes that are not UTF-8", events(b"\xff\xfe\x00"), f"{EVENT} is not UTF-8 text (byte 0 of 3)"),
]  # fmt: skip


@pytest.mark.parametrize(("stream", "warning"), [c[1:] for c in JUNK_STREAMS], ids=[c[0] for c in JUNK_STREAMS])
def test_a_malformed_watch_line_does_not_stop_later_requests(
    relay: Relay,
    signer: CertManagerSigner,
    make_provider: MakeProvider,
    caplog: pytest.LogCaptureFixture,
    stream: Answer,
    warning: str,
) -> None:
    """The finding: one malformed line killed the watch thread for good, and every later request waited for its
    timeout. Now the line is logged, escaped, and the watch lists again; the requests complete."""
    provider = make_provider()
    relay.plan("watch certificaterequests", stream, stream)  # the first two streams: the bad line and their end
    signer.behaviour = Behaviour.STALL  # so the answer must come from the watch, not from the first listing
    caplog.set_level(logging.WARNING)
    worker, result = in_background(lambda: sign(provider))
    assert relay.wait_for("watch certificaterequests", 3)  # two bad streams, then one forwarded
    signer.behaviour = Behaviour.ISSUE
    signer.resync()
    worker.join(timeout=15)
    [signed] = result
    assert isinstance(signed, SignedCertificate), signed
    for _ in range(3):  # and the ones after it, on the same watch thread
        assert isinstance(sign(provider), SignedCertificate)
    thread = provider.watcher._thread
    assert thread is not None and thread.is_alive()
    assert warnings_of(caplog) == [
        f"cert-manager: the watch of CertificateRequests cannot read an answer (attempt 1), listing them again: "
        f"cert-manager: {warning}"
    ]  # the second time (same answer, no event read since) at DEBUG
    routes = [r for r in relay.seen if r.endswith("certificaterequests") and not r.startswith(("create", "delete"))]
    assert routes[1:7] == [  # [0]: the sweep at start
        "list certificaterequests",
        "watch certificaterequests",
        "list certificaterequests",  # after the first bad stream: a fresh listing, after the pause
        "watch certificaterequests",
        "list certificaterequests",
        "watch certificaterequests",
    ]


def test_an_error_event_410_lists_again(
    relay: Relay, signer: CertManagerSigner, make_provider: MakeProvider, caplog: pytest.LogCaptureFixture
) -> None:
    provider = make_provider()
    expired = {"kind": "Status", "code": 410, "reason": "Expired", "message": "too old resource version: 1 (20)"}
    relay.plan("watch certificaterequests", events({"type": "ERROR", "object": expired}))
    signer.behaviour = Behaviour.STALL
    caplog.set_level(logging.WARNING)
    worker, result = in_background(lambda: sign(provider))
    assert relay.wait_for("watch certificaterequests", 2)
    signer.behaviour = Behaviour.ISSUE
    signer.resync()
    worker.join(timeout=15)
    assert isinstance(result[0], SignedCertificate), result
    assert warnings_of(caplog) == []  # an expired watch is how watches go
    assert [r for r in relay.seen if r in ("list certificaterequests", "watch certificaterequests")][1:5] == [
        "list certificaterequests",
        "watch certificaterequests",
        "list certificaterequests",
        "watch certificaterequests",
    ]


def test_other_error_events_are_logged_and_the_watch_restarted(
    relay: Relay, signer: CertManagerSigner, make_provider: MakeProvider, caplog: pytest.LogCaptureFixture
) -> None:
    provider = make_provider()
    failure = {"kind": "Status", "code": 500, "reason": "InternalError", "message": "etcd\nleader changed"}
    relay.plan("watch certificaterequests", events({"type": "ERROR", "object": failure}))
    signer.behaviour = Behaviour.STALL
    caplog.set_level(logging.WARNING)
    worker, result = in_background(lambda: sign(provider))
    assert relay.wait_for("watch certificaterequests", 2)
    signer.behaviour = Behaviour.ISSUE
    signer.resync()
    worker.join(timeout=15)
    assert isinstance(result[0], SignedCertificate), result
    assert warnings_of(caplog) == [
        'cert-manager: the watch of CertificateRequests in namespace "mesh-identity" ended with an ERROR event (500 '
        "InternalError: etcd\\nleader changed): listing them again"
    ]


def test_an_unreadable_listing_is_what_a_waiter_is_told(
    relay: Relay, signer: CertManagerSigner, make_provider: MakeProvider, caplog: pytest.LogCaptureFixture
) -> None:
    """The watch cannot start while its listing cannot be read: a waiter gets that at its deadline (not a bare
    timeout, and not at once: the next listing may be fine), health shows it, and once the listings are fine
    again so is signing."""
    provider = make_provider(timeout="1s")
    relay.always("list certificaterequests", document({"items": [], "metadata": "x"}))
    signer.behaviour = Behaviour.STALL
    caplog.set_level(logging.WARNING)
    started = time.monotonic()
    with pytest.raises(MalformedAnswerError) as info:
        sign(provider)
    assert time.monotonic() - started >= 0.9
    assert str(info.value) == f"cert-manager: {LIST}: metadata is not an object (got 'x')"
    assert _health(provider) == f"cert-manager: {LIST}: metadata is not an object (got 'x')"
    assert len(warnings_of(caplog)) == 1  # logged once, however often the watcher tried again
    relay.forward("list certificaterequests")
    signer.behaviour = Behaviour.ISSUE
    assert isinstance(sign(provider), SignedCertificate)
    assert provider.health().healthy


def test_a_stalled_request_still_times_out_after_a_bad_line(
    relay: Relay, signer: CertManagerSigner, make_provider: MakeProvider
) -> None:
    provider = make_provider(timeout="1s")
    relay.plan("watch certificaterequests", events(b"junk"))
    signer.behaviour = Behaviour.STALL
    with pytest.raises((RequestTimeoutError, MalformedAnswerError)):
        sign(provider)
    signer.behaviour = Behaviour.ISSUE
    assert isinstance(sign(provider), SignedCertificate)


@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")  # the SystemExit that ends it
def test_the_watch_thread_outlives_a_bug_and_an_ended_thread_is_replaced(
    relay: Relay,
    signer: CertManagerSigner,
    make_provider: MakeProvider,
    caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    provider = make_provider()
    watcher = provider.watcher
    real_update, real_list = RequestWatcher._update, RequestWatcher._list
    calls = {"update": 0, "list": 0}

    def buggy_update(self: RequestWatcher, event: str, found: dict[str, Any]) -> None:
        calls["update"] += 1
        if calls["update"] == 1:
            raise RuntimeError("a bug in the watcher")
        real_update(self, event, found)

    monkeypatch.setattr(RequestWatcher, "_update", buggy_update)
    signer.behaviour = Behaviour.STALL
    caplog.set_level(logging.WARNING)
    worker, result = in_background(lambda: sign(provider))
    assert relay.wait_for("watch certificaterequests", 1)
    before = relay.kube.store.resource_version  # the first stream started at or before it
    signer.behaviour = Behaviour.ISSUE
    signer.resync()
    worker.join(timeout=15)
    assert isinstance(result[0], SignedCertificate), result
    # The stream re-opened after the bug (from a listing that saw the issued request) is open at the API server,
    # so that end_watches() below ends it: a stream still on its way there would miss it and run for minutes.
    user, kind = relay.kube.tokens[relay.token], CERTIFICATE_REQUEST
    assert relay.kube.wait_for_watch(user=user, kind=kind, since=before + 1)
    [bug] = [r for r in caplog.records if r.levelno == logging.ERROR]
    assert bug.getMessage() == "cert-manager: the watch of CertificateRequests failed, listing them again"
    assert bug.exc_info is not None and isinstance(bug.exc_info[1], RuntimeError)
    first = watcher._thread
    assert first is not None and first.is_alive()  # the same thread went on

    def ending_list(self: RequestWatcher) -> str:
        calls["list"] += 1
        if calls["list"] == 1:
            raise SystemExit  # whatever ends a thread: it is not left for dead
        return real_list(self)

    monkeypatch.setattr(RequestWatcher, "_list", ending_list)
    caplog.clear()
    expired = {"kind": "Status", "code": 410, "reason": "Expired", "message": "too old resource version"}
    relay.plan("watch certificaterequests", events({"type": "ERROR", "object": expired}))
    relay.kube.end_watches()  # the watcher re-watches, gets the 410 and lists: the thread ends there
    deadline = time.monotonic() + 10
    while watcher._thread is not None and time.monotonic() < deadline:
        time.sleep(0.01)
    assert watcher._thread is None
    first.join(10)  # it has cleared its slot; let it finish returning
    assert not first.is_alive()
    assert [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR] == [
        "cert-manager: the watch of CertificateRequests ended; the next request starts another"
    ]
    assert isinstance(sign(provider), SignedCertificate)  # the next wait started another thread
    second = watcher._thread
    assert second is not None and second is not first and second.is_alive()
