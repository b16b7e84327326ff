"""One watch per kind: the objects of that kind as the API server last told them, kept current without polling.

A :class:`Watch` lists its kind once (pages, see :meth:`~mesh_identity.registry.kube.client.KubeClient.list`),
then watches from the list's resourceVersion with bookmarks, as client-go's reflector does: each event updates
the cache and its resourceVersion (a BOOKMARK only the version), and when the server ends a stream (after a
random 5 to 10 minutes, :data:`STREAM_SECONDS`) the next one resumes from the last version seen, so nothing is
listed again. A 410 Gone (the version left the server's history) lists again and replaces the cache at once,
so readers never see half of a listing.

Any other failure (403, 401, 5xx, an unreachable or silent server, an unreadable answer) is logged once with a
clear message, retried with exponential backoff and jitter (:class:`Backoff`), and the cache stays as it was:
the last good objects. A kind the server does not serve (404 on the list: the SMI CRDs are not installed) counts
as synced with no objects, and is listed again after the backoff in case they are installed later.

``on_change`` is called (from the watch's thread) after every change of the cache; the registry coalesces them.
"""

from __future__ import annotations

import logging
import random
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from types import MappingProxyType

from mesh_identity.registry.kube.client import KubeClient, Listing, WatchEvent, WatchStream
from mesh_identity.registry.kube.errors import KubeApiError, KubeExpiredError
from mesh_identity.registry.kube.objects import JsonObj
from mesh_identity.registry.kube.resources import Resource

log = logging.getLogger(__name__)

STREAM_SECONDS = (300, 600)
Key = tuple[str, str]  # (namespace, name); the namespace is "" for cluster-scoped kinds


@dataclass(frozen=True, slots=True)
class Backoff:
    """Pauses between failed attempts: ``first * 2**n`` capped at ``cap`` seconds, times a random factor in
    [0.5, 1) so that replicas and kinds do not retry in step."""

    first: float = 0.5
    cap: float = 30.0

    def delay(self, failures: int, rng: random.Random) -> float:
        return float(min(self.cap, self.first * 2.0 ** min(failures, 30)) * rng.uniform(0.5, 1.0))


def key_of(obj: JsonObj) -> Key | None:
    metadata = obj.get("metadata")
    if not isinstance(metadata, dict):
        return None
    name, namespace = metadata.get("name"), metadata.get("namespace", "")
    if not isinstance(name, str) or not name or not isinstance(namespace, str):
        return None
    return namespace, name


class Watch:
    """The cache of one kind, kept by a thread (see the module docstring)."""

    def __init__(
        self,
        client: KubeClient,
        resource: Resource,
        on_change: Callable[[], None],
        *,
        label_selector: str = "",
        backoff: Backoff | None = None,
        rng: random.Random | None = None,
    ) -> None:
        self.client = client
        self.resource = resource
        self.label_selector = label_selector
        self.backoff = backoff or Backoff()
        self._on_change = on_change
        self._rng = rng or random.Random()  # noqa: S311 (jitter, not secrets)
        self._lock = threading.Lock()
        self._objects: Mapping[Key, JsonObj] = MappingProxyType({})
        self._version = ""
        self._synced = False
        self._error: KubeApiError | None = None
        self._stopped = threading.Event()
        self._relist = threading.Event()
        self._stream: WatchStream | None = None
        self._thread: threading.Thread | None = None
        self.lists = 0  # list calls made (the first, and after each 410 or failure of a list)
        self.streams = 0  # watch streams opened

    # -- readers (any thread)
    def objects(self) -> Mapping[Key, JsonObj]:
        """The objects now, by (namespace, name): a read-only mapping that later changes do not touch."""
        with self._lock:
            return self._objects

    @property
    def synced(self) -> bool:
        """The first list has been read (since then the cache is a view of the server's objects)."""
        with self._lock:
            return self._synced

    @property
    def error(self) -> KubeApiError | None:
        """Why the watch is not running now (None while it runs)."""
        with self._lock:
            return self._error

    @property
    def resource_version(self) -> str:
        with self._lock:
            return self._version

    # -- lifecycle
    def start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name=f"kube-watch-{self.resource.plural}", daemon=True)
            self._thread.start()

    def stop(self, wait: float = 5.0) -> None:
        """End the watch; waits at most ``wait`` seconds for its thread (a request still waiting for the
        server's first answer cannot be cut, and ends at its timeout)."""
        self._stopped.set()
        thread, self._thread = self._thread, None
        deadline = time.monotonic() + wait
        while thread is not None and thread.is_alive() and time.monotonic() < deadline:
            stream = self._stream
            if stream is not None:
                stream.stop()
            thread.join(timeout=0.05)

    def relist(self) -> None:
        """List again now (SIGHUP), replacing the cache; the open stream ends first."""
        self._relist.set()
        stream = self._stream
        if stream is not None:
            stream.stop()

    # -- the thread
    def _run(self) -> None:
        failures = 0
        while not self._stopped.is_set():
            try:
                if not self._version or self._relist.is_set():
                    self._relist.clear()
                    self._take(self.client.list(self.resource, self.label_selector))
                seconds = self._rng.randint(*STREAM_SECONDS)
                self._stream = self.client.watch(self.resource, self._version, seconds, self.label_selector)
                self.streams += 1
                self._opened()
                if self._stopped.is_set():
                    break
                for event in self._stream.events():
                    self._apply(event)
                    failures = 0
                    if self._stopped.is_set() or self._relist.is_set():
                        break
            except KubeExpiredError as err:
                log.info("kubernetes: the watch of %s must list again: %s", self.resource, err)
                with self._lock:
                    self._version = ""
            except KubeApiError as err:
                if self._stopped.is_set():
                    break
                if err.code == 404 and not self._version:
                    self._missing(err)
                else:
                    self._failed(err, failures)
                self._stopped.wait(self.backoff.delay(failures, self._rng))
                failures += 1
            except Exception:  # a bug: the watch goes on, from a fresh list, and the traceback is in the log
                if self._stopped.is_set():
                    break
                log.exception("kubernetes: the watch of %s failed; listing again", self.resource)
                with self._lock:
                    self._version = ""
                self._stopped.wait(self.backoff.delay(failures, self._rng))
                failures += 1
            finally:
                stream, self._stream = self._stream, None
                if stream is not None:
                    stream.close()

    def _opened(self) -> None:
        """A stream is open: the watch runs (again)."""
        with self._lock:
            error, self._error = self._error, None
        if error is not None:
            log.info("kubernetes: the watch of %s runs again", self.resource)

    def _take(self, listing: Listing) -> None:
        objects: dict[Key, JsonObj] = {}
        for obj in listing.items:
            key = key_of(obj)
            if key is None:
                log.warning("kubernetes: a listed %s has no usable metadata.name; ignored", self.resource.kind)
                continue
            objects[key] = obj
        with self._lock:
            self.lists += 1
            changed = objects != self._objects or not self._synced
            self._objects = MappingProxyType(objects)
            self._version = listing.resource_version
            self._synced = True
            self._error = None
        if changed:
            self._on_change()

    def _apply(self, event: WatchEvent) -> None:
        version = event.resource_version
        if event.type == "BOOKMARK":
            with self._lock:
                self._version = version or self._version
                self._error = None
            return
        key = key_of(event.object)
        if key is None:
            log.warning("kubernetes: a %s event of %s has no usable metadata.name; ignored", event.type, self.resource)
            return
        with self._lock:
            objects = dict(self._objects)
            if event.type == "DELETED":
                objects.pop(key, None)
            else:
                objects[key] = event.object
            self._objects = MappingProxyType(objects)
            self._version = version or self._version
            self._error = None
        self._on_change()

    def _failed(self, err: KubeApiError, failures: int) -> None:
        with self._lock:
            repeated = self._error is not None and str(self._error) == str(err)
            self._error = err
            kept = len(self._objects)
        level = logging.DEBUG if repeated else logging.WARNING if failures == 0 else logging.ERROR
        log.log(
            level,
            "kubernetes: the watch of %s failed (attempt %d), retrying with backoff and keeping the %d %s last "
            "seen: %s",
            self.resource,
            failures + 1,
            kept,
            self.resource.plural,
            err,
        )

    def _missing(self, err: KubeApiError) -> None:
        """The server does not serve the kind: synced with no objects (logged once)."""
        with self._lock:
            first = not self._synced or self._error is None
            changed = bool(self._objects) or not self._synced
            self._objects = MappingProxyType({})
            self._synced = True
            self._error = err
        if first:
            log.warning("kubernetes: %s: taking it as none", err)
        if changed:
            self._on_change()
