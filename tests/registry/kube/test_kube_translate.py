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
from mesh_identity.registry.kube.events import event_for
from mesh_identity.registry.kube.objects import ObjectRef, Refusal
from mesh_identity.registry.kube.resources import (
    ENDPOINT_SLICES,
    NAMESPACES,
    PODS,
    SERVICE_ACCOUNTS,
    SERVICES,
    TRAFFIC_SPLITS,
    TRAFFIC_TARGETS,
    Resource,
)
from mesh_identity.registry.kube.translate import INBOUND_PORT, Snapshot, Translation, translate
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
