"""The Kubernetes API as a workload registry (``registry: {kind: kubernetes, ...}``).

:class:`KubernetesRegistry` runs one :class:`~mesh_identity.registry.kube.watch.Watch` per kind and one
thread that turns their caches into the mesh: whenever a watch changes its cache, the thread takes a snapshot of
all of them, translates it (:func:`~mesh_identity.registry.kube.translate.translate`: pure) and publishes the
mesh when it differs from the current one. Changes that come while it works are taken together in the next
round; nothing polls. Until every watch has listed its kind once nothing is published (a partial view would
drop workloads it has not read yet); :meth:`KubernetesRegistry.start` waits for that, bounded, and the server
goes on with an empty mesh if the API cannot be read in time (the watches keep trying).

Each object it refuses is logged once, naming it, and gets a Kubernetes Event (``type: Warning``) written by
the registry (:mod:`~mesh_identity.registry.kube.events`); the same refusal of the same version is not
repeated. When the API fails, the watches keep what they last saw, so the mesh stays the last good one.
"""

from __future__ import annotations

import logging
import socket
import threading
import time
from collections.abc import Callable, Mapping

from mesh_identity.clock import Clock, utcnow
from mesh_identity.config import RegistryConfig
from mesh_identity.errors import ConfigError
from mesh_identity.mesh.model import Mesh
from mesh_identity.registry.base import PublishedRegistry
from mesh_identity.registry.kube.client import KubeClient, connect
from mesh_identity.registry.kube.errors import KubeApiError
from mesh_identity.registry.kube.events import event_for
from mesh_identity.registry.kube.objects import JsonObj, Refusal
from mesh_identity.registry.kube.resources import MONITORED_BY, NAMESPACES, WATCHED, Resource
from mesh_identity.registry.kube.smi import DocKey
from mesh_identity.registry.kube.translate import Snapshot, translate
from mesh_identity.registry.kube.watch import Backoff, Watch
from mesh_identity.spiffe import TrustDomain

log = logging.getLogger(__name__)

SYNC_TIMEOUT = 30.0  # seconds start() waits for the first full view of the API


class KubernetesRegistry(PublishedRegistry):
    """See the module docstring. ``client`` replaces the one ``settings`` describe; ``backoff`` the watches'."""

    def __init__(
        self,
        settings: RegistryConfig,
        trust_domain: TrustDomain,
        *,
        client: KubeClient | None = None,
        backoff: Backoff | None = None,
        sync_timeout: float = SYNC_TIMEOUT,
        instance: str | None = None,
        clock: Clock = utcnow,
    ) -> None:
        super().__init__(Mesh(trust_domain))
        self.settings = settings
        self.client = client if client is not None else connect(settings)
        self.instance = instance or socket.gethostname()
        self._clock = clock
        self._sync_timeout = sync_timeout
        selector = f"{MONITORED_BY}={settings.mesh_name}"
        self.watches: Mapping[Resource, Watch] = {
            resource: Watch(
                self.client,
                resource,
                self._changed,
                label_selector=selector if resource is NAMESPACES else "",
                backoff=backoff,
            )
            for resource in WATCHED
        }
        self._cond = threading.Condition()
        self._dirty = False
        self._stopping = False
        self._thread: threading.Thread | None = None
        self._synced = threading.Event()
        self._accepted: Mapping[DocKey, JsonObj] = {}
        self._reported: set[tuple[str, str, str, str, str, str]] = set()
        self._noted: set[str] = set()
        self._event_errors: set[str] = set()
        self.refusals: tuple[Refusal, ...] = ()
        self.events_written = 0
        self._namespace_subscribers: list[Callable[[frozenset[str]], None]] = []
        self._namespaces_told: frozenset[str] | None = None

    # -- WorkloadRegistry
    def describe(self) -> str:
        return (
            f"Kubernetes API at {self.client.host} ({self.client.source}), namespaces labelled "
            f"{MONITORED_BY}={self.settings.mesh_name}"
        )

    def start(self) -> None:
        """Start the watches and the translating thread; wait (at most ``sync_timeout``) for the first mesh."""
        if self._thread is not None:
            return
        self._stopping = False
        self._thread = threading.Thread(target=self._run, name="kube-registry", daemon=True)
        self._thread.start()
        for watch in self.watches.values():
            watch.start()
        if not self._synced.wait(self._sync_timeout):
            log.warning(
                "kubernetes: no full view of the API after %.0fs; serving the workloads known so far while the "
                "watches retry (%s)",
                self._sync_timeout,
                self.waiting() or "translating",
            )

    def stop(self) -> None:
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        thread, self._thread = self._thread, None
        for watch in self.watches.values():
            watch.stop()
        if thread is not None:
            thread.join()
        self.client.close()

    def reload(self) -> bool:
        """List every kind again (SIGHUP); the mesh follows when the lists are read."""
        for watch in self.watches.values():
            watch.relist()
        log.info("kubernetes: listing every kind again")
        return True

    # -- state, for status and tests
    @property
    def synced(self) -> bool:
        """A first mesh was made from a full view of the API."""
        return self._synced.is_set()

    def waiting(self) -> str:
        """The kinds not listed yet, with what keeps each (empty when all are)."""
        return "; ".join(
            f"{resource}: {watch.error or 'not listed yet'}"
            for resource, watch in self.watches.items()
            if not watch.synced
        )

    def errors(self) -> dict[str, str]:
        """The current error of each watch that has one, by kind."""
        return {str(r): str(w.error) for r, w in self.watches.items() if w.error is not None}

    # -- the monitored namespaces (the trust-bundle ConfigMaps follow them: registry/kube/bundles.py)
    def namespaces(self) -> frozenset[str] | None:
        """The names of the namespaces labelled for the mesh, as last seen; None until they are listed."""
        watch = self.watches[NAMESPACES]
        if not watch.synced:
            return None
        return frozenset(name for _, name in watch.objects())

    def subscribe_namespaces(self, callback: Callable[[frozenset[str]], None]) -> Callable[[], None]:
        """Call ``callback(names)`` (from the registry's thread; it must be quick) whenever the set of monitored
        namespaces changes, and once they are first listed; returns a function that unsubscribes."""
        with self._cond:
            self._namespace_subscribers.append(callback)

        def unsubscribe() -> None:
            with self._cond:
                if callback in self._namespace_subscribers:
                    self._namespace_subscribers.remove(callback)

        return unsubscribe

    def _tell_namespaces(self) -> None:
        names = self.namespaces()
        if names is None or names == self._namespaces_told:
            return
        self._namespaces_told = names
        with self._cond:
            subscribers = tuple(self._namespace_subscribers)
        for callback in subscribers:
            try:
                callback(names)
            except Exception:
                log.exception("kubernetes: a subscriber of the monitored namespaces failed")

    # -- the translating thread
    def _changed(self) -> None:
        with self._cond:
            self._dirty = True
            self._cond.notify_all()

    def _run(self) -> None:
        while True:
            with self._cond:
                self._cond.wait_for(lambda: self._dirty or self._stopping)
                if self._stopping:
                    return
                self._dirty = False
            try:
                self._refresh()
            except Exception:  # a bug: logged, and the next change tries again
                log.exception("kubernetes: translating the API's objects failed; keeping the last good mesh")

    def _refresh(self) -> None:
        self._tell_namespaces()
        if not all(watch.synced for watch in self.watches.values()):
            return
        snapshot = Snapshot({resource: watch.objects() for resource, watch in self.watches.items()})
        try:
            result = translate(
                snapshot, self.settings.mesh_name, self.trust_domain, self._accepted, self.settings.egress
            )
        except ConfigError as err:
            log.error("kubernetes: the objects do not make a valid mesh, keeping the last good one: %s", err)
            return
        self._accepted = result.accepted
        if result.mesh != self.current().mesh:
            try:
                workloads = self._publication.publish(result.mesh)
            except ConfigError as err:
                log.error("kubernetes: the mesh does not validate, keeping the last good one: %s", err)
            else:
                log.info("kubernetes: %s (version %d)", workloads.describe(), workloads.version)
        self._report(result.refusals, result.notes)
        self._synced.set()

    def _report(self, refusals: tuple[Refusal, ...], notes: tuple[str, ...]) -> None:
        """Log each new refusal and note once; write an Event for each new refusal."""
        self.refusals = refusals
        keys = set()
        for refusal in refusals:
            ref = refusal.object
            key = (ref.kind, ref.namespace, ref.name, ref.uid, ref.resource_version, refusal.message)
            keys.add(key)
            if key in self._reported:
                continue
            log.error("kubernetes: refused %s: %s", ref, refusal.message)
            self._write_event(refusal)
        self._reported = keys
        for note in sorted(set(notes) - self._noted):
            log.warning("kubernetes: %s", note)
        self._noted = set(notes)

    def _write_event(self, refusal: Refusal) -> None:
        body = event_for(refusal, self._clock(), self.instance, f"{time.time_ns():x}")
        try:
            self.client.create_event(str(body["metadata"]["namespace"]), body)
        except KubeApiError as err:
            if str(err) not in self._event_errors:
                self._event_errors.add(str(err))
                log.warning("kubernetes: cannot write the Event about %s: %s", refusal.object, err)
            return
        self.events_written += 1
