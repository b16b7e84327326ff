"""Envoy delivery: the ADS/SDS gRPC server over mTLS, per-proxy snapshots, resource builders, bootstrap.

Part of mesh-identity; depends on the core (``mesh_identity``), never the other way round.
"""

from __future__ import annotations

from xds_sds.acks import Acked, AckEvent, AckTracker, Nack
from xds_sds.auth import Authorizer, BindingAuthorizer, bundle_secret_name, peer_identity, tls_secret_name
from xds_sds.cache import Resource, SnapshotCache, TypeSnapshot
from xds_sds.credentials import ServerTls
from xds_sds.metrics import XdsMetrics
from xds_sds.server import DiscoveryServer, StreamInfo

__all__ = [
    "AckEvent",
    "AckTracker",
    "Acked",
    "Authorizer",
    "BindingAuthorizer",
    "DiscoveryServer",
    "Nack",
    "Resource",
    "ServerTls",
    "SnapshotCache",
    "StreamInfo",
    "TypeSnapshot",
    "XdsMetrics",
    "bundle_secret_name",
    "peer_identity",
    "tls_secret_name",
]
