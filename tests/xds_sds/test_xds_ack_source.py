"""MeshPublisher as the root rotation's AckSource, over real gRPC: what connected sidecars acknowledged."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from mesh_identity.mesh.model import Address, Instance, Mesh, Protocol, Service
from mesh_identity.svid import X509Svid, fingerprint_of
from tests.pki import TestCa
from tests.waiting import wait_until
from tests.xds_sds.client import Client, Stream, ack, connect, sotw
from tests.xds_sds.waiting import ack_events
from xds_sds.mesh.publisher import MeshPublisher
from xds_sds.protocol.typeurls import SECRET

OLD = TestCa.for_trust_domain("example.org", "old root")
NEW = TestCa.for_trust_domain("example.org", "new root")
BUNDLE = "spiffe://example.org"


def _service(name: str, port: int) -> Service:
    instance = Instance(f"{name}-1", Address("127.0.0.1", port), Address("127.0.0.1", port + 1000))
    return Service(name, OLD.id(f"/ns/shop/sa/{name}"), Protocol.HTTP, (instance,))


@pytest.fixture
def xds() -> Iterator[MeshPublisher]:
    mesh = Mesh(OLD.trust_domain, {n: _service(n, p) for n, p in (("web", 8080), ("api", 8081), ("db", 8082))})
    server = MeshPublisher(mesh, OLD.server_svid())
    for service in mesh.services.values():
        server.update_identity(OLD.svid(service.identity.path))
    server.start()
    yield server
    server.stop(None)


class Sidecar:
    """A simulated sidecar: subscribes to its certificate and the bundle, ACKs what it gets."""

    def __init__(self, xds: MeshPublisher, node: str, svid: X509Svid) -> None:
        self.xds, self.node, self.names = xds, node, [str(svid.spiffe_id), BUNDLE]
        self.client: Client = connect(xds.server.target, OLD.pem(), svid)
        self.stream: Stream = self.client.ads()
        self.acknowledge(self.stream.exchange(sotw(SECRET, self.names, node=node)))

    def acknowledge(self, response: object) -> None:
        with ack_events(self.xds.acks) as events:
            self.stream.send(ack(response, self.names, node=self.node))  # type: ignore[arg-type]
            while events.next().node_id != self.node:
                pass


def test_which_connected_sidecars_miss_a_root_or_still_chain_to_one(xds: MeshPublisher) -> None:
    web = Sidecar(xds, "web-1", OLD.svid("/ns/shop/sa/web"))
    api = Sidecar(xds, "api-1", OLD.svid("/ns/shop/sa/api"))  # db-1 never connects: it is not asked about
    old, new = fingerprint_of(OLD.certificate), fingerprint_of(NEW.certificate)
    assert xds.proxies_missing_bundle(frozenset({old})) == []
    assert xds.proxies_missing_bundle(frozenset({old, new})) == ["api-1", "web-1"]
    assert xds.proxies_chaining_to(frozenset({old})) == ["api-1", "web-1"]

    # prepare: both roots in the bundle; web acknowledges it first
    xds.update_bundle(OLD.bundle.with_authorities(NEW.bundle.authorities))
    web.acknowledge(web.stream.recv())
    assert xds.proxies_missing_bundle(frozenset({old, new})) == ["api-1"]
    api.acknowledge(api.stream.recv())
    assert xds.proxies_missing_bundle(frozenset({old, new})) == []

    # activate: web's certificate now comes from the new root
    xds.update_identity(NEW.svid("/ns/shop/sa/web"))
    web.acknowledge(web.stream.recv())
    assert xds.proxies_chaining_to(frozenset({old})) == ["api-1"]
    assert xds.proxies_chaining_to(frozenset({new})) == ["web-1"]

    # a sidecar that goes away is no longer counted
    api.stream.cancel()
    api.client.close()
    wait_until(lambda: xds.connected_nodes() == {"web-1"}, "api-1 to disconnect", timeout=10)
    assert xds.proxies_chaining_to(frozenset({old})) == []
    web.client.close()
