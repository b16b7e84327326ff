"""SMI custom resources through the Kubernetes registry: the policy they make, and bad objects refused with an
Event on them and a log line naming them, while the last good policy stays."""

from __future__ import annotations

import logging
from typing import Any

import pytest

from mesh_identity.mesh.policy import Backend, HttpRule
from mesh_identity.spiffe import SpiffeId
from tests.registry.kube.conftest import TD, Cluster, Start
from tests.waiting import wait_until

WEB = SpiffeId.for_kubernetes(TD, "shop", "web")
API = SpiffeId.for_kubernetes(TD, "shop", "api")
OPS = SpiffeId.for_kubernetes(TD, "shop", "ops")


def shop(cluster: Cluster) -> None:
    """web calls api; api runs as v1 and v2 behind the Services api (the root), api-v1 and api-v2."""
    cluster.namespace("shop")
    for account in ("web", "api"):
        cluster.service_account("shop", account)
    cluster.pod("shop", "web-0", "web", {"app": "web"})
    cluster.pod("shop", "api-v1-0", "api", {"app": "api", "version": "v1"})
    cluster.pod("shop", "api-v2-0", "api", {"app": "api", "version": "v2"})
    cluster.service("shop", "web", {"app": "web"})
    cluster.service("shop", "api", {"app": "api"})
    cluster.service("shop", "api-v1", {"app": "api", "version": "v1"})
    cluster.service("shop", "api-v2", {"app": "api", "version": "v2"})


def routes(path_regex: str = "/items(/.*)?") -> dict[str, Any]:
    return {
        "kind": "HTTPRouteGroup",
        "metadata": {"name": "api-routes", "namespace": "shop"},
        "spec": {"matches": [{"name": "read", "pathRegex": path_regex, "methods": ["GET"]}]},
    }


def target(group: str = "api-routes", name: str = "web-reads-api") -> dict[str, Any]:
    return {
        "kind": "TrafficTarget",
        "metadata": {"name": name, "namespace": "shop"},
        "spec": {
            "destination": {"kind": "ServiceAccount", "name": "api", "namespace": "shop"},
            "sources": [{"kind": "ServiceAccount", "name": "web", "namespace": "shop"}],
            "rules": [{"kind": "HTTPRouteGroup", "name": group, "matches": ["read"]}],
        },
    }


def split(*weights: tuple[str, int]) -> dict[str, Any]:
    return {
        "kind": "TrafficSplit",
        "metadata": {"name": "api-canary", "namespace": "shop"},
        "spec": {"service": "api", "backends": [{"service": s, "weight": w} for s, w in weights]},
    }


def events_about(cluster: Cluster, kind: str, name: str) -> list[dict[str, Any]]:
    return [
        e for e in cluster.events("shop") if e["involvedObject"]["kind"] == kind and e["involvedObject"]["name"] == name
    ]


def test_the_smi_objects_make_the_mesh_policy(cluster: Cluster, start_registry: Start) -> None:
    shop(cluster)
    cluster.smi(routes())
    cluster.smi(target())
    cluster.smi(split(("api-v1", 90), ("api-v2", 10)))
    registry = start_registry()

    mesh = registry.current().mesh
    (access,) = mesh.policy.access_to(API) or ()
    assert access.name == "web-reads-api" and access.sources == (WEB,)
    (rule,) = access.rules
    assert isinstance(rule, HttpRule) and [m.path_regex for m in rule.matches] == ["/items(/.*)?"]
    assert mesh.policy.access_to(WEB) is None  # no TrafficTarget names web: open to the mesh
    canary = mesh.policy.split_of("api.shop")
    assert canary is not None and canary.backends == (Backend("api-v1.shop", 90), Backend("api-v2.shop", 10))
    assert mesh.services["api.shop"].instances == ()  # the root: its pods are the backends' sidecars
    assert [i.node for i in mesh.services["api-v1.shop"].instances] == ["api-v1-0.shop"]
    assert [i.node for i in mesh.services["api-v2.shop"].instances] == ["api-v2-0.shop"]
    assert not registry.refusals


def test_without_a_split_a_pod_serves_the_first_service_that_lists_it(cluster: Cluster, start_registry: Start) -> None:
    shop(cluster)
    registry = start_registry()
    services = registry.current().mesh.services
    assert [i.node for i in services["api.shop"].instances] == ["api-v1-0.shop", "api-v2-0.shop"]
    assert "api-v1.shop" not in services  # its only pod is already a sidecar of api


def test_a_split_whose_weights_do_not_add_up_is_refused_and_its_last_good_version_stays(
    cluster: Cluster, start_registry: Start, caplog: pytest.LogCaptureFixture
) -> None:
    shop(cluster)
    cluster.smi(split(("api-v1", 90), ("api-v2", 10)))
    registry = start_registry()
    good = registry.current()

    with caplog.at_level(logging.ERROR, logger="mesh_identity.registry.kube.registry"):
        bad = cluster.replace_smi(split(("api-v1", 60), ("api-v2", 30)))
        (event,) = wait_until(lambda: events_about(cluster, "TrafficSplit", "api-canary"), "an Event on the split")
    message = (
        "TrafficSplit shop/api-canary: spec.backends: the weights add up to 90, not 100; its last good version "
        "stays in force"
    )
    assert event["message"] == message
    assert event["reason"] == "InvalidPolicy" and event["type"] == "Warning"
    assert event["involvedObject"] == {
        "apiVersion": "split.smi-spec.io/v1alpha4",
        "kind": "TrafficSplit",
        "name": "api-canary",
        "namespace": "shop",
        "uid": bad["metadata"]["uid"],
        "resourceVersion": bad["metadata"]["resourceVersion"],
    }
    assert f"refused TrafficSplit shop/api-canary: {message}" in caplog.text
    assert registry.current().mesh == good.mesh  # the 90/10 split stays
    assert registry.current().mesh.policy.split_of("api.shop").backends[0].weight == 90  # type: ignore[union-attr]

    cluster.replace_smi(split(("api-v1", 50), ("api-v2", 50)))  # fixed
    wait_until(
        lambda: registry.current().mesh.policy.split_of("api.shop").backends[0].weight == 50,  # type: ignore[union-attr]
        "the fixed split",
    )
    assert not registry.refusals
    assert len(events_about(cluster, "TrafficSplit", "api-canary")) == 1  # one Event per refusal, not per change


def test_a_new_split_naming_an_unknown_service_is_left_out(cluster: Cluster, start_registry: Start) -> None:
    shop(cluster)
    cluster.smi(split(("api-v1", 50), ("api-v3", 50)))
    registry = start_registry()
    (event,) = wait_until(lambda: events_about(cluster, "TrafficSplit", "api-canary"), "an Event on the split")
    assert event["message"] == (
        "TrafficSplit shop/api-canary: spec.backends[1].service: Service shop/api-v3 is not in the mesh (no such "
        "Service, no ready pods, or refused); it is left out"
    )
    mesh = registry.current().mesh
    assert mesh.policy.splits == ()
    assert [i.node for i in mesh.services["api.shop"].instances] == ["api-v1-0.shop", "api-v2-0.shop"]


def test_a_regex_re2_refuses_keeps_the_last_good_route_group(cluster: Cluster, start_registry: Start) -> None:
    shop(cluster)
    cluster.smi(routes())
    cluster.smi(target())
    registry = start_registry()
    good = registry.current().mesh

    cluster.replace_smi(routes("/items(?=/secret)"))  # a lookahead: Python compiles it, RE2 (Envoy) does not
    (event,) = wait_until(lambda: events_about(cluster, "HTTPRouteGroup", "api-routes"), "an Event on the group")
    assert event["message"] == (
        "HTTPRouteGroup shop/api-routes: spec.matches[0].pathRegex: '/items(?=/secret)' is not a usable regex: it "
        "uses a lookahead, which Envoy's RE2 does not support; its last good version stays in force"
    )
    assert registry.current().mesh == good


def test_a_new_target_that_does_not_validate_closes_its_destination(cluster: Cluster, start_registry: Start) -> None:
    shop(cluster)
    registry = start_registry()
    assert registry.current().mesh.policy.access_to(API) is None  # open to the mesh

    cluster.smi(target(group="no-such-group"))
    (event,) = wait_until(lambda: events_about(cluster, "TrafficTarget", "web-reads-api"), "an Event on the target")
    assert event["message"] == (
        "TrafficTarget shop/web-reads-api: spec.rules[0].name: no HTTPRouteGroup 'no-such-group' in namespace "
        "shop; its destination admits no caller until it is fixed"
    )
    (closed,) = registry.current().mesh.policy.access_to(API) or ()
    assert closed.rules == (HttpRule("refused", ()),)  # a rule of no match: nothing is allowed

    cluster.smi(routes())
    cluster.replace_smi(target())
    wait_until(lambda: (registry.current().mesh.policy.access_to(API) or [closed])[0].rules != closed.rules, "fixed")
    assert not registry.refusals


def test_a_deleted_route_group_that_a_target_uses_stays_as_it_was(cluster: Cluster, start_registry: Start) -> None:
    shop(cluster)
    cluster.smi(routes())
    cluster.smi(target())
    registry = start_registry()
    good = registry.current().mesh

    cluster.delete_smi("HTTPRouteGroup", "shop", "api-routes")
    (event,) = wait_until(lambda: events_about(cluster, "TrafficTarget", "web-reads-api"), "an Event on the target")
    assert event["message"] == (
        "HTTPRouteGroup shop/api-routes was deleted, and TrafficTarget shop/web-reads-api does not validate without "
        "its last good version (spec.rules[0].name: no HTTPRouteGroup 'api-routes' in namespace shop); that "
        "version stays in force for it"
    )
    assert registry.current().mesh == good

    cluster.delete_smi("TrafficTarget", "shop", "web-reads-api")  # the target goes too: nothing keeps the group
    wait_until(lambda: registry.current().mesh.policy.access_to(API) is None, "the target and group gone")
    assert registry.current().mesh.policy.route_groups == ()


def test_smi_objects_outside_the_mesh_are_ignored(cluster: Cluster, start_registry: Start) -> None:
    shop(cluster)
    cluster.namespace("other", mesh=None)
    bad = split(("api-v1", 1))
    bad["metadata"]["namespace"] = "other"
    cluster.smi(bad)
    registry = start_registry()
    assert registry.current().mesh.policy.splits == () and not registry.refusals
