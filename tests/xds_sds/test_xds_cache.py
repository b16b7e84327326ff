"""The snapshot cache and the ACK tracker, without a server."""

from __future__ import annotations

from collections.abc import Callable

from envoy.extensions.transport_sockets.tls.v3 import secret_pb2
from google.protobuf import any_pb2

from tests.pki import TestCa
from tests.xds_sds.conftest import cluster
from xds_sds.protocol.acks import AckEvent, AckTracker
from xds_sds.protocol.cache import Resource, SnapshotCache
from xds_sds.protocol.typeurls import CLUSTER, ENDPOINT, SECRET
from xds_sds.resources.secrets import bundle_roots_pem, validation_context_secret


def test_changing_one_resource_changes_the_version_of_its_type_only() -> None:
    cache = SnapshotCache()
    cache.set_snapshot("n", {CLUSTER: {"a": cluster("a"), "b": cluster("b")}, SECRET: {}})
    clusters, secrets = cache.get("n", CLUSTER), cache.get("n", SECRET)
    assert cache.update_resources("n", CLUSTER, {"a": cluster("a", 2)}) is True
    assert cache.get("n", CLUSTER).version != clusters.version
    assert cache.get("n", CLUSTER).resources["b"] == clusters.resources["b"]
    assert cache.get("n", CLUSTER).resources["a"].version != clusters.resources["a"].version
    assert cache.get("n", SECRET) == secrets


def test_the_same_content_is_the_same_version_and_no_change() -> None:
    cache = SnapshotCache()
    told: list[tuple[str, frozenset[str]]] = []
    cache.watch("n", lambda node, types: told.append((node, types)))
    assert cache.set_resources("n", CLUSTER, {"a": cluster("a")}) is True
    version = cache.get("n", CLUSTER).version
    assert cache.set_resources("n", CLUSTER, {"a": cluster("a")}) is False
    assert cache.get("n", CLUSTER).version == version
    assert told == [("n", frozenset({CLUSTER}))]


def test_watchers_hear_of_their_node_only_and_can_stop() -> None:
    cache = SnapshotCache()
    told: list[str] = []
    stop = cache.watch("n1", lambda node, types: told.append(node))
    cache.watch("n2", lambda node, types: told.append(node))
    cache.set_snapshot("n1", {CLUSTER: {"a": cluster("a")}, ENDPOINT: {}})
    cache.set_resources("n2", CLUSTER, {"a": cluster("a")})
    stop()
    cache.set_resources("n1", CLUSTER, {"b": cluster("b")})
    assert told == ["n1", "n2"]
    assert cache.watcher_count("n1") == 0


def test_removing_a_node_tells_its_watchers() -> None:
    cache = SnapshotCache()
    told: list[frozenset[str]] = []
    cache.set_resources("n", CLUSTER, {"a": cluster("a")})
    cache.watch("n", lambda node, types: told.append(types))
    cache.remove_node("n")
    assert told == [frozenset({CLUSTER})]
    assert cache.get("n", CLUSTER).resources == {}
    assert cache.nodes() == frozenset()


def test_versions_do_not_depend_on_insertion_order() -> None:
    one, two = SnapshotCache(), SnapshotCache()
    one.set_resources("n", CLUSTER, {"a": cluster("a"), "b": cluster("b")})
    two.set_resources("n", CLUSTER, {"b": cluster("b"), "a": cluster("a")})
    assert one.get("n", CLUSTER).version == two.get("n", CLUSTER).version != ""


def _holds_root(root_pem: bytes) -> Callable[[any_pb2.Any], bool]:
    def check(body: any_pb2.Any) -> bool:
        secret = secret_pb2.Secret()
        body.Unpack(secret)
        return root_pem in bundle_roots_pem(secret)

    return check


def test_which_proxies_acknowledged_a_bundle_holding_a_root() -> None:
    old, new = TestCa.for_trust_domain("example.org", "old root"), TestCa.for_trust_domain("example.org", "new root")
    name = "spiffe://example.org"
    before = Resource.pack(name, validation_context_secret(old.bundle))
    both = Resource.pack(name, validation_context_secret(old.bundle.with_authorities(new.bundle.authorities)))
    tracker = AckTracker()
    events: list[AckEvent] = []
    tracker.subscribe(events.append)
    tracker.record_ack("p1", SECRET, [before])
    tracker.record_ack("p2", SECRET, [before])
    tracker.record_ack("p2", SECRET, [both])
    tracker.record_nack("p3", SECRET, "7", [both], "cannot load")
    holds_new = _holds_root(new.pem())
    assert tracker.nodes_where(SECRET, name, holds_new) == {"p2"}
    assert tracker.nodes_where(SECRET, name, _holds_root(old.pem())) == {"p1", "p2"}
    assert tracker.nodes_acked(SECRET, name, both.version) == {"p2"}
    assert tracker.nodes_acked(SECRET, name) == {"p1", "p2"}
    assert [(e.node_id, e.nack is not None) for e in events] == [
        ("p1", False),
        ("p2", False),
        ("p2", False),
        ("p3", True),
    ]
    tracker.forget("p2")
    assert tracker.nodes_acked(SECRET, name) == {"p1"}


def test_complete_ack_drops_what_is_not_in_it() -> None:
    tracker = AckTracker()
    a, b = Resource.pack("a", cluster("a")), Resource.pack("b", cluster("b"))
    tracker.record_ack("p", CLUSTER, [a, b], complete=True)
    tracker.record_ack("p", CLUSTER, [b], complete=True)
    assert tracker.acked_versions("p", CLUSTER) == {"b": b.version}
