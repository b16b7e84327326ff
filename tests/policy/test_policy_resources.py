"""What the sidecars get from the policies: RBAC on inbound ports, weighted clusters on callers (no Envoy)."""

from __future__ import annotations

from typing import Any, TypeVar

import yaml
from envoy.config.cluster.v3 import cluster_pb2
from envoy.config.listener.v3 import listener_pb2
from envoy.config.rbac.v3 import rbac_pb2
from envoy.config.route.v3 import route_pb2
from envoy.extensions.filters.http.rbac.v3 import rbac_pb2 as http_rbac_pb2
from envoy.extensions.filters.network.http_connection_manager.v3 import http_connection_manager_pb2 as hcm_pb2
from envoy.extensions.filters.network.rbac.v3 import rbac_pb2 as network_rbac_pb2
from envoy.extensions.filters.network.tcp_proxy.v3 import tcp_proxy_pb2
from envoy.extensions.transport_sockets.tls.v3 import tls_pb2
from google.protobuf import any_pb2
from google.protobuf.json_format import MessageToDict
from google.protobuf.message import Message

from mesh_identity.mesh.model import Mesh, parse_mesh
from tests.policy.test_policy_model import MESH, TD
from xds_sds.protocol.typeurls import CLUSTER, ENDPOINT, LISTENER, ROUTE
from xds_sds.resources.proxy import proxy_resources

FRONTEND = "spiffe://example.org/ns/shop/sa/frontend"
M = TypeVar("M", bound=Message)


def mesh(**changes: Any) -> Mesh:
    data = yaml.safe_load(MESH)
    data.update(changes)
    return parse_mesh(data, TD)


def unpack(body: any_pb2.Any, cls: type[M]) -> M:
    message = cls()
    assert body.Unpack(message), body.type_url
    return message


def inbound_http_rbac(m: Mesh, node: str, service: str) -> rbac_pb2.RBAC:
    """The inbound HTTP policy of a sidecar: the per-route override on its inbound virtual host."""
    route = proxy_resources(m, node)[ROUTE][f"inbound|{service}"]
    assert isinstance(route, route_pb2.RouteConfiguration)
    [host] = route.virtual_hosts
    per_route = unpack(host.typed_per_filter_config["envoy.filters.http.rbac"], http_rbac_pb2.RBACPerRoute)
    return per_route.rbac.rules


def as_dict(message: Message) -> dict[str, Any]:
    return MessageToDict(message, preserving_proto_field_name=True)


def test_the_inbound_http_filter_denies_unless_the_route_allows() -> None:
    listener = proxy_resources(mesh(), "backend-v1-1")[LISTENER]["inbound|backend-v1"]
    assert isinstance(listener, listener_pb2.Listener)
    manager = unpack(listener.filter_chains[0].filters[0].typed_config, hcm_pb2.HttpConnectionManager)
    assert [f.name for f in manager.http_filters] == ["envoy.filters.http.rbac", "envoy.filters.http.router"]
    default = unpack(manager.http_filters[0].typed_config, http_rbac_pb2.RBAC)
    assert as_dict(default) == {"rules": {}}  # ALLOW (the zero value) with no policy: deny everything
    assert manager.normalize_path.value is True
    assert manager.merge_slashes is True


def test_a_destination_admits_its_sources_by_certificate_on_the_selected_matches() -> None:
    rules = inbound_http_rbac(mesh(), "backend-v1-1", "backend-v1")
    assert rules.action == rbac_pb2.RBAC.ALLOW
    assert as_dict(rules)["policies"] == {
        "shop/frontend-reads": {
            "permissions": [
                {
                    "and_rules": {
                        "rules": [
                            {"url_path": {"path": {"safe_regex": {"regex": "/items(/.*)?"}}}},
                            {
                                "or_rules": {
                                    "rules": [
                                        {"header": {"name": ":method", "string_match": {"exact": "GET"}}},
                                        {"header": {"name": ":method", "string_match": {"exact": "HEAD"}}},
                                    ]
                                }
                            },
                        ]
                    }
                },
                {
                    "and_rules": {
                        "rules": [
                            {"url_path": {"path": {"safe_regex": {"regex": "/admin/.*"}}}},
                            {"header": {"name": "x-role", "string_match": {"safe_regex": {"regex": "ops|admin"}}}},
                        ]
                    }
                },
            ],
            "principals": [
                {"authenticated": {"principal_name": {"exact": FRONTEND}}},
                {"authenticated": {"principal_name": {"exact": "spiffe://example.org/batch"}}},
            ],
        }
    }


def test_principals_never_come_from_headers() -> None:
    for node, service in (("backend-v1-1", "backend-v1"), ("frontend-1", "frontend")):
        for policy in inbound_http_rbac(mesh(), node, service).policies.values():
            assert {p.WhichOneof("identifier") for p in policy.principals} == {"authenticated"}


def test_a_destination_no_target_names_is_open_to_the_mesh_only() -> None:
    for m in (mesh(), mesh(permissive=True)):
        rules = inbound_http_rbac(m, "frontend-1", "frontend")
        assert as_dict(rules)["policies"] == {
            "mesh": {
                "permissions": [{"any": True}],
                "principals": [{"authenticated": {"principal_name": {"prefix": "spiffe://example.org/"}}}],
            }
        }
    # permissive: even backend, which a TrafficTarget names, is open
    assert list(inbound_http_rbac(mesh(permissive=True), "backend-v1-1", "backend-v1").policies) == ["mesh"]


def _network_rbac(m: Mesh) -> network_rbac_pb2.RBAC:
    listener = proxy_resources(m, "ledger-1")[LISTENER]["inbound|ledger"]
    assert isinstance(listener, listener_pb2.Listener)
    filters = listener.filter_chains[0].filters
    assert [f.name for f in filters] == ["envoy.filters.network.rbac", "envoy.filters.network.tcp_proxy"]
    return unpack(filters[0].typed_config, network_rbac_pb2.RBAC)


def test_a_tcp_destination_has_network_rbac_on_the_tcp_route_ports() -> None:
    config = _network_rbac(mesh())
    assert config.stat_prefix == "inbound|ledger"
    assert as_dict(config.rules)["policies"] == {
        "shop/frontend-sql": {
            "permissions": [{"any": True}],
            "principals": [{"authenticated": {"principal_name": {"exact": FRONTEND}}}],
        }
    }
    # a TCPRoute for other ports grants nothing on this instance: no policy, so every connection is denied
    data = yaml.safe_load(MESH)
    data["policies"][1]["spec"]["matches"]["ports"] = [5433]
    assert as_dict(_network_rbac(parse_mesh(data, TD)).rules) == {}


def test_callers_of_a_split_root_get_weighted_clusters_to_the_backends() -> None:
    out = proxy_resources(mesh(), "frontend-1")
    route = out[ROUTE]["outbound|backend"]
    assert isinstance(route, route_pb2.RouteConfiguration)
    action = route.virtual_hosts[0].routes[0].route
    assert [(c.name, c.weight.value) for c in action.weighted_clusters.clusters] == [
        ("outbound|backend-v1", 90),
        ("outbound|backend-v2", 10),
    ]
    assert sorted(out[CLUSTER]) == [
        "inbound|frontend|app",
        "outbound|backend-v1",
        "outbound|backend-v2",
        "outbound|ledger",
    ]
    assert sorted(out[ENDPOINT]) == ["outbound|backend-v1", "outbound|backend-v2", "outbound|ledger"]
    cluster = out[CLUSTER]["outbound|backend-v2"]
    assert isinstance(cluster, cluster_pb2.Cluster)
    context = unpack(cluster.transport_socket.typed_config, tls_pb2.UpstreamTlsContext)
    [peer] = (
        context.common_tls_context.combined_validation_context.default_validation_context.match_typed_subject_alt_names
    )
    assert peer.matcher.exact == "spiffe://example.org/ns/shop/sa/backend"


def test_a_zero_weight_backend_keeps_its_cluster_but_gets_no_traffic() -> None:
    data = yaml.safe_load(MESH)
    data["policies"][4]["spec"]["backends"] = [
        {"service": "backend-v1", "weight": 100},
        {"service": "backend-v2", "weight": 0},
    ]
    out = proxy_resources(parse_mesh(data, TD), "frontend-1")
    route = out[ROUTE]["outbound|backend"]
    assert isinstance(route, route_pb2.RouteConfiguration)
    assert route.virtual_hosts[0].routes[0].route.cluster == "outbound|backend-v1"
    assert "outbound|backend-v2" in out[CLUSTER]  # warm, for when the weights shift back


def test_a_tcp_split_picks_a_backend_per_connection() -> None:
    data = yaml.safe_load(MESH)
    services = data["services"]
    services["ledger-v2"] = {
        "identity": {"namespace": "shop", "service_account": "ledger"},
        "protocol": "tcp",
        "instances": [{"node": "ledger-v2-1", "app": "127.0.0.1:5433", "inbound": "127.0.0.1:15084"}],
    }
    data["policies"].append(
        {
            "kind": "TrafficSplit",
            "metadata": {"name": "ledger-move"},
            "spec": {
                "service": "ledger",
                "backends": [{"service": "ledger", "weight": 75}, {"service": "ledger-v2", "weight": 25}],
            },
        }
    )
    listener = proxy_resources(parse_mesh(data, TD), "frontend-1")[LISTENER]["outbound|ledger"]
    assert isinstance(listener, listener_pb2.Listener)
    proxy = unpack(listener.filter_chains[0].filters[0].typed_config, tcp_proxy_pb2.TcpProxy)
    assert [(c.name, c.weight) for c in proxy.weighted_clusters.clusters] == [
        ("outbound|ledger", 75),
        ("outbound|ledger-v2", 25),
    ]
