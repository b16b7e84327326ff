"""Which identities the rotation engine keeps issued: the registry's, plus those kept for other reasons.

:class:`Membership` subscribes to a :class:`~mesh_identity.registry.base.WorkloadRegistry`. At start it adds
every identity of the current set and the ``keep`` list (the config's ``identities``, the control plane's own)
to the engine; on every change it adds the identities that joined (each gets its first SVID before the next
subscriber hears of the change) and removes those that left, unless ``keep`` holds them: their renewal stops
and their sources close.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterable

from mesh_identity.registry.base import WorkloadRegistry, Workloads
from mesh_identity.rotation.engine import RotationEngine
from mesh_identity.spiffe import SpiffeId

log = logging.getLogger(__name__)


class Membership:
    """See the module docstring."""

    def __init__(self, engine: RotationEngine, registry: WorkloadRegistry, keep: Iterable[SpiffeId] = ()) -> None:
        self.engine = engine
        self.registry = registry
        self.keep = tuple(dict.fromkeys(keep))
        self._lock = threading.Lock()
        self._members: frozenset[SpiffeId] = frozenset()
        self._unsubscribe: Callable[[], None] | None = None

    def start(self) -> None:
        """Subscribe, then issue the kept identities and those of the current set (in a stable order)."""
        self._unsubscribe = self.registry.subscribe(self._changed)
        current = self.registry.current()
        with self._lock:
            self._members = current.identities
        self.engine.add_all(dict.fromkeys([*self.keep, *sorted(current.identities, key=str)]))

    def stop(self) -> None:
        if self._unsubscribe is not None:
            self._unsubscribe()
            self._unsubscribe = None

    def _changed(self, workloads: Workloads) -> None:
        with self._lock:
            previous, self._members = self._members, workloads.identities
        joined = sorted(workloads.identities - previous, key=str)
        left = sorted(previous - workloads.identities - set(self.keep), key=str)
        for identity in joined:
            self.engine.add(identity)
        for identity in left:
            self.engine.remove(identity)
        if joined or left:
            log.info("registry version %d: %d identities joined, %d left", workloads.version, len(joined), len(left))
