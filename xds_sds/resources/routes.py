"""Route configurations: inbound to the local app, outbound to an upstream cluster.

An outbound route takes weighted clusters too, so that traffic splits (SMI ``TrafficSplit``) can reuse it, and
retries a request whose connection could not be made (:func:`outbound_retries`): an endpoint whose sidecar has
not opened its inbound listener yet (a pod that just became ready: its callers learn of it in the same push as
it learns of its listener) or is going away costs a retry on another endpoint, never a failed request. Nothing
is retried once it has reached an upstream, so no request runs twice.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from envoy.config.route.v3 import route_components_pb2, route_pb2
from envoy.extensions.retry.host.previous_hosts.v3 import previous_hosts_pb2
from google.protobuf import any_pb2, wrappers_pb2

from xds_sds.resources.packing import pack

PerFilter = Mapping[str, any_pb2.Any]
"""Per-filter configuration of the virtual host (e.g. the RBAC policy of an inbound port), by filter name."""


OUTBOUND_RETRIES = 2  # connection failures retried, each on an endpoint not tried yet
PREVIOUS_HOSTS = "envoy.retry_host_predicates.previous_hosts"


def outbound_retries() -> route_components_pb2.RetryPolicy:
    """Retry a request that never reached an upstream (connect failure, a stream refused before it started) on
    another endpoint, :data:`OUTBOUND_RETRIES` times at most."""
    return route_components_pb2.RetryPolicy(
        retry_on="connect-failure,refused-stream",
        num_retries=wrappers_pb2.UInt32Value(value=OUTBOUND_RETRIES),
        retry_host_predicate=[
            route_components_pb2.RetryPolicy.RetryHostPredicate(
                name=PREVIOUS_HOSTS, typed_config=pack(previous_hosts_pb2.PreviousHostsPredicate())
            )
        ],
        host_selection_retry_max_attempts=3,
    )


def to_cluster(
    name: str, cluster: str, per_filter: PerFilter | None = None, *, retries: bool = False
) -> route_pb2.RouteConfiguration:
    """Everything (any host, any path) to one cluster; ``retries``: see :func:`outbound_retries`."""
    action = route_components_pb2.RouteAction(cluster=cluster)
    if retries:
        action.retry_policy.CopyFrom(outbound_retries())
    return _single_route(name, action, per_filter)


def to_weighted_clusters(
    name: str, weights: Sequence[tuple[str, int]], *, retries: bool = False
) -> route_pb2.RouteConfiguration:
    """Everything to several clusters, split by weight (``[(cluster, weight), ...]``)."""
    action = route_components_pb2.RouteAction(
        weighted_clusters=route_components_pb2.WeightedCluster(
            clusters=[
                route_components_pb2.WeightedCluster.ClusterWeight(
                    name=cluster, weight=wrappers_pb2.UInt32Value(value=weight)
                )
                for cluster, weight in weights
            ]
        )
    )
    if retries:
        action.retry_policy.CopyFrom(outbound_retries())
    return _single_route(name, action)


def _single_route(
    name: str, action: route_components_pb2.RouteAction, per_filter: PerFilter | None = None
) -> route_pb2.RouteConfiguration:
    return route_pb2.RouteConfiguration(
        name=name,
        virtual_hosts=[
            route_components_pb2.VirtualHost(
                name=name,
                domains=["*"],
                typed_per_filter_config=dict(per_filter or {}),
                routes=[
                    route_components_pb2.Route(
                        match=route_components_pb2.RouteMatch(prefix="/"),
                        route=action,
                    )
                ],
            )
        ],
    )
