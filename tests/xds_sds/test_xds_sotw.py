"""State-of-the-world ADS over real gRPC and mTLS: versions, nonces, ACK/NACK, subscriptions, edge cases."""

from __future__ import annotations

import logging

import grpc
import pytest
from envoy.config.cluster.v3 import cluster_pb2
from envoy.extensions.transport_sockets.tls.v3 import secret_pb2

from mesh_identity.svid import X509Svid
from tests.pki import TestCa
from tests.waiting import wait_until
from tests.xds_sds.client import Client, ack, names_of, sotw
from tests.xds_sds.conftest import cluster
from tests.xds_sds.waiting import ack_events
from xds_sds.protocol.acks import AckTracker
from xds_sds.protocol.auth import bundle_secret_name, tls_secret_name
from xds_sds.protocol.cache import SnapshotCache
from xds_sds.protocol.server import DiscoveryServer
from xds_sds.protocol.typeurls import CLUSTER, PREFIX, SECRET
from xds_sds.resources.secrets import bundle_roots_pem, tls_certificate_secret, validation_context_secret

UNKNOWN = PREFIX + "envoy.config.foo.v3.Bar"


def responses(server: DiscoveryServer, type_name: str) -> float:
    return server.metrics.value("mesh_identity_xds_responses_total", type=type_name)


def unpack_cluster(response: object, index: int) -> cluster_pb2.Cluster:
    message = cluster_pb2.Cluster()
    response.resources[index].Unpack(message)  # type: ignore[attr-defined]
    return message


def test_wildcard_cds_sends_every_cluster_and_records_the_ack(
    client_a: Client, cache: SnapshotCache, acks: AckTracker
) -> None:
    stream = client_a.ads()
    response = stream.exchange(sotw(CLUSTER))
    assert response.type_url == CLUSTER
    assert names_of(response) == ["c1", "c2"]
    assert response.version_info == cache.get("node-a", CLUSTER).version
    assert response.nonce
    with ack_events(acks) as events:
        stream.send(ack(response))
        event = events.next()
    assert (event.node_id, event.type_url, event.names, event.nack) == ("node-a", CLUSTER, {"c1", "c2"}, None)
    assert acks.acked_versions("node-a", CLUSTER) == {
        name: r.version for name, r in cache.get("node-a", CLUSTER).resources.items()
    }


def test_a_change_pushes_only_its_type_to_the_affected_node(
    client_a: Client, client_b: Client, server: DiscoveryServer, cache: SnapshotCache, svid_a: X509Svid
) -> None:
    a, b = client_a.ads(), client_b.ads()
    a_names = [tls_secret_name(svid_a.spiffe_id)]
    a.send(ack(a.exchange(sotw(CLUSTER))))
    a.send(ack(a.exchange(sotw(SECRET, a_names)), a_names))
    b.send(ack(b.exchange(sotw(CLUSTER, node="node-b")), node="node-b"))

    secrets_before = cache.get("node-a", SECRET).version
    cache.update_resources("node-a", CLUSTER, {"c1": cluster("c1", 5)})
    pushed = a.recv()
    assert pushed.type_url == CLUSTER
    assert pushed.version_info == cache.get("node-a", CLUSTER).version
    assert unpack_cluster(pushed, 0).connect_timeout.seconds == 5
    assert cache.get("node-a", SECRET).version == secrets_before

    # node-b's stream hears of node-b's change and of nothing else
    cache.update_resources("node-b", CLUSTER, {"c3": cluster("c3")})
    assert names_of(b.recv()) == ["c1", "c2", "c3"]

    # node-a's secret stream was not pushed by the cluster change: its next message is the secret change
    a.send(ack(pushed))
    rotated = TestCa.for_trust_domain("example.org").svid("/ns/default/sa/a")
    cache.update_resources("node-a", SECRET, {a_names[0]: tls_certificate_secret(rotated)})
    secret_push = a.recv()
    assert secret_push.type_url == SECRET
    assert secret_push.version_info == cache.get("node-a", SECRET).version
    assert responses(server, "Secret") == 2
    assert responses(server, "Cluster") == 4  # a: initial + change, b: initial + change


def test_nack_keeps_the_last_good_config_is_logged_counted_and_not_resent(
    client_a: Client,
    server: DiscoveryServer,
    cache: SnapshotCache,
    acks: AckTracker,
    caplog: pytest.LogCaptureFixture,
) -> None:
    stream = client_a.ads()
    good = stream.exchange(sotw(CLUSTER))
    good_c1 = cache.get("node-a", CLUSTER).resources["c1"].version
    stream.send(ack(good))

    cache.update_resources("node-a", CLUSTER, {"c1": cluster("c1", 7)})
    bad = stream.recv()
    caplog.set_level(logging.WARNING, logger="xds_sds")
    with ack_events(acks) as events:
        stream.send(sotw(CLUSTER, version=good.version_info, nonce=bad.nonce, error="c1: bad timeout"))
        event = events.next()
    assert event.nack is not None
    assert (event.nack.error, event.nack.nonce) == ("c1: bad timeout", bad.nonce)
    assert acks.last_nack("node-a", CLUSTER) == event.nack
    acked = acks.acked("node-a", CLUSTER, "c1")
    assert acked is not None
    assert acked.version == good_c1
    assert server.metrics.value("mesh_identity_xds_nacks_total", type="Cluster") == 1
    assert (
        f"NACK from node node-a (spiffe://example.org/ns/default/sa/a) for Cluster nonce {bad.nonce}: c1: bad timeout"
    ) in caplog.messages

    # the rejected version is not sent again; the next change is
    cache.update_resources("node-a", CLUSTER, {"c2": cluster("c2", 9)})
    fixed = stream.recv()
    assert fixed.version_info == cache.get("node-a", CLUSTER).version
    assert fixed.version_info not in (good.version_info, bad.version_info)
    assert [unpack_cluster(fixed, i).connect_timeout.seconds for i in (0, 1)] == [7, 9]
    with ack_events(acks) as events:
        stream.send(ack(fixed))
        assert events.next().nack is None
    assert acks.last_nack("node-a", CLUSTER) is None


def test_a_request_with_a_stale_nonce_is_ignored(
    client_a: Client, server: DiscoveryServer, cache: SnapshotCache, svid_a: X509Svid, ca: TestCa
) -> None:
    mine, bundle = tls_secret_name(svid_a.spiffe_id), bundle_secret_name(ca.trust_domain)
    stream = client_a.ads()
    first = stream.exchange(sotw(SECRET, [mine]))
    stream.send(ack(first, [mine]))
    cache.update_resources("node-a", SECRET, {mine: tls_certificate_secret(ca.svid("/ns/default/sa/a"))})
    second = stream.recv()
    # sent before the client saw `second`: it carries the old nonce and must change nothing
    stream.send(ack(first, [mine, bundle]))
    # the ACK of `second` with the larger subscription is the request that counts: it is answered
    third = stream.exchange(ack(second, [mine, bundle]))
    assert names_of(third) == [bundle, mine]
    assert server.metrics.value("mesh_identity_xds_stale_nonces_total", type="Secret") == 1


def test_subscription_change_is_answered_with_the_new_set(
    client_a: Client, svid_a: X509Svid, ca: TestCa, cache: SnapshotCache
) -> None:
    mine, bundle = tls_secret_name(svid_a.spiffe_id), bundle_secret_name(ca.trust_domain)
    stream = client_a.ads()
    first = stream.exchange(sotw(SECRET, [bundle]))
    assert names_of(first) == [bundle]
    second = stream.exchange(ack(first, [bundle, mine]))
    assert names_of(second) == [bundle, mine]
    assert second.version_info == cache.get("node-a", SECRET).version


def test_unknown_type_url_gets_an_empty_answer_and_the_stream_goes_on(
    client_a: Client, server: DiscoveryServer
) -> None:
    stream = client_a.ads()
    response = stream.exchange(sotw(UNKNOWN, ["x"]))
    assert (response.type_url, response.version_info, list(response.resources)) == (UNKNOWN, "", [])
    stream.send(ack(response, ["x"]))  # the ACK of the empty answer is not answered again
    clusters = stream.exchange(sotw(CLUSTER))
    assert clusters.type_url == CLUSTER
    assert server.metrics.value("mesh_identity_xds_unknown_type_requests_total") == 1


def test_non_wildcard_subscription_to_missing_names_waits_for_them(client_a: Client, cache: SnapshotCache) -> None:
    partner = TestCa.for_trust_domain("partner.example")
    name = bundle_secret_name(partner.trust_domain)
    stream = client_a.ads()
    stream.send(sotw(SECRET, [name]))
    # nothing is sent for a name that does not exist (Envoy's SDS rejects an empty response) ...
    cache.update_resources("node-a", CLUSTER, {"c9": cluster("c9")})
    cache.update_resources("node-a", SECRET, {name: validation_context_secret(partner.bundle)})
    # ... and the first response is the secret once it exists
    response = stream.recv()
    assert response.type_url == SECRET
    assert names_of(response) == [name]


@pytest.mark.parametrize(
    ("requests", "message"),
    [
        ([sotw(CLUSTER, node=None)], "the first request must carry node.id"),
        ([sotw(CLUSTER, node="")], "the first request must carry node.id"),
        ([sotw("")], "type_url is required on an aggregated stream"),
        (
            [sotw("envoy.config.cluster.v3.Cluster")],
            "type_url 'envoy.config.cluster.v3.Cluster' is not of the form type.googleapis.com/<message>",
        ),
        ([sotw(PREFIX)], "type_url 'type.googleapis.com/' is not of the form type.googleapis.com/<message>"),
        ([sotw(SECRET, ["ok", ""])], "empty resource name in a Secret request"),
        (
            [sotw(CLUSTER), sotw(SECRET, ["x"], node="node-b")],
            "node.id changed on the stream from 'node-a' to 'node-b'",
        ),
    ],
    ids=["no-node", "empty-node", "no-type", "bare-type", "prefix-only", "empty-name", "node-changed"],
)
def test_malformed_requests_end_the_stream_with_invalid_argument(
    client_a: Client, server: DiscoveryServer, requests: list[object], message: str
) -> None:
    stream = client_a.ads()
    for request in requests:
        stream.send(request)
    assert stream.status() == (grpc.StatusCode.INVALID_ARGUMENT, message)
    assert server.metrics.value("mesh_identity_xds_refused_streams_total", code="INVALID_ARGUMENT") == 1
    # the server goes on serving
    assert names_of(client_a.ads().exchange(sotw(CLUSTER))) == ["c1", "c2"]


def test_bytes_that_are_no_discovery_request_end_the_stream(client_a: Client) -> None:
    stream = client_a.raw_ads()
    stream.send(b"\xff\xff\xff\xff")
    assert stream.status() == (
        grpc.StatusCode.INVALID_ARGUMENT,
        "malformed request: it is not a valid discovery request message",
    )
    assert names_of(client_a.ads().exchange(sotw(CLUSTER))) == ["c1", "c2"]


def test_client_disconnect_mid_stream_is_cleaned_up_and_others_are_served(
    client_a: Client, client_b: Client, server: DiscoveryServer, cache: SnapshotCache
) -> None:
    a, b = client_a.ads(), client_b.ads()
    a.exchange(sotw(CLUSTER))  # not acknowledged: a response is in flight when the client goes
    b.send(ack(b.exchange(sotw(CLUSTER, node="node-b")), node="node-b"))
    wait_until(lambda: server.connected_nodes() == {"node-a", "node-b"}, "both streams to open", timeout=10)
    a.cancel()
    wait_until(lambda: server.connected_nodes() == {"node-b"}, "node-a's stream to be cleaned up", timeout=10)
    assert cache.watcher_count("node-a") == 0
    assert server.metrics.value("mesh_identity_xds_streams", service="ads") == 1
    cache.update_resources("node-a", CLUSTER, {"c7": cluster("c7")})
    cache.update_resources("node-b", CLUSTER, {"c8": cluster("c8")})
    assert names_of(b.recv()) == ["c1", "c2", "c8"]


def test_client_half_close_ends_the_stream_ok(client_a: Client, server: DiscoveryServer) -> None:
    stream = client_a.ads()
    stream.exchange(sotw(CLUSTER))
    stream.close()
    assert stream.status() == (grpc.StatusCode.OK, "")
    wait_until(lambda: not server.streams(), "the stream to be forgotten", timeout=10)


def test_each_type_waits_for_the_ack_of_its_previous_response(client_a: Client, cache: SnapshotCache) -> None:
    stream = client_a.ads()
    first = stream.exchange(sotw(CLUSTER))
    cache.update_resources("node-a", CLUSTER, {"c3": cluster("c3")})
    cache.update_resources("node-a", CLUSTER, {"c4": cluster("c4")})
    # nothing is pushed until `first` is acknowledged; then one response with the latest state
    latest = stream.exchange(ack(first))
    assert names_of(latest) == ["c1", "c2", "c3", "c4"]
    assert latest.version_info == cache.get("node-a", CLUSTER).version


def test_pushes_follow_the_warming_order(
    client_a: Client, cache: SnapshotCache, acks: AckTracker, svid_a: X509Svid
) -> None:
    mine = tls_secret_name(svid_a.spiffe_id)
    stream = client_a.ads()
    secrets = stream.exchange(sotw(SECRET, [mine]))
    clusters = stream.exchange(sotw(CLUSTER))
    with ack_events(acks) as events:
        stream.send(ack(secrets, [mine]))
        stream.send(ack(clusters))
        events.next()
        events.next()
    rotated = TestCa.for_trust_domain("example.org").svid("/ns/default/sa/a")
    cache.set_snapshot(
        "node-a",
        {SECRET: {mine: tls_certificate_secret(rotated)}, CLUSTER: {"c1": cluster("c1"), "c5": cluster("c5")}},
    )
    assert [stream.recv().type_url, stream.recv().type_url] == [CLUSTER, SECRET]


def test_bundle_secret_is_served_as_validation_context(client_a: Client, ca: TestCa) -> None:
    bundle = bundle_secret_name(ca.trust_domain)
    response = client_a.ads().exchange(sotw(SECRET, [bundle]))
    assert len(response.resources) == 1
    secret = secret_pb2.Secret()
    response.resources[0].Unpack(secret)
    assert secret == validation_context_secret(ca.bundle)
    assert bundle_roots_pem(secret) == ca.pem()
