"""Which connected sidecars lag: they rejected their latest config, or have not acknowledged a change for longer
than the ack timeout (root rotation shows them in ``ca status``). Over real gRPC streams."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime, timedelta

import pytest

from mesh_identity.mesh.model import Address, Instance, Mesh, Protocol, Service
from tests.pki import TestCa
from tests.xds_sds.client import ack, connect, sotw
from tests.xds_sds.waiting import ack_events
from xds_sds.mesh.publisher import MeshPublisher
from xds_sds.protocol.typeurls import SECRET

CA = TestCa.for_trust_domain("example.org", "root")
BUNDLE = "spiffe://example.org"


class Clock:
    def __init__(self) -> None:
        self.now = datetime(2026, 12, 1, tzinfo=UTC)

    def __call__(self) -> datetime:
        return self.now


def _service(name: str, port: int) -> Service:
    instance = Instance(f"{name}-1", Address("127.0.0.1", port), Address("127.0.0.1", port + 1000))
    return Service(name, CA.id(f"/ns/shop/sa/{name}"), Protocol.HTTP, (instance,))


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def xds(clock: Clock) -> Iterator[MeshPublisher]:
    mesh = Mesh(CA.trust_domain, {n: _service(n, p) for n, p in (("web", 8180), ("api", 8181))})
    server = MeshPublisher(mesh, CA.server_svid(), clock=clock)
    for service in mesh.services.values():
        server.update_identity(CA.svid(service.identity.path))
    server.start()
    yield server
    server.stop(None)


def test_a_nack_and_a_missing_ack_show_as_lagging_and_an_ack_clears_them(xds: MeshPublisher, clock: Clock) -> None:
    web_names = [str(CA.id("/ns/shop/sa/web")), BUNDLE]
    api_names = [str(CA.id("/ns/shop/sa/api")), BUNDLE]
    web = connect(xds.server.target, CA.pem(), CA.svid("/ns/shop/sa/web")).ads()
    api = connect(xds.server.target, CA.pem(), CA.svid("/ns/shop/sa/api")).ads()
    first_web = web.exchange(sotw(SECRET, web_names, node="web-1"))
    first_api = api.exchange(sotw(SECRET, api_names, node="api-1"))
    with ack_events(xds.acks) as events:
        api.send(ack(first_api, api_names, node="api-1"))
        web.send(sotw(SECRET, web_names, node="web-1", nonce=first_web.nonce, error="bad\nforged log line"))
        seen = {events.next().node_id, events.next().node_id}
    assert seen == {"api-1", "web-1"}
    assert xds.proxies_lagging(timedelta(minutes=1)) == ["web-1: rejected its Secret config: bad\\nforged log line"]

    # a change api-1 does not acknowledge: lagging only once it is older than the timeout
    xds.update_identity(CA.svid("/ns/shop/sa/api"))
    second_api = api.recv()
    clock.now += timedelta(seconds=30)
    assert [line for line in xds.proxies_lagging(timedelta(minutes=1)) if line.startswith("api-1")] == []
    clock.now += timedelta(minutes=1)
    assert "api-1: has not acknowledged 1 Secret resource changed 1m30s ago" in xds.proxies_lagging(
        timedelta(minutes=1)
    )

    with ack_events(xds.acks) as events:
        api.send(ack(second_api, api_names, node="api-1"))
        web.send(ack(first_web, web_names, node="web-1"))
        seen = {events.next().node_id, events.next().node_id}
    assert xds.proxies_lagging(timedelta(minutes=1)) == []
