"""Leader election over a Lease (client-go's semantics) against the API test server, through the real client:
one leader among two and three contenders; a hand-over when the leader stops (release) or dies (expiry); a
deposed leader's stale replace refused with 409; 500, 403 and a silent API during renewals make the leader step
down after the renew deadline, and the recorded writes show no two holders at once."""

from __future__ import annotations

import itertools
import re
import threading
import time
from collections.abc import Callable, Iterator
from datetime import datetime

import pytest

from mesh_identity.registry.kube.client import KubeClient
from mesh_identity.registry.kube.errors import KubeConflictError
from mesh_identity.registry.kube.lease import LeaderElector, LeaseTiming, lease_body, parse_lease
from mesh_identity.registry.kube.resources import LEASES
from tests.ha.conftest import CONTROL, FAST, HaCluster, Write
from tests.registry.kube.stall import StallingRelay
from tests.waiting import wait_until

NAME = "mesh-identity-leader"


class Contender:
    """An elector and the periods it led: from its start callback to its step-down, cut at the renew deadline
    after its last renewal (when :attr:`LeaderElector.is_leader` turns False even if the thread is still
    waiting for the API)."""

    def __init__(self, client: KubeClient, identity: str, timing: LeaseTiming = FAST) -> None:
        self.identity = identity
        self.periods: list[list[float]] = []
        self.elector = LeaderElector(
            client,
            CONTROL,
            NAME,
            identity,
            timing=timing,
            on_started_leading=self._started,
            on_stopped_leading=self._stopped,
        )
        self.lock = threading.Lock()

    def _started(self) -> None:
        with self.lock:
            self.periods.append([time.monotonic(), float("inf")])

    def _stopped(self) -> None:
        renewed = self.elector.renewed_at
        end = time.monotonic()
        if renewed is not None:
            end = min(end, renewed + self.elector.timing.renew_deadline)
        with self.lock:
            self.periods[-1][1] = end

    @property
    def leading(self) -> bool:
        return self.elector.is_leader


@pytest.fixture
def contenders(ha_cluster: HaCluster) -> Iterator[Callable[..., Contender]]:
    made: list[Contender] = []

    def make(name: str, *, client: KubeClient | None = None, start: bool = True) -> Contender:
        contender = Contender(client or ha_cluster.client(name), f"replica-{name}")
        made.append(contender)
        if start:
            contender.elector.start()
        return contender

    yield make
    for contender in made:
        contender.elector.stop()


def leader_of(group: list[Contender]) -> Contender:
    return wait_until(lambda: next((c for c in group if c.leading), None), "a leader")


def assert_no_split_brain(cluster: HaCluster, group: list[Contender], timing: LeaseTiming = FAST) -> None:
    """No two contenders' leading periods overlap, and in the server's writes a holder follows another only
    after the lease duration (or after a release)."""
    periods = sorted((start, end, c.identity) for c in group for start, end in c.periods)
    for (_, end, first), (start, _, second) in itertools.pairwise(periods):
        assert end <= start, f"{first} led until {end}, {second} from {start}"
    writes = cluster.leases.of(NAME)
    last: Write | None = None
    for write in writes:
        if last is not None and last.holder and write.holder and write.holder != last.holder:
            assert write.at - last.at >= timing.duration, f"{write.holder} took the Lease from {last.holder} early"
        last = write
    assert 422 not in cluster.codes("update", "leases") + cluster.codes("create", "leases")


def takeovers(cluster: HaCluster) -> list[tuple[Write, Write]]:
    """(the old holder's last write, the new holder's first) for each change between two holders."""
    found = []
    writes = cluster.leases.of(NAME)
    for before, after in itertools.pairwise(writes):
        if before.holder and after.holder and before.holder != after.holder:
            found.append((before, after))
    return found


def spec_time(write: Write, key: str) -> datetime:
    return datetime.fromisoformat(str(write.obj["spec"][key]).replace("Z", "+00:00"))


@pytest.mark.parametrize("count", [2, 3])
def test_one_leader_among_contenders(ha_cluster: HaCluster, contenders: Callable[..., Contender], count: int) -> None:
    group = [contenders(name) for name in "abc"[:count]]
    leader = leader_of(group)
    wait_until(lambda: len(ha_cluster.leases.of(NAME)) >= 8, "several renewals")
    assert [c for c in group if c.periods] == [leader]
    assert {w.holder for w in ha_cluster.leases.of(NAME)} == {leader.identity}
    lease = ha_cluster.leases.of(NAME)[-1].obj
    assert lease["spec"]["leaseTransitions"] == 0
    assert lease["spec"]["leaseDurationSeconds"] == 2
    assert lease["metadata"]["labels"]["app.kubernetes.io/managed-by"] == "mesh-identity"
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{6}(Z|\+00:00)", lease["spec"]["renewTime"])
    assert all(c.elector.leader == leader.identity for c in group)
    assert_no_split_brain(ha_cluster, group)


def test_a_stopped_leader_releases_and_another_takes_over(
    ha_cluster: HaCluster, contenders: Callable[..., Contender]
) -> None:
    group = [contenders(name) for name in "abc"]
    first = leader_of(group)
    first.elector.stop()
    assert not first.leading and first.periods[-1][1] != float("inf")
    rest = [c for c in group if c is not first]
    second = leader_of(rest)
    writes = ha_cluster.leases.of(NAME)
    released = [w for w in writes if not w.holder]
    assert released, "the stopped leader did not clear holderIdentity"
    assert released[0].obj["spec"]["leaseDurationSeconds"] == 1
    assert writes[-1].holder == second.identity
    assert writes[-1].obj["spec"]["leaseTransitions"] == 1
    assert_no_split_brain(ha_cluster, group)


def test_a_killed_leader_is_replaced_after_the_lease_expires(
    ha_cluster: HaCluster, contenders: Callable[..., Contender]
) -> None:
    group = [contenders(name) for name in "abc"]
    first = leader_of(group)
    first.elector.stop(release=False)  # as kill -9: nothing written, the Lease expires
    rest = [c for c in group if c is not first]
    second = leader_of(rest)
    (old, new), *more = takeovers(ha_cluster)
    assert not more and old.holder == first.identity and new.holder == second.identity
    gap = (spec_time(new, "acquireTime") - spec_time(old, "renewTime")).total_seconds()
    # The lower bound is the safety property. The upper one is a sanity bound, not a speed target: a contender
    # retries every retry period, plus the requests' own time on a loaded machine; one that waited for a second
    # lease duration (2 s more) still fails it.
    assert FAST.duration <= gap <= FAST.duration + 2 * FAST.retry_period + 0.75, gap
    assert new.obj["spec"]["leaseTransitions"] == 1
    assert_no_split_brain(ha_cluster, group)


class PausingClient(KubeClient):
    """The real client, whose Lease replaces wait (holding the version they were read at) while ``paused``:
    a leader frozen between its read and its write, as a GC pause or a slow network does."""

    def __init__(self, base: KubeClient) -> None:
        super().__init__(base.api, base.host, base.source, base.timeout)
        self.paused = threading.Event()
        self.waiting = threading.Event()
        self.go = threading.Event()

    def replace(self, resource, namespace, body):  # type: ignore[no-untyped-def]
        if self.paused.is_set() and resource is LEASES:
            self.waiting.set()
            self.go.wait(30)
        return super().replace(resource, namespace, body)


def test_a_deposed_leaders_stale_replace_gets_409_and_it_steps_down(
    ha_cluster: HaCluster, contenders: Callable[..., Contender]
) -> None:
    pausing = PausingClient(ha_cluster.client("a"))
    first = contenders("a", client=pausing)
    leader_of([first])
    second = contenders("b")
    pausing.paused.set()
    wait_until(pausing.waiting.is_set, "the leader frozen before its renewal")
    leader_of([second])  # the frozen leader's Lease expired: the other took it
    assert not first.leading  # past its renew deadline, even while its request waits
    pausing.go.set()
    wait_until(lambda: 409 in ha_cluster.codes("update", "leases", "a"), "the stale replace refused")
    wait_until(lambda: first.periods[-1][1] != float("inf"), "the deposed leader stepping down")
    count = len(ha_cluster.leases.of(NAME))
    wait_until(lambda: len(ha_cluster.leases.of(NAME)) >= count + 3, "renewals after the refused write")
    assert second.leading and {w.holder for w in ha_cluster.leases.of(NAME)[count:]} == {second.identity}
    assert_no_split_brain(ha_cluster, [first, second])


def test_a_replace_at_a_version_read_before_anothers_write_is_refused(ha_cluster: HaCluster) -> None:
    client = ha_cluster.client("a")
    contender = Contender(client, "replica-a")
    contender.elector.start()
    try:
        leader_of([contender])
        stale = client.read(LEASES, CONTROL, NAME)
        assert stale is not None
        wait_until(lambda: client.read(LEASES, CONTROL, NAME) != stale, "a renewal")
        record, version = parse_lease(stale)
        with pytest.raises(KubeConflictError, match="409"):
            client.replace(LEASES, CONTROL, lease_body(CONTROL, NAME, record, resource_version=version))
    finally:
        contender.elector.stop()


@pytest.mark.parametrize("fault", ["500", "403", "silent"])
def test_renewal_faults_make_the_leader_step_down_without_split_brain(
    ha_cluster: HaCluster, contenders: Callable[..., Contender], fault: str
) -> None:
    server = ha_cluster.server
    with StallingRelay(server.port) as relay:
        client = ha_cluster.client("a", timeout=0.5, url=f"https://127.0.0.1:{relay.port}")
        first = contenders("a", client=client)
        leader_of([first])
        second = contenders("b")
        wait_until(lambda: second.elector.leader == first.identity, "the second contender seeing the leader")
        user = ha_cluster.user("a")
        if fault == "500":
            injected = server.inject_error("update", "leases", user=user, times=None)
        elif fault == "403":
            rule = server.deny("update", "leases", group="coordination.k8s.io", user=user)
        else:
            relay.stall()
        leader_of([second])
        wait_until(lambda: first.periods[-1][1] != float("inf"), "the first leader stepping down")
        assert not first.leading
        if fault == "500":
            server.remove_error(injected)
        elif fault == "403":
            server.allow(rule)
        else:
            relay.resume()
        renewals = len(ha_cluster.leases.of(NAME))
        wait_until(lambda: len(ha_cluster.leases.of(NAME)) >= renewals + 4, "renewals after the fault ended")
        assert second.leading and not first.leading and len(first.periods) == 1
        assert_no_split_brain(ha_cluster, [first, second])
