"""The current SVID of one identity and the current trust bundle, as lock-protected sources with subscriptions.

The rotation engine replaces the SVID and the bundle; the xDS server subscribes and pushes SDS updates on each
callback. Nothing polls. Callbacks run in the thread that made the change, in order, outside the source's lock;
they must be quick, and an exception in one is logged and does not stop the others.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from types import TracebackType
from typing import Generic, TypeVar

from mesh_identity.errors import IssuanceError
from mesh_identity.spiffe import SpiffeId
from mesh_identity.svid import TrustBundle, X509Svid

log = logging.getLogger(__name__)

T = TypeVar("T")
SvidCallback = Callable[[X509Svid], None]
BundleCallback = Callable[[TrustBundle], None]
Unsubscribe = Callable[[], None]


class _Value(Generic[T]):
    """A value with subscribers. The subscriber list is created on first use (sources exist per identity)."""

    __slots__ = ("_closed", "_lock", "_subscribers", "_value")

    def __init__(self, value: T | None = None) -> None:
        self._lock = threading.Lock()
        self._value = value
        self._subscribers: list[Callable[[T], None]] | None = None
        self._closed = False

    def get(self) -> T | None:
        with self._lock:
            return self._value

    def set(self, value: T) -> None:
        with self._lock:
            if self._closed:
                return
            self._value = value
            subscribers = tuple(self._subscribers or ())
        for callback in subscribers:
            try:
                callback(value)
            except Exception:
                log.exception("subscriber %r failed", callback)

    def subscribe(self, callback: Callable[[T], None], what: str) -> Unsubscribe:
        with self._lock:
            if self._closed:
                raise IssuanceError(f"the source of {what} is closed")
            if self._subscribers is None:
                self._subscribers = []
            self._subscribers.append(callback)

        def unsubscribe() -> None:
            with self._lock:
                if self._subscribers is not None and callback in self._subscribers:
                    self._subscribers.remove(callback)

        return unsubscribe

    def close(self) -> None:
        with self._lock:
            self._closed = True
            self._subscribers = None

    @property
    def closed(self) -> bool:
        return self._closed


class BundleSource:
    """The trust bundle being served. One per engine; every :class:`SvidSource` shares it."""

    __slots__ = ("_value",)

    def __init__(self) -> None:
        self._value: _Value[TrustBundle] = _Value()

    def bundle(self) -> TrustBundle:
        """The current bundle; IssuanceError before the engine has started."""
        bundle = self._value.get()
        if bundle is None:
            raise IssuanceError("no trust bundle yet: the rotation engine has not started")
        return bundle

    def current(self) -> TrustBundle | None:
        return self._value.get()

    def subscribe(self, callback: BundleCallback) -> Unsubscribe:
        """Call ``callback(bundle)`` after every change of the bundle; returns a function that unsubscribes."""
        return self._value.subscribe(callback, "the trust bundle")

    def publish(self, bundle: TrustBundle) -> bool:
        """Make ``bundle`` current and tell subscribers, unless it holds the same roots as now. Returns whether
        it changed."""
        current = self._value.get()
        if current is not None and current.fingerprints == bundle.fingerprints:
            return False
        self._value.set(bundle)
        return True

    def close(self) -> None:
        self._value.close()


class SvidSource:
    """The current X.509-SVID of one identity, plus the shared trust bundle.

    Use as a context manager or call :meth:`close` when done; a closed source keeps its last SVID but tells
    no one of changes and refuses new subscriptions.
    """

    __slots__ = ("_bundle_unsubscribes", "_bundles", "_svid", "spiffe_id")

    def __init__(self, spiffe_id: SpiffeId, bundles: BundleSource, svid: X509Svid | None = None) -> None:
        self.spiffe_id = spiffe_id
        self._svid: _Value[X509Svid] = _Value(svid)
        self._bundles = bundles
        self._bundle_unsubscribes: list[Unsubscribe] | None = None

    def svid(self) -> X509Svid:
        """The current SVID; IssuanceError when none could be issued yet."""
        svid = self._svid.get()
        if svid is None:
            raise IssuanceError(f"no SVID for {self.spiffe_id} yet: its first issuance has not succeeded")
        return svid

    def current(self) -> X509Svid | None:
        return self._svid.get()

    def bundle(self) -> TrustBundle:
        return self._bundles.bundle()

    def subscribe(self, callback: SvidCallback) -> Unsubscribe:
        """Call ``callback(svid)`` after every rotation of this identity; returns a function that unsubscribes."""
        return self._svid.subscribe(callback, str(self.spiffe_id))

    def subscribe_bundle(self, callback: BundleCallback) -> Unsubscribe:
        """Call ``callback(bundle)`` after every change of the trust bundle, until this source is closed."""
        if self._svid.closed:
            raise IssuanceError(f"the source of {self.spiffe_id} is closed")
        unsubscribe = self._bundles.subscribe(callback)
        if self._bundle_unsubscribes is None:
            self._bundle_unsubscribes = []
        self._bundle_unsubscribes.append(unsubscribe)
        return unsubscribe

    def update(self, svid: X509Svid) -> None:
        """Replace the SVID (the engine calls this) and tell subscribers."""
        if svid.spiffe_id != self.spiffe_id:
            raise IssuanceError(f"SVID for {svid.spiffe_id} offered to the source of {self.spiffe_id}")
        self._svid.set(svid)

    @property
    def closed(self) -> bool:
        return self._svid.closed

    def close(self) -> None:
        self._svid.close()
        for unsubscribe in self._bundle_unsubscribes or ():
            unsubscribe()
        self._bundle_unsubscribes = None

    def __enter__(self) -> SvidSource:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, value: BaseException | None, traceback: TracebackType | None
    ) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"SvidSource({self.spiffe_id}, {self._svid.get()!r})"
