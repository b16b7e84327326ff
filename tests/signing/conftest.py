"""Fixtures for the signing API: a real Authority (the built-in CA), a registry that places workloads on hosts,
the real JWT authority, the real audit plugin, the Kubernetes API test server for TokenReview, and a running
:class:`~xds_sds.signing.server.SigningServer` on loopback ports.

The server presents a certificate of the test CA with a DNS SAN ``localhost`` beside the control plane's SPIFFE
ID (gRPC's Python client checks a host name; see ``tests/pki.py``); the client certificates it accepts are the
Authority's, as in production. ``test_signing_component.py`` runs the real composition with the control plane's
own SVID.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

import grpc
import pytest

from mesh_identity.authority import Authority
from mesh_identity.config import JwtConfig, KubernetesAuthConfig
from mesh_identity.events import CertificateIssued, ListSink, SigningDecision
from mesh_identity.jointokens import JoinTokens
from mesh_identity.jwtkeys import JwtAuthority
from mesh_identity.mesh.model import parse_mesh
from mesh_identity.registry.base import StaticRegistry
from mesh_identity.server.service import Fanout
from mesh_identity.spiffe import TrustDomain
from plugins.manager import Plugins
from tests.fakes.kube import KubeServer
from tests.pki import TestCa
from tests.signing.client import channel, stub
from xds_sds.proto import signing_pb2_grpc
from xds_sds.protocol.credentials import ServerTls
from xds_sds.signing.metrics import SigningMetrics
from xds_sds.signing.server import SigningServer
from xds_sds.signing.signer import Signer
from xds_sds.signing.tls import AttestTls
from xds_sds.signing.tokenreview import TokenReviewer

TD = TrustDomain("example.org")
MESH: dict[str, Any] = {
    "services": {
        "frontend": {
            "identity": {"namespace": "shop", "service_account": "frontend"},
            "instances": [
                {"node": "frontend-1", "app": "127.0.0.1:8080", "inbound": "127.0.0.1:15080", "host": "host-a"}
            ],
        },
        "backend": {
            "identity": {"namespace": "shop", "service_account": "backend"},
            "instances": [
                {"node": "backend-1", "app": "127.0.0.1:8081", "inbound": "127.0.0.1:15081", "host": "host-b"}
            ],
        },
        "billing": {
            "identity": {"namespace": "shop", "service_account": "billing"},
            "instances": [{"node": "billing-1", "app": "127.0.0.1:8082", "inbound": "127.0.0.1:15082"}],
        },
    }
}
FRONTEND = "spiffe://example.org/ns/shop/sa/frontend"
BACKEND = "spiffe://example.org/ns/shop/sa/backend"
BILLING = "spiffe://example.org/ns/shop/sa/billing"
AGENT_A = "spiffe://example.org/mesh-identity/agent/host-a"


@pytest.fixture(scope="session")
def server_ca() -> TestCa:
    """The CA of the server's own certificate (the client checks the server against it)."""
    return TestCa.for_trust_domain("example.org", name="signing server CA")


@dataclass
class Api:
    """A running signing API and what it is made of."""

    server: SigningServer
    signer: Signer
    authority: Authority
    registry: StaticRegistry
    tokens: JoinTokens
    events: ListSink
    audit_path: Path
    kube: KubeServer
    server_ca: TestCa
    reviewer: TokenReviewer
    channels: list[grpc.Channel]

    @property
    def metrics(self) -> SigningMetrics:
        return self.server.metrics

    def attest_stub(self) -> signing_pb2_grpc.SigningStub:
        return self.connect(self.server.attest_target)

    def connect(self, target: str, **client: Any) -> signing_pb2_grpc.SigningStub:
        ch = channel(target, self.server_ca.pem(), **client)
        self.channels.append(ch)
        return stub(ch)

    def issued(self) -> list[CertificateIssued]:
        return [e for e in self.events.events if isinstance(e, CertificateIssued) and e.kind.value == "workload"]

    def decisions(self) -> list[SigningDecision]:
        return [e for e in self.events.events if isinstance(e, SigningDecision)]

    def audit_lines(self) -> list[dict[str, Any]]:
        if not self.audit_path.exists():
            return []
        lines = [json.loads(line) for line in self.audit_path.read_text().splitlines()]
        return [line for line in lines if line["event"] == "SigningDecision"]


@pytest.fixture
def make_api(
    tmp_path: Path, make_authority: Callable[..., Authority], server_ca: TestCa
) -> Iterator[Callable[..., Api]]:
    started: list[Api] = []

    def make(
        *,
        kube_timeout: timedelta = timedelta(seconds=5),
        with_kubernetes: bool = True,
        max_csr_bytes: int = 8 * 1024,
        workload_ttl: timedelta = timedelta(hours=1),
        **server_options: Any,
    ) -> Api:
        state = tmp_path / f"state-{len(started)}"
        events = ListSink()
        plugins = Plugins.load()
        plugins.configure({"trust_domain": TD.name, "state_dir": state, "plugins": {}})
        sink = Fanout(events, plugins)  # the audit plugin writes every event as a JSON line
        authority = make_authority(sink=events, state_dir=state / "ca", workload_ttl=workload_ttl)
        authority.events = sink
        registry = StaticRegistry(parse_mesh(MESH, TD))
        jwt = JwtAuthority(TD, state, settings=JwtConfig())
        jwt.start()
        kube = KubeServer().start()
        kubeconfig = kube.write_kubeconfig(tmp_path / f"kubeconfig-{len(started)}")
        kubernetes = KubernetesAuthConfig(kubeconfig, timeout=kube_timeout)
        reviewer = TokenReviewer(TD, kubernetes)
        tokens = JoinTokens(state)
        signer = Signer(
            authority,
            registry,
            tokens=tokens,
            reviewer=reviewer if with_kubernetes else None,
            jwt=jwt,
            bundle=authority.bundle,
            ttl=workload_ttl,
            max_csr_bytes=max_csr_bytes,
            events=sink,
        )
        server_svid = server_ca.server_svid()
        tls = ServerTls(server_svid.cert_chain_pem(), server_svid.key_pem(), authority.bundle().pem())
        server = SigningServer(signer, tls, AttestTls.from_svid(server_svid), **server_options)
        server.start()
        api = Api(
            server, signer, authority, registry, tokens, events, state / "audit.jsonl", kube, server_ca, reviewer, []
        )
        started.append(api)
        return api

    yield make
    for api in started:
        for ch in api.channels:
            ch.close()
        api.server.stop(None)
        api.reviewer.close()
        api.kube.stop()


@pytest.fixture
def api(make_api: Callable[..., Api]) -> Api:
    return make_api()
