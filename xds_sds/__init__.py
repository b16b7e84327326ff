"""Envoy delivery: the ADS/SDS gRPC server over mTLS, per-proxy snapshots, resource builders, bootstrap.

What ``mesh-identity serve`` and the CLI use:

* :class:`XdsServer` (``xds_sds.control_plane``): the mesh's xDS server. ``start()``/``stop()``; feed it
  ``update_identity(svid)``, ``update_bundle(bundle)``, ``update_server_svid(svid)``, ``update_mesh(mesh)``;
  it is the root rotation's ``AckSource``.
* :func:`write_bootstrap` / :func:`renew_bootstrap` (``xds_sds.bootstrap``): a sidecar's Envoy bootstrap and
  its file-watched bootstrap certificate.
* :class:`DemoApp` (``xds_sds.demoapp``): the demo's HTTP app that echoes its caller's SPIFFE ID.
* ``xds_sds.runtime.MeshXds``: the xDS server as a component of ``serve``, fed by the rotation engine;
  ``xds_sds.sidecars.SidecarDirs``: the bootstrap directories ``serve`` keeps renewed;
  ``xds_sds.envoy.EnvoyProcess``: a real Envoy sidecar process (the demo runs them).

The generic layer underneath: :class:`SnapshotCache`, :class:`DiscoveryServer` (SotW + delta ADS, SDS),
:class:`AckTracker`, :class:`ServerTls`, :class:`BindingAuthorizer`.

Part of mesh-identity; depends on the core (``mesh_identity``), never the other way round.
"""

from __future__ import annotations

from xds_sds.acks import Acked, AckEvent, AckTracker, Nack
from xds_sds.auth import Authorizer, BindingAuthorizer, bundle_secret_name, peer_identity, tls_secret_name
from xds_sds.bootstrap import BootstrapFiles, renew_bootstrap, renew_bootstrap_bundle, write_bootstrap
from xds_sds.cache import Resource, SnapshotCache, TypeSnapshot
from xds_sds.control_plane import XdsServer
from xds_sds.credentials import ServerTls
from xds_sds.demoapp import DemoApp
from xds_sds.metrics import XdsMetrics
from xds_sds.proxy import proxy_resources, secret_resources
from xds_sds.server import DiscoveryServer, StreamInfo

__all__ = [
    "AckEvent",
    "AckTracker",
    "Acked",
    "Authorizer",
    "BindingAuthorizer",
    "BootstrapFiles",
    "DemoApp",
    "DiscoveryServer",
    "Nack",
    "Resource",
    "ServerTls",
    "SnapshotCache",
    "StreamInfo",
    "TypeSnapshot",
    "XdsMetrics",
    "XdsServer",
    "bundle_secret_name",
    "peer_identity",
    "proxy_resources",
    "renew_bootstrap",
    "renew_bootstrap_bundle",
    "secret_resources",
    "tls_secret_name",
    "write_bootstrap",
]
