"""The pure translation from Kubernetes objects to the mesh model (no server): the mapping, what is refused and
why, and the Events about refusals (checked against the official schemas)."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import kubernetes_validate
import pytest

from mesh_identity.errors import ConfigError
from mesh_identity.mesh.model import Address, Protocol
from mesh_identity.mesh.policy import TcpRule
from mesh_identity.mesh.ports import INBOUND_PORT
from mesh_identity.registry.kube.events import event_for
from mesh_identity.registry.kube.objects import ObjectRef, Refusal
from mesh_identity.registry.kube.resources import (
    ENDPOINT_SLICES,
    HTTP_ROUTE_GROUPS,
    NAMESPACES,
    PODS,
    SERVICE_ACCOUNTS,
    SERVICES,
    TCP_ROUTES,
    TRAFFIC_SPLITS,
    TRAFFIC_TARGETS,
    Resource,
)
from mesh_identity.registry.kube.translate import Snapshot, Translation, translate
from mesh_identity.spiffe import SpiffeId
from tests.fakes.kube.workloads import SCHEMA_VERSIONS
from tests.registry.kube.conftest import MESH, MONITORED, TD

DB = SpiffeId.for_kubernetes(TD, "shop", "db")


class World:
    """Objects as the API returns them, built up by a test."""

    def __init__(self) -> None:
        self.objects: dict[Resource, dict[tuple[str, str], dict[str, Any]]] = {}
        self.namespace("shop")

    def add(self, resource: Resource, namespace: str, name: str, **body: Any) -> dict[str, Any]:
        obj = {"metadata": {"name": name, "namespace": namespace, "uid": f"uid-{name}", "resourceVersion": "7"}, **body}
        self.objects.setdefault(resource, {})[(namespace, name)] = obj
        return obj

    def namespace(self, name: str, mesh: str = MESH) -> None:
        self.objects.setdefault(NAMESPACES, {})[("", name)] = {"metadata": {"name": name, "labels": {MONITORED: mesh}}}

    def workload(
        self,
        name: str,
        *,
        account: str | None = None,
        ip: str = "10.0.0.5",
        port: int = 8080,
        port_spec: dict[str, Any] | None = None,
        pod: dict[str, Any] | None = None,
    ) -> None:
        account = account or name
        self.add(SERVICE_ACCOUNTS, "shop", account)
        self.add(
            PODS,
            "shop",
            f"{name}-0",
            spec={"serviceAccountName": account, "nodeName": "node-a", **(pod or {})},
            status={"phase": "Running", "podIP": ip},
        )
        spec = port_spec or {"name": "http", "port": 80, "targetPort": port, "protocol": "TCP"}
        self.add(SERVICES, "shop", name, spec={"selector": {"app": name}, "ports": [spec]})
        endpoint = {"addresses": [ip], "conditions": {"ready": True}, "targetRef": {"kind": "Pod", "name": f"{name}-0"}}
        self.add(
            ENDPOINT_SLICES,
            "shop",
            f"{name}-abcde",
            addressType="IPv4",
            metadata={"name": f"{name}-abcde", "namespace": "shop", "labels": {"kubernetes.io/service-name": name}},
            endpoints=[endpoint],
            ports=[{"name": spec.get("name", ""), "port": port, "protocol": "TCP"}],
        )

    def translate(self, previous: dict[Any, Any] | None = None) -> Translation:
        return translate(Snapshot(self.objects), MESH, TD, previous or {})


def test_a_service_and_its_pod_become_a_mesh_service_and_a_sidecar() -> None:
    world = World()
    world.workload("db", port=5432, port_spec={"name": "tcp-postgres", "port": 5432, "targetPort": 5432})
    mesh = world.translate().mesh
    db = mesh.services["db.shop"]
    assert db.identity == DB and db.protocol is Protocol.TCP
    (instance,) = db.instances
    assert (instance.node, instance.app, instance.inbound, instance.host) == (
        "db-0.shop",
        Address("10.0.0.5", 5432),
        Address("10.0.0.5", INBOUND_PORT),
        "node-a",
    )


@pytest.mark.parametrize(
    ("port", "protocol"),
    [
        ({"name": "http", "port": 80}, Protocol.HTTP),
        ({"name": "web", "port": 80, "appProtocol": "TCP"}, Protocol.TCP),
        ({"name": "tcp", "port": 80}, Protocol.TCP),
        ({"name": "tcp-redis", "port": 80}, Protocol.TCP),
        ({"name": "tcpish", "port": 80}, Protocol.HTTP),
        ({"name": "grpc", "port": 80, "appProtocol": "kubernetes.io/h2c"}, Protocol.HTTP),
    ],
)
def test_the_protocol_comes_from_the_first_port(port: dict[str, Any], protocol: Protocol) -> None:
    world = World()
    world.workload("db", port_spec=port)
    assert world.translate().mesh.services["db.shop"].protocol is protocol


@pytest.mark.parametrize(
    ("setup", "reason", "message"),
    [
        (
            {"port_spec": {"name": "dns", "port": 53, "protocol": "UDP"}},
            "UnsupportedService",
            "Service shop/db: spec.ports[0] is UDP; the mesh carries TCP only: it is left out",
        ),
        (
            {"port": INBOUND_PORT},
            "PortConflict",
            f"Service shop/db targets port {INBOUND_PORT}, the sidecar's inbound port: it is left out",
        ),
    ],
)
def test_services_the_mesh_cannot_carry_are_refused(setup: dict[str, Any], reason: str, message: str) -> None:
    world = World()
    world.workload("db", **setup)
    result = world.translate()
    assert "db.shop" not in result.mesh.services
    assert [(r.object.kind, r.reason, r.message) for r in result.refusals] == [("Service", reason, message)]


@pytest.mark.parametrize(
    ("pod", "status", "note"),
    [
        ({"hostNetwork": True}, None, "Pod shop/db-0 uses the node's network namespace: it has no sidecar of the mesh"),
        (
            {},
            {"phase": "Running", "podIP": "not-an-ip"},
            "Pod shop/db-0: status.podIP 'not-an-ip' is not an IP address; left out",
        ),
        ({}, {"phase": "Succeeded", "podIP": "10.0.0.5"}, None),
        ({}, {"phase": "Running"}, None),
    ],
)
def test_pods_that_are_no_sidecars(pod: dict[str, Any], status: dict[str, Any] | None, note: str | None) -> None:
    world = World()
    world.workload("db", pod=pod)
    if status is not None:
        world.objects[PODS][("shop", "db-0")]["status"] = status
    result = world.translate()
    assert "db.shop" not in result.mesh.services
    assert list(result.notes) == ([note] if note else [])
    assert not result.refusals


def test_objects_of_another_mesh_or_of_no_mesh_are_ignored() -> None:
    world = World()
    world.namespace("shop", mesh="other-mesh")
    world.workload("db")
    assert world.translate().mesh.services == {}


def test_malformed_objects_are_read_without_trusting_a_field() -> None:
    world = World()
    world.workload("db")
    world.add(PODS, "shop", "odd", spec="not a mapping", status=["neither"])
    world.add(SERVICES, "shop", "odd", spec={"ports": "eighty"})
    world.add(ENDPOINT_SLICES, "shop", "odd-x", addressType="IPv4", endpoints=[None, {"addresses": 5}], ports=None)
    assert list(world.translate().mesh.services) == ["db.shop"]


def test_a_refused_tcp_target_closes_its_destination_with_a_rule_of_no_port() -> None:
    world = World()
    world.workload("db", port=5432, port_spec={"name": "tcp", "port": 5432, "targetPort": 5432})
    world.add(
        TRAFFIC_TARGETS,
        "shop",
        "to-db",
        kind="TrafficTarget",
        spec={
            "destination": {"kind": "ServiceAccount", "name": "db"},
            "sources": [{"kind": "ServiceAccount", "name": "api"}],
            "rules": [{"kind": "TCPRoute", "name": "missing"}],
        },
    )
    result = world.translate()
    (closed,) = result.mesh.policy.access_to(DB) or ()
    assert closed.rules == (TcpRule("refused", (0,)),)
    assert [r.message for r in result.refusals] == [
        "TrafficTarget shop/to-db: spec.rules[0].name: no TCPRoute 'missing' in namespace shop; its destination "
        "admits no caller until it is fixed"
    ]
    assert result.accepted == {}


def test_a_split_root_without_any_backend_in_the_mesh_is_refused() -> None:
    world = World()
    world.workload("api")
    world.add(
        TRAFFIC_SPLITS,
        "shop",
        "canary",
        kind="TrafficSplit",
        spec={"service": "web", "backends": [{"service": "web-v1", "weight": 100}]},
    )
    world.add(SERVICES, "shop", "web", spec={"selector": {"app": "web"}, "ports": [{"name": "http", "port": 80}]})
    result = world.translate()
    assert [r.message for r in result.refusals] == [
        "TrafficSplit shop/canary: spec.service: Service shop/web is not in the mesh (no such Service, no ready "
        "pods, or refused); it is left out"
    ]
    assert sorted(result.mesh.services) == ["api.shop"]


def test_a_mesh_that_fails_for_no_smi_objects_reason_is_an_error() -> None:
    world = World()
    world.workload("db")
    world.workload("db2", ip="10.0.0.5")  # two pods with one IP: no real cluster does that
    with pytest.raises(
        ConfigError, match=r"services\.db2\.shop\.instances\[0\]\.app: 10\.0\.0\.5:8080 is already used"
    ):
        world.translate()


@pytest.mark.parametrize("version", SCHEMA_VERSIONS)
def test_the_event_about_a_refusal_is_a_valid_core_v1_event(version: str) -> None:
    ref = ObjectRef("TrafficSplit", "split.smi-spec.io/v1alpha4", "shop", "canary", "uid-1", "42")
    refusal = Refusal(ref, "InvalidPolicy", "x" * 5000)
    body = event_for(refusal, datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC), "mesh-identity-0", "18a2b3c4d5e6f708")
    kubernetes_validate.validate(body, version, strict=True)
    assert body["metadata"] == {"name": "canary.18a2b3c4d5e6f708", "namespace": "shop"}
    assert body["involvedObject"] == {
        "apiVersion": "split.smi-spec.io/v1alpha4",
        "kind": "TrafficSplit",
        "name": "canary",
        "namespace": "shop",
        "uid": "uid-1",
        "resourceVersion": "42",
    }
    assert (body["type"], body["reason"], body["count"]) == ("Warning", "InvalidPolicy", 1)
    assert body["firstTimestamp"] == body["lastTimestamp"] == "2026-01-02T03:04:05Z"
    assert len(body["message"]) == 1024 and body["message"].endswith("...")


def _allow(world: World, name: str, destination: str, *sources: str, tcp: bool = False) -> None:
    """A TrafficTarget letting ``sources`` call ``destination`` (any request; TCP: any connection)."""
    if tcp:
        world.add(TCP_ROUTES, "shop", "any", kind="TCPRoute", spec={})
        rule = {"kind": "TCPRoute", "name": "any"}
    else:
        matches = [{"name": "all", "pathRegex": ".*", "methods": ["*"]}]
        world.add(HTTP_ROUTE_GROUPS, "shop", "all", kind="HTTPRouteGroup", spec={"matches": matches})
        rule = {"kind": "HTTPRouteGroup", "name": "all", "matches": ["all"]}
    world.add(
        TRAFFIC_TARGETS,
        "shop",
        name,
        kind="TrafficTarget",
        spec={
            "destination": {"kind": "ServiceAccount", "name": destination},
            "sources": [{"kind": "ServiceAccount", "name": s} for s in sources],
            "rules": [rule],
        },
    )


def _upstreams(mesh: Any, service: str) -> list[tuple[str, int | None]]:
    return [(u.service, u.port) for u in mesh.services[service].upstreams]


def test_a_service_gets_upstreams_for_the_destinations_its_identity_may_call() -> None:
    world = World()
    world.workload("web", ip="10.0.0.1")
    world.workload("api", ip="10.0.0.2", port_spec={"name": "http", "port": 81, "targetPort": 8080})
    world.workload("db", ip="10.0.0.3", port_spec={"name": "tcp", "port": 5432, "targetPort": 5432})
    _allow(world, "web-to-api", "api", "web")
    _allow(world, "api-to-db", "db", "api", "web", tcp=True)
    result = world.translate()
    assert not result.refusals, result.refusals
    mesh = result.mesh
    assert _upstreams(mesh, "web.shop") == [("api.shop", 81), ("db.shop", 5432)]
    # web is named by no TrafficTarget, so it is open to the whole mesh (mesh_identity.mesh.policy): anyone may call
    assert _upstreams(mesh, "api.shop") == [("db.shop", 5432), ("web.shop", 80)]
    assert _upstreams(mesh, "db.shop") == [("web.shop", 80)]
    (web,) = mesh.services["web.shop"].instances
    listens = [str(u.address_for(web)) for u in mesh.services["web.shop"].upstreams]
    assert listens == ["10.0.0.1:81", "10.0.0.1:5432"]  # on the pod's own IP


def test_an_upstream_whose_port_the_pod_already_uses_is_left_out_with_a_note() -> None:
    world = World()
    world.workload("web", ip="10.0.0.1", port=8080)
    world.workload("api", ip="10.0.0.2", port_spec={"name": "http", "port": 8080, "targetPort": 9090})
    world.workload("auth", ip="10.0.0.3", port_spec={"name": "http", "port": 9000, "targetPort": 9090})
    world.workload("cart", ip="10.0.0.4", port_spec={"name": "http", "port": 9000, "targetPort": 9090})
    _allow(world, "web-calls", "api", "web")
    _allow(world, "web-calls-auth", "auth", "web")
    _allow(world, "web-calls-cart", "cart", "web")
    result = world.translate()
    assert _upstreams(result.mesh, "web.shop") == [("auth.shop", 9000)]
    assert sorted(result.notes) == [
        "web.shop: no upstream listener for api.shop: its port 8080 is the app's port on web.shop's sidecars",
        "web.shop: no upstream listener for cart.shop: its port 9000 is the upstream listener of auth.shop on "
        "web.shop's sidecars",
    ]


def test_a_split_root_is_an_upstream_of_who_may_call_a_backend_and_comes_first() -> None:
    world = World()
    world.workload("web", ip="10.0.0.1")
    world.workload("api-v1", account="api", ip="10.0.0.2", port_spec={"name": "http", "port": 80, "targetPort": 80})
    world.add(SERVICES, "shop", "api", spec={"selector": {"app": "api"}, "ports": [{"name": "http", "port": 80}]})
    world.add(
        TRAFFIC_SPLITS,
        "shop",
        "canary",
        kind="TrafficSplit",
        spec={"service": "api", "backends": [{"service": "api-v1", "weight": 100}]},
    )
    _allow(world, "web-calls", "api", "web")
    result = world.translate()
    assert not result.refusals, result.refusals
    assert _upstreams(result.mesh, "web.shop") == [("api.shop", 80)]  # the root took port 80
    assert result.notes == (
        "web.shop: no upstream listener for api-v1.shop: its port 80 is the upstream listener of api.shop on "
        "web.shop's sidecars",
    )


def test_a_pod_that_no_service_lists_is_a_client_only_sidecar_of_its_identity() -> None:
    world = World()
    world.workload("api", ip="10.0.0.2")
    world.add(SERVICE_ACCOUNTS, "shop", "batch")
    world.add(
        PODS,
        "shop",
        "batch-7",
        spec={"serviceAccountName": "batch", "nodeName": "node-b"},
        status={"phase": "Running", "podIP": "10.0.0.9"},
    )
    _allow(world, "batch-calls", "api", "batch")
    mesh = world.translate().mesh
    batch = mesh.services["batch.shop.serviceaccount"]
    assert batch.identity == SpiffeId.for_kubernetes(TD, "shop", "batch")
    (instance,) = batch.instances
    assert (instance.node, instance.app, instance.inbound, instance.host) == (
        "batch-7.shop",
        None,
        Address("10.0.0.9", INBOUND_PORT),
        "node-b",
    )
    assert batch.endpoints == ()
    assert _upstreams(mesh, "batch.shop.serviceaccount") == [("api.shop", 80)]
    assert mesh.node_identity("batch-7.shop") == batch.identity


@pytest.mark.parametrize("tcp", [False, True])
@pytest.mark.parametrize("listed", ["not ready", "not yet"])
def test_the_targets_to_a_starting_pod_hold_while_no_service_lists_it_ready(tcp: bool, listed: str) -> None:
    world = World()
    world.workload("web", ip="10.0.0.1")
    world.workload("api", ip="10.0.0.2", port_spec={"name": "tcp" if tcp else "http", "port": 80, "targetPort": 80})
    if listed == "not ready":
        world.objects[ENDPOINT_SLICES][("shop", "api-abcde")]["endpoints"][0]["conditions"] = {"ready": False}
    else:  # running, before the EndpointSlice controller has listed it
        del world.objects[ENDPOINT_SLICES][("shop", "api-abcde")]
    _allow(world, "web-calls", "api", "web", tcp=tcp)
    result = world.translate()
    assert not result.refusals, result.refusals  # the TrafficTarget to api holds while api's pod starts
    assert "api.shop" not in result.mesh.services  # no ready pod: nobody is sent to it yet
    assert [i.app for i in result.mesh.services["api.shop.serviceaccount"].instances] == [None]
    (allowed,) = result.mesh.policy.access_to(SpiffeId.for_kubernetes(TD, "shop", "api")) or ()
    assert allowed.name == "web-calls"
    assert _upstreams(result.mesh, "web.shop") == []  # nothing to call yet


def test_a_target_to_an_account_without_running_pods_waits_with_a_note_and_applies_once_one_runs() -> None:
    world = World()
    world.workload("web", ip="10.0.0.1")
    world.add(SERVICE_ACCOUNTS, "shop", "api")  # applied before its pods: kubectl sends objects in no set order
    _allow(world, "web-calls", "api", "web")
    result = world.translate()
    assert result.refusals == ()
    assert result.notes == (
        "TrafficTarget shop/web-calls: its destination spiffe://cluster.mesh/ns/shop/sa/api has no running pod in "
        "the mesh; it applies once one runs",
    )
    assert result.mesh.policy.targets == ()
    assert ("TrafficTarget", "shop", "web-calls") in result.accepted
    world.workload("api", ip="10.0.0.2")
    result = world.translate(dict(result.accepted))
    assert result.refusals == () and result.notes == ()
    (allowed,) = result.mesh.policy.access_to(SpiffeId.for_kubernetes(TD, "shop", "api")) or ()
    assert allowed.name == "web-calls"
    assert _upstreams(result.mesh, "web.shop") == [("api.shop", 80)]


def test_a_waiting_target_is_still_checked_as_far_as_it_can_be() -> None:
    world = World()
    world.workload("web", ip="10.0.0.1")
    _allow(world, "web-calls", "api", "web")
    spec = world.objects[TRAFFIC_TARGETS][("shop", "web-calls")]["spec"]
    spec["sources"].append({"kind": "SpiffeId", "id": "spiffe://partner.example/web"})
    result = world.translate()
    assert [r.message for r in result.refusals] == [
        "TrafficTarget shop/web-calls: spec.sources[1].id: spiffe://partner.example/web is not in trust domain "
        "cluster.mesh; its destination admits no caller until it is fixed"
    ]
    assert ("TrafficTarget", "shop", "web-calls") not in result.accepted


def test_a_service_of_another_protocol_than_its_accounts_other_services_is_refused() -> None:
    world = World()
    world.workload("api", ip="10.0.0.2")
    world.workload("api-grpc", account="api", ip="10.0.0.3", port_spec={"name": "tcp", "port": 90, "targetPort": 9090})
    world.workload("web", ip="10.0.0.1")
    _allow(world, "web-calls", "api", "web")
    result = world.translate()
    assert [r.message for r in result.refusals] == [
        "Service shop/api-grpc is tcp, but its pods' service account api already serves http (Service shop/api); an "
        "identity serves one protocol in the mesh (its TrafficTargets' rules are of that protocol): it is left out"
    ]
    assert "api-grpc.shop" not in result.mesh.services
    api = SpiffeId.for_kubernetes(TD, "shop", "api")
    (allowed,) = result.mesh.policy.access_to(api) or ()  # the TrafficTarget holds: api is not open to all
    assert allowed.name == "web-calls"
