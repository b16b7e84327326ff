"""SDS on the agent's ``sds`` socket, as Envoy speaks it: secrets by name, ACK and NACK, and only what the
caller's attested selectors grant."""

from __future__ import annotations

import queue
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from envoy.config.core.v3 import base_pb2
from envoy.extensions.transport_sockets.tls.v3 import secret_pb2
from envoy.service.discovery.v3 import discovery_pb2
from envoy.service.secret.v3 import sds_pb2_grpc
from google.rpc import status_pb2

from mesh_identity.svid import spiffe_id_of
from tests.agent.harness import ADMIN, BACKEND, FRONTEND, TD, AgentRun, ControlPlane, as_uid
from tests.waiting import wait_until

SECRET = "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.Secret"
BUNDLE = f"spiffe://{TD}"
SDS_CLIENT = Path(__file__).with_name("sds_client.py")


class Stream:
    """One StreamSecrets stream: requests in, responses out (each wait bounded)."""

    def __init__(self, socket_path: Path) -> None:
        self.channel = grpc.insecure_channel(f"unix:{socket_path}")
        self.requests: queue.SimpleQueue[discovery_pb2.DiscoveryRequest | None] = queue.SimpleQueue()
        self.responses = iter(
            sds_pb2_grpc.SecretDiscoveryServiceStub(self.channel).StreamSecrets(self._feed(), timeout=60)
        )

    def _feed(self) -> Iterator[discovery_pb2.DiscoveryRequest]:
        while (item := self.requests.get(timeout=60)) is not None:
            yield item

    def send(self, names: list[str], *, nonce: str = "", version: str = "", error: str | None = None) -> None:
        request = discovery_pb2.DiscoveryRequest(
            node=base_pb2.Node(id="envoy-1"), type_url=SECRET, resource_names=names, response_nonce=nonce,
            version_info=version,
        )  # fmt: skip
        if error is not None:
            request.error_detail.CopyFrom(status_pb2.Status(code=3, message=error))
        self.requests.put(request)

    def receive(self) -> discovery_pb2.DiscoveryResponse:
        response: discovery_pb2.DiscoveryResponse = next(self.responses)
        return response

    def close(self) -> None:
        self.requests.put(None)
        self.channel.close()


def secrets_of(response: discovery_pb2.DiscoveryResponse) -> dict[str, secret_pb2.Secret]:
    found = (secret_pb2.Secret.FromString(r.value) for r in response.resources)
    return {s.name: s for s in found}


def test_an_envoy_gets_its_certificate_and_the_bundle(agent: AgentRun, control_plane: ControlPlane) -> None:
    stream = Stream(agent.sds_socket)
    try:
        stream.send([ADMIN, BUNDLE])
        response = stream.receive()
        secrets = secrets_of(response)
        assert sorted(secrets) == sorted([ADMIN, BUNDLE])
        tls = secrets[ADMIN].tls_certificate
        chain = x509.load_pem_x509_certificates(tls.certificate_chain.inline_bytes)
        key = serialization.load_pem_private_key(tls.private_key.inline_bytes, None)
        assert str(spiffe_id_of(chain[0])) == ADMIN
        assert key.public_key().public_numbers() == chain[0].public_key().public_numbers()  # type: ignore[union-attr]
        assert secrets[BUNDLE].validation_context.trusted_ca.inline_bytes == control_plane.bundle_pem()
        acks = agent.sample("mesh_identity_xds_acks_total", type="Secret") or 0
        stream.send([ADMIN, BUNDLE], nonce=response.nonce, version=response.version_info)  # ACK
        wait_until(lambda: (agent.sample("mesh_identity_xds_acks_total", type="Secret") or 0) > acks, "the ACK")
        nacks = agent.sample("mesh_identity_xds_nacks_total", type="Secret") or 0
        stream.send([ADMIN], nonce=response.nonce, error="refused for the test")  # a stale nonce now: ignored
        stream.send([ADMIN])  # a new subscription: answered again
        again = stream.receive()
        assert sorted(secrets_of(again)) == [ADMIN]
        stream.send([ADMIN], nonce=again.nonce, error="refused for the test")  # NACK
        wait_until(lambda: (agent.sample("mesh_identity_xds_nacks_total", type="Secret") or 0) > nacks, "the NACK")
    finally:
        stream.close()


def test_a_secret_the_caller_does_not_hold_ends_the_stream_permission_denied(agent: AgentRun) -> None:
    stream = Stream(agent.sds_socket)
    try:
        stream.send([FRONTEND])  # root holds admin and backend, not frontend
        with pytest.raises(grpc.RpcError) as caught:
            stream.receive()
        assert caught.value.code() is grpc.StatusCode.PERMISSION_DENIED
        assert FRONTEND in (caught.value.details() or "")
    finally:
        stream.close()


def sds_as(agent: AgentRun, uid: int, *names: str) -> dict[str, object]:
    import json

    done = subprocess.run(
        [*as_uid(uid), sys.executable, "-c", SDS_CLIENT.read_text(), str(agent.sds_socket), *names],
        capture_output=True, text=True, timeout=60, check=False, cwd="/",
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    result: dict[str, object] = json.loads(done.stdout.splitlines()[-1])
    return result


def test_each_uid_gets_only_the_secrets_of_its_identities(agent: AgentRun) -> None:
    assert sds_as(agent, 1001, FRONTEND, BUNDLE)["names"] == sorted([FRONTEND, BUNDLE])
    assert sds_as(agent, 1002, BACKEND)["names"] == [BACKEND]
    refused = sds_as(agent, 1001, BACKEND)
    assert refused["code"] == "PERMISSION_DENIED" and BACKEND in str(refused["details"])
    nobody = sds_as(agent, 1003, BUNDLE)
    assert nobody["code"] == "PERMISSION_DENIED" and "no registration entry matches" in str(nobody["details"])


def test_fetch_and_delta_secrets(agent: AgentRun) -> None:
    with grpc.insecure_channel(f"unix:{agent.sds_socket}") as channel:
        stub = sds_pb2_grpc.SecretDiscoveryServiceStub(channel)
        fetched = stub.FetchSecrets(
            discovery_pb2.DiscoveryRequest(node=base_pb2.Node(id="envoy-2"), type_url=SECRET, resource_names=[BACKEND]),
            timeout=20,
        )
        assert sorted(secrets_of(fetched)) == [BACKEND]
        with pytest.raises(grpc.RpcError) as caught:
            stub.FetchSecrets(
                discovery_pb2.DiscoveryRequest(node=base_pb2.Node(id="envoy-2"), resource_names=[FRONTEND]), timeout=20
            )
        assert caught.value.code() is grpc.StatusCode.PERMISSION_DENIED
        delta = stub.DeltaSecrets(
            iter([discovery_pb2.DeltaDiscoveryRequest(node=base_pb2.Node(id="envoy-3"), type_url=SECRET,
                                                       resource_names_subscribe=[ADMIN, BUNDLE])]),
            timeout=20,
        )  # fmt: skip
        first = next(iter(delta))
        assert sorted(r.name for r in first.resources) == sorted([ADMIN, BUNDLE])
        delta.cancel()
