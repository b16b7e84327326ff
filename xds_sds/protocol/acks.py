"""Which proxy has acknowledged which version of which resource.

Every ACK a stream receives is recorded here per node, type URL and resource name, together with the
resource that was acknowledged. Root rotation asks "which proxies have acknowledged a trust bundle that
contains the new root?" with :meth:`AckTracker.nodes_where`; tests and the rotation engine can subscribe to be
told of every ACK and NACK instead of polling.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime

from google.protobuf import any_pb2

from xds_sds.protocol.cache import Resource


@dataclass(frozen=True, slots=True)
class Acked:
    """A resource version a proxy has applied."""

    version: str
    body: any_pb2.Any
    at: datetime


@dataclass(frozen=True, slots=True)
class Nack:
    """A response a proxy rejected: what it was sent and why it refused."""

    node_id: str
    type_url: str
    nonce: str
    versions: Mapping[str, str]
    error: str
    at: datetime


@dataclass(frozen=True, slots=True)
class AckEvent:
    """Told to subscribers after each ACK (``nack`` is None) or NACK."""

    node_id: str
    type_url: str
    names: frozenset[str]
    nack: Nack | None = None


Listener = Callable[[AckEvent], None]


class AckTracker:
    """Thread-safe record of the resources each node has acknowledged."""

    def __init__(self, clock: Callable[[], datetime] = lambda: datetime.now(UTC)) -> None:
        self._clock = clock
        self._lock = threading.Lock()
        self._acked: dict[tuple[str, str], dict[str, Acked]] = {}
        self._nacks: dict[tuple[str, str], Nack] = {}
        self._listeners: dict[int, Listener] = {}
        self._next_listener = 0

    def record_ack(
        self,
        node_id: str,
        type_url: str,
        resources: Iterable[Resource],
        removed: Iterable[str] = (),
        *,
        complete: bool = False,
    ) -> None:
        """Record that ``node_id`` applied ``resources`` (and dropped ``removed``).

        ``complete`` means the resources are the node's whole set of this type (a state-of-the-world
        response to a wildcard subscription), so anything not in it is gone.
        """
        now = self._clock()
        applied = {r.name: Acked(r.version, r.body, now) for r in resources}
        gone = frozenset(removed)
        with self._lock:
            table = self._acked.setdefault((node_id, type_url), {})
            if complete:
                table.clear()
            for name in gone:
                table.pop(name, None)
            table.update(applied)
            self._nacks.pop((node_id, type_url), None)
            listeners = list(self._listeners.values())
        event = AckEvent(node_id, type_url, frozenset(applied) | gone)
        for listener in listeners:
            listener(event)

    def record_nack(self, node_id: str, type_url: str, nonce: str, resources: Iterable[Resource], error: str) -> Nack:
        """Record a rejected response; what the node acknowledged before stays in force."""
        versions = {r.name: r.version for r in resources}
        nack = Nack(node_id, type_url, nonce, versions, error, self._clock())
        with self._lock:
            self._nacks[(node_id, type_url)] = nack
            listeners = list(self._listeners.values())
        event = AckEvent(node_id, type_url, frozenset(versions), nack)
        for listener in listeners:
            listener(event)
        return nack

    def acked(self, node_id: str, type_url: str, name: str) -> Acked | None:
        """The version of ``name`` that ``node_id`` last acknowledged, or None."""
        with self._lock:
            return self._acked.get((node_id, type_url), {}).get(name)

    def acked_versions(self, node_id: str, type_url: str) -> dict[str, str]:
        with self._lock:
            return {name: a.version for name, a in self._acked.get((node_id, type_url), {}).items()}

    def last_nack(self, node_id: str, type_url: str) -> Nack | None:
        """The last NACK of this node for this type, cleared by its next ACK."""
        with self._lock:
            return self._nacks.get((node_id, type_url))

    def nodes_acked(self, type_url: str, name: str, version: str | None = None) -> frozenset[str]:
        """Nodes that acknowledged ``name`` (at ``version`` when given)."""
        with self._lock:
            return frozenset(
                node_id
                for (node_id, t), table in self._acked.items()
                if t == type_url and name in table and (version is None or table[name].version == version)
            )

    def nodes_where(self, type_url: str, name: str, predicate: Callable[[any_pb2.Any], bool]) -> frozenset[str]:
        """Nodes whose acknowledged ``name`` satisfies ``predicate`` (e.g. "the bundle holds root R")."""
        with self._lock:
            candidates = [
                (node_id, table[name].body)
                for (node_id, t), table in self._acked.items()
                if t == type_url and name in table
            ]
        return frozenset(node_id for node_id, body in candidates if predicate(body))

    def forget(self, node_id: str) -> None:
        """Drop everything known about a node (it left the mesh)."""
        with self._lock:
            for key in [k for k in self._acked if k[0] == node_id]:
                del self._acked[key]
            for key in [k for k in self._nacks if k[0] == node_id]:
                del self._nacks[key]

    def subscribe(self, listener: Listener) -> Callable[[], None]:
        """Call ``listener`` after every ACK and NACK (in the server's thread); returns an unsubscribe."""
        with self._lock:
            key = self._next_listener
            self._next_listener += 1
            self._listeners[key] = listener

        def cancel() -> None:
            with self._lock:
                self._listeners.pop(key, None)

        return cancel


def versions_of(resources: Mapping[str, Resource]) -> dict[str, str]:
    return {name: r.version for name, r in resources.items()}
