"""The trust-bundle ConfigMaps against the API test server: one in each monitored namespace (learnt from the
registry's Namespace watch), its content following the bundle, deleted when a namespace leaves the mesh, a
ConfigMap of that name that is not ours left alone, and every write fenced (a stale one gets 409, dropped)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from mesh_identity.registry.kube import Backoff, KubernetesRegistry
from mesh_identity.registry.kube.bundles import DATA_KEY, NAME, BundleConfigMaps
from mesh_identity.spiffe import TrustDomain
from tests.ha.conftest import MESH, HaCluster
from tests.pki import TestCa
from tests.waiting import wait_until

TD = TrustDomain("cluster.mesh")
ROOT_1 = TestCa.create("root 1").pem().decode()
ROOT_2 = TestCa.create("root 2").pem().decode()


@pytest.fixture
def registry(ha_cluster: HaCluster) -> Iterator[KubernetesRegistry]:
    registry = KubernetesRegistry(
        ha_cluster.settings("admin", timeout=2.0), TD, backoff=Backoff(0.05, 0.5), sync_timeout=10
    )
    registry.start()
    yield registry
    registry.stop()


def contents(cluster: HaCluster) -> dict[str, str]:
    return {ns: cm.get("data", {}).get(DATA_KEY, "") for ns, cm in cluster.config_maps().items()}


def test_the_configmaps_follow_the_bundle_and_the_monitored_namespaces(
    ha_cluster: HaCluster, registry: KubernetesRegistry
) -> None:
    for name in ("shop", "bank"):
        ha_cluster.namespace(name)
    ha_cluster.namespace("elsewhere", mesh=None)
    ha_cluster.namespace("other-mesh", mesh="other")
    writer = BundleConfigMaps(ha_cluster.client("a"), MESH, retry_period=0.1)
    unsubscribe = registry.subscribe_namespaces(writer.set_namespaces)
    names = wait_until(registry.namespaces, "the monitored namespaces")
    writer.set_namespaces(names)
    writer.set_bundle(ROOT_1)
    writer.start()
    try:
        wait_until(lambda: contents(ha_cluster) == {"shop": ROOT_1, "bank": ROOT_1}, "a ConfigMap in each")
        made = ha_cluster.config_maps()["shop"]
        assert made["metadata"]["labels"] == {
            "app.kubernetes.io/managed-by": "mesh-identity",
            "mesh-identity.io/mesh": MESH,
        }
        writer.set_bundle(ROOT_1 + ROOT_2)  # prepare: the new root joins
        wait_until(lambda: set(contents(ha_cluster).values()) == {ROOT_1 + ROOT_2}, "both roots in each")
        ha_cluster.namespace("cafe")  # a namespace joins
        wait_until(lambda: contents(ha_cluster).get("cafe") == ROOT_1 + ROOT_2, "the new namespace's ConfigMap")
        writer.set_bundle(ROOT_2)  # retire: the old root leaves
        wait_until(lambda: set(contents(ha_cluster).values()) == {ROOT_2}, "the new root alone")
        ha_cluster.unlabel("bank")  # the namespace leaves the mesh
        wait_until(lambda: set(contents(ha_cluster)) == {"shop", "cafe"}, "the left namespace's ConfigMap deleted")
    finally:
        writer.stop()
        unsubscribe()
    assert writer.dropped == 0
    assert not {422, 409} & set(ha_cluster.codes("update", "configmaps") + ha_cluster.codes("create", "configmaps"))


def test_a_configmap_that_is_not_ours_is_left_alone_and_stale_ones_are_collected(ha_cluster: HaCluster) -> None:
    ha_cluster.namespace("shop")
    ha_cluster.namespace("gone", mesh=None)
    foreign = {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": NAME, "namespace": "shop"}}
    ha_cluster.core.create_namespaced_config_map("shop", {**foreign, "data": {DATA_KEY: "mine"}})
    leftover = BundleConfigMaps(ha_cluster.client("b"), MESH, retry_period=0.1)
    leftover.set_namespaces(frozenset({"gone"}))  # an earlier leader's view: "gone" was in the mesh
    leftover.set_bundle(ROOT_1)
    assert leftover.sync()
    assert contents(ha_cluster) == {"shop": "mine", "gone": ROOT_1}
    writer = BundleConfigMaps(ha_cluster.client("a"), MESH, retry_period=0.1)
    writer.set_namespaces(frozenset({"shop"}))
    writer.set_bundle(ROOT_2)
    assert writer.sync()  # lists ours first: "gone" is no longer monitored, so its ConfigMap is collected
    assert contents(ha_cluster) == {"shop": "mine"}


def test_a_deposed_writers_stale_write_gets_409_and_is_dropped(ha_cluster: HaCluster) -> None:
    ha_cluster.namespace("shop")
    leading = {"old": True, "new": False}
    old = BundleConfigMaps(ha_cluster.client("a"), MESH, is_leader=lambda: leading["old"])
    new = BundleConfigMaps(ha_cluster.client("b"), MESH, is_leader=lambda: leading["new"])
    for writer in (old, new):
        writer.set_namespaces(frozenset({"shop"}))
    old.set_bundle(ROOT_1)
    assert old.sync() and contents(ha_cluster) == {"shop": ROOT_1}
    leading["new"] = True  # a new leader writes; the old one has not noticed it lost the Lease yet
    new.set_bundle(ROOT_1 + ROOT_2)
    assert new.sync() and contents(ha_cluster) == {"shop": ROOT_1 + ROOT_2}
    old.set_bundle(ROOT_2)  # its own view, written at the version it last wrote
    assert not old.sync()
    assert old.dropped == 1 and 409 in ha_cluster.codes("update", "configmaps", "a")
    assert contents(ha_cluster) == {"shop": ROOT_1 + ROOT_2}
    leading["old"] = False  # once it knows, it writes nothing
    assert old.sync() and contents(ha_cluster) == {"shop": ROOT_1 + ROOT_2}
    new.set_namespaces(frozenset())
    leading["new"] = False
    assert new.sync() and "shop" in contents(ha_cluster)  # not leading: not even garbage collection
