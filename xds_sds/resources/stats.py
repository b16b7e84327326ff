"""What a sidecar tells about the traffic it carries: labelled stats, its Prometheus endpoint, JSON access logs.

An instance of the mesh file with ``stats: IP:PORT`` gets three things; ``access_log: stdout | /path`` adds the
fourth:

* **Stat names that say who talks to whom.** Each listener's connection manager (HTTP) or ``tcp_proxy`` (TCP)
  and each cluster gets a stat prefix (clusters: ``alt_stat_name``) that encodes the direction, the protocol,
  the route and the source and destination service and SPIFFE ID (:func:`stat_prefix`). On the caller's side
  (``outbound``) both ends are known: the sidecar's own service and the upstream (per backend in the clusters
  ``outbound|B``, so each side of a traffic split has its own series). On the callee's side (``inbound``) the
  destination is the sidecar's own service; the source is per request and shows in the access log.
* **Envoy's tag extraction** (:func:`stats_config`, in the bootstrap) turns those names back into labels:
  ``direction``, ``protocol``, ``route``, ``source_service``, ``source_identity``, ``destination_service``,
  ``destination_identity``, next to Envoy's own (``envoy_response_code_class``...). Envoy rewrites ``:`` in a
  stat name to ``_``, so an identity travels without its ``spiffe://`` scheme (:func:`identity_label`); the
  example Prometheus config puts it back (``metric_relabel_configs``) and :func:`identity_of_label` does it for
  readers of the raw text. Request latency histograms get buckets fine enough for a mesh on one host.
* **A Prometheus endpoint on a port of its own**, not Envoy's admin port: a listener (:func:`stats_listener`)
  that answers ``GET /stats/prometheus`` from the admin through a static cluster and 404 to everything else
  (the admin's other pages, and its POST handlers, are never reachable through it). It is in the bootstrap,
  not delivered over xDS: only the bootstrap knows the admin's address, and the stats stay readable while the
  control plane cannot be reached, when they matter most. Plain HTTP: bind it where only Prometheus reaches.
  Stats are flushed when scraped (``stats_flush_on_admin``), so every scrape sees current histograms.
* **JSON access logs** (:func:`access_logs`): one line per request (HTTP) or connection (TCP) with the
  direction, route, both ends, the peer's SPIFFE ID as the TLS handshake verified it
  (``%DOWNSTREAM_PEER_URI_SAN%`` inbound, ``%UPSTREAM_PEER_URI_SAN%`` outbound), method, path without its
  query, response code and flags, duration and bytes; to Envoy's standard output or appended to a file. The
  file's directory must exist on the sidecar's host: Envoy rejects listeners whose log it cannot open (a NACK
  with its reason, which the server logs and ``mesh-identity ca status`` lists; the last good config stays).

Sidecars without ``stats`` and ``access_log`` get exactly the config they had before (names and all).
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import TYPE_CHECKING

from envoy.config.accesslog.v3 import accesslog_pb2
from envoy.config.bootstrap.v3 import bootstrap_pb2
from envoy.config.cluster.v3 import cluster_pb2
from envoy.config.core.v3 import base_pb2, extension_pb2, substitution_format_string_pb2
from envoy.config.listener.v3 import listener_components_pb2, listener_pb2
from envoy.config.metrics.v3 import stats_pb2
from envoy.config.route.v3 import route_components_pb2, route_pb2
from envoy.extensions.access_loggers.file.v3 import file_pb2
from envoy.extensions.access_loggers.stream.v3 import stream_pb2
from envoy.extensions.filters.http.router.v3 import router_pb2
from envoy.extensions.filters.network.http_connection_manager.v3 import http_connection_manager_pb2 as hcm_pb2
from envoy.extensions.formatter.req_without_query.v3 import req_without_query_pb2
from envoy.type.matcher.v3 import string_pb2
from google.protobuf import struct_pb2, wrappers_pb2

from mesh_identity.mesh.model import Address, Protocol
from mesh_identity.spiffe import SpiffeId
from xds_sds.protocol.typeurls import CLUSTER, LISTENER
from xds_sds.resources import clusters, listeners, names
from xds_sds.resources.packing import pack, socket_address

if TYPE_CHECKING:
    from xds_sds.resources.proxy import ProxyView, Resources

STATS_PATH = "/stats/prometheus"
STATS_LISTENER = "mesh-identity-stats"
ADMIN_CLUSTER = "mesh-identity-admin"
STDOUT = "stdout"
SCHEME = "spiffe://"
LABELS = (
    "direction", "protocol", "route", "source_service", "source_identity", "destination_service", "destination_identity"
)  # fmt: skip
LATENCY_BUCKETS_MS = (0.5, 1, 2, 3, 5, 7.5, 10, 15, 25, 50, 75, 100, 250, 500, 1000, 2500, 5000, 10000, 30000, 60000)

# A stat prefix is "mi;d=<direction>;p=<protocol>[;r=<route>][;ss=<service>;si=<identity>];ds=<service>;di=<identity>;"
# and Envoy appends "." to it. Each field is one tag; together they remove the whole prefix from the stat name,
# the last one with the trailing ";.", so `http.<prefix>.downstream_rq_total` becomes `http.downstream_rq_total`.
_FIELDS = (
    ("direction", "(mi;d=([a-z]+))"),
    ("protocol", "(;p=([a-z]+))"),
    ("route", "(;r=([^;]*))"),
    ("source_service", "(;ss=([^;]*))"),
    ("source_identity", "(;si=([^;]*))"),
    ("destination_service", "(;ds=([^;]*))"),
    ("destination_identity", r"(;di=([^;]*);\.)"),
)
# Envoy's default tags that assume a prefix without dots (an identity has them) are replaced by versions that
# leave our prefixes alone (they stop at ";"); the others keep Envoy's own regex (named, no regex given).
_ENVOY_TAGS = (
    ("envoy.cluster_name", r"^cluster\.(([^;]+?)\.)"),
    ("envoy.http_conn_manager_prefix", r"^http\.(([^;]*?)\.)"),
    ("envoy.http_conn_manager_prefix", r"^listener(?=\.).*?\.http\.(([^;]*?)\.)"),
    ("envoy.tcp_prefix", r"^tcp\.(([^;]*?)\.)\w+?$"),
    ("envoy.listener_address", ""),
    ("envoy.response_code", ""),
    ("envoy.response_code_class", ""),
    ("envoy.worker_id", ""),
    ("envoy.ssl_cipher", ""),
    ("envoy.ssl_curve", ""),
    ("envoy.ssl_sigalg", ""),
    ("envoy.ssl_version", ""),
    ("envoy.rds_route_config", ""),
)


class Direction(enum.StrEnum):
    INBOUND = "inbound"  # on the callee's sidecar: the destination is its own service
    OUTBOUND = "outbound"  # on the caller's sidecar: the source is its own service


@dataclass(frozen=True, slots=True)
class Peer:
    """One end of a hop: a service of the mesh and its identity (None where several identities answer)."""

    service: str
    identity: SpiffeId | None


def identity_label(identity: SpiffeId) -> str:
    """An identity as it can travel in a stat name: without ``spiffe://`` (Envoy rewrites ``:`` to ``_``)."""
    return str(identity).removeprefix(SCHEME)


def identity_of_label(value: str) -> str:
    """The SPIFFE ID of an identity label as a sidecar exports it (``""`` stays ``""``)."""
    return value if not value or value.startswith(SCHEME) else SCHEME + value


def stat_prefix(
    direction: Direction,
    protocol: Protocol,
    destination: Peer,
    *,
    source: Peer | None = None,
    route: str | None = None,
) -> str:
    """The stat prefix of a listener's filter or a cluster (see the module docstring)."""
    fields = [f"mi;d={direction.value}", f"p={protocol.value}"]
    if route is not None:
        fields.append(f"r={route}")
    if source is not None:
        fields.append(f"ss={source.service}")
        fields.append(f"si={identity_label(source.identity) if source.identity is not None else ''}")
    fields.append(f"ds={destination.service}")
    fields.append(f"di={identity_label(destination.identity) if destination.identity is not None else ''}")
    text = ";".join(fields) + ";"
    if any(c in value for value in (route or "", source.service if source else "", destination.service) for c in ";."):
        raise ValueError(f"a stat prefix field may not contain ';' or '.': {text!r}")
    return text


# -- the bootstrap ------------------------------------------------------------------------------------------


def stats_config() -> stats_pb2.StatsConfig:
    """Tag extraction for :func:`stat_prefix` names, and latency buckets (ms) for request times and connection
    lengths."""
    tags = [stats_pb2.TagSpecifier(tag_name=name, regex=regex) for name, regex in _FIELDS]
    tags += [stats_pb2.TagSpecifier(tag_name=name, regex=regex or None) for name, regex in _ENVOY_TAGS]
    return stats_pb2.StatsConfig(
        use_all_default_tags=wrappers_pb2.BoolValue(value=False),
        stats_tags=tags,
        histogram_bucket_settings=[
            stats_pb2.HistogramBucketSettings(
                match=string_pb2.StringMatcher(suffix=suffix), buckets=[float(b) for b in LATENCY_BUCKETS_MS]
            )
            for suffix in ("_rq_time", "_cx_length_ms")
        ],
    )


def stats_listener(address: Address) -> listener_pb2.Listener:
    """``GET /stats/prometheus`` on ``address``, answered by the admin (cluster :data:`ADMIN_CLUSTER`); 404 else."""
    get_only = route_components_pb2.HeaderMatcher(name=":method", string_match=string_pb2.StringMatcher(exact="GET"))
    host = route_components_pb2.VirtualHost(
        name=STATS_LISTENER,
        domains=["*"],
        routes=[
            route_components_pb2.Route(
                match=route_components_pb2.RouteMatch(path=STATS_PATH, headers=[get_only]),
                route=route_components_pb2.RouteAction(cluster=ADMIN_CLUSTER),
            ),
            route_components_pb2.Route(
                match=route_components_pb2.RouteMatch(prefix="/"),
                direct_response=route_components_pb2.DirectResponseAction(
                    status=404, body=base_pb2.DataSource(inline_string=f"only GET {STATS_PATH} is served here\n")
                ),
            ),
        ],
    )
    manager = listeners.Hcm(
        stat_prefix="mesh_identity_stats",
        route_config=route_pb2.RouteConfiguration(name=STATS_LISTENER, virtual_hosts=[host]),
        http_filters=[hcm_pb2.HttpFilter(name=listeners.ROUTER, typed_config=pack(router_pb2.Router()))],
        normalize_path=wrappers_pb2.BoolValue(value=True),
        merge_slashes=True,
    )
    front = listener_components_pb2.Filter(name=listeners.HCM, typed_config=pack(manager))
    return listener_pb2.Listener(
        name=STATS_LISTENER,
        address=socket_address(address),
        filter_chains=[listener_components_pb2.FilterChain(filters=[front])],
    )


def admin_cluster(admin: Address) -> cluster_pb2.Cluster:
    """The sidecar's own admin endpoint (loopback), for :func:`stats_listener`."""
    return clusters.local_app(ADMIN_CLUSTER, admin)


def add_stats_endpoint(document: bootstrap_pb2.Bootstrap, stats: Address, admin: Address) -> None:
    """Give a bootstrap the stats listener on ``stats``, its cluster to ``admin`` and :func:`stats_config`."""
    if admin.port == 0:
        raise ValueError("the stats endpoint needs the admin on a known port, not port 0")
    if stats == admin:
        raise ValueError(f"the stats endpoint and the admin cannot share {stats}")
    document.static_resources.listeners.append(stats_listener(stats))
    document.static_resources.clusters.append(admin_cluster(admin))
    document.stats_config.CopyFrom(stats_config())
    document.stats_flush_on_admin = True


# -- access logs --------------------------------------------------------------------------------------------


def access_logs(
    sink: str, *, direction: Direction, route: str, local: Peer, remote: Peer | None, http: bool
) -> list[accesslog_pb2.AccessLog]:
    """One JSON access log to ``sink`` (``stdout`` or an absolute path) for a listener of the sidecar of ``local``.

    ``remote`` is the other end where the listener knows it (outbound: the upstream; inbound: None, the peer's
    verified SPIFFE ID is per request).
    """
    peer = "%DOWNSTREAM_PEER_URI_SAN%" if direction is Direction.INBOUND else "%UPSTREAM_PEER_URI_SAN%"
    here = (local.service, str(local.identity) if local.identity is not None else "")
    there = (remote.service if remote else "", peer)  # the other end's identity as the handshake verified it
    source, destination = (there, here) if direction is Direction.INBOUND else (here, there)
    fields: dict[str, str] = {
        "start_time": "%START_TIME%",
        "direction": direction.value,
        "route": route,
        "source_service": source[0],
        "source_identity": source[1],
        "destination_service": destination[0],
        "destination_identity": destination[1],
        "peer": peer,
    }
    if http:
        fields |= {
            "method": "%REQ(:METHOD)%",
            "path": "%REQ_WITHOUT_QUERY(X-ENVOY-ORIGINAL-PATH?:PATH)%",
            "protocol": "%PROTOCOL%",
            "response_code": "%RESPONSE_CODE%",
            "request_id": "%REQ(X-REQUEST-ID)%",
        }
    fields |= {
        "response_flags": "%RESPONSE_FLAGS%",
        "duration_ms": "%DURATION%",
        "bytes_received": "%BYTES_RECEIVED%",
        "bytes_sent": "%BYTES_SENT%",
        "upstream_cluster": "%UPSTREAM_CLUSTER_RAW%",
        "upstream_host": "%UPSTREAM_HOST%",
    }
    body = struct_pb2.Struct()
    body.update(fields)
    log_format = substitution_format_string_pb2.SubstitutionFormatString(
        json_format=body,
        formatters=[
            extension_pb2.TypedExtensionConfig(
                name="envoy.formatter.req_without_query", typed_config=pack(req_without_query_pb2.ReqWithoutQuery())
            )
        ],
    )
    if sink == STDOUT:
        name, config = "envoy.access_loggers.stdout", pack(stream_pb2.StdoutAccessLog(log_format=log_format))
    else:
        name, config = "envoy.access_loggers.file", pack(file_pb2.FileAccessLog(path=sink, log_format=log_format))
    return [accesslog_pb2.AccessLog(name=name, typed_config=config)]


# -- the xDS resources of one sidecar -----------------------------------------------------------------------


def instrument(view: ProxyView, resources: Resources) -> None:
    """Give the resources :func:`~xds_sds.resources.proxy.build_proxy` made for ``view`` the stat prefixes
    (when the instance has ``stats``) and access logs (``access_log``) of the module docstring; nothing
    otherwise."""
    instance = view.instance
    labelled, sink = instance.stats is not None, instance.access_log
    if not labelled and sink is None:
        return
    local = Peer(view.service, view.identity)
    http = view.protocol is Protocol.HTTP
    inbound = names.inbound(view.service)
    if inbound in resources[LISTENER]:  # a client-only sidecar has none
        _observe(resources[LISTENER][inbound], labelled, sink, Direction.INBOUND, inbound, local, None, http)
    if labelled and inbound in resources[LISTENER]:
        app = resources[CLUSTER][names.local_app(view.service)]
        assert isinstance(app, cluster_pb2.Cluster)
        app.alt_stat_name = stat_prefix(Direction.INBOUND, view.protocol, local, route=inbound)
    for upstream in view.upstreams:
        route = names.outbound(upstream.service)
        only = upstream.backends[0].identity if len(upstream.backends) == 1 else None
        remote = Peer(upstream.service, only)
        http = upstream.protocol is Protocol.HTTP
        _observe(resources[LISTENER][route], labelled, sink, Direction.OUTBOUND, route, local, remote, http)
        if labelled:
            for backend in upstream.backends:
                cluster = resources[CLUSTER][names.outbound(backend.service)]
                assert isinstance(cluster, cluster_pb2.Cluster)
                cluster.alt_stat_name = stat_prefix(
                    Direction.OUTBOUND, upstream.protocol, Peer(backend.service, backend.identity), source=local
                )


def _observe(
    listener: object,
    labelled: bool,
    sink: str | None,
    direction: Direction,
    route: str,
    local: Peer,
    remote: Peer | None,
    http: bool,
) -> None:
    assert isinstance(listener, listener_pb2.Listener)
    source, destination = (remote, local) if direction is Direction.INBOUND else (local, remote)
    assert destination is not None
    protocol = Protocol.HTTP if http else Protocol.TCP
    prefix = stat_prefix(direction, protocol, destination, source=source, route=route) if labelled else None
    logs = access_logs(sink, direction=direction, route=route, local=local, remote=remote, http=http) if sink else []
    for chain in listener.filter_chains:
        for item in chain.filters:
            listeners.observe(item, stat_prefix=prefix, access_log=logs)
