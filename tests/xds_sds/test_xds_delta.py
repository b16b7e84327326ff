"""Incremental (delta) ADS over real gRPC and mTLS."""

from __future__ import annotations

import grpc
import pytest

from mesh_identity.svid import X509Svid
from tests.pki import TestCa
from tests.xds_sds.client import Client, delta, names_of
from tests.xds_sds.conftest import cluster
from tests.xds_sds.waiting import ack_events
from xds_sds.protocol.acks import AckTracker
from xds_sds.protocol.auth import bundle_secret_name, tls_secret_name
from xds_sds.protocol.cache import SnapshotCache
from xds_sds.protocol.server import DiscoveryServer
from xds_sds.protocol.typeurls import CLUSTER, PREFIX, SECRET
from xds_sds.resources.secrets import tls_certificate_secret

A = "spiffe://example.org/ns/default/sa/a"


def versions(cache: SnapshotCache, node: str, type_url: str) -> dict[str, str]:
    return {name: r.version for name, r in cache.get(node, type_url).resources.items()}


def test_wildcard_sends_everything_then_only_changes_and_removals(
    client_a: Client, cache: SnapshotCache, acks: AckTracker
) -> None:
    stream = client_a.ads_delta()
    first = stream.exchange(delta(CLUSTER))
    assert names_of(first) == ["c1", "c2"]
    assert {r.name: r.version for r in first.resources} == versions(cache, "node-a", CLUSTER)
    assert first.system_version_info == cache.get("node-a", CLUSTER).version
    assert list(first.removed_resources) == []

    cache.update_resources("node-a", CLUSTER, {"c1": cluster("c1", 4)}, remove=["c2"])
    second = stream.exchange(delta(CLUSTER, nonce=first.nonce))
    assert names_of(second) == ["c1"]
    assert list(second.removed_resources) == ["c2"]
    with ack_events(acks) as events:
        stream.send(delta(CLUSTER, nonce=second.nonce))
        events.next()
    assert acks.acked_versions("node-a", CLUSTER) == versions(cache, "node-a", CLUSTER)
    assert acks.acked("node-a", CLUSTER, "c2") is None


def test_named_subscriptions_add_remove_and_resubscribe(client_a: Client, svid_a: X509Svid, ca: TestCa) -> None:
    mine, bundle = tls_secret_name(svid_a.spiffe_id), bundle_secret_name(ca.trust_domain)
    stream = client_a.ads_delta()
    first = stream.exchange(delta(SECRET, [mine]))
    assert names_of(first) == [mine]
    second = stream.exchange(delta(SECRET, [bundle], nonce=first.nonce))
    assert names_of(second) == [bundle]
    stream.send(delta(SECRET, nonce=second.nonce))
    # unsubscribing and subscribing again sends the resource again
    stream.send(delta(SECRET, unsubscribe=[mine]))
    third = stream.exchange(delta(SECRET, [mine]))
    assert names_of(third) == [mine]
    assert list(third.removed_resources) == []


def test_initial_resource_versions_are_not_sent_again(client_a: Client, cache: SnapshotCache) -> None:
    held = {"c1": versions(cache, "node-a", CLUSTER)["c1"], "c9": "0123456789abcdef"}
    response = client_a.ads_delta().exchange(delta(CLUSTER, initial=held))
    assert names_of(response) == ["c2"]
    assert list(response.removed_resources) == ["c9"]


def test_nack_keeps_what_the_proxy_had_and_the_rejected_version_is_not_resent(
    client_a: Client, server: DiscoveryServer, cache: SnapshotCache, acks: AckTracker
) -> None:
    stream = client_a.ads_delta()
    first = stream.exchange(delta(CLUSTER))
    good = versions(cache, "node-a", CLUSTER)
    with ack_events(acks) as events:
        stream.send(delta(CLUSTER, nonce=first.nonce))
        events.next()
        cache.update_resources("node-a", CLUSTER, {"c1": cluster("c1", 8)})
        bad = stream.recv()
        assert names_of(bad) == ["c1"]
        stream.send(delta(CLUSTER, nonce=bad.nonce, error="c1 is broken"))
        event = events.next()
    assert event.nack is not None
    assert event.nack.error == "c1 is broken"
    assert acks.acked_versions("node-a", CLUSTER) == good
    assert server.metrics.value("mesh_identity_xds_nacks_total", type="Cluster") == 1
    # a change elsewhere is sent; the rejected c1 is not sent again with it
    cache.update_resources("node-a", CLUSTER, {"c2": cluster("c2", 3)})
    third = stream.recv()
    assert names_of(third) == ["c2"]


def test_stale_nonce_ack_is_ignored(
    client_a: Client, server: DiscoveryServer, cache: SnapshotCache, acks: AckTracker
) -> None:
    stream = client_a.ads_delta()
    first = stream.exchange(delta(CLUSTER))
    with ack_events(acks) as events:
        stream.send(delta(CLUSTER, nonce="not-" + first.nonce))  # not the nonce in flight: ignored
        stream.send(delta(CLUSTER, nonce=first.nonce))
        event = events.next()
    assert event.names == {"c1", "c2"}
    assert server.metrics.value("mesh_identity_xds_stale_nonces_total", type="Cluster") == 1
    # an ACK repeated after it was processed is stale too (requests are handled in order: once the
    # secret request behind it is answered, the repeated ACK has been seen)
    stream.send(delta(CLUSTER, nonce=first.nonce))
    assert stream.exchange(delta(SECRET, [A])).type_url == SECRET
    assert server.metrics.value("mesh_identity_xds_stale_nonces_total", type="Cluster") == 2
    cache.update_resources("node-a", CLUSTER, {"c3": cluster("c3")})
    assert names_of(stream.recv()) == ["c3"]


def test_unknown_type_gets_an_empty_answer(client_a: Client, server: DiscoveryServer) -> None:
    stream = client_a.ads_delta()
    unknown = PREFIX + "envoy.config.foo.v3.Bar"
    response = stream.exchange(delta(unknown, ["x"]))
    assert (response.type_url, list(response.resources), list(response.removed_resources)) == (unknown, [], [])
    stream.send(delta(unknown, nonce=response.nonce))
    assert stream.exchange(delta(CLUSTER)).type_url == CLUSTER
    assert server.metrics.value("mesh_identity_xds_unknown_type_requests_total") == 1


def test_rotation_of_one_secret_sends_only_that_secret(
    client_a: Client, svid_a: X509Svid, ca: TestCa, cache: SnapshotCache
) -> None:
    mine, bundle = tls_secret_name(svid_a.spiffe_id), bundle_secret_name(ca.trust_domain)
    stream = client_a.ads_delta()
    first = stream.exchange(delta(SECRET, [mine, bundle]))
    assert names_of(first) == [bundle, mine]
    stream.send(delta(SECRET, nonce=first.nonce))
    cache.update_resources("node-a", SECRET, {mine: tls_certificate_secret(ca.svid("/ns/default/sa/a"))})
    pushed = stream.recv()
    assert [(r.name, r.version) for r in pushed.resources] == [(mine, versions(cache, "node-a", SECRET)[mine])]


@pytest.mark.parametrize(
    ("request_", "message"),
    [
        (delta(CLUSTER, node=None), "the first request must carry node.id"),
        (delta(""), "type_url is required on an aggregated stream"),
        (delta("Cluster"), "type_url 'Cluster' is not of the form type.googleapis.com/<message>"),
        (delta(SECRET, ["a", ""]), "empty resource name in a Secret request"),
        (delta(SECRET, unsubscribe=[""]), "empty resource name in a Secret request"),
        (delta(CLUSTER, initial={"": "1"}), "empty resource name in a Cluster request"),
    ],
    ids=["no-node", "no-type", "bad-type", "empty-subscribe", "empty-unsubscribe", "empty-initial"],
)
def test_malformed_delta_requests_end_the_stream(client_a: Client, request_: object, message: str) -> None:
    stream = client_a.ads_delta()
    stream.send(request_)
    assert stream.status() == (grpc.StatusCode.INVALID_ARGUMENT, message)
