"""The SPIFFE Workload API of a real agent, fed by a real control plane, called by the real py-spiffe client
(``spiffe_client.py``) as several uids, and by raw gRPC for what a good client never does (no security header)."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import grpc
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization

from mesh_identity.svid import spiffe_id_of
from tests.agent.harness import ADMIN, AGENT_ID, BACKEND, FRONTEND, TD, AgentRun, ControlPlane
from tests.waiting import wait_until
from xds_sds.proto import workload_pb2

HEADER = (("workload.spiffe.io", "true"),)


def raw_x509(socket_path: Path, metadata: tuple[tuple[str, str], ...] = HEADER) -> workload_pb2.X509SVIDResponse:
    """The first message of FetchX509SVID, by plain gRPC with our own messages."""
    with grpc.insecure_channel(f"unix:{socket_path}") as channel:
        call = channel.unary_stream(
            "/SpiffeWorkloadAPI/FetchX509SVID",
            request_serializer=workload_pb2.X509SVIDRequest.SerializeToString,
            response_deserializer=workload_pb2.X509SVIDResponse.FromString,
        )(workload_pb2.X509SVIDRequest(), metadata=metadata, timeout=20)
        first: workload_pb2.X509SVIDResponse = next(iter(call))
        call.cancel()
        return first


def raw_unary(socket_path: Path, method: str, request: object, response: type, metadata=HEADER):  # type: ignore[no-untyped-def]
    with grpc.insecure_channel(f"unix:{socket_path}") as channel:
        call = channel.unary_unary(
            f"/SpiffeWorkloadAPI/{method}",
            request_serializer=lambda m: m.SerializeToString(),
            response_deserializer=response.FromString,
        )
        return call(request, metadata=metadata, timeout=20)


def split_der(data: bytes) -> list[x509.Certificate]:
    """Concatenated DER certificates (each a SEQUENCE with a definite length), one by one."""
    certs = []
    while data:
        assert data[0] == 0x30
        length = data[1]
        head = 2
        if length & 0x80:
            octets = length & 0x7F
            length = int.from_bytes(data[2 : 2 + octets], "big")
            head = 2 + octets
        certs.append(x509.load_der_x509_certificate(data[: head + length]))
        data = data[head + length :]
    return certs


def test_py_spiffe_fetches_the_callers_svids_default_first(agent: AgentRun) -> None:
    code, [svids] = agent.client("x509")
    assert code == 0, svids
    # root's Python: admin by uid (the first entry: the default SVID), backend by uid and executable
    assert [s["spiffe_id"] for s in svids] == [ADMIN, BACKEND]
    assert all(s["chain"] == 2 and s["key"] == "secp256r1" for s in svids)  # leaf + intermediate


def test_two_uids_each_get_only_their_own_svid(agent: AgentRun) -> None:
    for uid, expected in ((1001, FRONTEND), (1002, BACKEND)):
        code, [svids] = agent.client("x509", uid=uid)
        assert code == 0, svids
        assert [s["spiffe_id"] for s in svids] == [expected]
        code, [jwt] = agent.client("jwt", "billing", uid=uid)
        assert code == 0 and jwt["spiffe_id"] == expected, jwt


@pytest.mark.parametrize("command", [["x509"], ["bundles"], ["jwt", "billing"], ["jwt-bundles"]])
def test_a_uid_with_no_entry_gets_permission_denied(agent: AgentRun, command: list[str]) -> None:
    code, [error] = agent.client(*command, uid=1003)
    assert code == 3
    assert "PERMISSION_DENIED" in error["message"] or "PermissionDenied" in error["message"], error


def test_a_call_without_the_security_header_is_invalid_argument(agent: AgentRun) -> None:
    with pytest.raises(grpc.RpcError) as caught:
        raw_x509(agent.workload_socket, metadata=())
    assert caught.value.code() is grpc.StatusCode.INVALID_ARGUMENT
    assert "workload.spiffe.io" in (caught.value.details() or "")
    with pytest.raises(grpc.RpcError) as wrong:
        raw_x509(agent.workload_socket, metadata=(("workload.spiffe.io", "True"),))  # the value is case sensitive
    assert wrong.value.code() is grpc.StatusCode.INVALID_ARGUMENT
    with pytest.raises(grpc.RpcError) as unary:
        raw_unary(
            agent.workload_socket,
            "FetchJWTSVID",
            workload_pb2.JWTSVIDRequest(audience=["a"]),
            workload_pb2.JWTSVIDResponse,
            metadata=(),
        )
    assert unary.value.code() is grpc.StatusCode.INVALID_ARGUMENT


def test_each_message_is_the_complete_set_in_the_specified_encodings(
    agent: AgentRun, control_plane: ControlPlane, tmp_path: Path
) -> None:
    message = raw_x509(agent.workload_socket)
    assert [s.spiffe_id for s in message.svids] == [ADMIN, BACKEND]
    roots = x509.load_pem_x509_certificates(control_plane.bundle_pem())
    for svid in message.svids:
        chain = split_der(svid.x509_svid)
        assert str(spiffe_id_of(chain[0])) == svid.spiffe_id  # the leaf first
        key = serialization.load_der_private_key(svid.x509_svid_key, None)  # PKCS#8 DER, unencrypted
        assert key.public_key().public_numbers() == chain[0].public_key().public_numbers()  # type: ignore[union-attr]
        assert [c.fingerprint(hashes.SHA256()) for c in split_der(svid.bundle)] == [
            r.fingerprint(hashes.SHA256()) for r in roots
        ]
        # an independent check: openssl verifies leaf -> intermediate -> root and sees the one URI SAN
        (tmp_path / "leaf.pem").write_bytes(chain[0].public_bytes(serialization.Encoding.PEM))
        (tmp_path / "mid.pem").write_bytes(b"".join(c.public_bytes(serialization.Encoding.PEM) for c in chain[1:]))
        (tmp_path / "root.pem").write_bytes(control_plane.bundle_pem())
        done = subprocess.run(
            ["openssl", "verify", "-CAfile", tmp_path / "root.pem", "-untrusted", tmp_path / "mid.pem", tmp_path / "leaf.pem"],
            capture_output=True, text=True, check=False,
        )  # fmt: skip
        assert done.returncode == 0 and done.stdout.strip().endswith(": OK"), done.stdout + done.stderr
        text = subprocess.run(
            ["openssl", "x509", "-in", tmp_path / "leaf.pem", "-noout", "-ext", "subjectAltName"],
            capture_output=True, text=True, check=True,
        ).stdout  # fmt: skip
        assert f"URI:{svid.spiffe_id}" in text and "DNS" not in text


def test_py_spiffe_fetches_the_trust_bundle(agent: AgentRun, control_plane: ControlPlane) -> None:
    code, [bundles] = agent.client("bundles")
    assert code == 0, bundles
    roots = x509.load_pem_x509_certificates(control_plane.bundle_pem())
    assert bundles == {TD: sorted(r.fingerprint(hashes.SHA256()).hex() for r in roots)}


def test_py_spiffe_fetches_and_validates_a_jwt_svid(agent: AgentRun) -> None:
    code, [jwt] = agent.client("jwt", "payments")
    assert code == 0, jwt
    assert jwt["spiffe_id"] == ADMIN and jwt["audience"] == ["payments"]
    code, [valid] = agent.client("validate", jwt["token"], "payments")
    assert code == 0 and valid == {"spiffe_id": ADMIN, "audience": ["payments"]}, valid
    # another workload validates the same token for itself (the agent validates for any caller with an entry)
    code, [other] = agent.client("validate", jwt["token"], "payments", uid=1001)
    assert code == 0 and other["spiffe_id"] == ADMIN
    code, [refused] = agent.client("validate", jwt["token"], "ledger")
    assert code == 3 and "INVALID_ARGUMENT" in refused["message"] and "ledger" in refused["message"], refused
    code, [forged] = agent.client("validate", jwt["token"][:-4] + "AAAA", "payments")
    assert code == 3 and "INVALID_ARGUMENT" in forged["message"], forged


def test_a_jwt_svid_for_a_named_identity_the_caller_holds_or_not(agent: AgentRun) -> None:
    code, [jwt] = agent.client("jwt", "payments", BACKEND)
    assert code == 0 and jwt["spiffe_id"] == BACKEND, jwt
    code, [refused] = agent.client("jwt", "payments", FRONTEND)
    assert code == 3 and "PERMISSION_DENIED" in refused["message"], refused


def test_jwt_svids_are_cached_per_identity_and_audience(agent: AgentRun) -> None:
    def fetch(audience: str) -> workload_pb2.JWTSVIDResponse:
        response: workload_pb2.JWTSVIDResponse = raw_unary(
            agent.workload_socket,
            "FetchJWTSVID",
            workload_pb2.JWTSVIDRequest(audience=[audience]),
            workload_pb2.JWTSVIDResponse,
        )
        return response

    first, again, other = fetch("cache-a"), fetch("cache-a"), fetch("cache-b")
    assert [s.spiffe_id for s in first.svids] == [ADMIN, BACKEND]  # one per identity of the caller
    assert [s.svid for s in first.svids] == [s.svid for s in again.svids]
    assert {s.svid for s in first.svids}.isdisjoint(s.svid for s in other.svids)
    with pytest.raises(grpc.RpcError) as caught:
        raw_unary(agent.workload_socket, "FetchJWTSVID", workload_pb2.JWTSVIDRequest(), workload_pb2.JWTSVIDResponse)
    assert caught.value.code() is grpc.StatusCode.INVALID_ARGUMENT


def test_py_spiffe_fetches_the_jwt_bundle_with_jwt_keys_only(agent: AgentRun) -> None:
    code, [bundles] = agent.client("jwt-bundles")
    assert code == 0, bundles
    assert list(bundles) == [TD] and len(bundles[TD]) >= 1
    with grpc.insecure_channel(f"unix:{agent.workload_socket}") as channel:
        call = channel.unary_stream(
            "/SpiffeWorkloadAPI/FetchJWTBundles",
            request_serializer=workload_pb2.JWTBundlesRequest.SerializeToString,
            response_deserializer=workload_pb2.JWTBundlesResponse.FromString,
        )(workload_pb2.JWTBundlesRequest(), metadata=HEADER, timeout=20)
        message: workload_pb2.JWTBundlesResponse = next(iter(call))
        call.cancel()
    document = json.loads(message.bundles[f"spiffe://{TD}"])
    assert document["keys"] and all(k["use"] == "jwt-svid" and k["kid"] for k in document["keys"])


def test_validate_names_the_missing_field(agent: AgentRun) -> None:
    for request, missing in (
        (workload_pb2.ValidateJWTSVIDRequest(svid="a.b.c"), "audience"),
        (workload_pb2.ValidateJWTSVIDRequest(audience="a"), "svid"),
    ):
        with pytest.raises(grpc.RpcError) as caught:
            raw_unary(agent.workload_socket, "ValidateJWTSVID", request, workload_pb2.ValidateJWTSVIDResponse)
        assert caught.value.code() is grpc.StatusCode.INVALID_ARGUMENT
        assert missing in (caught.value.details() or "")


def test_health_and_metrics_of_every_svid(agent: AgentRun) -> None:
    wait_until(lambda: agent.get("/healthz")[0] == 200, "the agent to be healthy")
    for identity, own in ((AGENT_ID, "1"), (ADMIN, "0"), (FRONTEND, "0"), (BACKEND, "0")):
        expiry = agent.sample("mesh_identity_agent_svid_expiry_timestamp_seconds", spiffe_id=identity, own=own)
        renewed = agent.sample("mesh_identity_agent_last_renewal_timestamp_seconds", spiffe_id=identity, own=own)
        assert expiry is not None and renewed is not None and expiry > renewed, identity
    budget = agent.sample("mesh_identity_agent_outage_budget_seconds")
    assert budget is not None and 0 < budget <= 3600
    assert agent.sample("mesh_identity_agent_svids") == 4
    status, text = agent.get("/status")
    assert status == 200 and '"healthy": true' in text and "PRIVATE KEY" not in text
