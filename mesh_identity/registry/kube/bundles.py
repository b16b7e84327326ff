"""The trust-bundle ConfigMaps: ``mesh-identity-root-ca`` (data key ``ca.crt``: the PEM of every root of the trust
bundle) in every monitored namespace, so that clients outside the mesh can trust mesh services.

:class:`BundleConfigMaps` is told the bundle (:meth:`~BundleConfigMaps.set_bundle`: the rotation engine's bundle
source, so a root rotation's prepare adds the new root and its retire removes the old) and the monitored
namespaces (:meth:`~BundleConfigMaps.set_namespaces`: the registry's Namespace watch). Its thread then writes
the ConfigMap of each monitored namespace whose content differs, and deletes ours from each namespace that
left the mesh. When it starts it lists every ConfigMap it owns across the cluster (label selector
``app.kubernetes.io/managed-by=mesh-identity,mesh-identity.io/mesh=<mesh name>``), which tells it their
versions and collects those of namespaces that left while no leader ran. Only ConfigMaps with both labels are
ever replaced or deleted: a ConfigMap of that name that someone else made is left alone (logged).

Every write is fenced: a replace or delete carries the resourceVersion this writer last read or wrote, so when
another writer (a newer leader) wrote in between, the write gets 409 and is dropped, logged; the ConfigMap is
read again at the next pass, if this replica still leads (``is_leader`` is asked before every write). A failed
pass is retried every ``retry_period``.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass

from mesh_identity.registry.kube.client import KubeClient
from mesh_identity.registry.kube.errors import KubeAlreadyExistsError, KubeApiError, KubeConflictError
from mesh_identity.registry.kube.lease import MANAGED_BY, MANAGER
from mesh_identity.registry.kube.objects import JsonObj, field, labels, text
from mesh_identity.registry.kube.resources import CONFIG_MAPS

log = logging.getLogger(__name__)

NAME = "mesh-identity-root-ca"
DATA_KEY = "ca.crt"
MESH = "mesh-identity.io/mesh"
"""The label naming the mesh a ConfigMap belongs to (several meshes may share a cluster)."""


@dataclass(frozen=True, slots=True)
class _Seen:
    """A ConfigMap as this writer last read or wrote it: its version and its ``ca.crt`` (None: not ours)."""

    resource_version: str
    pem: str | None


def config_map(namespace: str, mesh_name: str, pem: str, resource_version: str = "") -> JsonObj:
    """The trust-bundle ConfigMap of ``namespace``."""
    metadata: JsonObj = {"name": NAME, "namespace": namespace, "labels": {MANAGED_BY: MANAGER, MESH: mesh_name}}
    if resource_version:
        metadata["resourceVersion"] = resource_version
    return {"apiVersion": "v1", "kind": "ConfigMap", "metadata": metadata, "data": {DATA_KEY: pem}}


def _ours(obj: JsonObj, mesh_name: str) -> _Seen:
    version = text(obj, "metadata", "resourceVersion")
    found = labels(obj)
    if found.get(MANAGED_BY) != MANAGER or found.get(MESH) != mesh_name:
        return _Seen(version, None)
    pem = field(obj, "data", DATA_KEY)
    return _Seen(version, pem if isinstance(pem, str) else "")


class BundleConfigMaps:
    """See the module docstring. ``is_leader`` is asked before every write (the writer runs on the leader)."""

    def __init__(
        self,
        client: KubeClient,
        mesh_name: str,
        *,
        retry_period: float = 2.0,
        is_leader: Callable[[], bool] = lambda: True,
    ) -> None:
        self.client = client
        self.mesh_name = mesh_name
        self.retry_period = retry_period
        self.is_leader = is_leader
        self._cond = threading.Condition()
        self._pem: str | None = None
        self._namespaces: frozenset[str] | None = None
        self._dirty = True
        self._stopping = False
        self._thread: threading.Thread | None = None
        self._seen: dict[str, _Seen] = {}
        self._listed = False
        self._refused: set[str] = set()
        self.passes = 0
        self.writes = 0
        self.dropped = 0  # writes refused with 409: another writer got there first

    # -- inputs (any thread)
    def set_bundle(self, pem: str) -> None:
        with self._cond:
            if pem != self._pem:
                self._pem, self._dirty = pem, True
                self._cond.notify_all()

    def set_namespaces(self, names: frozenset[str]) -> None:
        with self._cond:
            if names != self._namespaces:
                self._namespaces, self._dirty = frozenset(names), True
                self._cond.notify_all()

    # -- lifecycle
    def start(self) -> None:
        if self._thread is None:
            with self._cond:
                self._stopping, self._dirty, self._listed = False, True, False
                self._seen.clear()
            self._thread = threading.Thread(target=self._run, name="bundle-configmaps", daemon=True)
            self._thread.start()

    def stop(self) -> None:
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        thread, self._thread = self._thread, None
        if thread is not None:
            thread.join()

    def _run(self) -> None:
        while True:
            with self._cond:
                self._cond.wait_for(lambda: self._dirty or self._stopping)
                if self._stopping:
                    return
                self._dirty = False
            try:
                done = self.sync()
            except Exception:  # a bug: logged, and retried after a retry period
                log.exception("trust-bundle ConfigMaps: a pass failed")
                done = False
            if not done:
                with self._cond:
                    self._cond.wait_for(lambda: self._stopping, self.retry_period)
                    self._dirty = True

    # -- one pass
    def sync(self) -> bool:
        """Write what differs and delete what left; True when everything is as it should be."""
        with self._cond:
            pem, namespaces = self._pem, self._namespaces
        self.passes += 1
        if pem is None or namespaces is None or not self.is_leader():
            return True  # nothing to do yet (the inputs wake the thread) or not ours to do
        done = True
        if not self._listed:
            done = self._list(namespaces)
        for namespace in sorted(namespaces):
            done = self._ensure(namespace, pem) and done
        for namespace in sorted(set(self._seen) - namespaces):
            done = self._remove(namespace) and done
        return done

    def _list(self, namespaces: frozenset[str]) -> bool:
        """Every ConfigMap of ours in the cluster: their versions, and those outside the mesh to collect."""
        try:
            listing = self.client.list(CONFIG_MAPS, f"{MANAGED_BY}={MANAGER},{MESH}={self.mesh_name}")
        except KubeApiError as err:
            log.warning("trust-bundle ConfigMaps: cannot list them (retried): %s", err)
            return False
        for obj in listing.items:
            namespace = text(obj, "metadata", "namespace")
            if text(obj, "metadata", "name") == NAME and namespace:
                self._seen[namespace] = _ours(obj, self.mesh_name)
        self._listed = True
        return True

    def _read(self, namespace: str) -> _Seen | None:
        obj = self.client.read(CONFIG_MAPS, namespace, NAME)
        return None if obj is None else _ours(obj, self.mesh_name)

    def _ensure(self, namespace: str, pem: str) -> bool:
        try:
            seen = self._seen.get(namespace) or self._read(namespace)
            if seen is not None and seen.pem is None:
                self._refuse(namespace)
                return True
            if seen is not None and seen.pem == pem:
                self._seen[namespace] = seen
                return True
            if not self.is_leader():
                return False
            if seen is None:
                written = self.client.create(CONFIG_MAPS, namespace, config_map(namespace, self.mesh_name, pem))
                action = "created"
            else:
                body = config_map(namespace, self.mesh_name, pem, seen.resource_version)
                written = self.client.replace(CONFIG_MAPS, namespace, body)
                action = "updated"
        except KubeConflictError as err:
            self._drop(namespace, "write", err)
            return False
        except KubeApiError as err:
            log.warning("trust-bundle ConfigMap %s/%s: cannot write it (retried): %s", namespace, NAME, err)
            self._seen.pop(namespace, None)
            return False
        self._seen[namespace] = _ours(written, self.mesh_name)
        self.writes += 1
        log.info("trust-bundle ConfigMap %s/%s %s", namespace, NAME, action)
        return True

    def _remove(self, namespace: str) -> bool:
        seen = self._seen[namespace]
        if seen.pem is None:  # not ours: never deleted
            del self._seen[namespace]
            return True
        if not self.is_leader():
            return False
        try:
            gone = self.client.delete(CONFIG_MAPS, namespace, NAME, seen.resource_version)
        except KubeConflictError as err:
            self._drop(namespace, "delete", err)
            return False
        except KubeApiError as err:
            log.warning("trust-bundle ConfigMap %s/%s: cannot delete it (retried): %s", namespace, NAME, err)
            return False
        del self._seen[namespace]
        if gone:
            self.writes += 1
            log.info("trust-bundle ConfigMap %s/%s deleted: the namespace left the mesh", namespace, NAME)
        return True

    def _drop(self, namespace: str, what: str, err: KubeApiError) -> None:
        """A fenced write refused: someone wrote since this writer read. Dropped; read again next pass."""
        self._seen.pop(namespace, None)
        self.dropped += 1
        already = " (it exists already)" if isinstance(err, KubeAlreadyExistsError) else ""
        log.warning(
            "trust-bundle ConfigMap %s/%s: %s dropped, another writer changed it since it was read%s: %s",
            namespace,
            NAME,
            what,
            already,
            err,
        )

    def _refuse(self, namespace: str) -> None:
        if namespace not in self._refused:
            self._refused.add(namespace)
            log.error(
                "trust-bundle ConfigMap %s/%s exists without the labels %s=%s and %s=%s: it is not ours and is left "
                "alone (delete it to let the control plane write the bundle there)",
                namespace,
                NAME,
                MANAGED_BY,
                MANAGER,
                MESH,
                self.mesh_name,
            )
