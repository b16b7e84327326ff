"""Watches in the Kubernetes fake: the open watchers and what each one is sent (``ADDED``, ``MODIFIED``,
``DELETED`` as objects enter, change in or leave its selection; ``BOOKMARK`` when it asked for them, and the
``k8s.io/initial-events-end`` bookmark after ``sendInitialEvents``), the retained event history a watch resumes
from, and the HTTP stream of newline-delimited JSON events. A watch from a ``resourceVersion`` older than the
history gets an ``ERROR`` event with a 410 ``Expired`` Status ("too old resource version"), exactly as the real
server streams it: the stream opens, says so, and ends."""

from __future__ import annotations

import json
import queue
import time
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from tests.fakes.kube.errors import ApiError, JsonObj, expired, invalid
from tests.fakes.kube.kinds import Kind
from tests.fakes.kube.selectors import matcher

if TYPE_CHECKING:
    from tests.fakes.kube.routing import Handler, Route


@dataclass(eq=False)
class Watcher:
    """One open watch stream; the store pushes ``(type, object)`` pairs, ``None`` to end it. ``user`` opened
    it; ``resource_version`` is where it started: the version it resumed from, or the current one when it
    began with the present state (no version, ``0``, or ``sendInitialEvents``)."""

    kind: Kind
    namespace: str | None
    matches: Callable[[JsonObj], bool]
    bookmarks: bool
    user: str = ""
    resource_version: int = 0
    events: queue.SimpleQueue[tuple[str, JsonObj] | None] = field(default_factory=queue.SimpleQueue)


@dataclass(frozen=True)
class Event:
    resource_version: int
    kind: Kind
    type: str
    old: JsonObj | None
    new: JsonObj


def deliver(watcher: Watcher, event: Event) -> None:
    """Send ``event`` to ``watcher`` as the watcher sees it: an object entering or leaving its selection is
    ``ADDED`` or ``DELETED``, whatever happened to it."""
    if watcher.kind is not event.kind:
        return
    namespace = (event.new.get("metadata") or {}).get("namespace", "")
    if watcher.namespace is not None and watcher.namespace != namespace:
        return
    was = event.old is not None and watcher.matches(event.old)
    now = watcher.matches(event.new)
    if event.type == "MODIFIED" and was != now:  # the object entered or left the selected set
        watcher.events.put(("ADDED" if now else "DELETED", event.new))
    elif (event.type == "DELETED" and was) or (event.type != "DELETED" and now):
        watcher.events.put((event.type, event.new))


def bookmark(kind: Kind, resource_version: int) -> JsonObj:
    return {"kind": kind.kind, "apiVersion": kind.api_version, "metadata": {"resourceVersion": str(resource_version)}}


class History:
    """The events a watch can still resume from: the last ``limit``; older versions are expired."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.compacted = 0  # watches from a resourceVersion below this are expired
        self._events: deque[Event] = deque()

    def append(self, event: Event) -> None:
        self._events.append(event)
        while len(self._events) > self.limit:
            self.compacted = self._events.popleft().resource_version

    def replay(self, watcher: Watcher, since: int) -> list[tuple[str, JsonObj]]:
        """What ``watcher`` missed after ``since``; 410 Expired when that is no longer known."""
        if since < self.compacted:
            raise expired(since, self.compacted)
        replay = Watcher(watcher.kind, watcher.namespace, watcher.matches, watcher.bookmarks)
        for event in self._events:
            if event.resource_version > since:
                deliver(replay, event)
        missed: list[tuple[str, JsonObj]] = []
        while not replay.events.empty():
            item = replay.events.get()
            assert item is not None
            missed.append(item)
        return missed

    def compact(self, resource_version: int) -> int:
        self._events.clear()
        self.compacted = resource_version
        return self.compacted


# ------------------------------------------------------------------------------------------------- HTTP


def _line(event_type: str, obj: JsonObj) -> bytes:
    return json.dumps({"type": event_type, "object": obj}).encode() + b"\n"


def serve(handler: Handler, route: Route, params: Mapping[str, str], record: dict[str, Any]) -> None:
    """Answer a ``watch=true`` request on ``handler``'s connection: a chunked stream of events until the watch
    times out (``timeoutSeconds``), the server ends it, or the client goes away."""
    owner = handler.server.owner
    store = owner.store
    bookmarks = params.get("allowWatchBookmarks") == "true"
    initial = params.get("sendInitialEvents") == "true"
    if initial and (params.get("resourceVersionMatch") != "NotOlderThan" or not bookmarks):
        raise invalid(
            route.kind,
            "",
            [
                "resourceVersionMatch: Forbidden: sendInitialEvents requires "
                "resourceVersionMatch=NotOlderThan and allowWatchBookmarks=true"
            ],
        )
    timeout = float(params["timeoutSeconds"]) if params.get("timeoutSeconds") else None
    deadline = None if timeout is None else time.monotonic() + timeout
    try:
        watcher, first = store.watch(
            route.kind,
            route.namespace,
            matcher(route.kind, params),
            params.get("resourceVersion"),
            bookmarks,
            initial,
            record["user"],
        )
    except ApiError as err:
        if err.code != 410:
            raise
        # An expired resourceVersion is not an HTTP error: the stream opens and says so in an ERROR event.
        record["code"] = 410
        handler.record(record)
        handler.start_stream()
        handler.chunk(_line("ERROR", err.status()))
        handler.chunk(b"")
        return
    handler.record(record)
    handler.start_stream()
    owner.watch_opened(watcher)
    try:
        for event_type, obj in first:
            handler.chunk(_line(event_type, obj))
        while deadline is None or time.monotonic() < deadline:
            try:
                item = watcher.events.get(timeout=0.05)
            except queue.Empty:
                if handler.peer_gone():
                    return
                continue
            if item is None:
                break
            event_type, obj = item
            handler.chunk(_line(event_type, obj))
        handler.chunk(b"")
    finally:
        store.unwatch(watcher)
        owner.watch_closed(watcher)
