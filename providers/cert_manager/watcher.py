"""One watch over all of a provider's CertificateRequests, shared by every request waiting for its answer.

A watch per request would cost a new connection (and a TLS handshake) per request, since a watch stream that
is left before the server ends it cannot go back to the connection pool, and would register one more watcher
with the API server each time. Instead, as client-go's informers do, one background thread lists the
provider's requests (label ``mesh-identity.io/instance=<instance>``), watches from the listing's
resourceVersion, keeps the latest version of each, and wakes the waiters. A 410 (history expired) makes it
list again; a broken stream is re-opened after a short pause; the server ends each stream after
``STREAM_SECONDS`` and it is re-opened from the last resourceVersion seen.

Waiters get the error that stops the watch: at once when retrying cannot help (403, 401, 404, TLS), at their
deadline otherwise (the API server is unreachable or answers 5xx), instead of a timeout that hides it.

An answer it cannot read (a line that is not JSON, an event or a listing of another shape: a
:class:`~providers.cert_manager.errors.MalformedAnswerError`) is logged, escaped and bounded, and the watch lists
again after the pause: the event it could not read may have been the one a waiter needs. Waiters keep waiting
through it, since the next listing may be fine, and get the error at their deadline if it is still current. An
ERROR event is a 410 (list again) or the error of its Status. The thread never dies of one answer: an exception
that is not a provider error (a bug) is logged with its traceback and the watch lists again after the pause,
and should the thread end anyway, the next wait starts another.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass

from mesh_identity.errors import ProviderError, ProviderUnavailableError
from providers.cert_manager.errors import NAME, MalformedAnswerError, RequestFailedError
from providers.cert_manager.kube import KubeApi, WatchExpired, WatchStream
from providers.cert_manager.request import State, name_of, request_ref, resource_version, state_of
from providers.cert_manager.shapes import JsonObj

log = logging.getLogger(__name__)

STREAM_SECONDS = 300.0  # how long the server keeps one stream open before we re-open it
RETRY_PAUSES = (0.05, 0.2, 0.5, 1.0, 2.0)  # between attempts while the watch cannot be (re)opened


@dataclass(frozen=True, slots=True)
class Outcome:
    """What a waiter got: a final state, or (``state`` None) the deadline passed; ``error`` is what kept the
    watch from running at that moment, if anything."""

    state: State | None
    obj: JsonObj
    error: ProviderError | None


class RequestWatcher:
    def __init__(self, api: KubeApi, namespace: str, label_selector: str) -> None:
        self.api = api
        self.namespace = namespace
        self.label_selector = label_selector
        self._cond = threading.Condition()
        self._objects: dict[str, JsonObj] = {}  # name -> latest version seen
        self._deleted: set[str] = set()
        self._error: ProviderError | None = None
        self._thread: threading.Thread | None = None
        self._stream: WatchStream | None = None
        self._stopped = threading.Event()
        self._warned = ""  # the last unreadable answer logged as a warning (the thread's own)

    @property
    def error(self) -> ProviderError | None:
        """Why the watch is not running now (None while it runs or before it started)."""
        with self._cond:
            return self._error

    def start(self) -> None:
        with self._cond:
            self._start_locked()

    def _start_locked(self) -> None:
        """A watch thread, unless one runs or the watcher was stopped (under the lock)."""
        if self._thread is None and not self._stopped.is_set():
            self._thread = threading.Thread(target=self._run, name=f"{NAME}-watch", daemon=True)
            self._thread.start()

    def stop(self) -> None:
        self._stopped.set()
        with self._cond:
            thread, self._thread = self._thread, None
            self._cond.notify_all()
        while thread is not None and thread.is_alive():
            stream = self._stream
            if stream is not None:
                stream.stop()
            thread.join(timeout=0.05)

    def wait(self, created: JsonObj, deadline: float) -> Outcome:
        """Wait until the request ``created`` (as the create call returned it) is final, or ``deadline``
        (``time.monotonic()``) passes. Raises at once the watch error that retrying cannot fix."""
        name, uid = request_ref(created)
        with self._cond:
            while True:
                self._start_locked()  # the first wait starts the thread; should it have ended, this starts another
                seen = self._objects.get(name)
                cr = seen if seen is not None and request_ref(seen)[1] == uid else created
                if name in self._deleted and cr is seen:
                    raise RequestFailedError(
                        NAME,
                        f"CertificateRequest {name_of(cr)} was deleted by someone else "
                        f"before it was ready ({state_of(cr).detail})",
                    )
                state = state_of(cr)
                if state.phase.final:
                    return Outcome(state, cr, None)
                error = self._error
                if error is not None and not error.retryable and not isinstance(error, MalformedAnswerError):
                    raise error
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return Outcome(None, cr, self._error)
                self._cond.wait(remaining)

    def forget(self, name: str) -> None:
        """The provider is done with ``name``: drop what is kept about it."""
        with self._cond:
            self._objects.pop(name, None)
            self._deleted.discard(name)

    # -- the thread
    def _run(self) -> None:
        failures = 0
        version = ""
        try:
            while not self._stopped.is_set():
                try:
                    if not version:
                        version = self._list()
                    self._stream = self.api.open_watch(self.namespace, self.label_selector, version, STREAM_SECONDS)
                    if self._stopped.is_set():
                        break
                    for event, obj in self._stream.events():
                        version = resource_version(obj) or version
                        if event != "BOOKMARK":
                            self._update(event, obj)
                        failures = 0
                        if self._stopped.is_set():
                            break
                except WatchExpired:
                    version = ""  # list again
                except Exception as err:
                    if self._stopped.is_set():
                        break
                    self._failed(err, failures)
                    self._stopped.wait(RETRY_PAUSES[min(failures, len(RETRY_PAUSES) - 1)])
                    failures += 1
                    version = ""
                finally:
                    self._stream = None
        finally:
            with self._cond:
                if self._thread is threading.current_thread():
                    self._thread = None  # the next wait starts another
                    if not self._stopped.is_set():
                        log.error("%s: the watch of CertificateRequests ended; the next request starts another", NAME)
                self._cond.notify_all()

    def _failed(self, err: Exception, failures: int) -> None:
        """The watch failed with ``err`` (the ``failures``-th time in a row): tell the waiters, and the log."""
        if isinstance(err, MalformedAnswerError):
            error: ProviderError = err
            repeated = str(err) == self._warned  # the same, with no event read since: once is enough
            self._warned = str(err)
            log.log(
                logging.DEBUG if repeated else logging.WARNING,
                "%s: the watch of CertificateRequests cannot read an answer (attempt %d), listing them again: %s",
                NAME,
                failures + 1,
                err,
            )
        elif isinstance(err, ProviderError):
            error = err
            log.debug("%s: watch of CertificateRequests failed: %s", NAME, err)
        else:  # a bug: the watch goes on, and the traceback is in the log
            error = ProviderUnavailableError(
                NAME, f"the watch of CertificateRequests failed ({type(err).__name__}): listing them again"
            )
            log.error("%s: the watch of CertificateRequests failed, listing them again", NAME, exc_info=err)
        with self._cond:
            self._error = error
            self._cond.notify_all()

    def _list(self) -> str:
        items, version = self.api.list_requests_at(self.namespace, self.label_selector)
        with self._cond:
            listed = {request_ref(i)[0]: i for i in items}
            for name in list(self._objects):
                if name not in listed:
                    self._deleted.add(name)
            for name, obj in listed.items():
                self._objects[name] = obj
            self._error = None
            self._cond.notify_all()
        return version

    def _update(self, event: str, obj: JsonObj) -> None:
        name = request_ref(obj)[0]
        self._warned = ""
        with self._cond:
            self._error = None
            if event == "DELETED":
                if name in self._objects:
                    self._objects[name] = obj
                    self._deleted.add(name)
            else:
                self._objects[name] = obj
            self._cond.notify_all()
