"""Two replicas with one shared CA state: the follower applies what the leader's rotation changed (the bundle
served, its own new intermediate from the new root), a follower refuses root steps naming the leader, the
leader's driver finishes a rotation the operator prepared, and when the leader dies in the middle the other
replica takes over and finishes it, with one new root only; the trust-bundle ConfigMaps follow on the way."""

from __future__ import annotations

from collections.abc import Callable, Iterator

import pytest

from mesh_identity.errors import RotationError
from mesh_identity.registry.kube import Backoff, KubernetesRegistry
from mesh_identity.registry.kube.bundles import DATA_KEY
from mesh_identity.registry.kube.lease import REPLICA_PREFIX
from mesh_identity.rotation.roots import RootStep
from mesh_identity.server.evidence import ANNOTATION, parse_evidence
from mesh_identity.svid import fingerprint_of, load_certs_pem
from tests.ha.conftest import CONTROL, HaCluster
from tests.ha.replicas import TEAM, Proxies, Replica, make_replica  # noqa: F401 (the fixture)
from tests.rotation.helpers import TD
from tests.waiting import wait_until

__all__ = ["make_replica"]


def leader_of(*replicas: Replica) -> Replica:
    return wait_until(lambda: next((r for r in replicas if r.leading), None), "a leader", timeout=30)


@pytest.fixture
def registry(ha_cluster: HaCluster) -> Iterator[KubernetesRegistry]:
    registry = KubernetesRegistry(ha_cluster.settings("admin", timeout=2.0), TD, backoff=Backoff(0.05, 0.5))
    registry.start()
    yield registry
    registry.stop()


def roots_in_configmaps(cluster: HaCluster) -> dict[str, frozenset[str]]:
    found = {}
    for namespace, cm in cluster.config_maps().items():
        pem = cm.get("data", {}).get(DATA_KEY, "").encode()
        found[namespace] = frozenset(fingerprint_of(c) for c in load_certs_pem(pem, namespace))
    return found


def test_the_follower_applies_the_leaders_rotation(
    ha_cluster: HaCluster, make_replica: Callable[..., Replica], registry: KubernetesRegistry
) -> None:
    ha_cluster.namespace("shop")
    first, second = make_replica("a", registry=registry), make_replica("b", registry=registry)
    leader = leader_of(first, second)
    follower = second if leader is first else first
    old = next(iter(leader.served()))
    assert follower.served() == {old} and follower.signing_root() == old
    wait_until(lambda: roots_in_configmaps(ha_cluster) == {"shop": {old}}, "the bundle ConfigMap")

    wait_until(lambda: follower.ha.elector.leader == leader.ha.identity, "the follower seeing the leader")
    with pytest.raises(RotationError, match=f"not the leader \\(the leader is {leader.ha.identity}\\)"):
        follower.service.root_step(RootStep.PREPARE)
    assert leader.service.roots.phase() == "steady"

    message = leader.service.root_step(RootStep.PREPARE)
    assert "the leader takes the next steps" in message
    (new,) = make_replica.bus.prepared  # type: ignore[attr-defined]
    # the driver activates and retires on the evidence of both replicas; the follower applies each phase
    wait_until(lambda: leader.ha.steps_taken == ["activate", "retire"], "the driver's steps", timeout=60)
    wait_until(lambda: follower.served() == {new}, "the follower serving the new root alone")
    assert follower.signing_root() == new and leader.signing_root() == new
    assert follower.leaves_on(new) and leader.leaves_on(new)
    ours, theirs = follower.service.authority.signing_ca, leader.service.authority.signing_ca
    assert ours is not None and theirs is not None and ours.serial != theirs.serial  # each its own intermediate
    assert follower.ha.followed >= 3
    wait_until(lambda: roots_in_configmaps(ha_cluster) == {"shop": {new}}, "the ConfigMap with the new root")
    assert make_replica.bus.prepared == [new]  # type: ignore[attr-defined]


def test_a_replica_publishes_its_evidence_in_its_own_lease(
    ha_cluster: HaCluster, make_replica: Callable[..., Replica]
) -> None:
    replica = make_replica("a", acks=Proxies("sidecar-1"))
    name = REPLICA_PREFIX + "replica-a"
    wait_until(lambda: ha_cluster.leases.of(name), "the replica's Lease")
    lease = ha_cluster.leases.of(name)[-1].obj
    evidence = parse_evidence(lease["metadata"]["annotations"][ANNOTATION])
    assert evidence.replica == "replica-a" and evidence.phase == "steady"
    assert evidence.bundle == replica.served()
    replica.ha.stop()
    assert not [
        lease
        for lease in ha_cluster.server.objects(ha_cluster.kind("Lease"), CONTROL)
        if lease["metadata"]["name"] == name
    ]


def test_a_new_leader_finishes_a_rotation_the_dead_leader_started(
    ha_cluster: HaCluster, make_replica: Callable[..., Replica]
) -> None:
    proxies = {name: Proxies() for name in "ab"}
    first, second = (make_replica(name, acks=proxies[name]) for name in "ab")
    leader = leader_of(first, second)
    follower = second if leader is first else first
    proxies[follower.name].missing = ["sidecar-on-" + follower.name]  # holds the activation up

    leader.service.root_step(RootStep.PREPARE)
    (new,) = make_replica.bus.prepared  # type: ignore[attr-defined]
    wait_until(lambda: new in follower.served(), "the follower serving the new bundle")
    wait_until(
        lambda: "sidecar" in (leader.ha._noted or "") or "proxies" in (leader.ha._noted or ""),
        "the driver waiting for the follower's proxies",
    )
    assert leader.service.roots.phase() == "prepared" and not leader.ha.steps_taken

    leader.ha.kill()  # as kill -9 between prepare and retire: no release, its Leases expire
    leader.service.stop()
    leader_of(follower)
    proxies[follower.name].missing = []  # its proxies acknowledged the new bundle
    wait_until(lambda: follower.ha.steps_taken == ["activate", "retire"], "the new leader finishing", timeout=60)
    assert follower.served() == {new} and follower.signing_root() == new and follower.leaves_on(new)
    assert follower.service.roots.phase() == "steady"
    assert make_replica.bus.prepared == [new]  # one new root only
