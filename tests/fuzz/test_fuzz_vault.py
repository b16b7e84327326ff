"""Fuzz target: the Vault provider's parsing of Vault's answers, through the real hvac client.

A tiny HTTP server on loopback stands between the provider and Vault. First it forwards to the Vault test
server (``tests/fakes/vault``) and records its real answers, route by route, while a real provider (token and
AppRole auth) reads the CA chain, signs an intermediate and a workload, checks its health, limits and doctor,
and renews its token. Then, for each input, it answers every route with a drawn mutation of the recorded
answer: the JSON changed (types, missing keys, cut and bit-flipped PEM, boundary numbers), other bytes, another
status, a redirect (to the same origin, or to a second loopback server that must never see the token). A
fresh provider runs one drawn operation against it. The rule: a provider error (our tree) or a valid result;
no other exception, no hang, and no token or key in an error, a log line, or at the other origin.
"""

from __future__ import annotations

import http.client
import json
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import timedelta
from http.server import BaseHTTPRequestHandler
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
from cryptography import x509
from hypothesis import given
from hypothesis import strategies as st

from mesh_identity.authority import workload_csr
from mesh_identity.clock import utcnow
from mesh_identity.keys import KeyType, generate_key, private_key_pem
from mesh_identity.profile import ca_csr
from mesh_identity.provider import Mode, ProviderContext, SignedCertificate
from mesh_identity.spiffe import SpiffeId, TrustDomain
from mesh_identity.svid import TrustBundle
from providers.vault.provider import SPEC, VaultProvider
from tests.fakes.vault import VaultServer
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
from tests.providers.vault.targets import set_up_pki

TARGET = "vault"
TD = TrustDomain("example.org")
WEB = SpiffeId.for_kubernetes(TD, "default", "web")
BOUND = 20.0  # one operation: a few requests, each bounded by the provider's request_timeout (2 s)


# -- the server between the provider and Vault ---------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Answer:
    status: int
    body: bytes
    content_type: str | None = "application/json"
    location: str | None = None


def route_of(method: str, path: str) -> str:
    return f"{method} {urlsplit(path).path}"


@dataclass
class Relay:
    """Forwards to ``upstream`` and records (``recording``), or answers from ``plan`` and the recordings."""

    upstream: str
    recorded: dict[str, Answer] = field(default_factory=dict)
    plan: dict[str, Answer] = field(default_factory=dict)
    recording: bool = True
    lock: threading.Lock = field(default_factory=threading.Lock)

    def answer(self, method: str, path: str, headers: dict[str, str], body: bytes) -> Answer:
        route = route_of(method, path)
        if self.recording:
            parts = urlsplit(self.upstream)
            connection = http.client.HTTPConnection(parts.hostname or "", parts.port, timeout=10)
            try:
                connection.request(method, path, body=body or None, headers=headers)
                response = connection.getresponse()
                answer = Answer(response.status, response.read(), response.getheader("Content-Type"))
            finally:
                connection.close()
            with self.lock:
                self.recorded.setdefault(route, answer)
            return answer
        with self.lock:
            planned = self.plan.get(route)
        return planned or Answer(404, b'{"errors":[]}')


class _Handler(BaseHTTPRequestHandler):
    relay: Relay
    protocol_version = "HTTP/1.1"

    def _any(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length) if length else b""
        skip = {"host", "content-length", "connection", "accept-encoding"}
        headers = {k: v for k, v in self.headers.items() if k.lower() not in skip}
        answer = self.relay.answer(self.command, self.path, headers, body)
        self.send_response_only(answer.status)
        if answer.content_type is not None:
            self.send_header("Content-Type", answer.content_type)
        if answer.location is not None:
            self.send_header("Location", answer.location)
        self.send_header("Content-Length", str(len(answer.body)))
        self.end_headers()
        self.wfile.write(answer.body)

    do_GET = do_POST = do_PUT = do_LIST = do_DELETE = _any

    def log_message(self, format: str, *args: Any) -> None:
        pass


class Elsewhere(BaseHTTPRequestHandler):
    """Another origin a redirect may point at: it records every request (with its headers) and answers 200."""

    seen: list[str]
    protocol_version = "HTTP/1.1"

    def _any(self) -> None:
        self.seen.append(f"{self.command} {self.path}\n{self.headers}")
        self.send_response_only(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", "2")
        self.end_headers()
        self.wfile.write(b"{}")

    do_GET = do_POST = do_PUT = do_LIST = do_DELETE = _any

    def log_message(self, format: str, *args: Any) -> None:
        pass


# -- the recording session -----------------------------------------------------------------------------------


@dataclass
class Setup:
    relay: Relay
    address: str
    elsewhere: str
    seen_elsewhere: list[str]
    directory: Path
    token_file: Path
    approle: tuple[str, Path]
    secrets: tuple[str, ...]
    csr: x509.CertificateSigningRequest
    intermediate_csr: x509.CertificateSigningRequest


def make_provider(setup: Setup, mode: Mode, auth: str) -> VaultProvider:
    options: dict[str, Any] = {
        "address": setup.address,
        "pki_mount": "pki",
        "pki_role": "spiffe",
        "request_timeout": "2s",
    }
    if auth == "approle":
        options |= {
            "auth_method": "approle",
            "approle_role_id": setup.approle[0],
            "approle_secret_id_file": str(setup.approle[1]),
        }
    else:
        options["token_file"] = str(setup.token_file)
    context = ProviderContext(TD, setup.directory / "state", KeyType.ECDSA_P256, mode, utcnow)
    return VaultProvider(context, SPEC.validate_options(options))


OPERATIONS: dict[str, Callable[[VaultProvider, Setup], Any]] = {
    "trust_bundle": lambda p, s: p.trust_bundle(),
    "sign_intermediate": lambda p, s: p.sign_intermediate(s.intermediate_csr, timedelta(hours=2)),
    "sign_workload": lambda p, s: p.sign_workload(s.csr, WEB, timedelta(minutes=20)),
    "health": lambda p, s: p.health(),
    "limits": lambda p, s: p.limits(),
    "doctor": lambda p, s: p.doctor(timedelta(minutes=20), timedelta(hours=2)),
    "renew": lambda p, s: (p.keeper.ensure(), p.keeper.refresh()),
}


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Setup]:
    directory = tmp_path_factory.mktemp("vault-fuzz")
    with VaultServer() as vault:
        set_up_pki(vault)
        token = vault.create_token(policies=["mesh"], ttl=3600)
        role_id, secret_id = vault.add_approle("mesh", policies=["mesh"])
        token_file, secret_file = directory / "token", directory / "secret-id"
        token_file.write_text(token + "\n")
        secret_file.write_text(secret_id + "\n")
        relay = Relay(vault.url)
        _Handler.relay = relay
        seen: list[str] = []
        Elsewhere.seen = seen
        front, other = serve_in_thread(_Handler), serve_in_thread(Elsewhere)
        key = generate_key(KeyType.ECDSA_P256)
        setup = Setup(
            relay,
            f"http://127.0.0.1:{front.server_address[1]}",
            f"http://127.0.0.1:{other.server_address[1]}",
            seen,
            directory,
            token_file,
            (role_id, secret_file),
            (token, secret_id, *secret_markers(private_key_pem(key))),
            workload_csr(key, WEB),
            ca_csr(generate_key(KeyType.ECDSA_P256), TD, "example.org fuzz intermediate"),
        )
        for mode, auth in ((Mode.PER_WORKLOAD, "token"), (Mode.INTERMEDIATE, "approle")):
            provider = make_provider(setup, mode, auth)
            try:
                for operation in OPERATIONS.values():
                    operation(provider, setup)
            finally:
                provider.close()
        fallback = http.client.HTTPConnection("127.0.0.1", front.server_address[1], timeout=10)
        fallback.request("GET", "/v1/pki/ca/pem")  # the CA read the provider falls back to
        fallback.getresponse().read()
        fallback.close()
        relay.recording = False
        # the tokens Vault handed out are secrets too (the login and lookup answers carry them)
        grants = [json.loads(a.body or b"{}") for a in relay.recorded.values() if a.body.startswith(b"{")]
        handed = [str((g.get("auth") or {}).get("client_token") or "") for g in grants if isinstance(g, dict)]
        setup.secrets = (*setup.secrets, *[t for t in handed if t])
        try:
            yield setup
        finally:
            front.shutdown()
            other.shutdown()
            front.server_close()
            other.server_close()


@pytest.fixture(scope="module")
def rule(setup: Setup) -> Iterator[Rule]:
    with Watch() as watch:
        yield Rule(TARGET, secrets=setup.secrets, timeout=BOUND, watch=watch)


def test_the_recording_has_every_route(setup: Setup) -> None:
    routes = set(setup.relay.recorded)
    for route in ("GET /v1/sys/health", "GET /v1/auth/token/lookup-self", "POST /v1/auth/approle/login",
                  "POST /v1/auth/token/renew-self", "GET /v1/pki/ca_chain", "GET /v1/pki/ca/pem",
                  "POST /v1/pki/sign/spiffe", "POST /v1/pki/root/sign-intermediate", "GET /v1/pki/roles/spiffe",
                  "GET /v1/sys/mounts/pki/tune", "POST /v1/sys/capabilities-self"):  # fmt: skip
        assert route in routes, sorted(routes)


# -- one input -----------------------------------------------------------------------------------------------


def check_result(operation: str, result: Any) -> None:
    if operation in ("sign_intermediate", "sign_workload"):
        assert isinstance(result, SignedCertificate) and isinstance(result.certificate, x509.Certificate)
        assert isinstance(result.bundle, TrustBundle) and result.bundle.authorities
    if operation == "trust_bundle":
        assert isinstance(result, TrustBundle) and result.trust_domain == TD


def check(setup: Setup, rule: Rule, plan: dict[str, Answer], mode: Mode, auth: str, operation: str) -> None:
    setup.relay.plan = plan
    provider = make_provider(setup, mode, auth)
    try:
        ok, result = rule.call(lambda: OPERATIONS[operation](provider, setup), f"{operation} ({auth}, {mode})")
    finally:
        provider.close()
    if ok:
        check_result(operation, result)
        outcome(f"{operation}: a result")
    else:
        outcome(f"{operation}: {type(result).__name__}")
    rule.settle(f"{operation} against fuzzed answers")
    while setup.seen_elsewhere:
        rule.check_text("a request that a redirect sent to another origin", setup.seen_elsewhere.pop())


# -- the seed corpus: each file a JSON object {"mode", "auth", "operation", "answers": {route: answer}}, the
# answer {"status", "body" (text) or "body_hex", "content_type", "location"}; routes not listed answer as
# recorded ------------------------------------------------------------------------------------------------


def plan_from_case(setup: Setup, case: dict[str, Any]) -> dict[str, Answer]:
    plan = dict(setup.relay.recorded)
    for route, spec in case.get("answers", {}).items():
        body = bytes.fromhex(spec["body_hex"]) if "body_hex" in spec else spec.get("body", "").encode()
        location = spec.get("location")
        if location is not None:
            location = location.replace("{elsewhere}", setup.elsewhere).replace("{here}", setup.address)
        plan[route] = Answer(spec.get("status", 200), body, spec.get("content_type", "application/json"), location)
    return plan


@pytest.mark.parametrize("path", corpus_cases(TARGET))
def test_corpus(setup: Setup, rule: Rule, path: Path) -> None:
    count(TARGET, corpus=True)
    case = json.loads(path.read_text())
    with rule.strictly():
        check(setup, rule, plan_from_case(setup, case), Mode(case["mode"]), case["auth"], case["operation"])


# -- generated answers ---------------------------------------------------------------------------------------

STATUSES = [200, 204, 301, 302, 307, 308, 400, 401, 403, 404, 405, 412, 429, 500, 501, 502, 503, 504]
WORDS = [
    "-----BEGIN CERTIFICATE-----", "-----END CERTIFICATE-----", "permission denied", "unknown role",
    "no handler for route", "TTL", "not allowed by this role", "Vault is sealed", "", "null", 0, -1, 3600,
    2**63, 1e308, True, None, [], {},
]  # fmt: skip


def answer_mutations(recorded: Answer) -> st.SearchStrategy[Answer]:
    """What a route may answer instead of its recording."""
    try:
        document = json.loads(recorded.body) if recorded.body else None
    except ValueError:  # PEM text: mutated as text
        json_changed = mutated(recorded.body.decode(), max_mutations=3, vocabulary=WORDS[:3]).map(
            lambda text: Answer(recorded.status, str(text).encode(), recorded.content_type)
        )
    else:
        json_changed = mutated(document, max_mutations=3, vocabulary=WORDS).map(
            lambda doc: Answer(recorded.status, json.dumps(doc).encode(), recorded.content_type)
        )
    return st.one_of(
        st.just(recorded),
        json_changed,
        json_changed,
        mutated_bytes(recorded.body, 4).map(lambda body: Answer(recorded.status, body, recorded.content_type)),
        st.builds(Answer, st.sampled_from(STATUSES), st.just(recorded.body), st.just(recorded.content_type)),
        st.builds(
            Answer, st.sampled_from(STATUSES), json_values().map(lambda v: json.dumps(v).encode()),
            st.sampled_from(["application/json", "text/html", None]),
        ),
        st.builds(Answer, st.sampled_from([301, 302, 307, 308]), st.just(b""), st.just(None),
                  st.sampled_from(["{here}/v1/sys/health", "{elsewhere}/v1/pki/sign/spiffe", "file:///etc/passwd",
                                   "", "/v1/auth/token/lookup-self", "{elsewhere}"])),
    )  # fmt: skip


ANSWERS: dict[str, st.SearchStrategy[Answer]] = {}
ORIGINS: dict[str, str] = {}  # "here" and "elsewhere": the addresses redirects point at


@pytest.fixture(scope="module")
def answers_ready(setup: Setup) -> None:
    """The mutations of every recorded route, for the generated plans (drawn after the fixtures ran)."""
    for route, answer in setup.relay.recorded.items():
        ANSWERS[route] = answer_mutations(answer)
    ORIGINS.update(here=setup.address, elsewhere=setup.elsewhere)


@st.composite
def plans(draw: st.DrawFn) -> dict[str, Answer]:
    plan = {}
    for route in sorted(ANSWERS):
        answer = draw(ANSWERS[route])
        if answer.location is not None:
            location = answer.location.replace("{elsewhere}", ORIGINS["elsewhere"]).replace("{here}", ORIGINS["here"])
            answer = Answer(answer.status, answer.body, answer.content_type, location)
        plan[route] = answer
    return plan


@fuzz_settings(100, shrink=False)  # the product's threads make a replay differ: report the input as found
@given(
    plan=st.deferred(plans),
    mode=st.sampled_from(list(Mode)),
    auth=st.sampled_from(["token", "approle"]),
    operation=st.sampled_from(sorted(OPERATIONS)),
)
def test_generated_answers(
    setup: Setup, rule: Rule, answers_ready: None, plan: dict[str, Answer], mode: Mode, auth: str, operation: str
) -> None:
    count(TARGET)
    check(setup, rule, plan, mode, auth, operation)


def test_seed_corpus_is_readable() -> None:
    for path in sorted((CORPUS / TARGET).iterdir()):
        case = json.loads(path.read_text())
        assert case["operation"] in OPERATIONS and case["auth"] in ("token", "approle"), path.name
        Mode(case["mode"])
