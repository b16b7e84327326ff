"""The Kubernetes fake's object store: objects of every served kind, one cluster-wide ``resourceVersion``
counter, and what the real API server does on a write: ``metadata`` (``uid``, ``creationTimestamp``,
``generation``, ``generateName``, finalizers with ``deletionTimestamp``), name validation, the ``status``
subresource split, optimistic concurrency (409 ``Conflict`` on a stale ``resourceVersion``, delete
preconditions), 409 ``AlreadyExists``, 404 ``NotFound``, 422 ``Invalid`` from a kind's validation. Every write
is an event for the watches (:mod:`~tests.fakes.kube.watch`)."""

from __future__ import annotations

import copy
import datetime as dt
import re
import secrets
import threading
import uuid
from collections.abc import Callable, Sequence

from tests.fakes.kube.errors import STALE, JsonObj, already_exists, bad_request, conflict, invalid, not_found
from tests.fakes.kube.kinds import Kind
from tests.fakes.kube.watch import Event, History, Watcher, bookmark, deliver

_NAME = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*")
_NAME_HELP = (
    "a lowercase RFC 1123 subdomain must consist of lower case alphanumeric characters, '-' or '.', and must "
    "start and end with an alphanumeric character (e.g. 'example.com', regex used for validation is "
    r"'[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*')"
)
_GENERATE_ALPHABET = "bcdfghjklmnpqrstvwxz2456789"  # the real apiserver's alphabet: no vowels, no 0/1/3


def now() -> str:
    return dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def meta(obj: JsonObj) -> JsonObj:
    """``obj``'s ``metadata`` (made an empty one if it has none)."""
    found = obj.get("metadata")
    if not isinstance(found, dict):
        found = {}
        obj["metadata"] = found
    return found


class Store:
    """Objects of every kind, one resourceVersion counter, the retained event history and the open watches."""

    def __init__(self, kinds: Sequence[Kind], history_limit: int) -> None:
        self.lock = threading.RLock()
        self.kinds = tuple(kinds)
        self.resource_version = 100  # a real cluster never answers "0", which means "any" to a watch
        self.history = History(history_limit)
        self._objects: dict[Kind, dict[tuple[str, str], JsonObj]] = {k: {} for k in kinds}
        self._watchers: set[Watcher] = set()

    def add_kind(self, kind: Kind) -> None:
        with self.lock:
            if kind not in self._objects:
                self._objects[kind] = {}
                self.kinds = (*self.kinds, kind)

    # -- reads
    def get(self, kind: Kind, namespace: str, name: str) -> JsonObj:
        with self.lock:
            obj = self._objects[kind].get((namespace, name))
            if obj is None:
                raise not_found(kind, name)
            return copy.deepcopy(obj)

    def select(self, kind: Kind, namespace: str | None, matches: Callable[[JsonObj], bool]) -> list[JsonObj]:
        with self.lock:
            return [
                copy.deepcopy(obj)
                for (ns, _), obj in sorted(self._objects[kind].items())
                if (namespace is None or ns == namespace) and matches(obj)
            ]

    def count(self, kind: Kind, namespace: str | None = None) -> int:
        with self.lock:
            return sum(1 for ns, _ in self._objects[kind] if namespace is None or ns == namespace)

    # -- writes
    def _commit(self, kind: Kind, event_type: str, old: JsonObj | None, new: JsonObj) -> JsonObj:
        self.resource_version += 1
        meta(new)["resourceVersion"] = str(self.resource_version)
        key = (meta(new).get("namespace", ""), meta(new)["name"])
        if event_type == "DELETED":
            del self._objects[kind][key]
        else:
            self._objects[kind][key] = new
        event = Event(self.resource_version, kind, event_type, old, copy.deepcopy(new))
        self.history.append(event)
        for watcher in self._watchers:
            deliver(watcher, event)
        return copy.deepcopy(new)

    def create(self, kind: Kind, namespace: str, body: JsonObj, *, dry_run: bool = False) -> JsonObj:
        """``body`` stored (an ADDED event); with ``dry_run``, the object as it would be stored (name generated,
        uid, creationTimestamp, defaults, validated; no resourceVersion), and nothing stored, no event."""
        with self.lock:
            obj = copy.deepcopy(body)
            obj_meta = meta(obj)
            _check_type(kind, obj)
            if kind.namespaced:
                if obj_meta.get("namespace", namespace) != namespace:
                    raise bad_request(
                        "the namespace of the provided object does not match the namespace sent on the request"
                    )
                obj_meta["namespace"] = namespace
            else:
                obj_meta.pop("namespace", None)
            if obj_meta.get("resourceVersion"):
                raise bad_request("resourceVersion should not be set on objects to be created")
            if not obj_meta.get("name"):
                if not obj_meta.get("generateName"):
                    raise invalid(kind, "", ["metadata.name: Required value: name or generateName is required"])
                while True:
                    suffix = "".join(secrets.choice(_GENERATE_ALPHABET) for _ in range(5))
                    obj_meta["name"] = obj_meta["generateName"] + suffix
                    if (namespace if kind.namespaced else "", obj_meta["name"]) not in self._objects[kind]:
                        break
            name = obj_meta["name"]
            if not isinstance(name, str) or len(name) > 253 or not _NAME.fullmatch(name):
                raise invalid(kind, str(name), [f"metadata.name: Invalid value: {name!r}: {_NAME_HELP}"])
            if (obj_meta.get("namespace", ""), name) in self._objects[kind]:
                raise already_exists(kind, name)
            obj_meta["uid"] = str(uuid.uuid4())
            obj_meta["creationTimestamp"] = now()
            obj_meta.pop("deletionTimestamp", None)
            if kind.status_subresource:
                obj_meta["generation"] = 1
                obj.pop("status", None)
            self._finish(kind, None, obj)
            if dry_run:
                return copy.deepcopy(obj)
            return self._commit(kind, "ADDED", None, obj)

    def _finish(self, kind: Kind, old: JsonObj | None, new: JsonObj) -> None:
        if kind.prepare is not None:
            kind.prepare(new)
        errors = kind.validate(kind, old, new) if kind.validate is not None else []
        if errors:
            raise invalid(kind, meta(new)["name"], errors)

    def update(
        self,
        kind: Kind,
        namespace: str,
        name: str,
        change: Callable[[JsonObj], JsonObj],
        subresource: str | None = None,
    ) -> JsonObj:
        """Replace an object by ``change(current)``: PUT passes a function returning the body, PATCH one
        applying the patch. A ``metadata.resourceVersion`` in the result must match the stored one."""
        with self.lock:
            key = (namespace if kind.namespaced else "", name)
            old = self._objects[kind].get(key)
            if old is None:
                raise not_found(kind, name)
            body = change(copy.deepcopy(old))
            if not isinstance(body, dict):
                raise bad_request("the body of the request must be a JSON object")
            _check_type(kind, body)
            body_meta = meta(body)
            if body_meta.get("name", name) != name:
                raise bad_request(
                    f"the name of the object ({body_meta['name']}) does not match the name on the URL ({name})"
                )
            if kind.namespaced and body_meta.get("namespace", namespace) != namespace:
                raise bad_request(
                    "the namespace of the provided object does not match the namespace sent on the request"
                )
            wanted = body_meta.get("resourceVersion")
            if not wanted and not kind.unconditional_update:
                raise invalid(
                    kind, name, ["metadata.resourceVersion: Invalid value: 0x0: must be specified for an update"]
                )
            if wanted and wanted != meta(old)["resourceVersion"]:
                raise conflict(kind, name, STALE)
            if subresource == "status":
                new = copy.deepcopy(old)
                if "status" in body:
                    new["status"] = body["status"]
                else:
                    new.pop("status", None)
            else:
                new = copy.deepcopy(body)
                if kind.status_subresource:
                    if "status" in old:
                        new["status"] = copy.deepcopy(old["status"])
                    else:
                        new.pop("status", None)
                new_meta, old_meta = meta(new), meta(old)
                for fixed in ("name", "namespace", "uid", "creationTimestamp", "deletionTimestamp", "generation"):
                    if fixed in old_meta:
                        new_meta[fixed] = old_meta[fixed]
                    else:
                        new_meta.pop(fixed, None)
            self._finish(kind, old, new)
            meta(new)["resourceVersion"] = meta(old)["resourceVersion"]
            if new == old:
                return copy.deepcopy(old)  # a no-op write changes nothing, not even the resourceVersion
            if kind.status_subresource and _spec_part(new) != _spec_part(old):
                meta(new)["generation"] = int(meta(old).get("generation", 1)) + 1
            if meta(new).get("deletionTimestamp") and not meta(new).get("finalizers"):
                return self._commit(kind, "DELETED", old, new)
            return self._commit(kind, "MODIFIED", old, new)

    def delete(self, kind: Kind, namespace: str, name: str, options: JsonObj) -> JsonObj | None:
        """Delete now, or mark with ``deletionTimestamp`` while finalizers remain (returns the object)."""
        with self.lock:
            key = (namespace if kind.namespaced else "", name)
            old = self._objects[kind].get(key)
            if old is None:
                raise not_found(kind, name)
            preconditions = options.get("preconditions") or {}
            for field_name, label in (("uid", "UID"), ("resourceVersion", "ResourceVersion")):
                wanted = preconditions.get(field_name)
                if wanted and wanted != meta(old).get(field_name):
                    raise conflict(
                        kind,
                        name,
                        f"Precondition failed: {label} in precondition: {wanted}, {label} "
                        f"in object meta: {meta(old).get(field_name)}",
                    )
            new = copy.deepcopy(old)
            if meta(old).get("finalizers"):
                if meta(old).get("deletionTimestamp"):
                    return copy.deepcopy(old)
                meta(new)["deletionTimestamp"] = now()
                return self._commit(kind, "MODIFIED", old, new)
            self._commit(kind, "DELETED", old, new)
            return None

    # -- watches
    def watch(
        self,
        kind: Kind,
        namespace: str | None,
        matches: Callable[[JsonObj], bool],
        resource_version: str | None,
        bookmarks: bool,
        initial_events: bool,
        user: str = "",
    ) -> tuple[Watcher, list[tuple[str, JsonObj]]]:
        """Register a watcher and return the events it must be sent first (replay or synthetic ADDED)."""
        with self.lock:
            watcher = Watcher(kind, namespace, matches, bookmarks, user, self.resource_version)
            first: list[tuple[str, JsonObj]] = []
            if initial_events or resource_version in (None, "", "0"):
                first = [("ADDED", obj) for obj in self.select(kind, namespace, matches)]
                if initial_events:
                    mark = self.bookmark(kind)
                    meta(mark)["annotations"] = {"k8s.io/initial-events-end": "true"}
                    first.append(("BOOKMARK", mark))
            else:
                try:
                    since = int(str(resource_version))
                except ValueError:
                    raise bad_request(f"invalid resource version: {resource_version!r}") from None
                first = self.history.replay(watcher, since)
                watcher.resource_version = since
            self._watchers.add(watcher)
            return watcher, first

    def unwatch(self, watcher: Watcher) -> None:
        with self.lock:
            self._watchers.discard(watcher)

    def bookmark(self, kind: Kind) -> JsonObj:
        return bookmark(kind, self.resource_version)

    def send_bookmarks(self) -> int:
        with self.lock:
            sent = 0
            for watcher in self._watchers:
                if watcher.bookmarks:
                    watcher.events.put(("BOOKMARK", self.bookmark(watcher.kind)))
                    sent += 1
            return sent

    def compact(self) -> int:
        with self.lock:
            return self.history.compact(self.resource_version)

    def end_watches(self) -> None:
        with self.lock:
            for watcher in self._watchers:
                watcher.events.put(None)
            self._watchers.clear()


def _spec_part(obj: JsonObj) -> JsonObj:
    return {k: v for k, v in obj.items() if k not in ("metadata", "status")}


def _check_type(kind: Kind, obj: JsonObj) -> None:
    if obj.get("apiVersion", kind.api_version) != kind.api_version:
        raise bad_request(
            f"the API version in the data ({obj['apiVersion']}) does not match the expected API "
            f"version ({kind.api_version})"
        )
    if obj.get("kind", kind.kind) != kind.kind:
        raise bad_request(f"the kind in the data ({obj['kind']}) does not match the expected kind ({kind.kind})")
    obj["apiVersion"] = kind.api_version
    obj["kind"] = kind.kind
