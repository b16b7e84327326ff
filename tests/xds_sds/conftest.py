"""Fixtures for the xDS protocol tests: a test PKI, a snapshot cache, and a running server over mTLS.

Two proxies are known to the server: ``node-a`` bound to identity A and ``node-b`` bound to identity B.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import pytest
from envoy.config.cluster.v3 import cluster_pb2
from google.protobuf import duration_pb2

from mesh_identity.events import ListSink
from mesh_identity.svid import X509Svid
from tests.pki import TestCa
from tests.xds_sds.client import Client, connect
from xds_sds.protocol.acks import AckTracker
from xds_sds.protocol.auth import BindingAuthorizer, bundle_secret_name, tls_secret_name
from xds_sds.protocol.cache import SnapshotCache
from xds_sds.protocol.credentials import ServerTls
from xds_sds.protocol.server import DiscoveryServer
from xds_sds.protocol.typeurls import CLUSTER, SECRET
from xds_sds.resources.secrets import tls_certificate_secret, validation_context_secret

A_PATH = "/ns/default/sa/a"
B_PATH = "/ns/default/sa/b"


def cluster(name: str, timeout_s: int = 1) -> cluster_pb2.Cluster:
    return cluster_pb2.Cluster(name=name, connect_timeout=duration_pb2.Duration(seconds=timeout_s))


@pytest.fixture(scope="session")
def ca() -> TestCa:
    return TestCa.for_trust_domain("example.org")


@pytest.fixture(scope="session")
def foreign_ca() -> TestCa:
    """Another root for the same trust domain name: the server must not trust what it signs."""
    return TestCa.for_trust_domain("example.org", name="foreign root")


@pytest.fixture(scope="session")
def svid_a(ca: TestCa) -> X509Svid:
    return ca.svid(A_PATH)


@pytest.fixture(scope="session")
def svid_b(ca: TestCa) -> X509Svid:
    return ca.svid(B_PATH)


@pytest.fixture
def cache(ca: TestCa, svid_a: X509Svid, svid_b: X509Svid) -> SnapshotCache:
    cache = SnapshotCache()
    bundle = validation_context_secret(ca.bundle)
    for node, svid in (("node-a", svid_a), ("node-b", svid_b)):
        cache.set_snapshot(
            node,
            {
                CLUSTER: {"c1": cluster("c1"), "c2": cluster("c2")},
                SECRET: {
                    tls_secret_name(svid.spiffe_id): tls_certificate_secret(svid),
                    bundle_secret_name(ca.trust_domain): bundle,
                },
            },
        )
    return cache


@pytest.fixture
def audit() -> ListSink:
    return ListSink()


@pytest.fixture
def acks() -> AckTracker:
    return AckTracker()


@pytest.fixture
def server(
    ca: TestCa, cache: SnapshotCache, audit: ListSink, acks: AckTracker, svid_a: X509Svid, svid_b: X509Svid
) -> Iterator[DiscoveryServer]:
    authorizer = BindingAuthorizer({"node-a": svid_a.spiffe_id, "node-b": svid_b.spiffe_id})
    server = DiscoveryServer(cache, ServerTls.from_svid(ca.server_svid()), authorizer, acks=acks, audit=audit)
    server.start()
    yield server
    server.stop(None)


@pytest.fixture
def connect_as(server: DiscoveryServer, ca: TestCa) -> Iterator[Callable[[X509Svid | None], Client]]:
    clients: list[Client] = []

    def make(svid: X509Svid | None) -> Client:
        client = connect(server.target, ca.pem(), svid)
        clients.append(client)
        return client

    yield make
    for client in clients:
        client.close()


@pytest.fixture
def client_a(connect_as: Callable[[X509Svid | None], Client], svid_a: X509Svid) -> Client:
    return connect_as(svid_a)


@pytest.fixture
def client_b(connect_as: Callable[[X509Svid | None], Client], svid_b: X509Svid) -> Client:
    return connect_as(svid_b)
