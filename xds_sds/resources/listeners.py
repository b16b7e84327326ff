"""Listeners: a sidecar's inbound mTLS port, and its plaintext outbound ports towards upstreams.

Inbound HTTP sets ``x-forwarded-client-cert`` from the verified client certificate (its URI SAN), replacing
any such header the client sent, so the app learns its caller's SPIFFE ID. Extra filters (RBAC, for access
control) slot in before the router (HTTP) or before the proxy filter (TCP). :func:`observe` gives a built
filter its labelled stat prefix and access logs (see :mod:`xds_sds.resources.stats`).
"""

from __future__ import annotations

from collections.abc import Sequence

from envoy.config.accesslog.v3 import accesslog_pb2
from envoy.config.core.v3 import base_pb2
from envoy.config.listener.v3 import listener_components_pb2, listener_pb2
from envoy.extensions.filters.http.router.v3 import router_pb2
from envoy.extensions.filters.network.http_connection_manager.v3 import http_connection_manager_pb2 as hcm_pb2
from envoy.extensions.filters.network.tcp_proxy.v3 import tcp_proxy_pb2
from google.protobuf import wrappers_pb2

from mesh_identity.mesh.model import Address
from xds_sds.resources.packing import ads, pack, socket_address

HCM = "envoy.filters.network.http_connection_manager"
TCP_PROXY = "envoy.filters.network.tcp_proxy"
ROUTER = "envoy.filters.http.router"
Hcm = hcm_pb2.HttpConnectionManager


def http_manager(
    stat_prefix: str,
    route_config: str,
    *,
    inbound: bool,
    http_filters: Sequence[hcm_pb2.HttpFilter] = (),
) -> listener_components_pb2.Filter:
    """An HTTP connection manager taking its routes over RDS; ``http_filters`` run before the router.

    Inbound, paths are normalised (RFC 3986, merged slashes) before any filter sees them, so that a path regex
    of an access rule cannot be sidestepped with ``/a/../b`` or ``//b``.
    """
    manager = Hcm(
        stat_prefix=stat_prefix,
        rds=hcm_pb2.Rds(config_source=ads(), route_config_name=route_config),
        http_filters=[*http_filters, hcm_pb2.HttpFilter(name=ROUTER, typed_config=pack(router_pb2.Router()))],
    )
    if inbound:
        manager.forward_client_cert_details = Hcm.SANITIZE_SET
        manager.set_current_client_cert_details.CopyFrom(Hcm.SetCurrentClientCertDetails(uri=True))
        manager.normalize_path.CopyFrom(wrappers_pb2.BoolValue(value=True))
        manager.merge_slashes = True
    return listener_components_pb2.Filter(name=HCM, typed_config=pack(manager))


CONNECT_ATTEMPTS = 3  # an outbound TCP connection tries this many endpoints before it gives up


def tcp_proxy(stat_prefix: str, cluster: str, *, outbound: bool = False) -> listener_components_pb2.Filter:
    """``tcp_proxy`` to ``cluster``; ``outbound``: a failed connect tries another endpoint (see
    :data:`CONNECT_ATTEMPTS`, and :mod:`xds_sds.resources.routes` for why)."""
    config = tcp_proxy_pb2.TcpProxy(stat_prefix=stat_prefix, cluster=cluster)
    if outbound:
        config.max_connect_attempts.value = CONNECT_ATTEMPTS
    return listener_components_pb2.Filter(name=TCP_PROXY, typed_config=pack(config))


def tcp_proxy_weighted(stat_prefix: str, weights: Sequence[tuple[str, int]]) -> listener_components_pb2.Filter:
    """TCP to several clusters, each new connection to one of them by weight (``[(cluster, weight), ...]``)."""
    split = tcp_proxy_pb2.TcpProxy.WeightedCluster(
        clusters=[
            tcp_proxy_pb2.TcpProxy.WeightedCluster.ClusterWeight(name=cluster, weight=weight)
            for cluster, weight in weights
        ]
    )
    config = tcp_proxy_pb2.TcpProxy(stat_prefix=stat_prefix, weighted_clusters=split)
    config.max_connect_attempts.value = CONNECT_ATTEMPTS  # only outbound traffic is split
    return listener_components_pb2.Filter(name=TCP_PROXY, typed_config=pack(config))


def listener(
    name: str,
    address: Address,
    filters: Sequence[listener_components_pb2.Filter],
    transport_socket: base_pb2.TransportSocket | None = None,
) -> listener_pb2.Listener:
    chain = listener_components_pb2.FilterChain(filters=list(filters))
    if transport_socket is not None:
        chain.transport_socket.CopyFrom(transport_socket)
    return listener_pb2.Listener(name=name, address=socket_address(address), filter_chains=[chain])


def observe(
    item: listener_components_pb2.Filter,
    *,
    stat_prefix: str | None = None,
    access_log: Sequence[accesslog_pb2.AccessLog] = (),
) -> None:
    """Set the stat prefix (when given) and add access logs to an HTTP connection manager or ``tcp_proxy``
    filter, in place; other filters (RBAC) are left as they are."""
    config: hcm_pb2.HttpConnectionManager | tcp_proxy_pb2.TcpProxy
    if item.name == HCM:
        config = Hcm()
    elif item.name == TCP_PROXY:
        config = tcp_proxy_pb2.TcpProxy()
    else:
        return
    if not item.typed_config.Unpack(config):
        raise ValueError(f"the {item.name} filter holds a {item.typed_config.type_url}")
    if stat_prefix is not None:
        config.stat_prefix = stat_prefix
    config.access_log.extend(access_log)
    item.typed_config.CopyFrom(pack(config))
