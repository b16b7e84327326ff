"""The watch of the built-in CA's Secret: tells the provider when another process changed its state.

One thread lists the one Secret (``fieldSelector=metadata.name=<name>``, which RBAC's ``resourceNames`` allows),
then watches it from the list's resourceVersion with bookmarks; when the server ends a stream the next resumes
from the last version seen, and a 410 Gone lists again. No polling: between changes the only request is the
open watch. Every event whose object is at another resourceVersion than the one the store holds (a write by
another replica, or the Secret deleted) calls the callbacks, from this thread; so does a list finding such a
version (the change may have happened while no stream was open). Failures (403, 5xx, an unreachable server) are
logged, once per distinct error, and retried with backoff; :attr:`SecretWatch.error` says what is failing.
"""

from __future__ import annotations

import logging
import random
import threading
import time
from collections.abc import Callable

from mesh_identity.registry.kube.client import KubeClient, WatchEvent, WatchStream
from mesh_identity.registry.kube.errors import KubeApiError, KubeExpiredError
from mesh_identity.registry.kube.watch import STREAM_SECONDS, Backoff

log = logging.getLogger(__name__)


class SecretWatch:
    """Calls the callbacks given to :meth:`add` when the Secret ``namespace/name`` changes to a resourceVersion
    other than ``known()`` (the one the store last read or wrote)."""

    def __init__(
        self,
        client: KubeClient,
        namespace: str,
        name: str,
        known: Callable[[], str],
        backoff: Backoff | None = None,
    ) -> None:
        self.client = client
        self.namespace = namespace
        self.name = name
        self.backoff = backoff or Backoff()
        self._known = known
        self._callbacks: list[Callable[[], None]] = []
        self._lock = threading.Lock()
        self._stopped = threading.Event()
        self._stream: WatchStream | None = None
        self._thread: threading.Thread | None = None
        self._error: KubeApiError | None = None
        self._started = threading.Event()
        self._ended = threading.Event()
        self._rng = random.Random()  # noqa: S311 (jitter, not secrets)
        self.streams = 0  # watch streams opened
        self.lists = 0  # lists made (the first, and after each 410)

    @property
    def error(self) -> KubeApiError | None:
        """Why the watch is not running now (None while it runs)."""
        with self._lock:
            return self._error

    @property
    def running(self) -> bool:
        """The thread was started and has not ended."""
        return self._started.is_set() and not self._ended.is_set()

    def add(self, changed: Callable[[], None]) -> None:
        """Call ``changed`` on each change from now on; the thread starts with the first callback."""
        with self._lock:
            self._callbacks.append(changed)
            start = self._thread is None and not self._stopped.is_set()
            if start:
                self._thread = threading.Thread(target=self._run, name=f"ca-secret-watch-{self.name}", daemon=True)
        if start and self._thread is not None:
            self._started.set()
            self._thread.start()

    def stop(self, wait: float = 5.0) -> None:
        """End the watch; waits at most ``wait`` seconds for its thread."""
        self._stopped.set()
        with self._lock:
            thread, self._thread = self._thread, None
        deadline = time.monotonic() + wait
        while thread is not None and thread.is_alive() and time.monotonic() < deadline:
            stream = self._stream
            if stream is not None:
                stream.stop()
            thread.join(timeout=0.05)

    # -- the thread

    def _run(self) -> None:
        try:
            self._watch()
        finally:
            self._ended.set()

    def _watch(self) -> None:
        failures = 0
        version = ""
        while not self._stopped.is_set():
            try:
                if not version:
                    version = self._list()
                seconds = self._rng.randint(*STREAM_SECONDS)
                self._stream = self.client.watch_secret(self.namespace, self.name, version, seconds)
                self.streams += 1
                self._running()
                if self._stopped.is_set():
                    break
                for event in self._stream.events():
                    failures = 0
                    version = event.resource_version or version
                    self._apply(event)
                    if self._stopped.is_set():
                        break
            except KubeExpiredError as err:
                log.info("the watch of the CA Secret %s/%s must list again: %s", self.namespace, self.name, err)
                version = ""
            except KubeApiError as err:
                if self._stopped.is_set():
                    break
                self._failed(err, failures)
                self._stopped.wait(self.backoff.delay(failures, self._rng))
                failures += 1
            except Exception:  # a bug: go on from a fresh list, the traceback in the log
                if self._stopped.is_set():
                    break
                log.exception("the watch of the CA Secret %s/%s failed; listing again", self.namespace, self.name)
                version = ""
                self._stopped.wait(self.backoff.delay(failures, self._rng))
                failures += 1
            finally:
                stream, self._stream = self._stream, None
                if stream is not None:
                    stream.close()

    def _list(self) -> str:
        listing = self.client.list_secret(self.namespace, self.name)
        self.lists += 1
        found = ""
        for obj in listing.items:
            metadata = obj.get("metadata")
            value = metadata.get("resourceVersion") if isinstance(metadata, dict) else None
            found = value if isinstance(value, str) else ""
        if found != self._known():
            self._notify()
        return listing.resource_version

    def _apply(self, event: WatchEvent) -> None:
        if event.type == "BOOKMARK":
            return
        if event.type == "DELETED" or event.resource_version != self._known():
            self._notify()

    def _notify(self) -> None:
        with self._lock:
            callbacks = list(self._callbacks)
        for callback in callbacks:
            try:
                callback()
            except Exception:
                log.exception("a callback of the CA Secret %s/%s's watch failed", self.namespace, self.name)

    def _running(self) -> None:
        with self._lock:
            error, self._error = self._error, None
        if error is not None:
            log.info("the watch of the CA Secret %s/%s runs again", self.namespace, self.name)

    def _failed(self, err: KubeApiError, failures: int) -> None:
        with self._lock:
            repeated = self._error is not None and str(self._error) == str(err)
            self._error = err
        level = logging.DEBUG if repeated else logging.WARNING
        log.log(
            level,
            "the watch of the CA Secret %s/%s failed (attempt %d), retrying with backoff: %s",
            self.namespace,
            self.name,
            failures + 1,
            err,
        )
