"""Several replicas on one Secret: providers started at once end with one root (create-or-load), and
``watch_state`` tells one replica of another's rotation step (a watch of the one Secret, relisted after 410)."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

import pytest

from mesh_identity.provider import ProviderContext
from mesh_identity.registry.kube.watch import Backoff
from providers.builtin.provider import SPEC, BuiltinProvider
from providers.builtin.secretstore import SecretRootStore
from providers.builtin.secretwatch import SecretWatch
from tests.fakes.kube import CONFIG_MAP
from tests.providers.builtin.secretcluster import NAMESPACE_NAME, VALIDATED_SECRET, MakeProvider, SecretCluster

ROUNDS = 4
REPLICAS = 4
WAIT = 20.0  # seconds, an upper bound only: the tests wait for events, never for time


def _eventually(predicate: Callable[[], bool]) -> bool:
    """Whether ``predicate`` holds within :data:`WAIT` seconds (checked every 10 ms)."""
    deadline = time.monotonic() + WAIT
    while not predicate():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.01)
    return True


def _watch(provider: BuiltinProvider) -> SecretWatch:
    assert isinstance(provider.store, SecretRootStore)
    watch = provider.store.watching
    assert watch is not None
    return watch


def _open_at_once(make: MakeProvider, namespace: str) -> tuple[list[BuiltinProvider], list[BaseException]]:
    """REPLICAS threads, released together, each open a provider on the Secret in ``namespace``."""
    start = threading.Barrier(REPLICAS)
    opened: list[BuiltinProvider] = []
    failed: list[BaseException] = []
    lock = threading.Lock()

    def replica() -> None:
        start.wait(timeout=WAIT)
        try:
            provider = make(secret_namespace=namespace)
        except BaseException as err:  # reported by the test
            with lock:
                failed.append(err)
            return
        with lock:
            opened.append(provider)

    threads = [threading.Thread(target=replica, name=f"replica-{i}") for i in range(REPLICAS)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=WAIT * 3)
    return opened, failed


def test_replicas_started_at_once_end_with_one_root(
    secret_cluster: SecretCluster, make_secret_provider: MakeProvider
) -> None:
    """Each round, REPLICAS threads released together each open a provider on a new Secret: exactly one creates
    it, the others load its root (after an AlreadyExists, for those that read before it was created)."""
    lost_races = 0
    for round_number in range(ROUNDS):
        namespace = f"round-{round_number}"
        opened, failed = _open_at_once(make_secret_provider, namespace)
        assert not failed, failed
        assert len(opened) == REPLICAS
        assert sum(1 for p in opened if p.created) == 1
        bundles = {p.trust_bundle().authorities for p in opened}
        assert len(bundles) == 1
        (roots,) = bundles
        assert len(roots) == 1
        assert secret_cluster.manifest(namespace)["roots"] == ["root-1"]
        creates = [r for r in secret_cluster.server.requests if r.verb == "create" and r.namespace == namespace]
        assert [r.code for r in creates].count(201) == 1
        assert all(r.code in (201, 409) for r in creates)
        lost_races += sum(1 for r in creates if r.code == 409)
        for provider in opened:
            provider.close()
    # the KDF (~0.2 s) between each replica's read and its create makes the replicas race: some lost a create
    print(f"creates lost to another replica (409 AlreadyExists): {lost_races} of {ROUNDS * (REPLICAS - 1)}")
    assert lost_races >= 1


def test_watch_state_tells_of_another_replicas_steps(
    secret_cluster: SecretCluster, make_secret_provider: MakeProvider
) -> None:
    mine, theirs = make_secret_provider(), make_secret_provider()
    calls: list[str] = []
    changed = threading.Condition()

    def on_change() -> None:
        with changed:
            calls.append(mine.root_phase())
            changed.notify_all()

    def wait_for(count: int) -> bool:
        with changed:
            return changed.wait_for(lambda: len(calls) >= count, WAIT)

    mine.watch_state(on_change)
    assert secret_cluster.server.wait_for_watch(kind=VALIDATED_SECRET, timeout=WAIT)

    theirs.prepare_root()
    assert wait_for(1)
    assert mine.root_phase() == "steady"  # told, not changed: the caller reloads
    mine.reload()
    assert mine.root_phase() == "prepared"
    assert mine.trust_bundle().authorities == theirs.trust_bundle().authorities

    mine.activate_root()  # its own write: the watch sees it, but does not call back
    theirs.reload()
    theirs.retire_root()
    assert wait_for(2)
    assert len(calls) == 2  # the events arrive in order: one for activate (none) and one for retire
    mine.reload()
    assert mine.root_phase() == "steady"
    assert mine.trust_bundle().authorities == theirs.trust_bundle().authorities

    watch = _watch(mine)
    secret_requests = [r for r in secret_cluster.server.requests if r.resource == "secrets"]
    assert [r.verb for r in secret_requests].count("list") == 1  # one list, one stream: no polling
    assert watch.lists == 1 and watch.streams == 1
    mine.close()
    assert not watch.running


def test_the_watch_lists_again_after_410(secret_cluster: SecretCluster, make_secret_provider: MakeProvider) -> None:
    mine, theirs = make_secret_provider(), make_secret_provider()
    calls = threading.Semaphore(0)
    mine.watch_state(calls.release)
    server = secret_cluster.server
    assert server.wait_for_watch(kind=VALIDATED_SECRET, timeout=WAIT)
    watch = _watch(mine)
    # something else changes, then the history is compacted: the watch's version is too old to resume from
    server.put_object(CONFIG_MAP, {"metadata": {"name": "other", "namespace": NAMESPACE_NAME}, "data": {}})
    current = server.compact()
    server.end_watches()
    assert server.wait_for_watch(kind=VALIDATED_SECRET, since=current, timeout=WAIT)
    assert watch.lists == 2
    theirs.prepare_root()
    assert calls.acquire(timeout=WAIT)
    mine.reload()
    assert mine.root_phase() == "prepared"


def test_a_change_while_the_watch_was_failing_is_told(
    secret_cluster: SecretCluster, make_secret_provider: MakeProvider
) -> None:
    """The server refuses the watch (403) for a while; a step taken meanwhile is told once it watches again."""
    mine, theirs = make_secret_provider(), make_secret_provider()
    server = secret_cluster.server
    rule = server.deny("watch", "secrets")
    calls = threading.Semaphore(0)
    mine.watch_state(calls.release)
    watch = _watch(mine)
    watch.backoff = Backoff(0.05, 0.2)
    assert _eventually(lambda: watch.error is not None)
    assert "not allowed to watch Secret mesh-identity/mesh-identity-ca (403 Forbidden)" in str(watch.error)
    check = {c.name: c for c in mine.doctor()}["CA Secret watch"]
    assert not check.ok and check.detail.startswith("failing: not allowed to watch Secret")
    theirs.prepare_root()
    server.allow(rule)
    assert calls.acquire(timeout=WAIT)
    mine.reload()
    assert mine.root_phase() == "prepared"
    assert _eventually(lambda: watch.error is None)


def test_a_store_in_files_never_calls_back(make_context: Callable[..., ProviderContext]) -> None:
    provider = SPEC.factory(make_context(), SPEC.validate_options({"store": "files"}))
    provider.watch_state(lambda: pytest.fail("called"))
    provider.close()


def test_the_requests_are_those_the_role_allows(
    secret_cluster: SecretCluster, make_secret_provider: MakeProvider
) -> None:
    """get, update, list and watch of the one Secret by name, and create: what the README's Role grants."""
    mine, theirs = make_secret_provider(), make_secret_provider()
    mine.watch_state(lambda: None)
    assert secret_cluster.server.wait_for_watch(kind=VALIDATED_SECRET, timeout=WAIT)
    theirs.prepare_root()
    mine.reload()
    mine.activate_root()
    requests = [r for r in secret_cluster.server.requests if r.resource == "secrets"]
    assert {r.verb for r in requests} == {"get", "create", "update", "list", "watch"}
    assert all(r.name == "mesh-identity-ca" for r in requests if r.verb in ("get", "update"))
    assert all(r.namespace == NAMESPACE_NAME for r in requests)
