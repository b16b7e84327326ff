"""The registry seam: :class:`WorkloadRegistry`, the :class:`Workloads` it publishes, and :class:`Publication`.

A registry validates every set before it publishes it (:func:`validate_workloads`): a set that does not
validate raises :class:`~mesh_identity.errors.ConfigError` and changes nothing, so subscribers only ever see
good sets. Subscribers are called in the order they subscribed, one change at a time, from the thread that
published it; the server subscribes the rotation membership first, so that a new identity has its SVID before
the xDS layer builds its sidecars' config. A subscriber that raises is logged and the others still run.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

from mesh_identity.errors import ConfigError
from mesh_identity.mesh.model import Mesh, check_mesh
from mesh_identity.spiffe import SpiffeId, TrustDomain

log = logging.getLogger(__name__)

RESERVED_PREFIX = "/mesh-identity/"  # the control plane's own identities; no workload may have one
CONTROL_PLANE_PATH = "/mesh-identity/xds"
AGENT_PATH = "/mesh-identity/agent/"

Subscriber = Callable[["Workloads"], None]


def control_plane_identity(trust_domain: TrustDomain) -> SpiffeId:
    """The control plane's own identity (the xDS server's certificate): reserved, no workload may claim it."""
    return SpiffeId(trust_domain, CONTROL_PLANE_PATH)


def agent_identity(trust_domain: TrustDomain, host: str) -> SpiffeId:
    """The identity of the node agent of ``host`` (what a join token for that host buys)."""
    return SpiffeId(trust_domain, AGENT_PATH + host)


def agent_host(spiffe_id: SpiffeId) -> str | None:
    """The host of a node agent's identity, or None for any other identity."""
    if spiffe_id.path.startswith(AGENT_PATH) and "/" not in spiffe_id.path[len(AGENT_PATH) :]:
        return spiffe_id.path[len(AGENT_PATH) :] or None
    return None


@dataclass(frozen=True, slots=True)
class Workloads:
    """A registry's set at one version: services with their identities, sidecar nodes and addresses,
    upstreams, and the mesh policy (the :class:`~mesh_identity.mesh.model.Mesh` model)."""

    version: int
    mesh: Mesh

    @property
    def trust_domain(self) -> TrustDomain:
        return self.mesh.trust_domain

    @property
    def identities(self) -> frozenset[SpiffeId]:
        return self.mesh.identities

    def describe(self) -> str:
        services, nodes = len(self.mesh.services), len(self.mesh.nodes())
        return f"{services} service{'' if services == 1 else 's'}, {nodes} sidecar{'' if nodes == 1 else 's'}"


class WorkloadRegistry(Protocol):
    """What the core and the xDS layer need of a source of workloads."""

    @property
    def trust_domain(self) -> TrustDomain: ...

    def current(self) -> Workloads:
        """The set in force now."""
        ...

    def subscribe(self, callback: Subscriber) -> Callable[[], None]:
        """Call ``callback`` with every new set from now on; returns a function that ends the subscription."""
        ...

    def reload(self) -> bool:
        """Read the source again now (SIGHUP); False, keeping the last good set, when that failed."""
        ...

    def describe(self) -> str:
        """One line for logs: where the workloads come from."""
        ...

    def start(self) -> None:
        """Begin following the source (watches); the server calls it before anything subscribes."""
        ...

    def stop(self) -> None: ...


def validate_workloads(mesh: Mesh, expected: TrustDomain) -> None:
    """Everything a registry checks before it publishes ``mesh``: its trust domain, its cross-references and
    policy (:func:`~mesh_identity.mesh.model.check_mesh`), and that no service claims the control plane's
    identity. ConfigError naming the key."""
    if mesh.trust_domain != expected:
        raise ConfigError(f"the workloads are in trust domain {mesh.trust_domain}, not the mesh's {expected}")
    check_mesh(mesh)
    for name, service in mesh.services.items():
        if service.identity.path.startswith(RESERVED_PREFIX):
            raise ConfigError(
                f"services.{name}.identity: {service.identity} is under {RESERVED_PREFIX}, the control plane's own "
                "identities (its xDS server's and the node agents')"
            )


class Publication:
    """The versioned current set and its subscribers; registries hold one and call :meth:`publish`."""

    def __init__(self, mesh: Mesh) -> None:
        validate_workloads(mesh, mesh.trust_domain)
        self.trust_domain = mesh.trust_domain
        self._current = Workloads(1, mesh)
        self._subscribers: dict[int, Subscriber] = {}
        self._next = 0
        self._lock = threading.Lock()  # the current set and the subscriber list
        self._publishing = threading.Lock()  # one change at a time reaches the subscribers

    def current(self) -> Workloads:
        with self._lock:
            return self._current

    def subscribe(self, callback: Subscriber) -> Callable[[], None]:
        with self._lock:
            key = self._next
            self._next += 1
            self._subscribers[key] = callback

        def cancel() -> None:
            with self._lock:
                self._subscribers.pop(key, None)

        return cancel

    def publish(self, mesh: Mesh) -> Workloads:
        """Validate ``mesh`` (ConfigError, and no change, when it is bad), make it the current set, tell every
        subscriber in order; returns the new set."""
        validate_workloads(mesh, self.trust_domain)
        with self._publishing:
            with self._lock:
                workloads = Workloads(self._current.version + 1, mesh)
                self._current = workloads
                subscribers = list(self._subscribers.values())
            for callback in subscribers:
                try:
                    callback(workloads)
                except Exception:
                    log.exception("a registry subscriber failed on version %d", workloads.version)
        return workloads


class PublishedRegistry:
    """The part every registry built on a :class:`Publication` shares: the current set and subscriptions."""

    def __init__(self, mesh: Mesh) -> None:
        self._publication = Publication(mesh)

    @property
    def trust_domain(self) -> TrustDomain:
        return self._publication.trust_domain

    def current(self) -> Workloads:
        return self._publication.current()

    def subscribe(self, callback: Subscriber) -> Callable[[], None]:
        return self._publication.subscribe(callback)

    def start(self) -> None:
        return None

    def stop(self) -> None:
        return None


class StaticRegistry(PublishedRegistry):
    """A set given in code that changes only through :meth:`replace` (an xDS server without a mesh file)."""

    def __init__(self, mesh: Mesh, description: str = "no mesh file") -> None:
        super().__init__(mesh)
        self._description = description

    def replace(self, mesh: Mesh) -> Workloads:
        return self._publication.publish(mesh)

    def reload(self) -> bool:
        log.warning("reload: %s; nothing to reload", self._description)
        return False

    def describe(self) -> str:
        return self._description
