"""Clusters and endpoints: the local app behind a sidecar, and each upstream service over mTLS."""

from __future__ import annotations

from collections.abc import Sequence

from envoy.config.cluster.v3 import cluster_pb2
from envoy.config.endpoint.v3 import endpoint_components_pb2, endpoint_pb2
from google.protobuf import duration_pb2

from mesh_identity.mesh import Address
from mesh_identity.spiffe import SpiffeId
from xds_sds import tls
from xds_sds.core import ads, socket_address

CONNECT_TIMEOUT = duration_pb2.Duration(seconds=2)


def load_assignment(cluster: str, addresses: Sequence[Address]) -> endpoint_pb2.ClusterLoadAssignment:
    """The endpoints of ``cluster``, in one locality."""
    return endpoint_pb2.ClusterLoadAssignment(
        cluster_name=cluster,
        endpoints=[
            endpoint_components_pb2.LocalityLbEndpoints(
                lb_endpoints=[
                    endpoint_components_pb2.LbEndpoint(
                        endpoint=endpoint_components_pb2.Endpoint(address=socket_address(address))
                    )
                    for address in sorted(addresses)
                ]
            )
        ],
    )


def local_app(name: str, app: Address) -> cluster_pb2.Cluster:
    """The app next to the sidecar, plaintext on loopback, with its one endpoint inline."""
    return cluster_pb2.Cluster(
        name=name,
        type=cluster_pb2.Cluster.STATIC,
        connect_timeout=CONNECT_TIMEOUT,
        load_assignment=load_assignment(name, [app]),
    )


def upstream(name: str, identity: SpiffeId, peer: SpiffeId) -> cluster_pb2.Cluster:
    """An upstream service: endpoints over EDS, mTLS presenting ``identity`` and accepting only ``peer``."""
    return cluster_pb2.Cluster(
        name=name,
        type=cluster_pb2.Cluster.EDS,
        eds_cluster_config=cluster_pb2.Cluster.EdsClusterConfig(eds_config=ads(), service_name=name),
        connect_timeout=CONNECT_TIMEOUT,
        transport_socket=tls.upstream(identity, peer),
    )
