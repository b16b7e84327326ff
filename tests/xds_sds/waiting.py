"""Waiting for something the server does in its own thread, with a bound that only stops a broken test."""

from __future__ import annotations

import queue
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

from xds_sds.acks import AckEvent, AckTracker


def wait_until(predicate: Callable[[], bool], what: str, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"gave up waiting for {what}")
        time.sleep(0.01)


class AckEvents:
    """Collects the tracker's ACK/NACK events in order."""

    def __init__(self) -> None:
        self._events: queue.Queue[AckEvent] = queue.Queue()

    def __call__(self, event: AckEvent) -> None:
        self._events.put(event)

    def next(self, timeout: float = 10.0) -> AckEvent:
        try:
            return self._events.get(timeout=timeout)
        except queue.Empty:
            raise AssertionError("no ACK or NACK arrived") from None


@contextmanager
def ack_events(tracker: AckTracker) -> Iterator[AckEvents]:
    events = AckEvents()
    cancel = tracker.subscribe(events)
    try:
        yield events
    finally:
        cancel()
