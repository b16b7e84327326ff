"""The Kubernetes registry when the API fails: 403, 410, 500, a server that stops answering, one that is down.
Each is logged with a clear message and retried with backoff, the last good mesh stays, and what changed
meanwhile arrives once the API answers again. And in steady state it only watches: no polling."""

from __future__ import annotations

import logging
from collections import Counter
from pathlib import Path

import pytest
import yaml

from mesh_identity.registry.kube.resources import PODS, WATCHED
from mesh_identity.spiffe import SpiffeId
from tests.registry.kube.conftest import TD, Cluster, Start
from tests.registry.kube.stall import StallingRelay
from tests.waiting import wait_until

WEB = SpiffeId.for_kubernetes(TD, "shop", "web")


def shop(cluster: Cluster) -> None:
    cluster.namespace("shop")
    cluster.service_account("shop", "web")
    cluster.pod("shop", "web-0", "web", {"app": "web"})
    cluster.service("shop", "web", {"app": "web"})


def nodes(registry) -> list[str]:  # type: ignore[no-untyped-def]
    found = registry.current().mesh.services.get("web.shop")
    return sorted(i.node for i in found.instances) if found is not None else []


def requests(cluster: Cluster, verb: str, resource: str = "pods") -> int:
    return sum(1 for r in list(cluster.server.requests) if r.verb == verb and r.resource == resource)


def test_it_lists_each_kind_once_then_only_watches(cluster: Cluster, start_registry: Start) -> None:
    shop(cluster)
    registry = start_registry()
    assert cluster.server.wait_for_watches(len(WATCHED))
    cluster.pod("shop", "web-1", "web", {"app": "web"})
    cluster.delete_pod("shop", "web-0")
    wait_until(lambda: nodes(registry) == ["web-1.shop"], "the changes")
    lists = Counter(r.resource for r in list(cluster.server.requests) if r.verb == "list" and r.user)
    assert set(lists.values()) == {1} and len(lists) == len(WATCHED)
    watches = Counter(r.resource for r in list(cluster.server.requests) if r.verb == "watch")
    assert set(watches.values()) == {1}  # one stream per kind, still open
    assert cluster.server.open_watches >= len(WATCHED)


def test_forbidden_keeps_the_last_good_mesh_and_catches_up_once_allowed(
    cluster: Cluster, start_registry: Start, caplog: pytest.LogCaptureFixture
) -> None:
    shop(cluster)
    registry = start_registry()
    good = registry.current()
    assert cluster.server.wait_for_watch(kind=cluster.kind("Pod"))  # open, so that end_watches() ends it
    rule = cluster.server.deny("watch", "pods")
    rule_list = cluster.server.deny("list", "pods")
    with caplog.at_level(logging.WARNING, logger="mesh_identity.registry.kube.watch"):
        cluster.server.end_watches()  # streams end (as after their timeout); the pods watch cannot reopen
        error = wait_until(lambda: registry.errors().get("pods"), "the pods watch to fail")
        cluster.pod("shop", "web-1", "web", {"app": "web"})  # while the registry cannot see pods
        cluster.delete_pod("shop", "web-0")
    assert error.startswith("not allowed to watch pods (403 Forbidden): pods is forbidden: User ")
    assert "the control plane's ClusterRole must allow it" in error
    assert "the watch of pods failed (attempt 1), retrying with backoff and keeping the 1 pods last seen" in caplog.text
    assert registry.current().mesh == good.mesh  # the last good set, while blind

    cluster.server.allow(rule)
    cluster.server.allow(rule_list)
    wait_until(lambda: nodes(registry) == ["web-1.shop"], "the pods changed while it was forbidden")
    assert "pods" not in registry.errors()


def test_410_gone_lists_again(cluster: Cluster, start_registry: Start, caplog: pytest.LogCaptureFixture) -> None:
    shop(cluster)
    registry = start_registry()
    assert requests(cluster, "list") == 1
    assert cluster.server.wait_for_watch(kind=cluster.kind("Pod"))  # open, so that end_watches() ends it
    rule = cluster.server.deny("watch", "pods")  # hold the pods watch closed while its version expires
    cluster.server.end_watches()
    wait_until(lambda: registry.errors().get("pods"), "the pods watch to be closed")
    cluster.delete_pod("shop", "web-0")  # not streamed to it
    cluster.pod("shop", "web-1", "web", {"app": "web"})
    cluster.server.compact()  # the versions it missed are gone
    with caplog.at_level(logging.INFO, logger="mesh_identity.registry.kube.watch"):
        cluster.server.allow(rule)
        wait_until(lambda: nodes(registry) == ["web-1.shop"], "the missed changes, by listing again")
    assert requests(cluster, "list") == 2
    assert "the watch of pods must list again: cannot watch pods from resourceVersion " in caplog.text
    assert "(410 Expired): too old resource version: " in caplog.text


def test_bookmarks_let_a_watch_resume_without_listing_again(cluster: Cluster, start_registry: Start) -> None:
    shop(cluster)
    registry = start_registry()
    watch = registry.watches[PODS]
    before = int(watch.resource_version)
    for i in range(3):  # writes of other kinds move the server's version past the pods watch's
        cluster.service_account("shop", f"other-{i}")
    assert cluster.server.send_bookmarks() >= len(WATCHED)
    wait_until(lambda: int(watch.resource_version) > before, "the bookmark's version")
    cluster.server.compact()  # the history before now is gone; the bookmark's version is now
    cluster.server.end_watches()
    assert cluster.server.wait_for_watch(kind=cluster.kind("Pod"), since=int(watch.resource_version))
    cluster.pod("shop", "web-1", "web", {"app": "web"})
    wait_until(lambda: nodes(registry) == ["web-0.shop", "web-1.shop"], "web-1 on the resumed stream")
    assert requests(cluster, "list") == 1  # resumed from the bookmark, not listed again


def test_500_at_start_is_retried_with_backoff(
    cluster: Cluster, start_registry: Start, caplog: pytest.LogCaptureFixture
) -> None:
    shop(cluster)
    cluster.server.inject_error("list", "pods", times=3)
    with caplog.at_level(logging.WARNING, logger="mesh_identity.registry.kube.watch"):
        registry = start_registry()
    assert registry.synced and nodes(registry) == ["web-0.shop"]
    assert requests(cluster, "list") == 4
    assert (
        "the Kubernetes API at https://127.0.0.1:" in caplog.text
        and "answered 500 InternalError to list pods: an error on the server has prevented the request from succeeding"
        in caplog.text
    )


def test_a_watch_ended_by_a_500_error_event_resumes(cluster: Cluster, start_registry: Start) -> None:
    shop(cluster)
    registry = start_registry()
    cluster.server.inject_error("watch", "pods", times=2)
    cluster.server.end_watches()
    cluster.pod("shop", "web-1", "web", {"app": "web"})
    wait_until(lambda: nodes(registry) == ["web-0.shop", "web-1.shop"], "web-1 after the errors")
    assert requests(cluster, "list") == 1  # resumed from its version, nothing listed again


def test_a_server_that_stops_answering_times_out_and_the_last_good_mesh_stays(
    cluster: Cluster, start_registry: Start, tmp_path: Path
) -> None:
    shop(cluster)
    with StallingRelay(cluster.server.port) as relay:
        kubeconfig = cluster.server.kubeconfig()
        kubeconfig["clusters"][0]["cluster"]["server"] = f"https://127.0.0.1:{relay.port}"
        path = tmp_path / "via-relay"
        path.write_text(yaml.safe_dump(kubeconfig))
        registry = start_registry(kubeconfig=path, timeout=0.5)
        good = registry.current()
        assert nodes(registry) == ["web-0.shop"]

        relay.stall()
        error = wait_until(lambda: registry.errors().get("pods"), "a timeout", timeout=30)
        cluster.pod("shop", "web-1", "web", {"app": "web"})
        assert "cannot reach the Kubernetes API" in error and "watch pods" in error
        assert registry.current().mesh == good.mesh

        relay.resume()
        wait_until(lambda: nodes(registry) == ["web-0.shop", "web-1.shop"], "web-1 once it answers", timeout=30)


def test_a_server_that_is_down_at_start_is_waited_for(cluster: Cluster, start_registry: Start) -> None:
    shop(cluster)
    cluster.server.go_down()
    registry = start_registry(sync_timeout=0.5)  # gives up waiting, the watches go on
    assert not registry.synced and registry.current().mesh.services == {}
    assert "cannot reach the Kubernetes API" in registry.waiting()
    cluster.server.come_up()
    wait_until(lambda: nodes(registry) == ["web-0.shop"], "the first mesh once the server is up")
