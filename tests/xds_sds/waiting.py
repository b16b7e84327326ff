"""Waiting for the ACKs and NACKs the xDS server's tracker sees, in order, with a bound that only stops a broken
test (for any other condition, :func:`tests.waiting.wait_until`)."""

from __future__ import annotations

import queue
from collections.abc import Iterator
from contextlib import contextmanager

from xds_sds.protocol.acks import AckEvent, AckTracker


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
