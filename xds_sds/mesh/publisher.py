"""The xDS server of a mesh: the mesh model, the workload SVIDs and the trust bundle, served to the sidecars.

:class:`MeshPublisher` is what :class:`~xds_sds.mesh.component.XdsComponent` runs for ``mesh-identity serve``.
Feed it as things change, from any thread:

* :meth:`MeshPublisher.update_identity` with a new X509Svid (the rotation engine's subscribe callback): the
  certificate secret of every sidecar of that identity is replaced; only their Secret type changes, only
  their streams are pushed;
* :meth:`MeshPublisher.update_bundle` with a new trust bundle (root rotation): the validation-context secret of
  every sidecar, and the roots the xDS port accepts client certificates from;
* :meth:`MeshPublisher.update_server_svid` when the server's own certificate rotates (next handshakes use it);
* :meth:`MeshPublisher.update_mesh` when the mesh model (services, endpoints, policies) changes: it is checked
  first (a bad one raises ConfigError and changes nothing: the last good config stays on every sidecar); then
  the sidecars whose :class:`~xds_sds.resources.proxy.ProxyView` changed get their listeners, routes, clusters and
  endpoints rebuilt, and only the types that differ are pushed to them. Every open stream is then authorised
  again: the streams of a node that left the mesh, or that now belongs to another identity than the
  certificate the stream was opened with, end with ``PERMISSION_DENIED``.

In agent mode (``secrets=SecretSource.AGENT``, the mesh's ``xds.secrets: agent``) no private key leaves the
control plane: the sidecars' TLS contexts fetch their certificate from the node agent next to them (see
:mod:`xds_sds.resources.tls`), the snapshots hold no ``TlsCertificate`` secret (the trust bundle stays: it is
public, and its acknowledgements are root rotation's evidence), :meth:`MeshPublisher.update_identity` serves
nothing, and a request for a certificate secret is refused and audited (:class:`BundlesOnly`). The control
plane cannot see which certificate a sidecar presents then: :meth:`MeshPublisher.proxies_chaining_to` finds none.

Root rotation asks which sidecars have acknowledged what: :class:`MeshPublisher` answers as an ``AckSource``
(:meth:`MeshPublisher.proxies_missing_bundle`, :meth:`MeshPublisher.proxies_chaining_to`), through the
:class:`~xds_sds.mesh.component.XdsComponent` that is the ``Service``'s component and ack source.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from datetime import datetime, timedelta
from typing import TYPE_CHECKING

from cryptography import x509
from envoy.extensions.transport_sockets.tls.v3 import secret_pb2
from google.protobuf import any_pb2
from google.protobuf.message import Message

from mesh_identity.clock import utcnow
from mesh_identity.config import SecretSource
from mesh_identity.durations import format_duration
from mesh_identity.events import EventSink
from mesh_identity.mesh.model import Address, Mesh, check_mesh
from mesh_identity.rotation.roots import root_of
from mesh_identity.spiffe import SpiffeId
from mesh_identity.svid import TrustBundle, X509Svid, fingerprint_of, load_certs_pem
from xds_sds.protocol.acks import AckTracker
from xds_sds.protocol.auth import (
    Authorizer,
    BindingAuthorizer,
    bundle_secret_name,
    is_bundle_secret_name,
    tls_secret_name,
)
from xds_sds.protocol.cache import Resource, SnapshotCache
from xds_sds.protocol.credentials import ServerTls
from xds_sds.protocol.metrics import XdsMetrics
from xds_sds.protocol.server import (
    DEFAULT_MAX_CONNECTION_AGE,
    DEFAULT_MAX_CONNECTION_AGE_GRACE,
    DiscoveryServer,
)
from xds_sds.protocol.text import escaped
from xds_sds.protocol.typeurls import KNOWN, SECRET, short_name
from xds_sds.resources.capture import sidecar_resources
from xds_sds.resources.proxy import ProxyView, Resources, proxy_views, secret_resources
from xds_sds.resources.secrets import bundle_roots_pem, tls_certificate_secret


class MeshPublisher:
    """The mesh's ADS/SDS server (see the module docstring).

    :param mesh: the mesh model; sidecar node ids are bound to their service's identity.
    :param server_svid: the server's own certificate (its bundle is the mesh's initial trust bundle).
    :param address: where to listen, ``host:port`` (port 0 picks one; see :attr:`port`).
    :param max_connection_age: how long a sidecar reuses an upstream HTTP connection before draining it, so
        that rotated certificates are used on the wire within that time (None: as long as it lives).
    :param secrets: who delivers the sidecars' certificates: the control plane (over ADS), or node agents
        (see the module docstring).
    """

    def __init__(
        self,
        mesh: Mesh,
        server_svid: X509Svid,
        *,
        address: str | Address = "127.0.0.1:0",
        audit: EventSink | None = None,
        metrics: XdsMetrics | None = None,
        max_connection_age: timedelta | None = None,
        clock: Callable[[], datetime] = utcnow,
        xds_connection_age: timedelta = DEFAULT_MAX_CONNECTION_AGE,
        secrets: SecretSource = SecretSource.CONTROL_PLANE,
    ) -> None:
        self._lock = threading.RLock()
        self.secrets = secrets
        self._clock = clock
        self._changed_at: dict[tuple[str, str], datetime] = {}  # (node, type URL) -> when last changed
        self.max_connection_age = max_connection_age
        self._mesh = mesh
        self._bundle = server_svid.bundle
        self._svids: dict[SpiffeId, X509Svid] = {}
        self._views: dict[str, ProxyView] = {}
        self.cache = SnapshotCache()
        self.acks = AckTracker()
        self.tls = ServerTls.from_svid(server_svid)
        self.server_identity = server_svid.spiffe_id
        authorizer: Authorizer = BindingAuthorizer(self._node_identity)
        self.server = DiscoveryServer(
            self.cache,
            self.tls,
            BundlesOnly(authorizer) if secrets is SecretSource.AGENT else authorizer,
            acks=self.acks,
            audit=audit,
            metrics=metrics,
            address=str(address),
            max_connection_age=xds_connection_age,
            max_connection_age_grace=min(xds_connection_age, DEFAULT_MAX_CONNECTION_AGE_GRACE),
        )
        check_mesh(mesh)
        self._publish_mesh(mesh, previous=None)

    # -- lifecycle -----------------------------------------------------------------------------------------

    def start(self) -> int:
        """Start serving; returns the port."""
        return self.server.start()

    def stop(self, grace: float | None = 1.0) -> None:
        self.server.stop(grace)

    def __enter__(self) -> MeshPublisher:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop(None)

    @property
    def port(self) -> int:
        return self.server.port

    @property
    def address(self) -> Address:
        return Address(self.server.target.rsplit(":", 1)[0], self.server.port)

    @property
    def mesh(self) -> Mesh:
        return self._mesh

    # -- inputs --------------------------------------------------------------------------------------------

    def update_identity(self, svid: X509Svid) -> tuple[str, ...]:
        """Serve ``svid`` to the sidecars of its identity; returns their node ids (empty if none). In agent mode
        nothing is served (their agents deliver their certificates)."""
        with self._lock:
            self._svids[svid.spiffe_id] = svid
            nodes = self._mesh.nodes_of(svid.spiffe_id)
            if self.secrets is SecretSource.AGENT:
                return nodes
            secrets = packed(secret_resources(svid, self._bundle))
            now = self._clock()
            for node in nodes:
                self.cache.update_resources(node, SECRET, secrets)
                self._changed_at[node, SECRET] = now
            return nodes

    def update_bundle(self, bundle: TrustBundle) -> None:
        """Serve a new trust bundle to every sidecar and accept client certificates chaining to it."""
        if bundle.trust_domain != self._mesh.trust_domain:
            raise ValueError(
                f"bundle of {bundle.trust_domain} is not the mesh's trust domain {self._mesh.trust_domain}"
            )
        with self._lock:
            self._bundle = bundle
            self.tls.update_roots(bundle.pem())
            secrets = packed(secret_resources(None, bundle))
            now = self._clock()
            for node in self._mesh.nodes():
                self.cache.update_resources(node, SECRET, secrets)
                self._changed_at[node, SECRET] = now

    def update_server_svid(self, svid: X509Svid) -> None:
        """The server's own certificate rotated: new handshakes present it (open streams carry on)."""
        self.tls.update(svid.cert_chain_pem(), svid.key_pem())

    def update_mesh(self, mesh: Mesh) -> tuple[str, ...]:
        """Serve ``mesh``: rebuild the sidecars whose view of it changed, push what differs, forget those that left.

        :raises ConfigError: the mesh (e.g. a policy) is invalid; nothing changed, every sidecar keeps its config.
        :return: the node ids whose config was rebuilt.
        """
        if mesh.trust_domain != self._mesh.trust_domain:
            raise ValueError(f"the mesh moved from {self._mesh.trust_domain} to {mesh.trust_domain}")
        check_mesh(mesh)
        with self._lock:
            previous, self._mesh = self._mesh, mesh
            return self._publish_mesh(mesh, previous)

    def _publish_mesh(self, mesh: Mesh, previous: Mesh | None) -> tuple[str, ...]:
        """Build every changed sidecar's config first, then hand it all to the cache (which pushes)."""
        with self._lock:
            views = proxy_views(mesh)
            changed = [node for node, view in views.items() if self._views.get(node) != view]
            built: dict[str, Resources] = {}
            for node in changed:
                built[node] = sidecar_resources(
                    views[node], max_connection_age=self.max_connection_age, secrets=self.secrets
                )
                svid = self._svids.get(views[node].identity)
                built[node][SECRET] = secret_resources(svid, self._bundle, self.secrets)
            now = self._clock()
            for node in changed:
                before = {type_url: self.cache.get(node, type_url).version for type_url in built[node]}
                self.cache.set_snapshot(node, built[node])
                for type_url in built[node]:
                    if self.cache.get(node, type_url).version != before[type_url]:
                        self._changed_at[node, type_url] = now
            self._views = views
            if previous is not None:
                for node in set(previous.nodes()) - set(views):
                    self.cache.remove_node(node)
                    self.acks.forget(node)
                    for key in [key for key in self._changed_at if key[0] == node]:
                        del self._changed_at[key]
                self.server.reauthorize()  # streams of nodes that left or changed identity end
            return tuple(changed)

    def _node_identity(self, node: str) -> SpiffeId | None:
        return self._mesh.node_identity(node)

    # -- what the sidecars have ------------------------------------------------------------------------------

    def connected_nodes(self) -> frozenset[str]:
        return self.server.connected_nodes()

    def nodes_trusting(self, root_fingerprint: str) -> frozenset[str]:
        """Sidecars that acknowledged a trust bundle holding the root with this SHA-256 fingerprint."""
        return self.acks.nodes_where(SECRET, bundle_secret_name(self._mesh.trust_domain), _holds(root_fingerprint))

    # -- root rotation's AckSource (mesh_identity.rotation.roots) -----------------------------------------------

    def proxies_missing_bundle(self, fingerprints: frozenset[str]) -> Sequence[str]:
        """Connected sidecars whose last acknowledged trust bundle lacks one of the roots ``fingerprints``."""
        name = bundle_secret_name(self._mesh.trust_domain)
        missing = []
        for node in sorted(self.connected_nodes()):
            acked = self.acks.acked(node, SECRET, name)
            roots = _bundle_roots(acked.body) if acked is not None else ()
            if not fingerprints <= {fingerprint_of(root) for root in roots}:
                missing.append(node)
        return missing

    def proxies_chaining_to(self, fingerprints: frozenset[str]) -> Sequence[str]:
        """Connected sidecars whose last acknowledged certificate chains to one of the roots ``fingerprints``."""
        roots = self._bundle.authorities
        found = []
        for node in sorted(self.connected_nodes()):
            identity = self._mesh.node_identity(node)
            acked = self.acks.acked(node, SECRET, tls_secret_name(identity)) if identity is not None else None
            chain = _certificate_chain(acked.body) if acked is not None else ()
            if chain and root_of(chain[-1], roots) in fingerprints:
                found.append(node)
        return found

    def proxies_lagging(self, older_than: timedelta) -> Sequence[str]:
        """Connected sidecars whose latest config of some type they rejected (NACK), or have not acknowledged
        although it changed more than ``older_than`` ago: ``node: what`` for each (root rotation shows them).
        Only the types a sidecar has answered before count (it asks for what it uses)."""
        now = self._clock()
        found = []
        for node in sorted(self.connected_nodes()):
            for type_url in sorted(KNOWN):
                acked = self.acks.acked_versions(node, type_url)
                nack = self.acks.last_nack(node, type_url)
                if not acked and nack is None:
                    continue  # a type this proxy has not asked for (or not answered at all yet)
                snapshot = self.cache.get(node, type_url)
                behind = [name for name, r in snapshot.resources.items() if acked.get(name) != r.version]
                if not behind:
                    continue
                changed = self._changed_at.get((node, type_url))
                if nack is not None and (changed is None or nack.at >= changed):
                    found.append(f"{node}: rejected its {short_name(type_url)} config: {escaped(nack.error, 200)}")
                elif changed is not None and now - changed > older_than:
                    found.append(
                        f"{node}: has not acknowledged {len(behind)} {short_name(type_url)} resource"
                        f"{'' if len(behind) == 1 else 's'} changed {format_duration(now - changed)} ago"
                    )
        return found

    def nodes_serving(self, svid: X509Svid) -> frozenset[str]:
        """Sidecars that acknowledged ``svid`` as their certificate."""
        version = Resource.pack(tls_secret_name(svid.spiffe_id), tls_certificate_secret(svid)).version
        return self.acks.nodes_acked(SECRET, tls_secret_name(svid.spiffe_id), version)


class BundlesOnly:
    """The authorizer of a mesh in agent mode: ``inner``'s decisions, except that no certificate secret is
    anyone's (the node agents deliver them): a request for one is refused, and audited as every refusal is."""

    def __init__(self, inner: Authorizer) -> None:
        self._inner = inner

    def node_denied(self, identity: SpiffeId, node_id: str) -> str | None:
        return self._inner.node_denied(identity, node_id)

    def resource_denied(self, identity: SpiffeId, node_id: str, type_url: str, name: str) -> str | None:
        if type_url == SECRET and not is_bundle_secret_name(name):
            return f"secret {name!r}: in agent mode the node agent delivers certificates, the control plane no key"
        return self._inner.resource_denied(identity, node_id, type_url, name)


def packed(resources: dict[str, Message]) -> dict[str, Resource]:
    """Pack once what many sidecars share."""
    return {name: Resource.pack(name, message) for name, message in resources.items()}


def _bundle_roots(body: any_pb2.Any) -> tuple[x509.Certificate, ...]:
    secret = secret_pb2.Secret()
    if not body.Unpack(secret):
        return ()
    try:
        return load_certs_pem(bundle_roots_pem(secret))
    except ValueError:
        return ()


def _certificate_chain(body: any_pb2.Any) -> tuple[x509.Certificate, ...]:
    secret = secret_pb2.Secret()
    if not body.Unpack(secret):
        return ()
    try:
        return load_certs_pem(bytes(secret.tls_certificate.certificate_chain.inline_bytes))
    except ValueError:
        return ()


def _holds(fingerprint: str) -> Callable[[any_pb2.Any], bool]:
    def check(body: any_pb2.Any) -> bool:
        return any(fingerprint_of(root) == fingerprint for root in _bundle_roots(body))

    return check


if TYPE_CHECKING:  # MeshPublisher answers what root rotation asks: an AckSource (checked by mypy)
    from mesh_identity.rotation.roots import AckSource

    def _is_ack_source(server: MeshPublisher) -> AckSource:
        return server
