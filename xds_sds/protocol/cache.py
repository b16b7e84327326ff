"""Per-proxy versioned snapshots of xDS resources.

For every proxy (Envoy node id) and type URL the cache holds a :class:`TypeSnapshot`: the resources by name,
each packed in an ``Any`` with its own version (a hash of its bytes), and a version for the whole set (a hash
of the names and resource versions). Changing one resource therefore changes the version of that type only,
and only the streams watching that proxy are told, with the type URLs that changed.

The cache is thread-safe: the rotation engine updates it from its own threads while the gRPC streams read it
from the event loop. Watch callbacks are called outside the lock, in the updating thread; they must be quick
(the stream callbacks only schedule a wake-up on their loop).
"""

from __future__ import annotations

import hashlib
import threading
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from types import MappingProxyType

from google.protobuf import any_pb2
from google.protobuf.message import Message

Watcher = Callable[[str, frozenset[str]], None]
"""Called with ``(node_id, changed type URLs)`` after a change to that node's snapshot."""


@dataclass(frozen=True, slots=True)
class Resource:
    """One named resource, packed, with a version derived from its content."""

    name: str
    version: str
    body: any_pb2.Any

    @classmethod
    def of(cls, name: str, item: Message | Resource) -> Resource:
        """``item`` as a resource named ``name``: packed, or renamed when it already is a resource."""
        if isinstance(item, Resource):
            return item if item.name == name else cls(name, item.version, item.body)
        return cls.pack(name, item)

    @classmethod
    def pack(cls, name: str, message: Message) -> Resource:
        if isinstance(message, any_pb2.Any):
            body = message
        else:
            body = any_pb2.Any()
            body.Pack(message, deterministic=True)
        digest = hashlib.sha256(body.type_url.encode() + b"\0" + body.value).hexdigest()
        return cls(name, digest[:16], body)


@dataclass(frozen=True, slots=True)
class TypeSnapshot:
    """All resources of one type for one proxy, and the version of the set."""

    version: str
    resources: Mapping[str, Resource]

    @classmethod
    def of(cls, resources: Iterable[Resource]) -> TypeSnapshot:
        by_name = {r.name: r for r in sorted(resources, key=lambda r: r.name)}
        digest = hashlib.sha256()
        for resource in by_name.values():
            digest.update(f"{resource.name}\0{resource.version}\n".encode())
        return cls(digest.hexdigest()[:16] if by_name else "", MappingProxyType(by_name))


EMPTY = TypeSnapshot.of(())
Item = Message | Resource
"""What the cache accepts as a resource: a message to pack, or an already packed :class:`Resource`."""


class SnapshotCache:
    """Per-proxy, per-type snapshots with change notification."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._nodes: dict[str, dict[str, TypeSnapshot]] = {}
        self._watchers: dict[str, dict[int, Watcher]] = {}
        self._next_watch = 0

    def get(self, node_id: str, type_url: str) -> TypeSnapshot:
        """The current snapshot of one type for one node (empty when there is none)."""
        with self._lock:
            return self._nodes.get(node_id, {}).get(type_url, EMPTY)

    def nodes(self) -> frozenset[str]:
        with self._lock:
            return frozenset(self._nodes)

    def types(self, node_id: str) -> frozenset[str]:
        with self._lock:
            return frozenset(self._nodes.get(node_id, {}))

    def set_snapshot(self, node_id: str, resources: Mapping[str, Mapping[str, Item]]) -> frozenset[str]:
        """Replace the node's resources of every type given (types not given are left alone).

        Values are messages (packed here) or :class:`Resource` objects packed once and shared by many nodes.

        :return: the type URLs whose version changed.
        """
        packed = {
            type_url: TypeSnapshot.of(Resource.of(name, item) for name, item in by_name.items())
            for type_url, by_name in resources.items()
        }
        return self._apply(node_id, lambda current: packed)

    def set_resources(self, node_id: str, type_url: str, resources: Mapping[str, Item]) -> bool:
        """Replace all resources of one type for a node; True when the version changed."""
        return bool(self.set_snapshot(node_id, {type_url: resources}))

    def update_resources(
        self,
        node_id: str,
        type_url: str,
        upsert: Mapping[str, Item],
        remove: Iterable[str] = (),
    ) -> bool:
        """Add or replace some resources of one type and remove others; True when the version changed."""
        new = [Resource.of(name, item) for name, item in upsert.items()]
        gone = frozenset(remove)

        def change(current: Mapping[str, TypeSnapshot]) -> dict[str, TypeSnapshot]:
            old = current.get(type_url, EMPTY).resources
            merged = {name: r for name, r in old.items() if name not in gone}
            merged.update((r.name, r) for r in new)
            return {type_url: TypeSnapshot.of(merged.values())}

        return bool(self._apply(node_id, change))

    def remove_node(self, node_id: str) -> None:
        """Forget a node; its streams are told that every type changed (to empty)."""
        with self._lock:
            gone = self._nodes.pop(node_id, {})
            watchers = list(self._watchers.get(node_id, {}).values())
        changed = frozenset(t for t, snap in gone.items() if snap.version)
        if changed:
            for watcher in watchers:
                watcher(node_id, changed)

    def watch(self, node_id: str, watcher: Watcher) -> Callable[[], None]:
        """Call ``watcher`` after every change of the node's snapshot; returns a function that stops it."""
        with self._lock:
            key = self._next_watch
            self._next_watch += 1
            self._watchers.setdefault(node_id, {})[key] = watcher

        def cancel() -> None:
            with self._lock:
                watchers = self._watchers.get(node_id)
                if watchers is not None:
                    watchers.pop(key, None)
                    if not watchers:
                        del self._watchers[node_id]

        return cancel

    def watcher_count(self, node_id: str) -> int:
        with self._lock:
            return len(self._watchers.get(node_id, {}))

    def _apply(
        self, node_id: str, change: Callable[[Mapping[str, TypeSnapshot]], Mapping[str, TypeSnapshot]]
    ) -> frozenset[str]:
        with self._lock:
            current = self._nodes.setdefault(node_id, {})
            updates = change(current)
            changed = frozenset(
                type_url for type_url, snap in updates.items() if current.get(type_url, EMPTY).version != snap.version
            )
            current.update(updates)
            watchers = list(self._watchers.get(node_id, {}).values()) if changed else []
        for watcher in watchers:
            watcher(node_id, changed)
        return changed
