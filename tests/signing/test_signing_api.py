"""The signing API over real gRPC and TLS on loopback, through the generated stub: join tokens, CSR checks, the
agent's authorisation by host, renewal over mutual TLS, the two listeners, JWT-SVIDs, the bundle, the audit and
the metrics. Nothing is issued on any refusal (the Authority's CertificateIssued events are counted)."""

from __future__ import annotations

import base64
import json
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path

import grpc
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from mesh_identity.jointokens import JoinTokens
from mesh_identity.jwtsvid import JwtBundle, validate_jwt_svid
from mesh_identity.mesh.model import parse_mesh
from mesh_identity.profile import same_key
from mesh_identity.spiffe import SpiffeId
from mesh_identity.svid import X509Svid, spiffe_id_of
from tests.signing.client import attest_join, corrupt_signature, csr, new_key, openssl_verify, presented_certificate
from tests.signing.conftest import AGENT_A, BACKEND, BILLING, FRONTEND, MESH, TD, Api
from xds_sds.proto import signing_pb2, signing_pb2_grpc

Stub = signing_pb2_grpc.SigningStub


def _code(call: Callable[[], object]) -> tuple[grpc.StatusCode, str]:
    with pytest.raises(grpc.RpcError) as caught:
        call()
    err = caught.value
    return err.code(), err.details()  # type: ignore[attr-defined]


def _agent(api: Api, host: str = "host-a") -> tuple[Stub, X509Svid]:
    """Attest as the agent of ``host`` with a join token; a stub on the signing listener with its SVID."""
    key = new_key()
    response = attest_join(api.attest_stub(), api.tokens.create(host, timedelta(minutes=15)), csr(key))
    svid = _svid(response, key)
    return api.connect(api.server.target, svid=svid), svid


def _svid(response: signing_pb2.X509Response, key: object) -> X509Svid:
    from mesh_identity.svid import TrustBundle

    leaf, *chain = (x509.load_der_x509_certificate(c) for c in response.cert_chain)
    roots = tuple(x509.load_der_x509_certificate(r) for r in response.bundle.x509_authorities)
    return X509Svid(SpiffeId.parse(response.spiffe_id), leaf, tuple(chain), key, TrustBundle(TD, roots))  # type: ignore[arg-type]


# -- Attest with a join token ----------------------------------------------------------------------------------


def test_a_join_token_buys_its_hosts_agent_identity_once(api: Api, tmp_path: Path) -> None:
    token = api.tokens.create("host-a", timedelta(minutes=15))
    key = new_key()
    response = attest_join(api.attest_stub(), token, csr(key))
    assert response.spiffe_id == AGENT_A
    leaf = x509.load_der_x509_certificate(response.cert_chain[0])
    assert str(spiffe_id_of(leaf)) == AGENT_A
    assert same_key(leaf, key.public_key())
    assert len(response.cert_chain) == 2  # the leaf and the intermediate, never the root
    assert openssl_verify(tmp_path, response).strip().endswith(": OK")
    assert [e.subject for e in api.issued()] == [AGENT_A]

    code, message = _code(lambda: attest_join(api.attest_stub(), token, csr(new_key())))
    assert code is grpc.StatusCode.UNAUTHENTICATED
    assert "join token refused: the join token" in message
    assert "for node 'host-a' was already used at" in message
    assert len(api.issued()) == 1


def test_an_expired_join_token_is_unauthenticated(api: Api) -> None:
    past = JoinTokens(api.tokens.state_dir, clock=lambda: datetime.now(UTC) - timedelta(hours=1))
    token = past.create("host-a", timedelta(minutes=15))
    code, message = _code(lambda: attest_join(api.attest_stub(), token, csr(new_key())))
    assert code is grpc.StatusCode.UNAUTHENTICATED
    assert "for node 'host-a' expired at" in message
    assert api.issued() == []


def test_an_unknown_join_token_is_unauthenticated(api: Api, tmp_path: Path) -> None:
    token = JoinTokens(tmp_path / "another-control-plane").create("host-a", timedelta(minutes=15))
    code, message = _code(lambda: attest_join(api.attest_stub(), token, csr(new_key())))
    assert (code, message) == (
        grpc.StatusCode.UNAUTHENTICATED,
        "join token refused: the join token is unknown to this control plane",
    )
    code, message = _code(lambda: attest_join(api.attest_stub(), "guess", csr(new_key())))
    assert code is grpc.StatusCode.UNAUTHENTICATED
    assert "malformed" in message
    assert api.issued() == []


def test_an_attest_without_a_credential_is_unauthenticated(api: Api) -> None:
    code, message = _code(lambda: api.attest_stub().Attest(signing_pb2.AttestRequest(csr=csr(new_key())), timeout=30))
    assert code is grpc.StatusCode.UNAUTHENTICATED
    assert message == "the request carries no credential (join_token or kubernetes_token)"


# -- CSR checks (the Authority's), mapped to statuses ------------------------------------------------------------


def test_a_csr_for_another_identity_is_permission_denied_and_the_token_is_kept(api: Api) -> None:
    token = api.tokens.create("host-a", timedelta(minutes=15))
    key = new_key()
    code, message = _code(lambda: attest_join(api.attest_stub(), token, csr(key, uris=[FRONTEND])))
    assert code is grpc.StatusCode.PERMISSION_DENIED
    assert message == (
        f"the CSR names {FRONTEND}, but the caller may only be issued {AGENT_A} (the server decides the identity, "
        "not the CSR)"
    )
    assert api.issued() == []
    # the refused request did not use the token up: the agent may try again with a good CSR
    assert attest_join(api.attest_stub(), token, csr(key, uris=[AGENT_A])).spiffe_id == AGENT_A


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (
            lambda: csr(new_key(), uris=[AGENT_A], dns=["evil.example.com"]),
            "CSR asks for SANs other than the SPIFFE ID",
        ),
        (
            lambda: corrupt_signature(csr(new_key())),
            "CSR signature is invalid: it was not signed by the key it carries",
        ),
        (lambda: csr(new_key(), padding=9000), "more than the 8192 allowed (signing.max_csr_bytes)"),
        (lambda: b"\x30\x03\x02\x01\x00", "CSR is malformed: not a PEM or DER PKCS#10 request"),
        (lambda: b"", "csr is empty"),
    ],
    ids=["extra-sans", "bad-signature", "oversized", "unparsable", "empty"],
)
def test_a_bad_csr_is_invalid_argument_and_nothing_is_issued(api: Api, make: Callable[[], bytes], message: str) -> None:
    token = api.tokens.create("host-a", timedelta(minutes=15))
    request = make()
    code, details = _code(lambda: attest_join(api.attest_stub(), token, request))
    assert code is grpc.StatusCode.INVALID_ARGUMENT
    assert message in details
    assert api.issued() == []
    assert api.tokens.list()[0].used is None


def test_the_corrupted_csr_is_otherwise_well_formed() -> None:
    request = x509.load_der_x509_csr(corrupt_signature(csr(new_key())))
    assert not request.is_signature_valid


def test_a_message_beyond_the_size_limit_is_refused_by_grpc(api: Api) -> None:
    code, _ = _code(lambda: attest_join(api.attest_stub(), "x", b"\x00" * (api.server.max_message + 1)))
    assert code is grpc.StatusCode.RESOURCE_EXHAUSTED
    assert api.issued() == []


# -- the agent over mutual TLS ---------------------------------------------------------------------------------


def test_an_agent_obtains_the_workloads_on_its_host_only(api: Api, tmp_path: Path) -> None:
    agent, _ = _agent(api, "host-a")
    key = new_key()
    response = agent.SignX509(
        signing_pb2.SignX509Request(spiffe_id=FRONTEND, csr=csr(key, uris=[FRONTEND])), timeout=30
    )
    assert response.spiffe_id == FRONTEND
    assert same_key(x509.load_der_x509_certificate(response.cert_chain[0]), key.public_key())
    assert openssl_verify(tmp_path, response, "frontend").strip().endswith(": OK")
    issued = len(api.issued())

    for identity, reason in (
        (BACKEND, f"the registry places no instance of {BACKEND} on host 'host-a', the host of {AGENT_A}"),
        (BILLING, f"the registry places no instance of {BILLING} on host 'host-a', the host of {AGENT_A}"),
        (
            "spiffe://example.org/ns/shop/sa/nobody",
            "spiffe://example.org/ns/shop/sa/nobody is not a workload of the registry",
        ),
        ("spiffe://example.org/mesh-identity/xds", "is one of the control plane's own identities"),
        ("spiffe://example.org/mesh-identity/agent/host-b", "is one of the control plane's own identities"),
        ("spiffe://other.org/ns/shop/sa/frontend", "is not in trust domain example.org"),
    ):
        request = signing_pb2.SignX509Request(spiffe_id=identity, csr=csr(new_key()))
        code, message = _code(lambda r=request: agent.SignX509(r, timeout=30))  # type: ignore[misc]
        assert code is grpc.StatusCode.PERMISSION_DENIED, identity
        assert reason in message
    assert len(api.issued()) == issued


def test_a_csr_naming_another_identity_than_the_one_asked_for_is_permission_denied(api: Api) -> None:
    agent, _ = _agent(api, "host-a")
    request = signing_pb2.SignX509Request(spiffe_id=FRONTEND, csr=csr(new_key(), uris=[BACKEND]))
    code, message = _code(lambda: agent.SignX509(request, timeout=30))
    assert code is grpc.StatusCode.PERMISSION_DENIED
    assert message.startswith(f"the CSR names {BACKEND}, but the caller may only be issued {FRONTEND}")
    assert [e.subject for e in api.issued()] == [AGENT_A]


def test_an_agent_renews_its_own_identity_over_mutual_tls(api: Api) -> None:
    agent, old = _agent(api, "host-a")
    key = new_key()
    response = agent.SignX509(signing_pb2.SignX509Request(spiffe_id=AGENT_A, csr=csr(key)), timeout=30)
    renewed = _svid(response, key)
    assert renewed.spiffe_id == old.spiffe_id
    assert renewed.serial != old.serial
    # and the renewed SVID is a credential of its own
    again = api.connect(api.server.target, svid=renewed)
    assert (
        again.SignX509(signing_pb2.SignX509Request(spiffe_id=AGENT_A, csr=csr(new_key())), timeout=30).spiffe_id
        == AGENT_A
    )


def test_a_workload_renews_itself_while_it_is_in_the_registry(api: Api) -> None:
    agent, _ = _agent(api, "host-a")
    key = new_key()
    frontend = _svid(agent.SignX509(signing_pb2.SignX509Request(spiffe_id=FRONTEND, csr=csr(key)), timeout=30), key)
    workload = api.connect(api.server.target, svid=frontend)
    assert (
        workload.SignX509(signing_pb2.SignX509Request(spiffe_id=FRONTEND, csr=csr(new_key())), timeout=30).spiffe_id
        == FRONTEND
    )
    code, message = _code(
        lambda: workload.SignX509(signing_pb2.SignX509Request(spiffe_id=BACKEND, csr=csr(new_key())), timeout=30)
    )
    assert (code, message) == (
        grpc.StatusCode.PERMISSION_DENIED,
        f"{FRONTEND} may obtain only its own identity, not {BACKEND}",
    )

    moved = json.loads(json.dumps(MESH))
    del moved["services"]["frontend"]
    api.registry.replace(parse_mesh(moved, TD))
    code, message = _code(
        lambda: workload.SignX509(signing_pb2.SignX509Request(spiffe_id=FRONTEND, csr=csr(new_key())), timeout=30)
    )
    assert (code, message) == (grpc.StatusCode.PERMISSION_DENIED, f"{FRONTEND} is no longer a workload of the registry")


def test_a_workload_that_moves_to_another_host_is_refused_to_the_old_hosts_agent(api: Api) -> None:
    agent, _ = _agent(api, "host-a")
    moved = json.loads(json.dumps(MESH))
    moved["services"]["frontend"]["instances"][0]["host"] = "host-b"
    api.registry.replace(parse_mesh(moved, TD))
    code, message = _code(
        lambda: agent.SignX509(signing_pb2.SignX509Request(spiffe_id=FRONTEND, csr=csr(new_key())), timeout=30)
    )
    assert code is grpc.StatusCode.PERMISSION_DENIED
    assert "places no instance of" in message


def test_a_malformed_spiffe_id_is_invalid_argument(api: Api) -> None:
    agent, _ = _agent(api, "host-a")
    for bad in ("spiffe://example.org/ns/../sa/x", "not a spiffe id", "spiffe://example.org/" + "a" * 3000):
        code, message = _code(
            lambda b=bad: agent.SignX509(signing_pb2.SignX509Request(spiffe_id=b, csr=csr(new_key())), timeout=30)
        )  # type: ignore[misc]
        assert code is grpc.StatusCode.INVALID_ARGUMENT, bad
        assert message.startswith("spiffe_id")


# -- the two listeners -----------------------------------------------------------------------------------------


def test_the_signing_listener_refuses_a_client_without_a_certificate_in_the_handshake(api: Api) -> None:
    anonymous = api.connect(api.server.target)
    code, _ = _code(lambda: anonymous.FetchBundle(signing_pb2.BundleRequest(), timeout=30))
    assert code is grpc.StatusCode.UNAVAILABLE  # the TLS handshake failed: no RPC reached the server
    assert api.decisions() == []


def test_the_signing_listener_refuses_a_certificate_of_another_ca(api: Api) -> None:
    from tests.pki import TestCa

    foreign = TestCa.for_trust_domain("example.org", name="foreign").svid("/mesh-identity/agent/host-a")
    stranger = api.connect(api.server.target, svid=foreign)
    code, _ = _code(lambda: stranger.FetchBundle(signing_pb2.BundleRequest(), timeout=30))
    assert code is grpc.StatusCode.UNAVAILABLE
    assert api.issued() == []


@pytest.mark.parametrize("rpc", ["SignX509", "SignJwt", "FetchBundle"])
def test_the_attestation_listener_serves_attest_only(api: Api, rpc: str) -> None:
    attest = api.attest_stub()
    requests = {
        "SignX509": signing_pb2.SignX509Request(spiffe_id=AGENT_A, csr=csr(new_key())),
        "SignJwt": signing_pb2.SignJwtRequest(spiffe_id=AGENT_A, audience=["x"]),
        "FetchBundle": signing_pb2.BundleRequest(),
    }
    code, message = _code(lambda: getattr(attest, rpc)(requests[rpc], timeout=30))
    assert code is grpc.StatusCode.UNAUTHENTICATED
    assert message.startswith(f"{rpc} needs the caller's SVID over mutual TLS on the signing listener")
    assert api.issued() == []
    assert [(d.rpc, d.granted, d.code, d.caller) for d in api.decisions()] == [
        (rpc, False, "UNAUTHENTICATED", "anonymous")
    ]


def test_attest_on_the_signing_listener_is_refused(api: Api) -> None:
    agent, _ = _agent(api)
    token = api.tokens.create("host-b", timedelta(minutes=15))
    code, message = _code(lambda: attest_join(agent, token, csr(new_key())))
    assert code is grpc.StatusCode.FAILED_PRECONDITION
    assert message.startswith("Attest is served on the attestation listener only")
    assert api.tokens.list()[-1].used is None


def test_both_listeners_present_a_rotated_server_certificate_without_a_restart(api: Api) -> None:
    _, agent_svid = _agent(api)
    before = presented_certificate(api.server.attest_target, api.server_ca.pem())
    assert (
        before.serial_number == presented_certificate(api.server.target, api.server_ca.pem(), agent_svid).serial_number
    )
    renewed = api.server_ca.server_svid()
    api.server.tls.update(renewed.cert_chain_pem(), renewed.key_pem())
    api.server.attest_tls.update_svid(renewed)
    for cert in (
        presented_certificate(api.server.attest_target, api.server_ca.pem()),
        presented_certificate(api.server.target, api.server_ca.pem(), agent_svid),
    ):
        assert cert.serial_number == renewed.leaf.serial_number
        assert str(spiffe_id_of(cert)) == "spiffe://example.org/mesh-identity/xds"
    agent = api.connect(api.server.target, svid=agent_svid)  # a new connection: the new certificate
    assert agent.FetchBundle(signing_pb2.BundleRequest(), timeout=30).trust_domain == "spiffe://example.org"


# -- JWT-SVIDs and the bundle ------------------------------------------------------------------------------------


def test_an_agent_obtains_jwt_svids_for_its_hosts_workloads(api: Api) -> None:
    agent, _ = _agent(api, "host-a")
    response = agent.SignJwt(signing_pb2.SignJwtRequest(spiffe_id=FRONTEND, audience=["orders"]), timeout=30)
    bundle = agent.FetchBundle(signing_pb2.BundleRequest(), timeout=30)
    jwt_bundle = JwtBundle.from_jwks(TD, bundle.jwks)
    svid = validate_jwt_svid(response.token, "orders", {TD: jwt_bundle}, datetime.now(UTC))
    assert str(svid.spiffe_id) == FRONTEND == response.spiffe_id
    assert response.expires_at == int(svid.expiry.timestamp())
    assert timedelta(minutes=4) < svid.expiry - svid.issued_at <= timedelta(minutes=5)

    code, message = _code(
        lambda: agent.SignJwt(signing_pb2.SignJwtRequest(spiffe_id=BACKEND, audience=["orders"]), timeout=30)
    )
    assert code is grpc.StatusCode.PERMISSION_DENIED
    assert "places no instance of" in message
    for request, text in (
        (signing_pb2.SignJwtRequest(spiffe_id=FRONTEND), "audience: at least one is needed"),
        (signing_pb2.SignJwtRequest(spiffe_id=FRONTEND, audience=["a"], ttl_seconds=7200), "longer than jwt.max_ttl"),
        (signing_pb2.SignJwtRequest(spiffe_id=FRONTEND, audience=["a\nb"]), "is not 1 to 256 printable characters"),
    ):
        code, message = _code(lambda r=request: agent.SignJwt(r, timeout=30))  # type: ignore[misc]
        assert code is grpc.StatusCode.INVALID_ARGUMENT
        assert text in message


def test_the_bundle_holds_the_roots_and_the_jwt_keys(api: Api) -> None:
    agent, _ = _agent(api)
    bundle = agent.FetchBundle(signing_pb2.BundleRequest(), timeout=30)
    roots = api.authority.bundle().authorities
    assert [x509.load_der_x509_certificate(r) for r in bundle.x509_authorities] == list(roots)
    document = json.loads(bundle.jwks)
    uses = sorted(k["use"] for k in document["keys"])
    assert uses.count("x509-svid") == len(roots)
    assert "jwt-svid" in uses
    assert document["spiffe_sequence"] == bundle.sequence > 0
    assert bundle.refresh_hint_seconds == document["spiffe_refresh_hint"] == 300
    assert agent.FetchBundle(signing_pb2.BundleRequest(), timeout=30).sequence == bundle.sequence  # unchanged


# -- audit and metrics -----------------------------------------------------------------------------------------


def test_every_grant_and_refusal_is_audited_without_any_secret(api: Api) -> None:
    token = api.tokens.create("host-a", timedelta(minutes=15))
    request = csr(new_key())
    attest_join(api.attest_stub(), token, request)
    _code(lambda: attest_join(api.attest_stub(), token, request))
    kube_token = api.kube.token_reviews.issue("shop", "frontend")
    api.attest_stub().Attest(signing_pb2.AttestRequest(kubernetes_token=kube_token, csr=csr(new_key())), timeout=30)

    lines = api.audit_lines()
    shown = [(line["rpc"], line["credential"], line["granted"], line["code"], line["spiffe_id"]) for line in lines]
    assert shown == [
        ("Attest", "join-token", True, "OK", AGENT_A),
        ("Attest", "join-token", False, "UNAUTHENTICATED", ""),
        ("Attest", "kubernetes-token", True, "OK", FRONTEND),
    ]
    assert lines[0]["caller"] == "node host-a"
    assert lines[0]["serial"] == api.issued()[0].serial
    assert lines[1]["caller"].startswith("join token ") and len(lines[1]["caller"]) == len("join token ") + 12
    assert lines[2]["caller"] == "serviceaccount shop/frontend"
    assert all(line["peer"].startswith("ipv4:127.0.0.1:") for line in lines)
    text = api.audit_path.read_text()
    for secret in (token, token[5:], kube_token, base64.b64encode(request).decode()[:40], request.hex()[:40]):
        assert secret not in text


def test_requests_are_counted_by_rpc_and_code_and_timed(api: Api) -> None:
    token = api.tokens.create("host-a", timedelta(minutes=15))
    attest_join(api.attest_stub(), token, csr(new_key()))
    _code(lambda: attest_join(api.attest_stub(), token, csr(new_key())))
    _code(lambda: api.attest_stub().FetchBundle(signing_pb2.BundleRequest(), timeout=30))
    value = api.metrics.value
    assert value("mesh_identity_signing_requests_total", rpc="Attest", code="OK") == 1
    assert value("mesh_identity_signing_requests_total", rpc="Attest", code="UNAUTHENTICATED") == 1
    assert value("mesh_identity_signing_requests_total", rpc="FetchBundle", code="UNAUTHENTICATED") == 1
    assert value("mesh_identity_signing_request_seconds_count", rpc="Attest") == 2
    assert value("mesh_identity_signing_in_flight") == 0


def test_the_chain_is_pem_compatible_with_openssl_and_its_leaf_is_an_svid(api: Api, tmp_path: Path) -> None:
    key = new_key()
    response = attest_join(api.attest_stub(), api.tokens.create("host-a", timedelta(minutes=15)), csr(key))
    leaf = x509.load_der_x509_certificate(response.cert_chain[0])
    constraints = leaf.extensions.get_extension_for_class(x509.BasicConstraints).value
    assert not constraints.ca
    (tmp_path / "leaf.pem").write_bytes(leaf.public_bytes(serialization.Encoding.PEM))
    assert leaf.not_valid_after_utc - leaf.not_valid_before_utc <= timedelta(hours=1, minutes=1)


def test_a_connection_made_under_old_roots_is_refused_once_they_change(api: Api) -> None:
    from tests.pki import TestCa

    agent, _ = _agent(api)
    assert agent.FetchBundle(signing_pb2.BundleRequest(), timeout=30).trust_domain == "spiffe://example.org"
    api.server.tls.update_roots(TestCa.for_trust_domain("example.org", name="the next root").pem())
    code, message = _code(lambda: agent.FetchBundle(signing_pb2.BundleRequest(), timeout=30))  # same connection
    assert code is grpc.StatusCode.UNAUTHENTICATED
    assert message == "the peer certificate does not chain to any root of the current trust bundle"
    assert [(d.rpc, d.code) for d in api.decisions()][-1] == ("FetchBundle", "UNAUTHENTICATED")


def test_signing_on_worker_threads_as_in_per_workload_mode_answers_the_same(make_api: Callable[..., Api]) -> None:
    api = make_api(local_signing=False)
    assert api.server.blocking_issue
    agent, _ = _agent(api, "host-a")
    assert (
        agent.SignX509(signing_pb2.SignX509Request(spiffe_id=FRONTEND, csr=csr(new_key())), timeout=30).spiffe_id
        == FRONTEND
    )
    code, _ = _code(
        lambda: agent.SignX509(signing_pb2.SignX509Request(spiffe_id=BACKEND, csr=csr(new_key())), timeout=30)
    )
    assert code is grpc.StatusCode.PERMISSION_DENIED
    assert [e.subject for e in api.issued()] == [AGENT_A, FRONTEND]
