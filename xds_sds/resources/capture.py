"""Envoy config for captured traffic: the outbound capture listener of a sidecar whose pod's traffic iptables
redirects (see :mod:`mesh_identity.inject`).

An unmodified app calls ``http://<a Service's ClusterIP>:<port>/``; the pod's ``nat`` rules redirect the
connection to Envoy's :data:`OUTBOUND_CAPTURE_PORT`. The listener :data:`CAPTURE_LISTENER` (on ``0.0.0.0``)
runs the listener filter :data:`ORIGINAL_DST` first: it restores the address the app dialled as the
connection's local address, so the filter chains match on it:

* one chain per upstream of the sidecar (:class:`~xds_sds.resources.proxy.UpstreamView`) whose service has a
  ``cluster_ip`` (:attr:`mesh_identity.mesh.model.Service.cluster_ip`), matched on that IP (``/32``, ``/128``)
  and port, to the same outbound clusters :func:`~xds_sds.resources.proxy.build_proxy` makes for it: HTTP
  through an HTTP connection manager on the route ``outbound|U`` (one cluster, or the weighted clusters of a
  TrafficSplit), TCP through ``tcp_proxy`` (weighted per connection); an upstream without a ClusterIP is
  reachable only at its explicit listener;
* any other destination, by :class:`CaptureDefault`: ``passthrough`` sends it on unchanged to where it was going
  (``tcp_proxy`` to the ``ORIGINAL_DST`` cluster :data:`PASSTHROUGH`, plaintext, outside the mesh); ``deny``
  sends it to the cluster :data:`BLACKHOLE` (no endpoints: the connection is closed, and the cluster's
  ``upstream_cx_none_healthy`` counts it). Envoy refuses a listener without any chain, so ``deny`` needs that
  default chain too: a sidecar that may call no service with a ClusterIP has it alone.
  With passthrough, a connection whose original destination is the capture port itself goes to the cluster
  :data:`BLACKHOLE` (as Istio's ``virtualOutbound`` does): passing it on would connect to this listener again, as
  Envoy's UID (not redirected), and so on without end.

:func:`capture_resources` is the resources :func:`~xds_sds.resources.proxy.build_proxy` makes for the view,
unchanged, plus the capture listener (and, with passthrough, the clusters :data:`PASSTHROUGH` and
:data:`BLACKHOLE`). :func:`sidecar_resources` is what the xDS server serves each sidecar: ``build_proxy``'s
resources for a sidecar whose traffic is not captured; for a captured one (an injected pod,
:attr:`~mesh_identity.mesh.model.Instance.captured`), the capture resources with the mesh's egress choice
(:attr:`~mesh_identity.mesh.model.Mesh.egress`), less the listener per upstream: its app reaches every upstream
at the Service's ClusterIP, and a listener of Envoy's on ``<pod IP>:<port>`` could take a port the app itself
binds.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Mapping
from datetime import timedelta

from envoy.config.cluster.v3 import cluster_pb2
from envoy.config.core.v3 import address_pb2
from envoy.config.listener.v3 import listener_components_pb2, listener_pb2
from envoy.extensions.filters.listener.original_dst.v3 import original_dst_pb2
from google.protobuf import wrappers_pb2

from mesh_identity.config import Egress, SecretSource
from mesh_identity.mesh.model import Address, Mesh, Protocol
from mesh_identity.mesh.ports import OUTBOUND_CAPTURE_PORT
from xds_sds.protocol.typeurls import CLUSTER, LISTENER
from xds_sds.resources import clusters, listeners, names
from xds_sds.resources.packing import pack, socket_address
from xds_sds.resources.proxy import ProxyView, Resources, UpstreamView, build_proxy, proxy_view

CAPTURE_ADDRESS = Address("0.0.0.0", OUTBOUND_CAPTURE_PORT)  # noqa: S104 - the pod's own network namespace
CAPTURE_LISTENER = "outbound-capture"
PASSTHROUGH = "passthrough"  # the ORIGINAL_DST cluster of non-mesh destinations
BLACKHOLE = "blackhole"  # a cluster without endpoints: its connections are closed
ORIGINAL_DST = "envoy.filters.listener.original_dst"


CaptureDefault = Egress
"""What the capture listener does with a destination that is no upstream's ClusterIP and port."""


def cluster_ips(mesh: Mesh) -> dict[str, Address]:
    """The ClusterIP and port of each service of ``mesh`` that has one, by service name."""
    return {name: s.cluster_ip for name, s in mesh.services.items() if s.cluster_ip is not None}


def passthrough_cluster() -> cluster_pb2.Cluster:
    """The cluster that connects to the destination the app dialled (``ORIGINAL_DST``, plaintext)."""
    return cluster_pb2.Cluster(
        name=PASSTHROUGH,
        type=cluster_pb2.Cluster.ORIGINAL_DST,
        lb_policy=cluster_pb2.Cluster.CLUSTER_PROVIDED,
        connect_timeout=clusters.CONNECT_TIMEOUT,
    )


def blackhole_cluster() -> cluster_pb2.Cluster:
    """A cluster without endpoints: a connection proxied to it is closed."""
    return cluster_pb2.Cluster(
        name=BLACKHOLE, type=cluster_pb2.Cluster.STATIC, connect_timeout=clusters.CONNECT_TIMEOUT
    )


def _prefix(address: Address, path: str) -> address_pb2.CidrRange:
    try:
        ip = ipaddress.ip_address(address.host)
    except ValueError:
        raise ValueError(f"{path}: {address.host!r} is not an IP address") from None
    if not 1 <= address.port <= 65535:
        raise ValueError(f"{path}: port {address.port} is out of range (1-65535)")
    return address_pb2.CidrRange(address_prefix=str(ip), prefix_len=wrappers_pb2.UInt32Value(value=ip.max_prefixlen))


def _front(upstream: UpstreamView) -> list[listener_components_pb2.Filter]:
    """The filters of ``upstream``'s chain: what build_proxy puts on its explicit listener."""
    name = names.outbound(upstream.service)
    weights = [(names.outbound(b.service), b.weight) for b in upstream.backends if b.weight > 0]
    if not weights:
        raise ValueError(f"upstreams.{upstream.service}: no backend has a weight above 0")
    if upstream.protocol is Protocol.HTTP:
        return [listeners.http_manager(name, name, inbound=False)]  # the route outbound|U holds the split
    if len(weights) == 1:
        return [listeners.tcp_proxy(name, weights[0][0], outbound=True)]
    return [listeners.tcp_proxy_weighted(name, weights)]


def outbound_capture_listener(
    view: ProxyView,
    ips: Mapping[str, Address],
    default: CaptureDefault,
    listen: Address = CAPTURE_ADDRESS,
) -> listener_pb2.Listener:
    """The capture listener of ``view``'s sidecar (see the module docstring); ``ips``: the ClusterIP and port of
    the services that have one (:func:`cluster_ips`). ValueError naming the upstream when two upstreams share
    a ClusterIP and port, or an address is not an IP."""
    if not isinstance(default, CaptureDefault):
        raise ValueError(f"default: {default!r} is not one of {', '.join(CaptureDefault)}")
    chains = []
    seen: dict[tuple[str, int], str] = {}
    for upstream in sorted(view.upstreams, key=lambda u: u.service):
        address = ips.get(upstream.service)
        if address is None:
            continue
        path = f"upstreams.{upstream.service}.cluster_ip"
        prefix = _prefix(address, path)
        key = (prefix.address_prefix, address.port)  # normalised: fd00:0::1 is fd00::1
        if key in seen:
            raise ValueError(f"{path}: {address} is already the ClusterIP of {seen[key]}")
        seen[key] = upstream.service
        match = listener_components_pb2.FilterChainMatch(
            prefix_ranges=[prefix], destination_port=wrappers_pb2.UInt32Value(value=address.port)
        )
        chains.append(
            listener_components_pb2.FilterChain(
                name=names.outbound(upstream.service), filter_chain_match=match, filters=_front(upstream)
            )
        )
    listener = listener_pb2.Listener(
        name=CAPTURE_LISTENER,
        address=socket_address(listen),
        listener_filters=[
            listener_components_pb2.ListenerFilter(name=ORIGINAL_DST, typed_config=pack(original_dst_pb2.OriginalDst()))
        ],
        filter_chains=chains,
    )
    if default is CaptureDefault.PASSTHROUGH:
        listener.filter_chains.append(
            listener_components_pb2.FilterChain(
                name=BLACKHOLE,
                filter_chain_match=listener_components_pb2.FilterChainMatch(
                    destination_port=wrappers_pb2.UInt32Value(value=listen.port)
                ),
                filters=[listeners.tcp_proxy(BLACKHOLE, BLACKHOLE)],
            )
        )
        listener.default_filter_chain.CopyFrom(
            listener_components_pb2.FilterChain(
                name=PASSTHROUGH, filters=[listeners.tcp_proxy(PASSTHROUGH, PASSTHROUGH)]
            )
        )
    else:
        listener.default_filter_chain.CopyFrom(
            listener_components_pb2.FilterChain(name=BLACKHOLE, filters=[listeners.tcp_proxy(BLACKHOLE, BLACKHOLE)])
        )
    return listener


def capture_resources(
    view: ProxyView,
    ips: Mapping[str, Address],
    default: CaptureDefault,
    *,
    max_connection_age: timedelta | None = None,
    secrets: SecretSource = SecretSource.CONTROL_PLANE,
) -> Resources:
    """What :func:`~xds_sds.resources.proxy.build_proxy` makes for ``view`` (the same arguments), plus the capture
    listener, the cluster :data:`BLACKHOLE` and, for ``passthrough``, :data:`PASSTHROUGH`."""
    out = build_proxy(view, max_connection_age=max_connection_age, secrets=secrets)
    out[LISTENER][CAPTURE_LISTENER] = outbound_capture_listener(view, ips, default)
    out[CLUSTER][BLACKHOLE] = blackhole_cluster()
    if default is CaptureDefault.PASSTHROUGH:
        out[CLUSTER][PASSTHROUGH] = passthrough_cluster()
    return out


def capture_resources_of(
    mesh: Mesh,
    node: str,
    default: CaptureDefault,
    *,
    max_connection_age: timedelta | None = None,
    secrets: SecretSource = SecretSource.CONTROL_PLANE,
) -> Resources:
    """:func:`capture_resources` of the sidecar ``node`` of ``mesh``; KeyError when it is none."""
    found = mesh.instance(node)
    if found is None:
        raise KeyError(f"node {node!r} is not a sidecar of the mesh")
    view = proxy_view(mesh, *found)
    return capture_resources(view, cluster_ips(mesh), default, max_connection_age=max_connection_age, secrets=secrets)


def view_cluster_ips(view: ProxyView) -> dict[str, Address]:
    """The ClusterIP and port of each upstream of ``view`` that has one, by service name."""
    return {u.service: u.cluster_ip for u in view.upstreams if u.cluster_ip is not None}


def sidecar_resources(
    view: ProxyView,
    *,
    max_connection_age: timedelta | None = None,
    secrets: SecretSource = SecretSource.CONTROL_PLANE,
) -> Resources:
    """What the xDS server serves the sidecar of ``view`` (see the module docstring)."""
    if not view.instance.captured:
        return build_proxy(view, max_connection_age=max_connection_age, secrets=secrets)
    out = capture_resources(
        view, view_cluster_ips(view), view.egress, max_connection_age=max_connection_age, secrets=secrets
    )
    for upstream in view.upstreams:
        out[LISTENER].pop(names.outbound(upstream.service), None)
    return out
