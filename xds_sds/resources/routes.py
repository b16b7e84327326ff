"""Route configurations: inbound to the local app, outbound to an upstream cluster.

An outbound route takes weighted clusters too, so that traffic splits (SMI ``TrafficSplit``) can reuse it.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from envoy.config.route.v3 import route_components_pb2, route_pb2
from google.protobuf import any_pb2, wrappers_pb2

PerFilter = Mapping[str, any_pb2.Any]
"""Per-filter configuration of the virtual host (e.g. the RBAC policy of an inbound port), by filter name."""


def to_cluster(name: str, cluster: str, per_filter: PerFilter | None = None) -> route_pb2.RouteConfiguration:
    """Everything (any host, any path) to one cluster."""
    action = route_components_pb2.RouteAction(cluster=cluster)
    return _single_route(name, action, per_filter)


def to_weighted_clusters(name: str, weights: Sequence[tuple[str, int]]) -> route_pb2.RouteConfiguration:
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
