"""The timer that rotates the JWT-SVID signing keys: a small thread of its own, bounded in every way.

:class:`KeyRotationTimer` asks the JWT authority when its keys next change (:meth:`next_rotation`), sleeps until
then (but never longer than ``check``, so a clock that jumps or a rotation that came due meanwhile is seen within
that bound), calls :meth:`rotate_if_due`, and starts over. A failing rotation is logged and tried again after
``retry``, not in a tight loop. :meth:`stop` wakes it and joins it.
"""

from __future__ import annotations

import logging
import threading
from datetime import datetime, timedelta
from typing import Protocol

from mesh_identity.clock import Clock, utcnow

log = logging.getLogger(__name__)

CHECK = timedelta(minutes=1)
RETRY = timedelta(seconds=5)
_SOONEST = 0.05  # seconds: the shortest sleep, when a rotation is due now


class RotatingKeys(Protocol):
    def rotate_if_due(self) -> bool: ...

    def next_rotation(self) -> datetime: ...


class KeyRotationTimer:
    """Rotates ``keys`` when due (see the module docstring); ``on_rotated`` is called after each rotation."""

    def __init__(
        self,
        keys: RotatingKeys,
        *,
        clock: Clock = utcnow,
        check: timedelta = CHECK,
        retry: timedelta = RETRY,
        name: str = "jwt-key-rotation",
    ) -> None:
        self.keys = keys
        self.clock = clock
        self.check = check.total_seconds()
        self.retry = retry.total_seconds()
        self.rotations = 0
        self.failures = 0
        self._name = name
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        if self._thread is not None:
            raise RuntimeError("the key rotation timer is already running")
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, name=self._name, daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None

    def _run(self) -> None:
        soonest = _SOONEST
        while not self._stop.is_set():
            try:
                wait = (self.keys.next_rotation() - self.clock()).total_seconds()
            except Exception:
                log.exception("the JWT authority cannot say when its keys rotate next")
                wait = self.check
            if self._stop.wait(min(max(wait, soonest), self.check)):
                return
            try:
                if self.keys.rotate_if_due():
                    self.rotations += 1
                    log.info("rotated the JWT-SVID signing keys")
                soonest = _SOONEST
            except Exception:
                self.failures += 1
                log.exception("rotating the JWT-SVID signing keys failed; trying again in %gs", self.retry)
                soonest = self.retry
