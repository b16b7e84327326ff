"""The xDS part of ``mesh-identity serve``: subscribed to the workload registry and the rotation engine.

:class:`XdsComponent` is a ``Component`` of :class:`~mesh_identity.server.service.Service` (started after the
engine has issued every identity's first SVID, stopped before the engine) and its root rotation's
``AckSource``. It never decides which identities exist: the registry does, and the service's membership keeps
their SVIDs issued before this component hears of a change. On start it builds a
:class:`~xds_sds.mesh.publisher.MeshPublisher` with the server's own SVID and subscribes:

* the registry -> :meth:`MeshPublisher.update_mesh` (sidecars rebuilt, streams of removed or rebound nodes
  closed), and following the sources of the identities that joined, no longer those that left;
* each identity's source -> :meth:`MeshPublisher.update_identity`, and the bootstrap certificate of the
  identity's registered sidecars (:class:`~xds_sds.mesh.sidecars.SidecarDirs`);
* the server identity's source -> :meth:`MeshPublisher.update_server_svid`;
* the trust bundle -> :meth:`MeshPublisher.update_bundle`, and the bootstrap bundle of every registered sidecar.

In agent mode (``secrets=SecretSource.AGENT``) the publisher serves no certificate and there are no bootstrap
directories to renew (``sidecars`` is None): each sidecar's node agent delivers its certificate, and the
bundle that verifies this server, over SDS on a Unix socket.

A callback does not use the value it is handed but reads the source again under one lock, so whatever order
the callbacks of two quick changes run in, the last one applied is the current one.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterable, Sequence
from datetime import timedelta
from pathlib import Path

from mesh_identity.config import SecretSource
from mesh_identity.errors import MeshIdentityError
from mesh_identity.events import EventSink
from mesh_identity.files import write_private
from mesh_identity.mesh.model import Address, Mesh
from mesh_identity.registry.base import WorkloadRegistry, Workloads, control_plane_identity
from mesh_identity.rotation.engine import RotationEngine
from mesh_identity.spiffe import SpiffeId, TrustDomain
from mesh_identity.svid import X509Svid
from xds_sds.mesh.publisher import MeshPublisher
from xds_sds.mesh.sidecars import SidecarDirs
from xds_sds.protocol.metrics import XdsMetrics
from xds_sds.protocol.server import DEFAULT_MAX_CONNECTION_AGE, Tap

log = logging.getLogger(__name__)

XDS_ADDR = "xds.addr"


def server_identity(trust_domain: TrustDomain) -> SpiffeId:
    """The SPIFFE ID of the xDS server's own certificate (what every bootstrap expects it to present)."""
    return control_plane_identity(trust_domain)


def xds_connection_age(workload_ttl: timedelta, rotate_after: float) -> timedelta:
    """How long a sidecar's connection to the xDS server lives: a third of the renewal window (at most the
    server's default), so that the connection is recycled, and the sidecar handshakes with its renewed bootstrap
    certificate, before the server must end its stream at the old certificate's NotAfter (30 s at 0.5: 5 s)."""
    return min(DEFAULT_MAX_CONNECTION_AGE, workload_ttl * (1 - rotate_after) / 3)


def connection_age(workload_ttl: timedelta, rotate_after: float) -> timedelta:
    """How long a sidecar reuses an upstream connection: a fifth of the renewal window, so that a renewed
    certificate is on the wire long before the previous one expires (1h at 0.5: 6m; 30s at 0.5: 3s)."""
    return workload_ttl * (1 - rotate_after) / 5


class XdsComponent:
    """See the module docstring.

    :param addr_file: where to write ``host:port`` once listening (removed at stop), for ``bootstrap``.
    :param secrets: who delivers the sidecars' certificates (the control plane, or node agents).
    """

    def __init__(
        self,
        engine: RotationEngine,
        registry: WorkloadRegistry,
        *,
        address: Address,
        sidecars: SidecarDirs | None = None,
        audit: EventSink | None = None,
        metrics: XdsMetrics | None = None,
        max_connection_age: timedelta | None = None,
        addr_file: Path | None = None,
        xds_connection_age: timedelta = DEFAULT_MAX_CONNECTION_AGE,
        secrets: SecretSource = SecretSource.CONTROL_PLANE,
    ) -> None:
        if secrets is SecretSource.AGENT and sidecars is not None:
            raise ValueError("in agent mode no bootstrap certificate is renewed: pass no SidecarDirs")
        self.engine = engine
        self.secrets = secrets
        self._taps: list[Tap] = []
        self.registry = registry
        self.server_identity = server_identity(registry.trust_domain)
        self.sidecars = sidecars
        self._mesh = registry.current().mesh
        self._address = address
        self._audit = audit
        self._metrics = metrics
        self._max_connection_age = max_connection_age
        self._xds_connection_age = xds_connection_age
        self._addr_file = addr_file
        self._lock = threading.RLock()
        self._unsubscribes: dict[SpiffeId | None, Callable[[], None]] = {}
        self._unsubscribe_registry: Callable[[], None] | None = None
        self.xds: MeshPublisher | None = None

    @property
    def mesh(self) -> Mesh:
        return self._mesh

    @property
    def address(self) -> Address:
        """Where the xDS server listens (the bound port once started)."""
        return self.xds.address if self.xds is not None else self._address

    def summary(self) -> str:
        keys = "; certificates from node agents" if self.secrets is SecretSource.AGENT else ""
        return f"xDS (ADS over mTLS) on {self.address}{keys} for {self.registry.current().describe()}; " + (
            self.registry.describe()
        )

    def add_tap(self, tap: Tap) -> None:
        """Show ``tap`` every response the xDS server sends (see
        :meth:`~xds_sds.protocol.server.DiscoveryServer.add_tap`), from the next :meth:`start` on, and at once
        when it is running."""
        with self._lock:
            self._taps.append(tap)
            if self.xds is not None:
                self.xds.server.add_tap(tap)

    # -- lifecycle -----------------------------------------------------------------------------------------

    def start(self) -> int:
        """Build the xDS server from the registry's set and the engine's SVIDs and bundle, subscribe, listen;
        returns the port."""
        with self._lock:
            self._unsubscribe_registry = self.registry.subscribe(self._registry_changed)
            self._mesh = self.registry.current().mesh
            server_source = self.engine.source(self.server_identity)
            xds = MeshPublisher(
                self._mesh,
                server_source.svid(),
                address=self._address,
                audit=self._audit,
                metrics=self._metrics,
                max_connection_age=self._max_connection_age,
                xds_connection_age=self._xds_connection_age,
                secrets=self.secrets,
            )
            for tap in self._taps:
                xds.server.add_tap(tap)
            self.xds = xds
            self._unsubscribes[None] = self.engine.bundles.subscribe(lambda _: self._apply_bundle())
            self._apply_bundle()
            self._unsubscribes[self.server_identity] = server_source.subscribe(lambda _: self._apply_server())
            for identity in sorted(self._mesh.identities, key=str):
                self._follow(identity)
        try:
            port = xds.start()
        except BaseException:
            self.stop()
            raise
        if self._addr_file is not None:
            write_private(self._addr_file, f"{xds.address}\n".encode(), mode=0o644)
        return port

    def stop(self) -> None:
        with self._lock:
            if self._unsubscribe_registry is not None:
                self._unsubscribe_registry()
                self._unsubscribe_registry = None
            for unsubscribe in self._unsubscribes.values():
                unsubscribe()
            self._unsubscribes.clear()
            xds, self.xds = self.xds, None
        if self._addr_file is not None:
            self._addr_file.unlink(missing_ok=True)
        if xds is not None:
            xds.stop()

    # -- the registry --------------------------------------------------------------------------------------

    def _registry_changed(self, workloads: Workloads) -> None:
        """Serve the registry's new set: follow the identities that joined (the membership has issued them),
        rebuild the sidecars, close the streams of nodes that left or changed identity, stop following the
        identities that left."""
        mesh = workloads.mesh
        with self._lock:
            previous, self._mesh = self._mesh, mesh
            if self.xds is None:
                return
            joined = sorted(mesh.identities - previous.identities, key=str)
            left = sorted(previous.identities - mesh.identities, key=str)
            for identity in joined:
                self._follow(identity)
            self.xds.update_mesh(mesh)
            for identity in left:
                unsubscribe = self._unsubscribes.pop(identity, None)
                if unsubscribe is not None:
                    unsubscribe()
            self._renew_nodes(set(mesh.nodes()) - set(previous.nodes()))

    # -- root rotation's AckSource -------------------------------------------------------------------------

    def proxies_missing_bundle(self, fingerprints: frozenset[str]) -> Sequence[str]:
        xds = self.xds
        return () if xds is None else xds.proxies_missing_bundle(fingerprints)

    def proxies_chaining_to(self, fingerprints: frozenset[str]) -> Sequence[str]:
        xds = self.xds
        return () if xds is None else xds.proxies_chaining_to(fingerprints)

    def proxies_lagging(self, older_than: timedelta) -> Sequence[str]:
        xds = self.xds
        return () if xds is None else xds.proxies_lagging(older_than)

    # -- feeding the server --------------------------------------------------------------------------------

    def _follow(self, identity: SpiffeId) -> None:
        def changed(svid: X509Svid) -> None:
            self._apply_identity(identity)

        try:
            source = self.engine.source(identity)
        except MeshIdentityError as err:  # the registry has it, the engine not (yet): no secret to serve
            log.warning("not serving %s: %s", identity, err)
            return
        self._unsubscribes[identity] = source.subscribe(changed)
        self._apply_identity(identity)

    def _apply_identity(self, identity: SpiffeId) -> None:
        with self._lock:
            if self.xds is None or identity not in self._mesh.identities:
                return
            try:
                svid = self.engine.source(identity).current()
            except MeshIdentityError:  # removed from the engine while this callback was on its way
                return
            if svid is None:
                return
            nodes = self.xds.update_identity(svid)
            if self.sidecars is not None:
                self.sidecars.renew(svid, nodes)

    def _apply_server(self) -> None:
        with self._lock:
            svid = self.engine.source(self.server_identity).current()
            if self.xds is not None and svid is not None:
                self.xds.update_server_svid(svid)

    def _apply_bundle(self) -> None:
        with self._lock:
            bundle = self.engine.bundles.current()
            if self.xds is None or bundle is None:
                return
            self.xds.update_bundle(bundle)
            if self.sidecars is not None:
                self.sidecars.renew_bundle(bundle, self._mesh.nodes())

    def _renew_nodes(self, nodes: Iterable[str]) -> None:
        """Bring the bootstrap files of sidecars that joined the mesh up to date (they may have been written
        long ago)."""
        bundle = self.engine.bundles.current()
        if self.sidecars is None or bundle is None:
            return
        for node in sorted(nodes):
            identity = self._mesh.node_identity(node)
            svid = self.engine.source(identity).current() if identity is not None else None
            if svid is not None:
                self.sidecars.renew(svid, [node])
            self.sidecars.renew_bundle(bundle, [node])
