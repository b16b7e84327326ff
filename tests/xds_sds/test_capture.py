"""The outbound capture listener (xds_sds.resources.capture): its protos, the model's ClusterIP from Kubernetes, and
a real Envoy's ``--mode validate`` of a bootstrap holding the listener and its clusters statically."""

from __future__ import annotations

import dataclasses
import http.server
import socket
import subprocess
import threading
from datetime import timedelta
from pathlib import Path
from types import MappingProxyType

import pytest
from envoy.config.bootstrap.v3 import bootstrap_pb2
from envoy.config.cluster.v3 import cluster_pb2
from envoy.config.core.v3 import base_pb2, config_source_pb2, grpc_service_pb2
from envoy.config.listener.v3 import listener_pb2
from envoy.config.route.v3 import route_pb2
from envoy.extensions.filters.listener.original_dst.v3 import original_dst_pb2
from envoy.extensions.filters.network.http_connection_manager.v3 import http_connection_manager_pb2 as hcm_pb2
from envoy.extensions.filters.network.tcp_proxy.v3 import tcp_proxy_pb2
from google.protobuf import any_pb2, duration_pb2, json_format
from google.protobuf.message import Message

from mesh_identity.config import Egress, SecretSource
from mesh_identity.mesh.model import Address, Instance, Mesh, Protocol, Service, Upstream
from mesh_identity.mesh.policy import Backend, Policy, TrafficSplit
from mesh_identity.registry.kube.resources import (
    HTTP_ROUTE_GROUPS,
    PODS,
    SERVICE_ACCOUNTS,
    SERVICES,
    TRAFFIC_TARGETS,
)
from mesh_identity.registry.kube.translate import Snapshot, translate
from tests.e2e.harness import ENVOY, Envoy, free_port
from tests.pki import TestCa
from tests.registry.kube.conftest import MESH, TD
from tests.registry.kube.test_kube_translate import World
from xds_sds.protocol.typeurls import CLUSTER, ENDPOINT, LISTENER, ROUTE
from xds_sds.resources import capture
from xds_sds.resources import clusters as clusters_module
from xds_sds.resources.capture import (
    BLACKHOLE,
    CAPTURE_LISTENER,
    PASSTHROUGH,
    CaptureDefault,
    capture_resources,
    capture_resources_of,
    cluster_ips,
    outbound_capture_listener,
    sidecar_resources,
)
from xds_sds.resources.packing import pack, socket_address
from xds_sds.resources.proxy import ProxyView, build_proxy, proxy_view

CA = TestCa.for_trust_domain("example.org")
POD = "10.99.0.2"


def _service(name: str, protocol: Protocol, n: int, ip: str | None, port: int = 80) -> Service:
    instance = Instance(f"{name}-1", Address(f"10.99.0.{n}", 8080), Address(f"10.99.0.{n}", 15003))
    cluster_ip = Address(ip, port) if ip is not None else None
    return Service(name, CA.id(f"/ns/shop/sa/{name}"), protocol, (instance,), (), cluster_ip)


def _mesh() -> Mesh:
    """frontend calls backend (HTTP), ledger (TCP), shop (an HTTP split 80/20), queue (a TCP split 50/50, on an
    IPv6 ClusterIP) and legacy (no ClusterIP)."""
    services = {
        "frontend": Service(
            "frontend", CA.id("/ns/shop/sa/frontend"), Protocol.HTTP,
            (Instance("frontend-1", Address(POD, 8080), Address(POD, 15003)),),
            tuple(Upstream(s, port=p) for s, p in
                  (("backend", 80), ("ledger", 5432), ("shop", 8000), ("queue", 9092), ("legacy", 9000))),
        ),
        "backend": _service("backend", Protocol.HTTP, 3, "10.96.0.10"),
        "ledger": _service("ledger", Protocol.TCP, 4, "10.96.0.11", 5432),
        "shop": Service("shop", CA.id("/ns/shop/sa/shop-v1"), Protocol.HTTP, (), (), Address("10.96.0.12", 8000)),
        "shop-v1": _service("shop-v1", Protocol.HTTP, 5, "10.96.0.13"),
        "shop-v2": _service("shop-v2", Protocol.HTTP, 6, "10.96.0.14"),
        "queue": Service("queue", CA.id("/ns/shop/sa/queue-a"), Protocol.TCP, (), (), Address("fd00::12", 9092)),
        "queue-a": _service("queue-a", Protocol.TCP, 7, None),
        "queue-b": _service("queue-b", Protocol.TCP, 8, None),
        "legacy": _service("legacy", Protocol.HTTP, 9, None),
    }  # fmt: skip
    splits = (
        TrafficSplit("shop", "shop", "shop", (Backend("shop-v1", 80), Backend("shop-v2", 20))),
        TrafficSplit("queue", "shop", "queue", (Backend("queue-a", 50), Backend("queue-b", 50))),
    )
    return Mesh(CA.trust_domain, MappingProxyType(services), Policy(splits=splits))


def _view() -> ProxyView:
    mesh = _mesh()
    found = mesh.instance("frontend-1")
    assert found is not None
    return proxy_view(mesh, *found)


def unpack(body: any_pb2.Any, cls: type[Message]) -> Message:
    message = cls()
    assert body.Unpack(message), body.type_url
    return message


def _listener(default: CaptureDefault = CaptureDefault.PASSTHROUGH) -> listener_pb2.Listener:
    mesh = _mesh()
    return outbound_capture_listener(_view(), cluster_ips(mesh), default)


def test_the_capture_listener_restores_the_original_destination_and_matches_each_cluster_ip_and_port() -> None:
    listener = _listener()
    assert listener.name == CAPTURE_LISTENER == "outbound-capture"
    assert (listener.address.socket_address.address, listener.address.socket_address.port_value) == ("0.0.0.0", 15001)
    [listener_filter] = listener.listener_filters
    assert listener_filter.name == "envoy.filters.listener.original_dst"
    assert unpack(listener_filter.typed_config, original_dst_pb2.OriginalDst) == original_dst_pb2.OriginalDst()
    matches = [
        (c.name, [(r.address_prefix, r.prefix_len.value) for r in c.filter_chain_match.prefix_ranges],
         c.filter_chain_match.destination_port.value)
        for c in listener.filter_chains
    ]  # fmt: skip
    assert matches == [  # legacy has no ClusterIP: no chain (its explicit listener is still there)
        ("outbound|backend", [("10.96.0.10", 32)], 80),
        ("outbound|ledger", [("10.96.0.11", 32)], 5432),
        ("outbound|queue", [("fd00::12", 128)], 9092),
        ("outbound|shop", [("10.96.0.12", 32)], 8000),
        ("blackhole", [], 15001),  # passthrough: a connection to the capture port itself would loop
    ]
    assert [c.name for c in _listener(CaptureDefault.DENY).filter_chains] == [m[0] for m in matches[:-1]]


def test_http_chains_use_the_outbound_route_and_tcp_chains_proxy_to_the_clusters_by_weight() -> None:
    chains = {c.name: c for c in _listener().filter_chains}
    for name in ("outbound|backend", "outbound|shop"):
        [hcm] = chains[name].filters
        manager = unpack(hcm.typed_config, hcm_pb2.HttpConnectionManager)
        assert isinstance(manager, hcm_pb2.HttpConnectionManager)
        assert manager.rds.route_config_name == name and manager.rds.config_source.HasField("ads")
        assert manager.forward_client_cert_details == hcm_pb2.HttpConnectionManager.SANITIZE  # the default: none
        assert [f.name for f in manager.http_filters] == ["envoy.filters.http.router"]
    ledger = unpack(chains["outbound|ledger"].filters[0].typed_config, tcp_proxy_pb2.TcpProxy)
    assert isinstance(ledger, tcp_proxy_pb2.TcpProxy)
    assert (ledger.cluster, ledger.max_connect_attempts.value) == ("outbound|ledger", 3)
    queue = unpack(chains["outbound|queue"].filters[0].typed_config, tcp_proxy_pb2.TcpProxy)
    assert isinstance(queue, tcp_proxy_pb2.TcpProxy)
    assert [(c.name, c.weight) for c in queue.weighted_clusters.clusters] == [
        ("outbound|queue-a", 50),
        ("outbound|queue-b", 50),
    ]


def test_the_routes_and_clusters_of_captured_traffic_are_build_proxys() -> None:
    out = capture_resources(_view(), cluster_ips(_mesh()), CaptureDefault.PASSTHROUGH)
    route = out[ROUTE]["outbound|shop"]
    assert isinstance(route, route_pb2.RouteConfiguration)
    [vhost] = route.virtual_hosts
    assert [(c.name, c.weight.value) for c in vhost.routes[0].route.weighted_clusters.clusters] == [
        ("outbound|shop-v1", 80),
        ("outbound|shop-v2", 20),
    ]
    for chain in out[LISTENER][CAPTURE_LISTENER].filter_chains:  # type: ignore[attr-defined]
        for item in chain.filters:
            if item.name == "envoy.filters.network.http_connection_manager":
                manager = unpack(item.typed_config, hcm_pb2.HttpConnectionManager)
                assert manager.rds.route_config_name in out[ROUTE]  # type: ignore[attr-defined]
            else:
                proxy = unpack(item.typed_config, tcp_proxy_pb2.TcpProxy)
                assert isinstance(proxy, tcp_proxy_pb2.TcpProxy)
                targets = [proxy.cluster] if proxy.cluster else [c.name for c in proxy.weighted_clusters.clusters]
                assert set(targets) <= set(out[CLUSTER])


@pytest.mark.parametrize("secrets", list(SecretSource))
@pytest.mark.parametrize("default", list(CaptureDefault))
def test_capture_resources_add_to_build_proxy_and_change_nothing_of_it(
    default: CaptureDefault, secrets: SecretSource
) -> None:
    view, age = _view(), timedelta(minutes=5)
    plain = build_proxy(view, max_connection_age=age, secrets=secrets)
    out = capture_resources(view, cluster_ips(_mesh()), default, max_connection_age=age, secrets=secrets)
    passing = default is CaptureDefault.PASSTHROUGH
    added = {LISTENER: {CAPTURE_LISTENER}, CLUSTER: {PASSTHROUGH, BLACKHOLE} if passing else {BLACKHOLE}}
    for kind in (LISTENER, ROUTE, CLUSTER, ENDPOINT):
        assert set(out[kind]) - set(plain[kind]) == added.get(kind, set())
        assert {k: v for k, v in out[kind].items() if k in plain[kind]} == plain[kind]
    assert capture_resources_of(_mesh(), "frontend-1", default, max_connection_age=age, secrets=secrets) == out


def _captured_mesh(egress: Egress) -> Mesh:
    mesh = _mesh()
    frontend = mesh.services["frontend"]
    instance = dataclasses.replace(frontend.instances[0], captured=True)
    services = {**mesh.services, "frontend": dataclasses.replace(frontend, instances=(instance,))}
    return dataclasses.replace(mesh, services=MappingProxyType(services), egress=egress)


@pytest.mark.parametrize("egress", list(Egress))
def test_a_captured_sidecar_is_served_the_capture_listener_with_the_mesh_egress_and_no_listener_per_upstream(
    egress: Egress,
) -> None:
    mesh = _captured_mesh(egress)
    found = mesh.instance("frontend-1")
    assert found is not None
    view = proxy_view(mesh, *found)
    assert view.egress is egress and [u.cluster_ip for u in view.upstreams][:2] == [
        Address("10.96.0.10", 80),
        Address("10.96.0.11", 5432),
    ]
    served = sidecar_resources(view)
    plain = build_proxy(view)
    upstream_listeners = {f"outbound|{u.service}" for u in view.upstreams}
    assert upstream_listeners <= set(plain[LISTENER])
    assert set(served[LISTENER]) == set(plain[LISTENER]) - upstream_listeners | {CAPTURE_LISTENER}
    assert served[LISTENER][CAPTURE_LISTENER] == outbound_capture_listener(view, cluster_ips(mesh), egress)
    assert (PASSTHROUGH in served[CLUSTER]) is (egress is Egress.PASSTHROUGH)
    for kind in (ROUTE, ENDPOINT):
        assert served[kind] == plain[kind]
    # a sidecar whose pod is not captured is served build_proxy's resources, whatever the mesh's egress
    uncaptured = proxy_view(_mesh(), *found[:1], dataclasses.replace(found[1], captured=False))
    assert uncaptured.egress is Egress.DENY
    assert sidecar_resources(uncaptured) == build_proxy(uncaptured)


def test_a_changed_cluster_ip_or_egress_changes_the_view_so_the_sidecar_is_rebuilt() -> None:
    mesh = _captured_mesh(Egress.DENY)
    found = mesh.instance("frontend-1")
    assert found is not None
    before = proxy_view(mesh, *found)
    backend = dataclasses.replace(mesh.services["backend"], cluster_ip=Address("10.96.0.99", 80))
    moved = dataclasses.replace(mesh, services=MappingProxyType({**mesh.services, "backend": backend}))
    assert proxy_view(moved, *found) != before
    assert proxy_view(dataclasses.replace(mesh, egress=Egress.PASSTHROUGH), *found) != before


def test_passthrough_sends_other_destinations_to_the_original_dst_cluster_and_deny_to_the_blackhole() -> None:
    listener = _listener(CaptureDefault.PASSTHROUGH)
    [proxy] = listener.default_filter_chain.filters
    config = unpack(proxy.typed_config, tcp_proxy_pb2.TcpProxy)
    assert isinstance(config, tcp_proxy_pb2.TcpProxy)
    assert config.cluster == PASSTHROUGH == "passthrough"
    cluster = capture.passthrough_cluster()
    assert (cluster.name, cluster.type, cluster.lb_policy) == (
        "passthrough",
        cluster_pb2.Cluster.ORIGINAL_DST,
        cluster_pb2.Cluster.CLUSTER_PROVIDED,
    )
    assert not cluster.HasField("transport_socket")  # not the mesh's: plaintext as the app sent it
    denying = _listener(CaptureDefault.DENY)
    [closing] = denying.default_filter_chain.filters  # to the blackhole: closed
    closed = unpack(closing.typed_config, tcp_proxy_pb2.TcpProxy)
    assert isinstance(closed, tcp_proxy_pb2.TcpProxy) and closed.cluster == BLACKHOLE
    assert list(denying.filter_chains) == list(listener.filter_chains)[:-1]  # no blackhole chain either
    blackhole = unpack(listener.filter_chains[-1].filters[0].typed_config, tcp_proxy_pb2.TcpProxy)
    assert isinstance(blackhole, tcp_proxy_pb2.TcpProxy) and blackhole.cluster == BLACKHOLE
    hole = capture.blackhole_cluster()
    assert (hole.name, hole.type, list(hole.load_assignment.endpoints)) == ("blackhole", cluster_pb2.Cluster.STATIC, [])
    out = capture_resources(_view(), cluster_ips(_mesh()), CaptureDefault.DENY)
    assert PASSTHROUGH not in out[CLUSTER] and BLACKHOLE in out[CLUSTER]


def test_bad_inputs_are_refused_with_the_field_named() -> None:
    view, ips = _view(), cluster_ips(_mesh())
    shared = {**ips, "ledger": ips["backend"]}
    with pytest.raises(ValueError, match=r"^upstreams\.ledger\.cluster_ip: 10\.96\.0\.10:80 is already the ClusterIP "
                       r"of backend$"):  # fmt: skip
        outbound_capture_listener(view, shared, CaptureDefault.DENY)
    ipv6 = {**ips, "shop": Address("fd00:0::12", 9092)}  # queue's, written another way
    with pytest.raises(ValueError, match=r"^upstreams\.shop\.cluster_ip: \[fd00:0::12\]:9092 is already the ClusterIP "
                       r"of queue$"):  # fmt: skip
        outbound_capture_listener(view, ipv6, CaptureDefault.DENY)
    with pytest.raises(ValueError, match=r"^upstreams\.backend\.cluster_ip: 'backend\.shop' is not an IP address$"):
        outbound_capture_listener(view, {"backend": Address("backend.shop", 80)}, CaptureDefault.DENY)
    with pytest.raises(ValueError, match=r"^upstreams\.backend\.cluster_ip: port 0 is out of range \(1-65535\)$"):
        outbound_capture_listener(view, {"backend": Address("10.96.0.10", 0)}, CaptureDefault.DENY)
    with pytest.raises(ValueError, match=r"^default: 'allow' is not one of deny, passthrough$"):
        outbound_capture_listener(view, ips, "allow")  # type: ignore[arg-type]
    with pytest.raises(KeyError, match="node 'nobody' is not a sidecar of the mesh"):
        capture_resources_of(_mesh(), "nobody", CaptureDefault.DENY)


@pytest.mark.parametrize(
    ("cluster_ip", "expected"),
    [
        ("10.96.0.10", Address("10.96.0.10", 80)),
        ("fd00::10", Address("fd00::10", 80)),
        ("None", None),  # headless
        (None, None),
        ("", None),
        ("10.96.0.300", None),
    ],
)
def test_the_kubernetes_registry_fills_the_cluster_ip_from_the_service(
    cluster_ip: str | None, expected: object
) -> None:
    world = World()
    world.workload("db")
    if cluster_ip is not None:
        world.objects[SERVICES][("shop", "db")]["spec"]["clusterIP"] = cluster_ip
    assert world.translate().mesh.services["db.shop"].cluster_ip == expected


@pytest.mark.parametrize(("annotation", "captured"), [("true", True), ("false", False), (None, False), ("yes", False)])
def test_the_kubernetes_registry_marks_a_pod_the_injector_injected_as_captured(
    annotation: str | None, captured: bool
) -> None:
    world = World()
    world.workload("db")
    world.add(SERVICE_ACCOUNTS, "shop", "batch")
    world.add(
        PODS, "shop", "batch-0",
        spec={"serviceAccountName": "batch"}, status={"phase": "Running", "podIP": "10.0.0.9"},
    )  # fmt: skip
    if annotation is not None:
        for name in ("db-0", "batch-0"):
            world.objects[PODS][("shop", name)]["metadata"]["annotations"] = {"mesh-identity.io/injected": annotation}
    mesh = world.translate().mesh
    assert [i.captured for i in mesh.services["db.shop"].instances] == [captured]
    assert [i.captured for i in mesh.services["batch.shop.serviceaccount"].instances] == [captured]  # client-only
    assert mesh.egress is Egress.DENY
    passing = translate(Snapshot(world.objects), MESH, TD, {}, Egress.PASSTHROUGH).mesh
    assert passing.egress is Egress.PASSTHROUGH


def test_a_captured_caller_reaches_every_cluster_ip_so_a_denied_call_gets_the_destinations_403() -> None:
    world = World()
    world.workload("db")
    world.objects[SERVICES][("shop", "db")]["spec"]["clusterIP"] = "10.96.0.40"
    for account, injected in (("batch", "true"), ("cron", "false")):
        world.add(SERVICE_ACCOUNTS, "shop", account)
        world.add(
            PODS, "shop", f"{account}-0", metadata={"name": f"{account}-0", "namespace": "shop",
                                                    "annotations": {"mesh-identity.io/injected": injected}},
            spec={"serviceAccountName": account}, status={"phase": "Running", "podIP": f"10.0.1.{len(account)}"},
        )  # fmt: skip
    target = {
        "apiVersion": "access.smi-spec.io/v1alpha3", "kind": "TrafficTarget",
        "metadata": {"name": "nobody-to-db", "namespace": "shop"},
        "spec": {"destination": {"kind": "ServiceAccount", "name": "db", "namespace": "shop"},
                 "sources": [{"kind": "ServiceAccount", "name": "other", "namespace": "shop"}],
                 "rules": [{"kind": "HTTPRouteGroup", "name": "all", "matches": ["all"]}]},
    }  # fmt: skip
    group = {
        "apiVersion": "specs.smi-spec.io/v1alpha4", "kind": "HTTPRouteGroup",
        "metadata": {"name": "all", "namespace": "shop"},
        "spec": {"matches": [{"name": "all", "pathRegex": "/.*", "methods": ["*"]}]},
    }  # fmt: skip
    world.add(TRAFFIC_TARGETS, "shop", "nobody-to-db", **{k: v for k, v in target.items() if k != "metadata"})
    world.add(HTTP_ROUTE_GROUPS, "shop", "all", **{k: v for k, v in group.items() if k != "metadata"})
    mesh = world.translate().mesh
    batch, cron = mesh.services["batch.shop.serviceaccount"], mesh.services["cron.shop.serviceaccount"]
    assert batch.upstreams == (Upstream("db.shop", port=80, capture_only=True),)  # denied, but routed to db
    assert cron.upstreams == ()  # not captured: nothing to route, no listener for a denied destination
    found = mesh.instance("batch-0.shop")
    assert found is not None
    view = proxy_view(mesh, *found)
    assert [u.service for u in view.upstreams] == ["db.shop"]
    chains = [c.name for c in sidecar_resources(view)[LISTENER][CAPTURE_LISTENER].filter_chains]  # type: ignore[attr-defined]
    assert chains == ["outbound|db.shop"]
    # an uncaptured instance of a service with capture-only upstreams ignores them (no listener, no cluster)
    plain = dataclasses.replace(found[1], captured=False)
    assert proxy_view(mesh, found[0], plain).upstreams == ()


# -- a real Envoy ------------------------------------------------------------------------------------------------


def _inline_routes(listener: listener_pb2.Listener, routes: dict[str, Message]) -> None:
    """Replace each chain's RDS with the route configuration it names (Envoy then checks its clusters exist)."""
    for chain in listener.filter_chains:
        for item in chain.filters:
            if item.name != "envoy.filters.network.http_connection_manager":
                continue
            manager = unpack(item.typed_config, hcm_pb2.HttpConnectionManager)
            assert isinstance(manager, hcm_pb2.HttpConnectionManager)
            route = routes[manager.rds.route_config_name]
            assert isinstance(route, route_pb2.RouteConfiguration)
            manager.ClearField("rds")
            manager.route_config.CopyFrom(route)
            item.typed_config.CopyFrom(pack(manager))


def _bootstrap(listeners: list[Message], clusters: list[Message]) -> bootstrap_pb2.Bootstrap:
    """The listeners and clusters statically; ADS (never reached in validate mode) for EDS, RDS and SDS."""
    api = config_source_pb2.ApiConfigSource
    xds = cluster_pb2.Cluster(
        name="xds", type=cluster_pb2.Cluster.STATIC, connect_timeout=duration_pb2.Duration(seconds=1)
    )
    xds.load_assignment.cluster_name = "xds"
    return bootstrap_pb2.Bootstrap(
        node=base_pb2.Node(id="frontend-1", cluster="frontend"),
        dynamic_resources=bootstrap_pb2.Bootstrap.DynamicResources(
            ads_config=api(
                api_type=api.GRPC,
                transport_api_version=config_source_pb2.ApiVersion.V3,
                grpc_services=[
                    grpc_service_pb2.GrpcService(envoy_grpc=grpc_service_pb2.GrpcService.EnvoyGrpc(cluster_name="xds"))
                ],
            )
        ),
        static_resources=bootstrap_pb2.Bootstrap.StaticResources(
            listeners=listeners,
            clusters=[*clusters, xds],
        ),
    )


def _validate(document: bootstrap_pb2.Bootstrap, path: Path) -> subprocess.CompletedProcess[str]:
    path.write_text(json_format.MessageToJson(document, indent=2))
    return subprocess.run(
        [str(ENVOY), "--mode", "validate", "-c", str(path), "--disable-hot-restart", "-l", "warning"],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip


def _resources(
    default: CaptureDefault, secrets: SecretSource = SecretSource.CONTROL_PLANE
) -> dict[str, dict[str, Message]]:
    return capture_resources(_view(), cluster_ips(_mesh()), default, secrets=secrets)


@pytest.mark.e2e
@pytest.mark.parametrize("inline", [False, True], ids=["rds", "inline-routes"])
@pytest.mark.parametrize("default", list(CaptureDefault))
def test_envoy_validates_the_capture_listener_and_its_clusters(
    tmp_path: Path, default: CaptureDefault, inline: bool
) -> None:
    out = _resources(default)
    listener = out[LISTENER][CAPTURE_LISTENER]
    assert isinstance(listener, listener_pb2.Listener)
    if inline:
        _inline_routes(listener, out[ROUTE])
    # every listener of the sidecar, the capture listener among them, and every cluster it routes to
    path = tmp_path / "bootstrap.json"
    result = _validate(_bootstrap(list(out[LISTENER].values()), list(out[CLUSTER].values())), path)
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"configuration '{path}' OK" in result.stdout


@pytest.mark.e2e
@pytest.mark.parametrize("egress", list(Egress))
def test_envoy_takes_the_capture_listener_of_a_sidecar_that_may_call_no_cluster_ip(
    tmp_path: Path, egress: Egress
) -> None:
    """A captured sidecar without an upstream that has a ClusterIP: its listener has no chain of its own (Envoy
    refuses a listener without any: the default chain is what makes it valid, for deny as for passthrough)."""
    mesh = _captured_mesh(egress)
    found = mesh.instance("frontend-1")
    assert found is not None
    lonely = dataclasses.replace(proxy_view(mesh, *found), upstreams=())
    out = sidecar_resources(lonely)
    listener = out[LISTENER][CAPTURE_LISTENER]
    assert isinstance(listener, listener_pb2.Listener)
    assert [c.name for c in listener.filter_chains] == ([] if egress is Egress.DENY else [BLACKHOLE])
    path = tmp_path / "bootstrap.json"
    result = _validate(_bootstrap(list(out[LISTENER].values()), list(out[CLUSTER].values())), path)
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.e2e
def test_envoy_rejects_a_broken_capture_listener(tmp_path: Path) -> None:
    """The check can fail: two chains on one ClusterIP and port, and a route to a cluster that does not exist."""
    out = _resources(CaptureDefault.PASSTHROUGH)
    clusters = list(out[CLUSTER].values())

    twice = out[LISTENER][CAPTURE_LISTENER]
    assert isinstance(twice, listener_pb2.Listener)
    twice.filter_chains.append(twice.filter_chains[0])
    twice.filter_chains[-1].name = "again"
    result = _validate(_bootstrap([twice], clusters), tmp_path / "twice.json")
    assert result.returncode != 0
    assert 'duplicate matcher is: {"prefix_ranges":[{"address_prefix":"10.96.0.10","prefix_len":32}],' in result.stderr

    missing = _resources(CaptureDefault.PASSTHROUGH)
    listener = missing[LISTENER][CAPTURE_LISTENER]
    assert isinstance(listener, listener_pb2.Listener)
    _inline_routes(listener, missing[ROUTE])
    without_v2 = [c for c in clusters if c.name != "outbound|shop-v2"]  # type: ignore[attr-defined]
    result = _validate(_bootstrap([listener], without_v2), tmp_path / "missing.json")
    assert result.returncode != 0
    assert "route: unknown weighted cluster 'outbound|shop-v2'" in result.stderr


class _Tagged(http.server.BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        body = b"backend"
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: object) -> None:
        pass


def _received(address: Address, send: bytes = b"") -> bytes:
    """Everything the listener sends back on a connection to ``address`` until it closes (b"": closed at once)."""
    with socket.create_connection((address.host, address.port), timeout=10) as conn:
        conn.sendall(send)
        data = b""
        while chunk := conn.recv(4096):
            data += chunk
            if len(data) > 65536:
                break
        return data


@pytest.mark.e2e
def test_a_real_envoy_routes_by_the_destination_address_and_closes_a_connection_to_its_own_port(
    tmp_path: Path,
) -> None:
    """Without iptables (see tests/podrunner for real capture) the original destination is the address dialled:
    the listener on 0.0.0.0 sees 127.0.0.2 and 127.0.0.3 as two ClusterIPs. The mesh clusters are replaced by
    plaintext local servers; a connection to the capture port on another address goes to the blackhole."""
    port = free_port("0.0.0.0")
    ips = {"ledger": Address("127.0.0.2", port), "backend": Address("127.0.0.3", port)}
    view = _view()
    listener = outbound_capture_listener(view, ips, CaptureDefault.PASSTHROUGH, listen=Address("0.0.0.0", port))
    out = capture_resources(view, ips, CaptureDefault.PASSTHROUGH)
    _inline_routes(listener, out[ROUTE])

    ledger = socket.create_server(("127.0.0.1", 0))
    web = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Tagged)
    threads = [threading.Thread(target=web.serve_forever, daemon=True)]

    def serve_ledger() -> None:
        while True:
            try:
                conn, _ = ledger.accept()
            except OSError:
                return
            with conn:
                conn.sendall(b"ledger")

    threads.append(threading.Thread(target=serve_ledger, daemon=True))
    for thread in threads:
        thread.start()

    def local(name: str, at: tuple[str, int]) -> cluster_pb2.Cluster:
        cluster = cluster_pb2.Cluster(
            name=name, type=cluster_pb2.Cluster.STATIC, connect_timeout=duration_pb2.Duration(seconds=2)
        )
        cluster.load_assignment.CopyFrom(clusters_module.load_assignment(name, [Address(*at)]))
        return cluster

    document = bootstrap_pb2.Bootstrap(
        node=base_pb2.Node(id="frontend-1", cluster="frontend"),
        admin=bootstrap_pb2.Admin(address=socket_address(Address("127.0.0.1", 0))),
        static_resources=bootstrap_pb2.Bootstrap.StaticResources(
            listeners=[listener],
            clusters=[
                local("outbound|ledger", ledger.getsockname()),
                local("outbound|backend", web.server_address[:2]),  # type: ignore[arg-type]
                capture.passthrough_cluster(),
                capture.blackhole_cluster(),
            ],
        ),
    )
    path = tmp_path / "bootstrap.json"
    path.write_text(json_format.MessageToJson(document, indent=2))
    envoy = Envoy(path, tmp_path, name="capture")
    try:
        envoy.start()
        assert _received(Address("127.0.0.2", port)) == b"ledger"
        reply = _received(Address("127.0.0.3", port), b"GET / HTTP/1.1\r\nHost: 127.0.0.3\r\nConnection: close\r\n\r\n")
        assert reply.startswith(b"HTTP/1.1 200 OK") and reply.endswith(b"backend"), reply
        assert _received(Address("127.0.0.4", port)) == b""  # not passed on to itself: closed
        stats = envoy.stats()
        assert stats["cluster.outbound|ledger.upstream_cx_total"] == 1
        assert stats["cluster.outbound|backend.upstream_rq_total"] == 1
        assert stats["cluster.passthrough.upstream_cx_total"] == 0
        assert stats["cluster.blackhole.upstream_cx_none_healthy"] == 1
    finally:
        envoy.stop()
        web.shutdown()
        web.server_close()
        ledger.close()
        for thread in threads:
            thread.join(timeout=10)
