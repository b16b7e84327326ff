"""The xDS server as a part of ``mesh-identity serve``: fed by the rotation engine, reloaded with the mesh.

:class:`MeshXds` is a ``Component`` of :class:`~mesh_identity.rotation.service.Service` (started after the
engine has issued every identity's first SVID, stopped before the engine) and its root rotation's
``AckSource``. On start it builds an :class:`~xds_sds.control_plane.XdsServer` with the server's own SVID and
subscribes to the engine:

* each mesh identity's source -> :meth:`XdsServer.update_identity`, and the bootstrap certificate of the
  identity's registered sidecars (:class:`~xds_sds.sidecars.SidecarDirs`);
* the server identity's source -> :meth:`XdsServer.update_server_svid`;
* the trust bundle -> :meth:`XdsServer.update_bundle`, and the bootstrap bundle of every registered sidecar.

A callback does not use the value it is handed but reads the source again under one lock, so whatever order
the callbacks of two quick changes run in, the last one applied is the current one.

:meth:`MeshXds.set_mesh` replaces the mesh: identities that joined are added to the engine, those that left
are removed from it (unless ``keep`` holds them), then every sidecar's config is rebuilt.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterable, Sequence
from datetime import timedelta
from pathlib import Path

from mesh_identity.events import EventSink
from mesh_identity.files import write_private
from mesh_identity.mesh import Address, Mesh, check_mesh
from mesh_identity.rotation.engine import RotationEngine
from mesh_identity.spiffe import SpiffeId, TrustDomain
from mesh_identity.svid import X509Svid
from xds_sds.control_plane import XdsServer
from xds_sds.metrics import XdsMetrics
from xds_sds.sidecars import SidecarDirs

log = logging.getLogger(__name__)

SERVER_ID_PATH = "/mesh-identity/xds"
XDS_ADDR = "xds.addr"


def server_identity(trust_domain: TrustDomain) -> SpiffeId:
    """The SPIFFE ID of the xDS server's own certificate (what every bootstrap expects it to present)."""
    return SpiffeId(trust_domain, SERVER_ID_PATH)


def connection_age(workload_ttl: timedelta, rotate_after: float) -> timedelta:
    """How long a sidecar reuses an upstream connection: a fifth of the renewal window, so that a renewed
    certificate is on the wire long before the previous one expires (1h at 0.5: 6m; 30s at 0.5: 3s)."""
    return workload_ttl * (1 - rotate_after) / 5


class MeshXds:
    """See the module docstring.

    :param keep: identities the engine manages for other reasons (the config's list): never removed here.
    :param addr_file: where to write ``host:port`` once listening (removed at stop), for ``bootstrap``.
    """

    def __init__(
        self,
        engine: RotationEngine,
        mesh: Mesh,
        *,
        address: Address,
        sidecars: SidecarDirs | None = None,
        audit: EventSink | None = None,
        metrics: XdsMetrics | None = None,
        max_connection_age: timedelta | None = None,
        keep: Iterable[SpiffeId] = (),
        addr_file: Path | None = None,
    ) -> None:
        self.engine = engine
        self.server_identity = server_identity(mesh.trust_domain)
        self.sidecars = sidecars
        self._mesh = mesh
        self._address = address
        self._audit = audit
        self._metrics = metrics
        self._max_connection_age = max_connection_age
        self._keep = frozenset(keep) | {self.server_identity}
        self._addr_file = addr_file
        self._lock = threading.RLock()
        self._unsubscribes: dict[SpiffeId | None, Callable[[], None]] = {}
        self.xds: XdsServer | None = None

    @property
    def mesh(self) -> Mesh:
        return self._mesh

    @property
    def address(self) -> Address:
        """Where the xDS server listens (the bound port once started)."""
        return self.xds.address if self.xds is not None else self._address

    # -- lifecycle -----------------------------------------------------------------------------------------

    def start(self) -> int:
        """Build the xDS server from the engine's current SVIDs and bundle, subscribe, listen; returns the port."""
        with self._lock:
            server_source = self.engine.source(self.server_identity)
            xds = XdsServer(
                self._mesh,
                server_source.svid(),
                address=self._address,
                audit=self._audit,
                metrics=self._metrics,
                max_connection_age=self._max_connection_age,
            )
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
            for unsubscribe in self._unsubscribes.values():
                unsubscribe()
            self._unsubscribes.clear()
            xds, self.xds = self.xds, None
        if self._addr_file is not None:
            self._addr_file.unlink(missing_ok=True)
        if xds is not None:
            xds.stop()

    # -- the mesh ------------------------------------------------------------------------------------------

    def set_mesh(self, mesh: Mesh) -> None:
        """Serve ``mesh`` from now on (see the module docstring); ConfigError, and no change, when it is invalid.
        The engine is called without this object's lock held: its rotation threads call back into it."""
        if mesh.trust_domain != self._mesh.trust_domain:
            raise ValueError(f"the mesh moved from {self._mesh.trust_domain} to {mesh.trust_domain}")
        check_mesh(mesh)  # before anything changes: a bad mesh leaves the engine and the server as they are
        with self._lock:
            previous = self._mesh
        joined = sorted(mesh.identities - previous.identities, key=str)
        left = sorted(previous.identities - mesh.identities, key=str)
        for identity in joined:
            self.engine.add(identity)
        with self._lock:
            self._mesh = mesh
            if self.xds is not None:
                for identity in joined:
                    self._follow(identity)
                self.xds.update_mesh(mesh)
                for identity in left:
                    unsubscribe = self._unsubscribes.pop(identity, None)
                    if unsubscribe is not None:
                        unsubscribe()
                self._renew_nodes(set(mesh.nodes()) - set(previous.nodes()))
        for identity in left:
            if identity not in self._keep:
                self.engine.remove(identity)

    # -- root rotation's AckSource -------------------------------------------------------------------------

    def proxies_missing_bundle(self, fingerprints: frozenset[str]) -> Sequence[str]:
        xds = self.xds
        return () if xds is None else xds.proxies_missing_bundle(fingerprints)

    def proxies_chaining_to(self, fingerprints: frozenset[str]) -> Sequence[str]:
        xds = self.xds
        return () if xds is None else xds.proxies_chaining_to(fingerprints)

    # -- feeding the server --------------------------------------------------------------------------------

    def _follow(self, identity: SpiffeId) -> None:
        def changed(svid: X509Svid) -> None:
            self._apply_identity(identity)

        self._unsubscribes[identity] = self.engine.source(identity).subscribe(changed)
        self._apply_identity(identity)

    def _apply_identity(self, identity: SpiffeId) -> None:
        with self._lock:
            if self.xds is None or identity not in self._mesh.identities:
                return
            svid = self.engine.source(identity).current()
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
