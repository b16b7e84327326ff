"""Malformed answers from Vault are errors of ours (:class:`VaultAnswerError`, naming the path and the field), never
an AttributeError, TypeError, KeyError or ValueError out of the provider or out of hvac.

The real provider (and hvac) talks to a relay on loopback in front of the Vault test server: each route answers
as Vault does, unless the test replaces its answer (a fixed status and body) or rewrites Vault's JSON.
"""

from __future__ import annotations

import http.client
import json
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest

from mesh_identity.authority import workload_csr
from mesh_identity.errors import ProviderRejectedError
from mesh_identity.keys import KeyType, generate_key
from mesh_identity.profile import ca_csr
from mesh_identity.provider import Mode, ProviderContext
from mesh_identity.spiffe import SpiffeId, TrustDomain
from providers.vault.answers import Fields, answer_of, data_of, kind, parse_seconds
from providers.vault.errors import (
    VaultAnswerError,
    VaultRequestError,
    VaultRoleError,
    VaultTokenExpiredError,
)
from providers.vault.provider import SPEC, VaultProvider
from tests.fakes.vault import VaultServer
from tests.providers.vault.targets import set_up_pki

TD = TrustDomain("example.org")
WORKLOAD = SpiffeId.for_kubernetes(TD, "default", "web")
SIGN = "POST /v1/pki/sign/spiffe"
SIGN_INTERMEDIATE = "POST /v1/pki/root/sign-intermediate"
LOOKUP = "GET /v1/auth/token/lookup-self"
RENEW = "POST /v1/auth/token/renew-self"
LOGIN = "POST /v1/auth/approle/login"


@dataclass(frozen=True)
class Answer:
    """What a route answers instead of Vault: ``body`` as given (a str or bytes), or JSON of anything else."""

    status: int
    body: Any = b""
    content_type: str | None = "application/json"

    def encoded(self) -> bytes:
        if isinstance(self.body, bytes):
            return self.body
        return self.body.encode() if isinstance(self.body, str) else json.dumps(self.body).encode()


Rewrite = Callable[[Any], Any]  # Vault's JSON answer -> what the route answers instead (as JSON)


@dataclass
class Relay:
    """Forwards every request to ``upstream`` (the Vault test server), except the routes of ``plan``."""

    upstream: str
    plan: dict[str, Answer | Rewrite] = field(default_factory=dict)

    def answer(self, method: str, path: str, headers: dict[str, str], body: bytes) -> Answer:
        planned = self.plan.get(f"{method} {urlsplit(path).path}")
        if isinstance(planned, Answer):
            return planned
        parts = urlsplit(self.upstream)
        connection = http.client.HTTPConnection(parts.hostname or "", parts.port, timeout=10)
        try:
            connection.request(method, path, body=body or None, headers=headers)
            response = connection.getresponse()
            status, content, content_type = response.status, response.read(), response.getheader("Content-Type")
        finally:
            connection.close()
        if planned is not None:
            return Answer(status, planned(json.loads(content)))
        return Answer(status, content, content_type)


@pytest.fixture
def relay(vault: VaultServer) -> Iterator[tuple[Relay, str]]:
    """A relay in front of ``vault`` (with the PKI mount, role and policy of ``set_up_pki``) and its address."""
    set_up_pki(vault)
    relay = Relay(vault.url)

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def _any(self) -> None:
            length = int(self.headers.get("Content-Length") or 0)
            body = self.rfile.read(length) if length else b""
            skip = {"host", "content-length", "connection", "accept-encoding"}
            headers = {k: v for k, v in self.headers.items() if k.lower() not in skip}
            answer = relay.answer(self.command, self.path, headers, body)
            content = answer.encoded()
            self.send_response_only(answer.status)
            if answer.content_type is not None:
                self.send_header("Content-Type", answer.content_type)
            self.send_header("Content-Length", str(len(content)))
            self.end_headers()
            self.wfile.write(content)

        do_GET = do_POST = do_PUT = do_LIST = do_DELETE = _any

        def log_message(self, format: str, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield relay, f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)


@dataclass
class Made:
    provider: VaultProvider
    relay: Relay
    secrets: tuple[str, ...]  # what must never show in a message

    def answer(self, route: str, answer: Answer | Rewrite) -> None:
        self.relay.plan[route] = answer


@pytest.fixture
def make(vault: VaultServer, relay: tuple[Relay, str], tmp_path: Path) -> Iterator[Callable[..., Made]]:
    """``make(mode, auth)``: a provider that talks to Vault through the relay (token or AppRole auth)."""
    made: list[VaultProvider] = []

    def _make(mode: Mode = Mode.PER_WORKLOAD, auth: str = "token") -> Made:
        options: dict[str, Any] = {"address": relay[1], "pki_role": "spiffe", "request_timeout": "5s"}
        if auth == "approle":
            role_id, secret_id = vault.add_approle("mesh", policies=["mesh"])
            (tmp_path / "secret-id").write_text(secret_id)
            options |= {
                "auth_method": "approle",
                "approle_role_id": role_id,
                "approle_secret_id_file": str(tmp_path / "secret-id"),
            }
            secrets: tuple[str, ...] = (secret_id,)
        else:
            token = vault.create_token(policies=["mesh"], ttl=3600)
            (tmp_path / "token").write_text(token)
            options["token_file"] = str(tmp_path / "token")
            secrets = (token,)
        context = ProviderContext(TD, tmp_path / "state", KeyType.ECDSA_P256, mode, lambda: datetime.now(UTC))
        provider = VaultProvider(context, SPEC.validate_options(options))
        made.append(provider)
        return Made(provider, relay[0], secrets)

    yield _make
    for provider in made:
        provider.close()


def sign_workload(made: Made) -> Any:
    csr = workload_csr(generate_key(KeyType.ECDSA_P256), WORKLOAD)
    return made.provider.sign_workload(csr, WORKLOAD, timedelta(minutes=20))


def sign_intermediate(made: Made) -> Any:
    csr = ca_csr(generate_key(KeyType.ECDSA_P256), TD, "example.org test intermediate")
    return made.provider.sign_intermediate(csr, timedelta(hours=2))


def raised(made: Made, action: Callable[[Made], Any], error: type[Exception] = VaultAnswerError) -> str:
    """The message of the ``error`` that ``action`` raises; it names no secret."""
    with pytest.raises(error) as caught:
        action(made)
    message = str(caught.value)
    for secret in made.secrets:
        assert secret not in message
    return message


# -- signing --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("answer", "message"),
    [
        (Answer(200, [1, 2]), "vault: pki/sign/spiffe: answer is not a JSON object (got a list)"),
        (Answer(200, {"data": "x"}), "vault: pki/sign/spiffe: answer has no data (got a string, not an object)"),
        (Answer(200, {"data": None}), "vault: pki/sign/spiffe: answer has no data (got null)"),
        (Answer(200, {"data": []}), "vault: pki/sign/spiffe: answer has no data (got a list, not an object)"),
        (Answer(200, {"warnings": None}), "vault: pki/sign/spiffe: answer has no data"),
        (Answer(200, {"data": {}}), "vault: pki/sign/spiffe: answer has no data.certificate"),
        (
            Answer(200, {"data": {"certificate": 5}}),
            "vault: pki/sign/spiffe: answer has no data.certificate (got a number, not PEM text)",
        ),
        (
            Answer(200, {"data": {"certificate": [1, 2]}}),
            "vault: pki/sign/spiffe: answer has no data.certificate (got a list holding a number, not PEM text)",
        ),
        (
            Answer(200, "<html>oops</html>", "text/html"),
            "vault: pki/sign/spiffe: answer is not a JSON object (got text/html that is not JSON, HTTP 200)",
        ),
        (
            Answer(204, b"", None),
            "vault: pki/sign/spiffe: answer is not a JSON object (got an empty answer, HTTP 204)",
        ),
        (
            lambda signed: {**signed, "warnings": 7},
            "vault: pki/sign/spiffe: answer has no warnings (got a number, not a list of strings)",
        ),
        (
            lambda signed: {**signed, "data": {**signed["data"], "ca_chain": [signed["data"]["issuing_ca"], None]}},
            "vault: pki/sign/spiffe: answer has no data.ca_chain (got a list holding null, not PEM text)",
        ),
    ],
    ids=[
        "list", "data-string", "data-null", "data-list", "no-data", "no-certificate", "certificate-number",
        "certificate-numbers", "html", "204", "warnings-number", "ca-chain-holding-null",
    ],
)  # fmt: skip
def test_a_malformed_sign_answer(make: Callable[..., Made], answer: Answer | Rewrite, message: str):
    made = make()
    made.answer(SIGN, answer)
    assert raised(made, sign_workload) == message


def test_a_sign_answer_as_vault_gives_it_still_signs(make: Callable[..., Made]):
    made = make()
    made.answer(SIGN, lambda signed: signed)  # through the JSON rewriting, unchanged
    signed = sign_workload(made)
    assert signed.certificate.not_valid_after_utc > datetime.now(UTC)


@pytest.mark.parametrize(
    ("answer", "message"),
    [
        (
            Answer(204, b"", None),
            "vault: pki/root/sign-intermediate: answer is not a JSON object (got an empty answer, HTTP 204)",
        ),
        (
            Answer(200, "<html>oops</html>", "text/html"),
            "vault: pki/root/sign-intermediate: answer is not a JSON object (got text/html that is not JSON, HTTP 200)",
        ),
    ],
    ids=["204", "html"],
)
def test_a_malformed_sign_intermediate_answer(make: Callable[..., Made], answer: Answer, message: str):
    made = make(Mode.INTERMEDIATE)
    made.answer(SIGN_INTERMEDIATE, answer)
    assert raised(made, sign_intermediate) == message


# -- error answers of odd shapes: still the status's error, with what Vault said ---------------------------------


def test_an_error_answer_whose_errors_are_not_strings(make: Callable[..., Made]):
    made = make()
    made.answer(SIGN, Answer(400, {"errors": [None, 5, {"a": 1}]}))
    assert raised(made, sign_workload, VaultRequestError) == (
        f"vault: sign {WORKLOAD} at pki/sign/spiffe: Vault refused POST pki/sign/spiffe (400): 5; " + '{"a": 1}'
    )


def test_an_error_answer_whose_errors_are_one_string(make: Callable[..., Made]):
    made = make()
    made.answer(SIGN, Answer(400, {"errors": "unknown role spiffe"}))  # read whole, not letter by letter
    assert raised(made, sign_workload, VaultRoleError) == (
        f"vault: sign {WORKLOAD} at pki/sign/spiffe: PKI role 'spiffe' does not exist on mount 'pki'; create it or "
        "fix pki_role"
    )


@pytest.mark.parametrize("body", ["null", "[1]", '"denied"'])
def test_a_403_whose_body_is_not_an_object_is_still_a_denial(make: Callable[..., Made], tmp_path: Path, body: str):
    made = make()
    made.answer(LOOKUP, Answer(403, body))
    assert raised(made, sign_workload, VaultTokenExpiredError) == (
        f"vault: the Vault token from token_file {tmp_path / 'token'} is expired, revoked or not valid; give a new "
        "token (token_file is re-read), or use approle or kubernetes auth, which log in again (a valid token also "
        "needs the default policy, for auth/token/lookup-self)"
    )


# -- the CA chain -------------------------------------------------------------------------------------------------


def test_a_ca_chain_answered_as_json(make: Callable[..., Made]):
    made = make()
    made.answer("GET /v1/pki/ca_chain", Answer(200, {"data": {}}))
    assert raised(made, lambda m: m.provider.trust_bundle()) == (
        "vault: pki/ca_chain: answer is not PEM text (got JSON: an object)"
    )


def test_a_ca_pem_answered_as_json(make: Callable[..., Made]):
    made = make()
    made.answer("GET /v1/pki/ca_chain", Answer(200, "", "application/pem-certificate-chain"))  # old Vaults: empty
    made.answer("GET /v1/pki/ca/pem", Answer(200, [1]))
    assert raised(made, lambda m: m.provider.trust_bundle()) == (
        "vault: pki/ca/pem: answer is not PEM text (got JSON: a list)"
    )


# -- hvac's own errors on an answer it cannot read, in Connection.call -------------------------------------------


def test_what_hvac_raises_reading_an_answer_is_an_answer_error(make: Callable[..., Made]):
    made = make()
    made.answer("GET /v1/pki/ca_chain", Answer(200, {"data": {}}))
    connection = made.provider.connection
    read = connection.client.secrets.pki.read_ca_certificate_chain  # takes .text of the dict hvac decoded
    with pytest.raises(VaultAnswerError) as caught:
        connection.call("read the CA chain", lambda: read(mount_point="pki"))
    assert str(caught.value) == (
        "vault: pki/ca_chain: hvac could not read the answer (GET, HTTP 200, application/json: AttributeError)"
    )
    assert isinstance(caught.value.__cause__, AttributeError)
    assert caught.value.path == "pki/ca_chain"


def test_json_nested_too_deep_for_hvac_to_decode(make: Callable[..., Made]):
    made = make()
    made.answer(SIGN, Answer(200, "[" * 100_000))  # json.loads: RecursionError, which hvac does not catch
    assert raised(made, sign_workload) == (
        "vault: pki/sign/spiffe: hvac could not read the answer (POST, HTTP 200, application/json: RecursionError)"
    )


def test_a_bug_of_ours_in_the_call_is_not_taken_for_a_malformed_answer(make: Callable[..., Made]):
    made = make()
    connection = made.provider.connection
    client = connection.client
    health = client.sys.read_health_status
    with pytest.raises(AttributeError):  # raised in our lambda, after an answer came
        connection.call("check", lambda: health(method="GET").no_such_attribute)
    with pytest.raises(TypeError):  # raised in hvac's code, but before any answer: not about an answer
        connection.call("sign", lambda: client.secrets.pki.sign_certificate("spiffe", "x", "y", extra_params=object()))
    with pytest.raises(TypeError):  # our lambda called wrong
        connection.call("check", lambda: health(no_such_parameter=1))


# -- logins and the token -----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("answer", "message"),
    [
        (Answer(200, {"auth": None}), "vault: auth/approle/login: answer has no auth (got null)"),
        (Answer(200, {"auth": {"lease_duration": 60}}), "vault: auth/approle/login: answer has no auth.client_token"),
        (
            Answer(200, {"auth": {"client_token": ""}}),
            "vault: auth/approle/login: answer has no auth.client_token (got an empty string, not a non-empty string)",
        ),
        (
            lambda login: {**login, "auth": {**login["auth"], "client_token": [login["auth"]["client_token"]]}},
            "vault: auth/approle/login: answer has no auth.client_token (got a list, not a non-empty string)",
        ),
        (
            lambda login: {**login, "auth": {**login["auth"], "policies": "default"}},
            "vault: auth/approle/login: answer has no auth.policies (got a string, not a list of strings)",
        ),
        (
            lambda login: {**login, "auth": {**login["auth"], "renewable": "yes"}},
            "vault: auth/approle/login: answer has no auth.renewable (got a string, not true or false)",
        ),
        (Answer(200, "{not json"), "vault: auth/approle/login: answer is not a JSON object (got application/json "
                                   "that is not JSON, HTTP 200)"),
    ],
    ids=["auth-null", "no-token", "empty-token", "token-in-a-list", "policies-string", "renewable-string", "not-json"],
)  # fmt: skip
def test_a_malformed_login_answer(make: Callable[..., Made], answer: Answer | Rewrite, message: str):
    made = make(Mode.INTERMEDIATE, "approle")
    made.answer(LOGIN, answer)
    assert raised(made, sign_intermediate) == message


@pytest.mark.parametrize(
    ("answer", "message"),
    [
        (Answer(200, {"data": None}), "vault: auth/token/lookup-self: answer has no data (got null)"),
        (Answer(200, {"auth": None}), "vault: auth/token/lookup-self: answer has no data"),
        (
            Answer(200, {"data": {"ttl": "abc"}}),
            "vault: auth/token/lookup-self: answer has no data.ttl (got a string that is not a duration)",
        ),
        (
            Answer(200, {"data": {"ttl": -1}}),
            "vault: auth/token/lookup-self: answer has no data.ttl (got a negative duration)",
        ),
        (
            Answer(200, {"data": {"ttl": 2**63}}),
            "vault: auth/token/lookup-self: answer has no data.ttl (got a duration longer than Go's longest, 292 "
            "years)",
        ),
        (
            Answer(200, {"data": {"ttl": [3600]}}),
            "vault: auth/token/lookup-self: answer has no data.ttl (got a list, not a duration)",
        ),
        (
            Answer(200, "{not json"),
            "vault: auth/token/lookup-self: answer is not a JSON object (got application/json that is not JSON, HTTP "
            "200)",
        ),
    ],
    ids=["data-null", "no-data", "ttl-text", "ttl-negative", "ttl-huge", "ttl-list", "not-json"],
)
def test_a_malformed_token_lookup(make: Callable[..., Made], answer: Answer, message: str):
    made = make()
    made.answer(LOOKUP, answer)
    assert raised(made, sign_workload) == message


def test_a_token_ttl_given_as_a_duration_string(make: Callable[..., Made]):
    made = make()
    made.answer(LOOKUP, Answer(200, {"data": {"ttl": "1h", "creation_ttl": "2h0m0s", "renewable": True}}))
    lease = made.provider.keeper.ensure()
    assert (lease.ttl, lease.renewable) == (7200.0, True)
    assert lease.expires is not None and lease.expires - lease.obtained == pytest.approx(3600.0)


def test_a_malformed_renewal_is_an_error_not_a_lease(make: Callable[..., Made]):
    made = make(Mode.INTERMEDIATE)
    made.answer(LOOKUP, Answer(200, {"data": {"ttl": 3600, "renewable": True}}))
    made.answer(RENEW, Answer(200, {"auth": {"lease_duration": "abc"}}))
    keeper = made.provider.keeper
    lease = keeper.ensure()
    assert raised(made, lambda m: keeper.refresh()) == (
        "vault: auth/token/renew-self: answer has no auth.lease_duration (got a string that is not a duration)"
    )
    assert keeper.lease == lease  # untouched: renewed again later


# -- health, the role, the mount, the token's capabilities ----------------------------------------------------


def test_a_health_answer_that_is_a_list(make: Callable[..., Made]):
    made = make()
    made.answer("GET /v1/sys/health", Answer(200, [True]))
    health = made.provider.health()
    assert not health.healthy
    assert health.detail == "vault: sys/health: answer is not a JSON object (got a list)"


def test_a_health_answer_of_a_sealed_vault_whose_body_is_not_an_object(make: Callable[..., Made]):
    made = make()
    made.answer("GET /v1/sys/health", Answer(503, [True]))  # the status says it
    health = made.provider.health()
    assert not health.healthy
    assert (
        health.detail
        == f"vault: Vault at {made.provider.settings.address} is sealed; unseal it (vault operator unseal)"
    )


@pytest.mark.parametrize(
    ("answer", "message"),
    [
        (Answer(200, {"data": [1]}), "vault: pki/roles/spiffe: answer has no data (got a list, not an object)"),
        (
            Answer(200, {"data": {"key_bits": "abc"}}),
            "vault: pki/roles/spiffe: answer has no data.key_bits (got a string, not an integer)",
        ),
        (
            Answer(200, {"data": {"allowed_uri_sans": [1]}}),
            "vault: pki/roles/spiffe: answer has no data.allowed_uri_sans (got a list holding a number, not a list of "
            "strings)",
        ),
        (
            Answer(200, {"data": {"max_ttl": {}}}),
            "vault: pki/roles/spiffe: answer has no data.max_ttl (got an object, not a duration)",
        ),
    ],
    ids=["data-list", "key-bits-text", "uri-sans-numbers", "max-ttl-object"],
)
def test_a_malformed_role(make: Callable[..., Made], answer: Answer, message: str):
    made = make()
    made.answer("GET /v1/pki/roles/spiffe", answer)
    assert raised(made, lambda m: m.provider.pki.role("spiffe")) == message
    assert message in made.provider.limits().notes


def test_a_role_with_durations_as_strings_and_uri_sans_as_one_string(make: Callable[..., Made]):
    made = make()
    made.answer(
        "GET /v1/pki/roles/spiffe",
        lambda role: {**role, "data": {**role["data"], "max_ttl": "768h", "ttl": "1h30m", "allowed_uri_sans": "a,b"}},
    )
    role = made.provider.pki.role("spiffe")
    assert (role.max_ttl, role.ttl, role.allowed_uri_sans) == (timedelta(hours=768), timedelta(minutes=90), ("a", "b"))


def test_a_malformed_mount_tune(make: Callable[..., Made]):
    made = make()
    made.answer("GET /v1/sys/mounts/pki/tune", Answer(200, {"data": [1]}))
    message = "vault: sys/mounts/pki/tune: answer has no data (got a list, not an object)"
    assert raised(made, lambda m: m.provider.pki.mount_max_ttl()) == message
    limits = made.provider.limits()
    assert message in limits.notes
    assert limits.max_intermediate_ttl is None


def test_a_mount_tune_that_may_not_be_read_is_unknown(make: Callable[..., Made]):
    made = make()
    made.answer("GET /v1/sys/mounts/pki/tune", Answer(403, {"errors": ["permission denied"]}))
    assert made.provider.pki.mount_max_ttl() is None


@pytest.mark.parametrize(
    ("answer", "message"),
    [
        (Answer(200, {"data": "root"}), "vault: sys/capabilities-self: answer has no data (got a string, not an object)"),
        (
            Answer(200, {"data": {"pki/sign/spiffe": "update"}}),
            "vault: sys/capabilities-self: answer has no data.pki/sign/spiffe (got a string, not a list of strings)",
        ),
        (Answer(200, ["update"]), "vault: sys/capabilities-self: answer is not a JSON object (got a list)"),
    ],
    ids=["data-string", "capabilities-string", "list"],
)  # fmt: skip
def test_malformed_capabilities(make: Callable[..., Made], answer: Answer, message: str):
    made = make()
    made.answer("POST /v1/sys/capabilities-self", answer)
    assert raised(made, lambda m: m.provider.pki.token_capabilities(["pki/sign/spiffe"])) == message
    checks = {check.name: check for check in made.provider.doctor(timedelta(minutes=20))}
    assert any(not check.ok and check.detail == message for check in checks.values()), checks


def test_the_answer_error_names_the_namespace(vault: VaultServer, tmp_path: Path):
    set_up_pki(vault, namespace="team")
    token = vault.create_token(policies=["mesh"], namespace="team")
    (tmp_path / "token").write_text(token)
    options = {"address": vault.url, "token_file": str(tmp_path / "token"), "pki_role": "spiffe", "namespace": "team"}
    context = ProviderContext(TD, tmp_path, KeyType.ECDSA_P256, Mode.PER_WORKLOAD, lambda: datetime.now(UTC))
    provider = VaultProvider(context, SPEC.validate_options(options))
    try:
        assert provider.connection.where("pki/sign/spiffe") == "pki/sign/spiffe in namespace 'team'"
        with pytest.raises(VaultAnswerError) as caught:
            provider.pki._signed({"data": []}, "the certificate", "pki/sign/spiffe")
        assert str(caught.value) == (
            "vault: pki/sign/spiffe in namespace 'team': answer has no data (got a list, not an object)"
        )
        assert (caught.value.path, caught.value.key) == ("pki/sign/spiffe in namespace 'team'", "data")
    finally:
        provider.close()


# -- the readers themselves ---------------------------------------------------------------------------------------


def test_the_answer_error_is_a_rejection_that_backing_off_does_not_fix():
    err = VaultAnswerError("vault", "x", path="p")
    assert isinstance(err, ProviderRejectedError) and err.retryable is False


@pytest.mark.parametrize(
    ("text", "seconds"),
    [
        ("3600", 3600.0), ("0", 0.0), ("1h", 3600.0), ("1h0m0s", 3600.0), ("768h", 768 * 3600.0),
        ("1.5h", 5400.0), ("90s", 90.0), ("300ms", 0.3), ("7d", 7 * 86400.0), ("0s", 0.0), ("2\u00b5s", 2e-6),
        ("", None), ("abc", None), ("-1s", None), ("1h 2m", None), ("1e3s", None), ("h", None), ("1", 1.0),
    ],
)  # fmt: skip
def test_parse_seconds(text: str, seconds: float | None):
    assert parse_seconds(text) == seconds


@pytest.mark.parametrize(
    ("value", "shown"),
    [(None, "null"), (True, "a boolean"), (1, "a number"), (1.5, "a number"), ("", "an empty string"),
     ("x", "a string"), ([], "a list"), ({}, "an object")],
)  # fmt: skip
def test_kind(value: object, shown: str):
    assert kind(value) == shown


def test_readers_take_defaults_for_missing_and_null_fields_only():
    fields = Fields("p", "data", {"null": None, "zero": 0, "no": False, "empty": ""})
    assert fields.integer("missing", 7) == 7 and fields.integer("null", 7) == 7 and fields.integer("zero", 7) == 0
    assert fields.boolean("no", True) is False and fields.boolean("missing", None) is None
    assert fields.string("empty", "x") == "" and fields.strings("missing") == () and fields.seconds("null", 1.0) == 1.0
    assert fields.pem("missing", "") == ""
    with pytest.raises(VaultAnswerError, match=r"^vault: p: answer has no data\.null \(got null\)$"):
        fields.integer("null")
    with pytest.raises(VaultAnswerError, match=r"^vault: p: answer has no data\.no \(got a boolean, not an integer\)$"):
        fields.integer("no")  # a bool is no integer
    with pytest.raises(VaultAnswerError, match=r"^vault: p: answer has no data\.zero \(got a number, not an object\)$"):
        fields.fields("zero")


def test_answer_of_and_data_of():
    assert answer_of({"a": 1}, "p").items == {"a": 1}
    assert data_of({"data": {"a": 1}}, "p").name == "data"
    with pytest.raises(VaultAnswerError, match=r"^vault: p: answer is not a JSON object \(got a string\)$"):
        answer_of("x", "p")
