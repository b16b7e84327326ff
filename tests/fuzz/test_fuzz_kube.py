"""Fuzz target: the cert-manager provider's parsing of the Kubernetes API server's answers, through the real
``kubernetes`` client.

A tiny HTTP server on loopback stands between the provider and the API server. First it forwards to the
Kubernetes test server (``tests/fakes/kube``, with the cert-manager stand-in of ``tests/fakes/cert_manager``
signing) and records its real answers route by route, while a real provider learns the bundle, signs an
intermediate and a workload, checks its health and runs its doctor (watch streams are recorded event by
event). Then, for each input, it answers every route with a drawn mutation of the recorded answer (the
CertificateRequest JSON changed: conditions, status.certificate and status.ca cut or bit-flipped, types
swapped; list and watch events changed, junk lines; other bytes; another status), and a fresh provider runs
one drawn operation against it. The rule: a provider error (our tree) or a valid result; no other exception,
in the call or in the provider's watch thread; no hang; no token or key in an error or a log line.
"""

from __future__ import annotations

import base64
import dataclasses
import http.client
import itertools
import json
import ssl
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from http.server import BaseHTTPRequestHandler
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, urlencode, urlsplit

import pytest
import yaml
from cryptography import x509
from hypothesis import given
from hypothesis import strategies as st

from mesh_identity.authority import workload_csr
from mesh_identity.keys import KeyType, generate_key, private_key_pem
from mesh_identity.profile import ca_csr
from mesh_identity.provider import Mode, ProviderContext, SignedCertificate
from mesh_identity.spiffe import SpiffeId, TrustDomain
from mesh_identity.svid import TrustBundle
from providers.cert_manager.provider import SPEC, CertManagerProvider
from tests.fakes.cert_manager import CertManagerSigner, install_crds
from tests.fakes.kube import KubeServer
from tests.fuzz.harness import (
    CORPUS,
    Rule,
    Watch,
    corpus_cases,
    count,
    fuzz_settings,
    json_values,
    mutated,
    mutated_bytes,
    outcome,
    secret_markers,
    serve_in_thread,
)
from tests.pki import TestCa

TARGET = "kube"
TD = TrustDomain("example.org")
NS = "mesh-identity"
WEB = SpiffeId.for_kubernetes(TD, "shop", "web")
TOKEN = "fuzz-kube-token-3f9c2a7e5d1b"  # what the provider sends; the relay sends the test server's own
BOUND = 20.0  # one operation: waits at most the provider's timeout (0.3 s) per request, plus the calls
WATCH_HOLD = 0.05  # a fuzzed watch stream stays open this long after its events (the watcher re-opens it)


CR = "/apis/cert-manager.io/v1/namespaces/mesh-identity/certificaterequests"
CREATE, LIST, WATCH_ROUTE = f"POST {CR}", f"GET {CR}", f"GET {CR} watch"

# -- the server between the provider and the API server ------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Answer:
    status: int
    body: bytes
    content_type: str | None = "application/json"
    watch: bool = False  # a stream of event lines


def route_of(method: str, path: str) -> str:
    parts = urlsplit(path)
    query = dict(parse_qsl(parts.query))
    kind = " watch" if query.get("watch") in ("true", "1") else ""
    segments = parts.path.split("/")
    if len(segments) == 8 and segments[6] == "certificaterequests":  # .../certificaterequests/<name>
        segments[7] = "{name}"
    return f"{method} {'/'.join(segments)}{kind}"


@dataclass
class Relay:
    upstream: str
    token: str
    context: ssl.SSLContext
    recorded: dict[str, Answer] = field(default_factory=dict)
    plan: dict[str, Answer] = field(default_factory=dict)
    recording: bool = True
    lock: threading.Lock = field(default_factory=threading.Lock)
    versions: dict[str, list[Any]] = field(default_factory=dict)

    def forward(self, method: str, path: str, headers: dict[str, str], body: bytes) -> Answer:
        parts = urlsplit(path)
        query = dict(parse_qsl(parts.query))
        watching = query.get("watch") in ("true", "1")
        if watching:  # the test server ends the stream after a second: record what it sent by then
            query["timeoutSeconds"] = "1"
            path = f"{parts.path}?{urlencode(query)}"
        up = urlsplit(self.upstream)
        connection = http.client.HTTPSConnection(up.hostname or "", up.port, timeout=10, context=self.context)
        try:
            connection.request(
                method, path, body=body or None, headers={**headers, "Authorization": f"Bearer {self.token}"}
            )
            response = connection.getresponse()
            answer = Answer(response.status, response.read(), response.getheader("Content-Type"), watching)
        finally:
            connection.close()
        route = route_of(method, path)
        self._keep_versions(answer)
        with self.lock:
            old = self.recorded.get(route)
            if old is None:
                self.recorded[route] = answer
            elif watching:  # every event any watch saw, in order, once
                lines = old.body.splitlines(keepends=True)
                lines += [line for line in answer.body.splitlines(keepends=True) if line not in lines]
                self.recorded[route] = Answer(old.status, b"".join(lines), old.content_type, True)
        return answer

    def _keep_versions(self, answer: Answer) -> None:
        """Every CertificateRequest seen, by uid, in the order seen (from answers, listings, watch events)."""
        texts = answer.body.splitlines() if answer.watch else [answer.body]
        for text in texts:
            try:
                found = json.loads(text)
            except ValueError:
                continue
            if not isinstance(found, dict):
                continue
            objects = found.get("items") or [found.get("object") if answer.watch else found]
            for obj in objects:
                if isinstance(obj, dict) and obj.get("kind") == "CertificateRequest":
                    with self.lock:
                        self.versions.setdefault(obj["metadata"]["uid"], []).append(obj)

    def consistent_watch(self) -> None:
        """The recorded watch, made to tell the story of the recorded create: the request as created (ADDED),
        then as issued (MODIFIED), both the test server's own objects."""
        created = json.loads(self.recorded[CREATE].body)
        issued = [v for v in self.versions[created["metadata"]["uid"]] if (v.get("status") or {}).get("certificate")]
        events = [{"type": "ADDED", "object": created}, {"type": "MODIFIED", "object": issued[-1]}]
        body = b"".join(json.dumps(e).encode() + b"\n" for e in events)
        self.recorded[WATCH_ROUTE] = Answer(200, body, "application/json", True)

    def answer(self, method: str, path: str, headers: dict[str, str], body: bytes) -> Answer:
        if self.recording:
            return self.forward(method, path, headers, body)
        with self.lock:
            planned = self.plan.get(route_of(method, path))
        return planned or Answer(404, json.dumps(NOT_FOUND).encode())


NOT_FOUND = {"kind": "Status", "apiVersion": "v1", "status": "Failure", "reason": "NotFound", "code": 404}


class _Handler(BaseHTTPRequestHandler):
    relay: Relay
    protocol_version = "HTTP/1.1"

    def _any(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length) if length else b""
        skip = {"host", "content-length", "connection", "authorization", "accept-encoding"}
        headers = {k: v for k, v in self.headers.items() if k.lower() not in skip}
        answer = self.relay.answer(self.command, self.path, headers, body)
        self.send_response_only(answer.status)
        if answer.content_type is not None:
            self.send_header("Content-Type", answer.content_type)
        if answer.watch and not self.relay.recording:
            self.send_header("Transfer-Encoding", "chunked")
            self.end_headers()
            for line in answer.body.splitlines(keepends=True):
                self.wfile.write(b"%x\r\n%s\r\n" % (len(line), line))
            self.wfile.flush()
            time.sleep(WATCH_HOLD)
            self.wfile.write(b"0\r\n\r\n")
            self.close_connection = True
            return
        self.send_header("Content-Length", str(len(answer.body)))
        self.end_headers()
        self.wfile.write(answer.body)

    do_GET = do_POST = do_PUT = do_PATCH = do_DELETE = _any

    def log_message(self, format: str, *args: Any) -> None:
        pass


# -- the recording session -----------------------------------------------------------------------------------


@dataclass
class Setup:
    relay: Relay
    directory: Path
    kubeconfig: Path
    root_file: Path
    secrets: tuple[str, ...]
    csr: x509.CertificateSigningRequest
    intermediate_csr: x509.CertificateSigningRequest
    states: Iterator[int] = field(default_factory=itertools.count)


def make_provider(setup: Setup, mode: Mode, pinned: bool, timeout: str = "1s") -> CertManagerProvider:
    options: dict[str, Any] = {
        "kubeconfig": str(setup.kubeconfig),
        "issuer_name": "mesh-ca",
        "timeout": timeout,
        "api_timeout": "2s",
    }
    if pinned:
        options["trust_bundle_file"] = str(setup.root_file)
    state = setup.directory / f"state-{next(setup.states)}"  # each input on its own: nothing trusted yet
    context = ProviderContext(TD, state, KeyType.ECDSA_P256, mode, lambda: datetime.now(UTC))
    provider = CertManagerProvider(context, SPEC.validate_options(options), environ={})
    if timeout == "1s":  # shorter than the options allow: an answer that never becomes final costs 0.3 s
        provider.settings = dataclasses.replace(provider.settings, timeout=timedelta(seconds=0.3))
    return provider


OPERATIONS: dict[str, Callable[[CertManagerProvider, Setup], Any]] = {
    "trust_bundle": lambda p, s: p.trust_bundle(),
    "sign_intermediate": lambda p, s: p.sign_intermediate(s.intermediate_csr, timedelta(hours=2)),
    "sign_workload": lambda p, s: p.sign_workload(s.csr, WEB, timedelta(minutes=20)),
    "health": lambda p, s: p.health(),
    "limits": lambda p, s: p.limits(),
    "doctor": lambda p, s: p.doctor(),
}


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Setup]:
    directory = tmp_path_factory.mktemp("kube-fuzz")
    root = TestCa.create("cert-manager fuzz root", lifetime=timedelta(days=30))
    with install_crds(KubeServer()) as kube, CertManagerSigner(kube) as signer:
        signer.add_ca_issuer("mesh-ca", root, namespace=NS)
        context = ssl.create_default_context(cafile=str(kube.ca_path))
        relay = Relay(kube.url, next(iter(kube.tokens)), context)
        _Handler.relay = relay
        front = serve_in_thread(_Handler)
        kubeconfig = directory / "kubeconfig"
        config = {
            "apiVersion": "v1", "kind": "Config", "current-context": "fuzz",
            "clusters": [{"name": "fuzz", "cluster": {"server": f"http://127.0.0.1:{front.server_address[1]}"}}],
            "users": [{"name": "fuzz", "user": {"token": TOKEN}}],
            "contexts": [{"name": "fuzz", "context": {"cluster": "fuzz", "user": "fuzz", "namespace": NS}}],
        }  # fmt: skip
        kubeconfig.write_text(yaml.safe_dump(config))
        root_file = directory / "root.pem"
        root_file.write_bytes(root.pem())
        key = generate_key(KeyType.ECDSA_P256)
        setup = Setup(
            relay,
            directory,
            kubeconfig,
            root_file,
            (TOKEN, next(iter(kube.tokens)), *secret_markers(private_key_pem(key), root.key_pem())),
            workload_csr(key, WEB),
            ca_csr(generate_key(KeyType.ECDSA_P256), TD, "example.org fuzz intermediate"),
        )
        provider = make_provider(setup, Mode.PER_WORKLOAD, False, timeout="10s")  # the relay holds watches 1 s
        try:
            for operation in OPERATIONS.values():
                operation(provider, setup)
        finally:
            provider.close()
        relay.recording = False
        relay.consistent_watch()
        try:
            yield setup
        finally:
            front.shutdown()
            front.server_close()


@pytest.fixture(scope="module")
def rule(setup: Setup) -> Iterator[Rule]:
    with Watch() as watch:
        yield Rule(TARGET, secrets=setup.secrets, timeout=BOUND, watch=watch)


def test_the_recording_has_every_route(setup: Setup) -> None:
    routes = set(setup.relay.recorded)
    for route in (CREATE, LIST, WATCH_ROUTE, f"DELETE {CR}/{{name}}", "GET /version/",
                  "GET /apis/cert-manager.io/v1/namespaces/mesh-identity/issuers/mesh-ca"):  # fmt: skip
        assert route in routes, sorted(routes)
    assert b'"certificate"' in setup.relay.recorded[WATCH_ROUTE].body, "the watch saw no issued request"


# -- one input -----------------------------------------------------------------------------------------------


def check_result(operation: str, result: Any) -> None:
    if operation in ("sign_intermediate", "sign_workload"):
        assert isinstance(result, SignedCertificate) and isinstance(result.certificate, x509.Certificate)
        assert isinstance(result.bundle, TrustBundle) and result.bundle.authorities
    if operation == "trust_bundle":
        assert isinstance(result, TrustBundle) and result.authorities


def check(setup: Setup, rule: Rule, plan: dict[str, Answer], mode: Mode, pinned: bool, operation: str) -> None:
    setup.relay.plan = plan

    def run() -> Any:
        provider = make_provider(setup, mode, pinned)
        try:
            return OPERATIONS[operation](provider, setup)
        finally:
            provider.close()

    ok, result = rule.call(run, f"{operation} ({mode}, {'pinned' if pinned else 'trust on first use'})")
    if ok:
        check_result(operation, result)
        outcome(f"{operation}: a result")
    else:
        outcome(f"{operation}: {type(result).__name__}")
    rule.settle(f"{operation} against fuzzed answers")


# -- the seed corpus: each file a JSON object {"mode", "pinned", "operation", "answers": {route: answer}}, the
# answer {"status", "body" (text), "content_type", "watch"}; in bodies "{recorded:<route>}" stands for the
# recorded body of that route; routes not listed answer as recorded -----------------------------------------


def plan_from_case(setup: Setup, case: dict[str, Any]) -> dict[str, Answer]:
    plan = dict(setup.relay.recorded)
    for route, spec in case.get("answers", {}).items():
        body = spec.get("body", "")
        for name, answer in setup.relay.recorded.items():
            body = body.replace(f"{{recorded:{name}}}", answer.body.decode())
        plan[route] = Answer(
            spec.get("status", 200),
            body.encode(),
            spec.get("content_type", "application/json"),
            spec.get("watch", False),
        )
    return plan


@pytest.mark.parametrize("path", corpus_cases(TARGET))
def test_corpus(setup: Setup, rule: Rule, path: Path) -> None:
    count(TARGET, corpus=True)
    case = json.loads(path.read_text())
    with rule.strictly():
        check(setup, rule, plan_from_case(setup, case), Mode(case["mode"]), case["pinned"], case["operation"])


# -- generated answers ---------------------------------------------------------------------------------------

STATUSES = [200, 201, 204, 400, 401, 403, 404, 409, 410, 422, 429, 500, 503]
WORDS = [
    "True", "False", "Ready", "Denied", "Failed", "Pending", "Approved", "InvalidRequest", "Issued",
    'Referenced "Issuer" not found', "ADDED", "MODIFIED", "DELETED", "BOOKMARK", "ERROR", "Status", "",
    base64.b64encode(b"-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n").decode(), "!!!notbase64",
    0, -1, 2**63, None, True, [], {},
]  # fmt: skip


def answer_mutations(recorded: Answer) -> st.SearchStrategy[Answer]:
    """What a route may answer instead of its recording (a watch: its events as one JSON list, mutated)."""
    if recorded.watch:
        events = [json.loads(line) for line in recorded.body.splitlines() if line.strip()]
        changed = mutated(events, max_mutations=3, vocabulary=WORDS).map(
            lambda evs: b"".join(json.dumps(e).encode() + b"\n" for e in (evs if isinstance(evs, list) else [evs]))
        )
        junk = st.lists(st.binary(max_size=30).map(lambda b: b.replace(b"\n", b"") + b"\n"), max_size=3).map(b"".join)
        return st.one_of(
            st.just(recorded),
            changed.map(lambda body: Answer(recorded.status, body, recorded.content_type, True)),
            changed.map(lambda body: Answer(recorded.status, body, recorded.content_type, True)),
            st.tuples(changed, junk).map(lambda bj: Answer(200, bj[0] + bj[1], recorded.content_type, True)),
            st.builds(Answer, st.sampled_from(STATUSES), st.just(recorded.body), st.just(recorded.content_type)),
        )
    try:
        document = json.loads(recorded.body) if recorded.body else None
    except ValueError:
        document = recorded.body.decode(errors="replace")
    json_changed = mutated(document, max_mutations=3, vocabulary=WORDS).map(
        lambda doc: Answer(recorded.status, json.dumps(doc).encode(), recorded.content_type)
    )
    return st.one_of(
        st.just(recorded),
        st.just(recorded),
        json_changed,
        json_changed,
        mutated_bytes(recorded.body, 4).map(lambda body: Answer(recorded.status, body, recorded.content_type)),
        st.builds(Answer, st.sampled_from(STATUSES), st.just(recorded.body), st.just(recorded.content_type)),
        st.builds(
            Answer, st.sampled_from(STATUSES), json_values().map(lambda v: json.dumps(v).encode()),
            st.sampled_from(["application/json", "text/html", None]),
        ),
    )  # fmt: skip


ANSWERS: dict[str, st.SearchStrategy[Answer]] = {}


@st.composite
def plans(draw: st.DrawFn, routes: tuple[str, ...]) -> dict[str, Answer]:
    return {route: draw(ANSWERS[route]) for route in routes}


@pytest.fixture(scope="module")
def answers_ready(setup: Setup) -> None:
    """The mutations of every recorded route, for the generated plans (drawn after the fixtures ran)."""
    for route, answer in setup.relay.recorded.items():
        ANSWERS[route] = answer_mutations(answer)


@fuzz_settings(60, shrink=False)  # the provider's watch thread makes a replay differ: report the input as found
@given(
    plan=st.deferred(lambda: plans(tuple(sorted(ANSWERS)))),
    mode=st.sampled_from(list(Mode)),
    pinned=st.booleans(),
    operation=st.sampled_from(sorted(OPERATIONS)),
)
def test_generated_answers(
    setup: Setup, rule: Rule, answers_ready: None, plan: dict[str, Answer], mode: Mode, pinned: bool, operation: str
) -> None:
    count(TARGET)
    check(setup, rule, plan, mode, pinned, operation)


def test_seed_corpus_is_readable() -> None:
    for path in sorted((CORPUS / TARGET).iterdir()):
        case = json.loads(path.read_text())
        assert case["operation"] in OPERATIONS and isinstance(case["pinned"], bool), path.name
        Mode(case["mode"])
