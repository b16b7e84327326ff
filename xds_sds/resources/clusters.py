"""Clusters and endpoints: the local app behind a sidecar, and each upstream service over mTLS."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import timedelta

from envoy.config.cluster.v3 import cluster_pb2
from envoy.config.core.v3 import protocol_pb2
from envoy.config.endpoint.v3 import endpoint_components_pb2, endpoint_pb2
from envoy.extensions.upstreams.http.v3 import http_protocol_options_pb2
from google.protobuf import duration_pb2

from mesh_identity.config import SecretSource
from mesh_identity.mesh.model import Address
from mesh_identity.spiffe import SpiffeId
from xds_sds.resources import tls
from xds_sds.resources.packing import ads, pack, socket_address

CONNECT_TIMEOUT = duration_pb2.Duration(seconds=2)
HTTP_PROTOCOL_OPTIONS = "envoy.extensions.upstreams.http.v3.HttpProtocolOptions"


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


def upstream(
    name: str,
    identity: SpiffeId,
    peer: SpiffeId,
    *,
    http: bool = True,
    max_connection_age: timedelta | None = None,
    secrets: SecretSource = SecretSource.CONTROL_PLANE,
) -> cluster_pb2.Cluster:
    """An upstream service: endpoints over EDS, mTLS presenting ``identity`` and accepting only ``peer``.

    ``max_connection_age`` bounds how long an HTTP connection to the upstream is reused: Envoy drains older
    ones (no request fails) and the next handshake presents the current certificate. Without it a connection
    made before a rotation keeps the old certificate for as long as it lives. ``secrets``: where the sidecar
    fetches its certificate (see :mod:`xds_sds.resources.tls`).
    """
    cluster = cluster_pb2.Cluster(
        name=name,
        type=cluster_pb2.Cluster.EDS,
        eds_cluster_config=cluster_pb2.Cluster.EdsClusterConfig(eds_config=ads(), service_name=name),
        connect_timeout=CONNECT_TIMEOUT,
        transport_socket=tls.upstream(identity, peer, secrets),
    )
    if http and max_connection_age is not None:
        age = duration_pb2.Duration()
        age.FromTimedelta(max_connection_age)
        options = http_protocol_options_pb2.HttpProtocolOptions(
            common_http_protocol_options=protocol_pb2.HttpProtocolOptions(max_connection_duration=age),
            explicit_http_config=http_protocol_options_pb2.HttpProtocolOptions.ExplicitHttpConfig(
                http_protocol_options=protocol_pb2.Http1ProtocolOptions()
            ),
        )
        cluster.typed_extension_protocol_options[HTTP_PROTOCOL_OPTIONS].CopyFrom(pack(options))
    return cluster
