"""A Kubernetes API server for tests: the REST API over real HTTPS on a loopback port (``:0``).

No Kubernetes API server can be installed on these machines, so tests drive this one through the real
``kubernetes`` client. It keeps objects in memory and implements the parts of the API our code relies on:

* create / get / list / replace (PUT) / patch / delete / deletecollection, for namespaced and cluster-scoped
  kinds, with the ``/status`` subresource where a kind has one (writes to the main resource then ignore
  ``status``, writes to ``/status`` change nothing else);
* patches as JSON merge patch, JSON patch (RFC 6902) and, for built-in kinds, strategic merge patch (applied
  as a merge patch: the kinds served here have no merge-keyed lists we rely on); custom kinds answer 415
  to a strategic merge patch, as the real server does;
* ``metadata``: ``uid``, ``creationTimestamp``, ``generation``, ``generateName``, one cluster-wide
  ``resourceVersion`` counter, finalizers with ``deletionTimestamp``;
* optimistic concurrency: 409 ``Conflict`` on a stale ``resourceVersion`` (PUT, patch, delete
  preconditions), 409 ``AlreadyExists``, 404 ``NotFound``, 422 ``Invalid``, 401 without a known bearer
  token, 403 ``Forbidden`` from deny rules per user/verb/resource/namespace, all as ``kind: Status`` bodies;
* label selectors (``=``, ``==``, ``!=``, ``in``, ``notin``, ``key``, ``!key``) and field selectors
  (``metadata.name``, ``metadata.namespace`` and per-kind fields), ``limit``/``continue``;
* ``watch=true`` streams of newline-delimited JSON events ``ADDED``/``MODIFIED``/``DELETED``/``BOOKMARK``
  (``allowWatchBookmarks``, ``sendInitialEvents``), resumable from any retained ``resourceVersion``;
  older ones get an ``ERROR`` event with a 410 ``Expired`` Status ("too old resource version"), exactly
  as the real server streams it;
* discovery: ``/version``, ``/api``, ``/api/v1``, ``/apis``, ``/apis/<group>``, ``/apis/<group>/<version>``.

The served kinds are a table (:data:`DEFAULT_KINDS`); to serve another, add a :class:`Kind`::

    POD = Kind("Pod", "pods", status_subresource=True, short_names=("po",))
    with KubeServer(kinds=(*DEFAULT_KINDS, POD)) as server: ...

Use it through the ``kube_server`` and ``kube_api_client`` fixtures (import them into a ``conftest.py``),
or directly::

    with KubeServer() as server:
        with kubernetes.client.ApiClient(server.client_configuration()) as api:
            kubernetes.client.CoreV1Api(api).read_namespaced_secret("name", "namespace")

Faults for tests: :meth:`KubeServer.deny` (403), :meth:`KubeServer.inject_error` (any status, N times),
:meth:`KubeServer.go_down` / :meth:`KubeServer.come_up` (connections dropped, as an unreachable server),
:meth:`KubeServer.compact` (watch history expired), :meth:`KubeServer.send_bookmarks`.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import copy
import datetime as dt
import http.server
import ipaddress
import json
import queue
import re
import secrets
import select
import socket
import ssl
import tempfile
import threading
import time
import uuid
from collections import deque
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

import kubernetes
import pytest
import yaml
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

JsonObj = dict[str, Any]

DEFAULT_TOKEN = "mesh-identity-test-token"
DEFAULT_USER = "system:serviceaccount:mesh-identity:mesh-identity"


# --------------------------------------------------------------------------------------------- errors


class ApiError(Exception):
    """An error answered as a ``kind: Status`` body."""

    def __init__(self, code: int, reason: str, message: str, details: JsonObj | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.reason = reason
        self.message = message
        self.details = details

    def status(self) -> JsonObj:
        body: JsonObj = {
            "kind": "Status",
            "apiVersion": "v1",
            "metadata": {},
            "status": "Failure",
            "message": self.message,
            "reason": self.reason,
            "code": self.code,
        }
        if self.details is not None:
            body["details"] = self.details
        return body


def _details(kind: Kind, name: str | None) -> JsonObj:
    details: JsonObj = {"kind": kind.plural}
    if name:
        details["name"] = name
    if kind.group:
        details["group"] = kind.group
    return details


def not_found(kind: Kind, name: str) -> ApiError:
    return ApiError(404, "NotFound", f'{kind.qualified} "{name}" not found', _details(kind, name))


def already_exists(kind: Kind, name: str) -> ApiError:
    return ApiError(409, "AlreadyExists", f'{kind.qualified} "{name}" already exists', _details(kind, name))


def conflict(kind: Kind, name: str, why: str) -> ApiError:
    return ApiError(
        409, "Conflict", f'Operation cannot be fulfilled on {kind.qualified} "{name}": {why}', _details(kind, name)
    )


STALE = "the object has been modified; please apply your changes to the latest version and try again"


def invalid(kind: Kind, name: str, errors: Sequence[str]) -> ApiError:
    shown = errors[0] if len(errors) == 1 else "[" + ", ".join(errors) + "]"
    qualified_kind = f"{kind.kind}.{kind.group}" if kind.group else kind.kind
    details = _details(kind, name)
    details["kind"] = kind.kind
    details["causes"] = [{"reason": "FieldValueInvalid", "message": e} for e in errors]
    return ApiError(422, "Invalid", f'{qualified_kind} "{name}" is invalid: {shown}', details)


def bad_request(message: str) -> ApiError:
    return ApiError(400, "BadRequest", message)


def expired(resource_version: int, oldest: int) -> ApiError:
    return ApiError(410, "Expired", f"too old resource version: {resource_version} ({oldest})")


# ----------------------------------------------------------------------------------------------- kinds

Validator = Callable[["Kind", "JsonObj | None", JsonObj], list[str]]
Preparer = Callable[[JsonObj], None]

ALL_VERBS = ("create", "delete", "deletecollection", "get", "list", "patch", "update", "watch")


@dataclass(frozen=True)
class Kind:
    """One served kind. ``prepare`` normalises an object before it is stored (may raise :class:`ApiError`);
    ``validate(kind, old, new)`` returns field errors (``"spec: Forbidden: ..."``) that make a 422."""

    kind: str
    plural: str
    group: str = ""
    version: str = "v1"
    namespaced: bool = True
    status_subresource: bool = False
    unconditional_update: bool = True
    strategic_merge: bool = True
    short_names: tuple[str, ...] = ()
    field_labels: tuple[str, ...] = ()
    prepare: Preparer | None = None
    validate: Validator | None = None

    @property
    def api_version(self) -> str:
        return f"{self.group}/{self.version}" if self.group else self.version

    @property
    def qualified(self) -> str:
        """``secrets`` or ``certificaterequests.cert-manager.io``: how the real server names it in messages."""
        return f"{self.plural}.{self.group}" if self.group else self.plural

    @property
    def prefix(self) -> str:
        return f"/apis/{self.group}/{self.version}" if self.group else f"/api/{self.version}"


def _prepare_secret(obj: JsonObj) -> None:
    data = obj.get("data") or {}
    if not isinstance(data, dict):
        raise bad_request('Secret in version "v1" cannot be handled as a Secret: data is not an object')
    for key, value in data.items():
        try:
            base64.b64decode(str(value), validate=True)
        except binascii.Error:
            raise bad_request(
                f'Secret in version "v1" cannot be handled as a Secret: illegal base64 data in data.{key}'
            ) from None
    for key, value in (obj.pop("stringData", None) or {}).items():
        data[key] = base64.b64encode(str(value).encode()).decode()
    if data:
        obj["data"] = data
    obj.setdefault("type", "Opaque")


def _validate_config_map(kind: Kind, old: JsonObj | None, new: JsonObj) -> list[str]:
    data = new.get("data") or {}
    return [f"data[{k}]: Invalid value: must be a string" for k, v in data.items() if not isinstance(v, str)]


def _conditions(obj: JsonObj | None) -> dict[str, JsonObj]:
    conditions = ((obj or {}).get("status") or {}).get("conditions") or []
    return {c.get("type", ""): c for c in conditions if isinstance(c, dict)}


CERT_MANAGER_USAGES = (
    "signing",
    "digital signature",
    "content commitment",
    "key encipherment",
    "key agreement",
    "data encipherment",
    "cert sign",
    "crl sign",
    "encipher only",
    "decipher only",
    "any",
    "server auth",
    "client auth",
    "code signing",
    "email protection",
    "s/mime",
    "ipsec end system",
    "ipsec tunnel",
    "ipsec user",
    "timestamping",
    "ocsp signing",
    "microsoft sgc",
    "netscape sgc",
)


def _validate_certificate_request(kind: Kind, old: JsonObj | None, new: JsonObj) -> list[str]:
    """What cert-manager's CRD schema and validating webhook enforce on a CertificateRequest."""
    errors: list[str] = []
    spec = new.get("spec") or {}
    if old is None:
        if not spec.get("request"):
            errors.append("spec.request: Required value")
        if not (spec.get("issuerRef") or {}).get("name"):
            errors.append("spec.issuerRef.name: Required value")
        for index, usage in enumerate(spec.get("usages") or []):
            if usage not in CERT_MANAGER_USAGES:
                errors.append(f'spec.usages[{index}]: Unsupported value: "{usage}"')
    elif spec != (old.get("spec") or {}):
        errors.append("spec: Forbidden: field is immutable")
    conditions = _conditions(new)
    if "Approved" in conditions and "Denied" in conditions:
        errors.append("status.conditions: Forbidden: 'Approved' and 'Denied' conditions cannot coexist")
    before = _conditions(old)
    for approval in ("Approved", "Denied"):
        if approval in before and approval in conditions and before[approval] != conditions[approval]:
            errors.append(f"status.conditions: Forbidden: '{approval}' condition may not be modified once set")
        if approval in before and approval not in conditions:
            errors.append(f"status.conditions: Forbidden: '{approval}' condition may not be removed once set")
        if approval in conditions and conditions[approval].get("status") != "True":
            errors.append(f"status.conditions: Forbidden: '{approval}' condition may only have status True")
    return errors


SECRET = Kind("Secret", "secrets", field_labels=("type",), prepare=_prepare_secret)
CONFIG_MAP = Kind("ConfigMap", "configmaps", short_names=("cm",), validate=_validate_config_map)
NAMESPACE = Kind("Namespace", "namespaces", namespaced=False, status_subresource=True, short_names=("ns",))


def cert_manager_kind(kind: str, plural: str, **options: Any) -> Kind:
    """A cert-manager custom resource: status subresource, no unconditional update, no strategic merge."""
    return Kind(
        kind,
        plural,
        group="cert-manager.io",
        status_subresource=True,
        unconditional_update=False,
        strategic_merge=False,
        **options,
    )


CERTIFICATE_REQUEST = cert_manager_kind(
    "CertificateRequest", "certificaterequests", short_names=("cr", "crs"), validate=_validate_certificate_request
)
ISSUER = cert_manager_kind("Issuer", "issuers")
CLUSTER_ISSUER = cert_manager_kind("ClusterIssuer", "clusterissuers", namespaced=False)

DEFAULT_KINDS: tuple[Kind, ...] = (SECRET, CONFIG_MAP, NAMESPACE, CERTIFICATE_REQUEST, ISSUER, CLUSTER_ISSUER)


# ------------------------------------------------------------------------------------------- selectors

_KEY = r"(?:[A-Za-z0-9][-A-Za-z0-9.]*/)?[A-Za-z0-9](?:[-A-Za-z0-9_.]*[A-Za-z0-9])?"
_VALUE = r"(?:[A-Za-z0-9](?:[-A-Za-z0-9_.]*[A-Za-z0-9])?)?"
_REQUIREMENT = re.compile(
    rf"""^\s*(?:
        !\s*(?P<absent>{_KEY})
      | (?P<key>{_KEY})\s*(?:
            (?P<op>==|=|!=)\s*(?P<value>{_VALUE})
          | \s(?P<setop>in|notin)\s*\((?P<values>[^()]*)\)
        )?
    )\s*$""",
    re.VERBOSE,
)

Matcher = Callable[[Mapping[str, str]], bool]


def _split_selector(text: str) -> list[str]:
    parts, depth, current = [], 0, ""
    for char in text:
        if char == "(":
            depth += 1
        elif char == ")":
            depth -= 1
        if char == "," and depth == 0:
            parts.append(current)
            current = ""
        else:
            current += char
    parts.append(current)
    return [p for p in parts if p.strip()]


@dataclass(frozen=True)
class Requirement:
    """One term of a label selector: ``op`` is ``=``, ``!=``, ``in``, ``notin``, ``exists`` or ``!exists``."""

    key: str
    op: str
    values: frozenset[str] = frozenset()

    def matches(self, labels: Mapping[str, str]) -> bool:
        value = labels.get(self.key)
        match self.op:
            case "exists":
                return self.key in labels
            case "!exists":
                return self.key not in labels
            case "=" | "in":
                return value in self.values
            case _:  # "!=" and "notin" also select objects without the label
                return value not in self.values


def parse_label_selector(text: str) -> Matcher:
    """A label selector as ``kubectl -l`` takes it; 400 BadRequest when it does not parse."""
    requirements: list[Requirement] = []
    for part in _split_selector(text):
        match = _REQUIREMENT.match(part)
        if not match:
            raise bad_request(f"unable to parse requirement: {part.strip()!r}")
        if match["absent"]:
            requirements.append(Requirement(match["absent"], "!exists"))
        elif match["op"]:
            requirements.append(
                Requirement(match["key"], "!=" if match["op"] == "!=" else "=", frozenset({match["value"]}))
            )
        elif match["setop"]:
            values = frozenset(v.strip() for v in match["values"].split(",") if v.strip())
            requirements.append(Requirement(match["key"], match["setop"], values))
        else:
            requirements.append(Requirement(match["key"], "exists"))

    def matches(labels: Mapping[str, str]) -> bool:
        return all(r.matches(labels) for r in requirements)

    return matches


def _field(obj: JsonObj, path: str) -> str | None:
    value: Any = obj
    for part in path.split("."):
        if not isinstance(value, dict):
            return None
        value = value.get(part)
    return None if value is None else str(value)


def parse_field_selector(kind: Kind, text: str) -> Callable[[JsonObj], bool]:
    allowed = ("metadata.name", "metadata.namespace", *kind.field_labels)
    terms: list[tuple[str, str, bool]] = []
    for part in _split_selector(text):
        match = re.fullmatch(r"\s*([\w.]+)\s*(==|=|!=)\s*([^,]*?)\s*", part)
        if not match:
            raise bad_request(f"invalid selector: {part.strip()!r}; can't understand it")
        path, op, value = match.groups()
        if path not in allowed:
            raise bad_request(f"field label not supported: {path}")
        terms.append((path, value, op == "!="))

    def matches(obj: JsonObj) -> bool:
        return all((_field(obj, path) == value) != negate for path, value, negate in terms)

    return matches


# ---------------------------------------------------------------------------------------------- patches


def merge_patch(target: Any, patch: Any) -> Any:
    """RFC 7386 JSON merge patch (``null`` removes a key; lists are replaced whole)."""
    if not isinstance(patch, dict):
        return copy.deepcopy(patch)
    result = copy.deepcopy(target) if isinstance(target, dict) else {}
    for key, value in patch.items():
        if key.startswith("$"):  # strategic-merge directives: not needed by the kinds served here
            continue
        if value is None:
            result.pop(key, None)
        else:
            result[key] = merge_patch(result.get(key), value)
    return result


def _pointer(path: str) -> list[str]:
    if path == "":
        return []
    if not path.startswith("/"):
        raise bad_request(f"invalid JSON pointer: {path!r}")
    return [p.replace("~1", "/").replace("~0", "~") for p in path[1:].split("/")]


def _walk(doc: Any, parts: list[str], path: str) -> Any:
    for part in parts:
        if isinstance(doc, dict) and part in doc:
            doc = doc[part]
        elif isinstance(doc, list) and part.isdigit() and int(part) < len(doc):
            doc = doc[int(part)]
        else:
            raise ApiError(422, "Invalid", f"jsonpatch: path {path!r} does not exist")
    return doc


def json_patch(doc: Any, operations: Any) -> Any:
    """RFC 6902 JSON patch: add, remove, replace, move, copy, test."""
    if not isinstance(operations, list):
        raise bad_request("json patch must be a list of operations")
    doc = copy.deepcopy(doc)
    for operation in operations:
        if not isinstance(operation, dict) or "op" not in operation or "path" not in operation:
            raise bad_request(f"invalid json patch operation: {operation!r}")
        op, path = operation["op"], operation["path"]
        parts = _pointer(path)
        if op in ("move", "copy"):
            value = copy.deepcopy(_walk(doc, _pointer(operation.get("from", "")), operation.get("from", "")))
            if op == "move":
                doc = json_patch(doc, [{"op": "remove", "path": operation["from"]}])
            doc = json_patch(doc, [{"op": "add", "path": path, "value": value}])
            continue
        if op == "test":
            if _walk(doc, parts, path) != operation.get("value"):
                raise ApiError(422, "Invalid", f"jsonpatch: test operation for path {path!r} failed")
            continue
        if not parts:
            if op == "remove":
                raise bad_request("jsonpatch: cannot remove the document root")
            doc = copy.deepcopy(operation.get("value"))
            continue
        parent = _walk(doc, parts[:-1], path)
        last = parts[-1]
        if op == "add":
            if isinstance(parent, list):
                index = len(parent) if last == "-" else int(last) if last.isdigit() else -1
                if not 0 <= index <= len(parent):
                    raise ApiError(422, "Invalid", f"jsonpatch: path {path!r} is out of range")
                parent.insert(index, copy.deepcopy(operation.get("value")))
            elif isinstance(parent, dict):
                parent[last] = copy.deepcopy(operation.get("value"))
            else:
                raise ApiError(422, "Invalid", f"jsonpatch: path {path!r} does not exist")
        elif op in ("remove", "replace"):
            _walk(parent, [last], path)
            if op == "remove":
                del parent[int(last) if isinstance(parent, list) else last]
            else:
                parent[int(last) if isinstance(parent, list) else last] = copy.deepcopy(operation.get("value"))
        else:
            raise bad_request(f"jsonpatch: unknown operation {op!r}")
    return doc


# ------------------------------------------------------------------------------------------------ store

_NAME = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*")
_NAME_HELP = (
    "a lowercase RFC 1123 subdomain must consist of lower case alphanumeric characters, '-' or '.', and must "
    "start and end with an alphanumeric character (e.g. 'example.com', regex used for validation is "
    r"'[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*')"
)
_GENERATE_ALPHABET = "bcdfghjklmnpqrstvwxz2456789"  # the real apiserver's alphabet: no vowels, no 0/1/3


def _now() -> str:
    return dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _meta(obj: JsonObj) -> JsonObj:
    meta = obj.get("metadata")
    if not isinstance(meta, dict):
        meta = {}
        obj["metadata"] = meta
    return meta


def _labels(obj: JsonObj) -> Mapping[str, str]:
    return _meta(obj).get("labels") or {}


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


class Store:
    """Objects of every kind, one resourceVersion counter, and the retained event history."""

    def __init__(self, kinds: Sequence[Kind], history_limit: int) -> None:
        self.lock = threading.RLock()
        self.kinds = tuple(kinds)
        self.resource_version = 100  # a real cluster never answers "0", which means "any" to a watch
        self.compacted = 0  # watches from a resourceVersion below this are expired
        self._objects: dict[Kind, dict[tuple[str, str], JsonObj]] = {k: {} for k in kinds}
        self._history: deque[Event] = deque()
        self._history_limit = history_limit
        self._watchers: set[Watcher] = set()

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
        _meta(new)["resourceVersion"] = str(self.resource_version)
        key = (_meta(new).get("namespace", ""), _meta(new)["name"])
        if event_type == "DELETED":
            del self._objects[kind][key]
        else:
            self._objects[kind][key] = new
        event = Event(self.resource_version, kind, event_type, old, copy.deepcopy(new))
        self._history.append(event)
        while len(self._history) > self._history_limit:
            self.compacted = self._history.popleft().resource_version
        for watcher in self._watchers:
            self._deliver(watcher, event)
        return copy.deepcopy(new)

    @staticmethod
    def _deliver(watcher: Watcher, event: Event) -> None:
        if watcher.kind is not event.kind:
            return
        namespace = _meta(event.new).get("namespace", "")
        if watcher.namespace is not None and watcher.namespace != namespace:
            return
        was = event.old is not None and watcher.matches(event.old)
        now = watcher.matches(event.new)
        if event.type == "MODIFIED" and was != now:  # the object entered or left the selected set
            watcher.events.put(("ADDED" if now else "DELETED", event.new))
        elif (event.type == "DELETED" and was) or (event.type != "DELETED" and now):
            watcher.events.put((event.type, event.new))

    def create(self, kind: Kind, namespace: str, body: JsonObj) -> JsonObj:
        with self.lock:
            obj = copy.deepcopy(body)
            meta = _meta(obj)
            _check_type(kind, obj)
            if kind.namespaced:
                if meta.get("namespace", namespace) != namespace:
                    raise bad_request(
                        "the namespace of the provided object does not match the namespace sent on the request"
                    )
                meta["namespace"] = namespace
            else:
                meta.pop("namespace", None)
            if meta.get("resourceVersion"):
                raise bad_request("resourceVersion should not be set on objects to be created")
            if not meta.get("name"):
                if not meta.get("generateName"):
                    raise invalid(kind, "", ["metadata.name: Required value: name or generateName is required"])
                while True:
                    suffix = "".join(secrets.choice(_GENERATE_ALPHABET) for _ in range(5))
                    meta["name"] = meta["generateName"] + suffix
                    if (namespace if kind.namespaced else "", meta["name"]) not in self._objects[kind]:
                        break
            name = meta["name"]
            if not isinstance(name, str) or len(name) > 253 or not _NAME.fullmatch(name):
                raise invalid(kind, str(name), [f"metadata.name: Invalid value: {name!r}: {_NAME_HELP}"])
            if (meta.get("namespace", ""), name) in self._objects[kind]:
                raise already_exists(kind, name)
            meta["uid"] = str(uuid.uuid4())
            meta["creationTimestamp"] = _now()
            meta.pop("deletionTimestamp", None)
            if kind.status_subresource:
                meta["generation"] = 1
                obj.pop("status", None)
            self._finish(kind, None, obj)
            return self._commit(kind, "ADDED", None, obj)

    def _finish(self, kind: Kind, old: JsonObj | None, new: JsonObj) -> None:
        if kind.prepare is not None:
            kind.prepare(new)
        errors = kind.validate(kind, old, new) if kind.validate is not None else []
        if errors:
            raise invalid(kind, _meta(new)["name"], errors)

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
            meta = _meta(body)
            if meta.get("name", name) != name:
                raise bad_request(
                    f"the name of the object ({meta['name']}) does not match the name on the URL ({name})"
                )
            if kind.namespaced and meta.get("namespace", namespace) != namespace:
                raise bad_request(
                    "the namespace of the provided object does not match the namespace sent on the request"
                )
            wanted = meta.get("resourceVersion")
            if not wanted and not kind.unconditional_update:
                raise invalid(
                    kind, name, ["metadata.resourceVersion: Invalid value: 0x0: must be specified for an update"]
                )
            if wanted and wanted != _meta(old)["resourceVersion"]:
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
                new_meta, old_meta = _meta(new), _meta(old)
                for fixed in ("name", "namespace", "uid", "creationTimestamp", "deletionTimestamp", "generation"):
                    if fixed in old_meta:
                        new_meta[fixed] = old_meta[fixed]
                    else:
                        new_meta.pop(fixed, None)
            self._finish(kind, old, new)
            _meta(new)["resourceVersion"] = _meta(old)["resourceVersion"]
            if new == old:
                return copy.deepcopy(old)  # a no-op write changes nothing, not even the resourceVersion
            if kind.status_subresource and _spec_part(new) != _spec_part(old):
                _meta(new)["generation"] = int(_meta(old).get("generation", 1)) + 1
            if _meta(new).get("deletionTimestamp") and not _meta(new).get("finalizers"):
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
                if wanted and wanted != _meta(old).get(field_name):
                    raise conflict(
                        kind,
                        name,
                        f"Precondition failed: {label} in precondition: {wanted}, {label} "
                        f"in object meta: {_meta(old).get(field_name)}",
                    )
            new = copy.deepcopy(old)
            if _meta(old).get("finalizers"):
                if _meta(old).get("deletionTimestamp"):
                    return copy.deepcopy(old)
                _meta(new)["deletionTimestamp"] = _now()
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
                    _meta(mark)["annotations"] = {"k8s.io/initial-events-end": "true"}
                    first.append(("BOOKMARK", mark))
            else:
                try:
                    since = int(str(resource_version))
                except ValueError:
                    raise bad_request(f"invalid resource version: {resource_version!r}") from None
                if since < self.compacted:
                    raise expired(since, self.compacted)
                watcher.resource_version = since
                replay = Watcher(kind, namespace, matches, bookmarks)
                for event in self._history:
                    if event.resource_version > since:
                        self._deliver(replay, event)
                while not replay.events.empty():
                    item = replay.events.get()
                    assert item is not None
                    first.append(item)
            self._watchers.add(watcher)
            return watcher, first

    def unwatch(self, watcher: Watcher) -> None:
        with self.lock:
            self._watchers.discard(watcher)

    def bookmark(self, kind: Kind) -> JsonObj:
        return {
            "kind": kind.kind,
            "apiVersion": kind.api_version,
            "metadata": {"resourceVersion": str(self.resource_version)},
        }

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
            self._history.clear()
            self.compacted = self.resource_version
            return self.compacted

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


# ----------------------------------------------------------------------------------- access and faults


@dataclass(frozen=True)
class Rule:
    """A deny rule: each field is a value or ``*``. ``resource`` is ``plural`` or ``plural/status``."""

    verb: str = "*"
    resource: str = "*"
    group: str = "*"
    namespace: str = "*"
    user: str = "*"

    def matches(self, user: str, verb: str, group: str, resource: str, namespace: str) -> bool:
        return all(
            mine in ("*", theirs)
            for mine, theirs in (
                (self.verb, verb),
                (self.resource, resource),
                (self.group, group),
                (self.namespace, namespace),
                (self.user, user),
            )
        )


@dataclass
class InjectedError:
    rule: Rule
    error: ApiError
    times: int | None  # None: until removed


@dataclass(frozen=True)
class RequestRecord:
    """One request as the server saw it (for tests and benchmarks)."""

    user: str
    verb: str
    resource: str
    namespace: str
    name: str
    code: int


@dataclass(frozen=True)
class Route:
    kind: Kind
    namespace: str | None  # None: all namespaces (a list or watch), or a cluster-scoped kind
    name: str | None
    subresource: str | None

    @property
    def resource(self) -> str:
        return f"{self.kind.plural}/{self.subresource}" if self.subresource else self.kind.plural


# ------------------------------------------------------------------------------------------------- HTTP


class _Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: _HttpServer
    disable_nagle_algorithm = True

    def log_message(self, format: str, *args: Any) -> None:
        """Quiet: tests read :attr:`KubeServer.requests` instead."""

    def do_GET(self) -> None:
        self._serve("GET")

    def do_POST(self) -> None:
        self._serve("POST")

    def do_PUT(self) -> None:
        self._serve("PUT")

    def do_PATCH(self) -> None:
        self._serve("PATCH")

    def do_DELETE(self) -> None:
        self._serve("DELETE")

    # -- plumbing
    def _body(self) -> Any:
        length = int(self.headers.get("Content-Length") or 0)
        raw = self.rfile.read(length) if length else b""
        if not raw:
            return None
        try:
            return json.loads(raw)
        except json.JSONDecodeError as err:
            raise bad_request(f"couldn't get version/kind; json parse error: {err}") from None

    def _send(self, code: int, body: JsonObj) -> None:
        data = json.dumps(body).encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.send_header("Audit-Id", str(uuid.uuid4()))
        self.end_headers()
        self.wfile.write(data)

    def _chunk(self, data: bytes) -> None:
        self.wfile.write(f"{len(data):X}\r\n".encode() + data + b"\r\n")

    def _serve(self, method: str) -> None:
        owner = self.server.owner
        record: dict[str, Any] = {
            "user": "",
            "verb": method.lower(),
            "resource": "",
            "namespace": "",
            "name": "",
            "code": 200,
        }
        try:
            if owner.down:
                self.close_connection = True
                socket.socket.shutdown(self.connection, socket.SHUT_RDWR)
                return
            url = urlsplit(self.path)
            params = {k: v[-1] for k, v in parse_qs(url.query, keep_blank_values=True).items()}
            body = self._body() if method in ("POST", "PUT", "PATCH", "DELETE") else None
            user = owner.authenticate(self.headers.get("Authorization", ""))
            record["user"] = user
            path = unquote(url.path).rstrip("/") or "/"
            discovery = owner.discovery(path)
            if discovery is not None:
                record["verb"], record["resource"] = "get", path
                if method != "GET":
                    raise ApiError(405, "MethodNotAllowed", f"the server does not allow this method on {path}")
                self._answer(record, 200, discovery)
                return
            route = owner.route(path)
            verb = _verb(method, route, params)
            record.update(verb=verb, resource=route.resource, namespace=route.namespace or "", name=route.name or "")
            owner.authorize(user, verb, route)
            if verb == "watch":
                self._watch(route, params, record)  # records the request once the stream has opened
                return
            code, result = owner.handle(method, route, params, body, self.headers.get("Content-Type", ""))
            self._answer(record, code, result)
        except ApiError as err:
            self._answer(record, err.code, err.status())
        except (ConnectionError, ssl.SSLError, OSError):
            self.close_connection = True
        finally:
            self._record(record)

    def _answer(self, record: dict[str, Any], code: int, body: JsonObj) -> None:
        """Record the request, then answer it (so a client that got its answer finds the record)."""
        record["code"] = code
        self._record(record)
        self._send(code, body)

    def _record(self, record: dict[str, Any]) -> None:
        if not record.get("recorded"):
            record["recorded"] = True
            self.server.owner.record(RequestRecord(**{k: v for k, v in record.items() if k != "recorded"}))

    def _watch(self, route: Route, params: Mapping[str, str], record: dict[str, Any]) -> None:
        owner = self.server.owner
        store = owner.store
        matches = owner.matcher(route, params)
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
                route.kind, route.namespace, matches, params.get("resourceVersion"), bookmarks, initial, record["user"]
            )
        except ApiError as err:
            if err.code != 410:
                raise
            # An expired resourceVersion is not an HTTP error: the stream opens and says so in an ERROR event.
            record["code"] = 410
            self._record(record)
            self._start_stream()
            self._chunk(json.dumps({"type": "ERROR", "object": err.status()}).encode() + b"\n")
            self._chunk(b"")
            return
        self._record(record)
        self._start_stream()
        owner.watch_opened(watcher)
        try:
            for event_type, obj in first:
                self._chunk(json.dumps({"type": event_type, "object": obj}).encode() + b"\n")
            while deadline is None or time.monotonic() < deadline:
                try:
                    item = watcher.events.get(timeout=0.05)
                except queue.Empty:
                    if self._peer_gone():
                        return
                    continue
                if item is None:
                    break
                event_type, obj = item
                self._chunk(json.dumps({"type": event_type, "object": obj}).encode() + b"\n")
            self._chunk(b"")
        finally:
            store.unwatch(watcher)
            owner.watch_closed(watcher)

    def _start_stream(self) -> None:
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()

    def _peer_gone(self) -> bool:
        """The client closed the watch (it sends nothing while a response is in flight)."""
        try:
            readable, _, _ = select.select([self.connection], [], [], 0)
            if not readable:
                return False
            self.connection.recv(1)
        except (OSError, ValueError):
            pass
        self.close_connection = True
        return True


def _verb(method: str, route: Route, params: Mapping[str, str]) -> str:
    if method == "GET":
        if route.name is not None:
            return "get"
        return "watch" if params.get("watch") in ("true", "1") else "list"
    if method == "POST":
        if route.name is not None:
            raise ApiError(405, "MethodNotAllowed", "the server does not allow this method on the requested resource")
        return "create"
    if route.name is None:
        if method == "DELETE":
            return "deletecollection"
        raise ApiError(405, "MethodNotAllowed", "the server does not allow this method on the requested resource")
    return {"PUT": "update", "PATCH": "patch", "DELETE": "delete"}[method]


class _HttpServer(http.server.ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, owner: KubeServer, tls: ssl.SSLContext | None) -> None:
        self.owner = owner
        self.tls = tls
        self.connections: set[socket.socket] = set()
        self.connections_lock = threading.Lock()
        super().__init__(("127.0.0.1", 0), _Handler)

    def finish_request(self, request: Any, client_address: Any) -> None:
        sock: socket.socket = request
        with self.connections_lock:
            self.connections.add(sock)
        try:
            if self.tls is not None:
                try:
                    sock = self.tls.wrap_socket(sock, server_side=True)
                except (ssl.SSLError, OSError):
                    return
                with self.connections_lock:
                    self.connections.add(sock)
            super().finish_request(sock, client_address)
        finally:
            with self.connections_lock:
                self.connections.discard(request)
                self.connections.discard(sock)
            if sock is not request:
                with contextlib.suppress(OSError):
                    sock.close()

    def drop_connections(self) -> None:
        with self.connections_lock:
            live = list(self.connections)
        for sock in live:
            with contextlib.suppress(OSError):
                # the plain socket's shutdown: SSLSocket.shutdown would drop its TLS state first, and a
                # handler thread still writing would then send plaintext into the TLS stream
                socket.socket.shutdown(sock, socket.SHUT_RDWR)


# ----------------------------------------------------------------------------------------------- server


class KubeServer:
    """The test API server. ``tokens`` maps bearer tokens to user names (default: one token, one user)."""

    def __init__(
        self,
        kinds: Sequence[Kind] = DEFAULT_KINDS,
        *,
        tokens: Mapping[str, str] | None = None,
        tls: bool = True,
        history_limit: int = 10_000,
        request_log_limit: int = 100_000,
    ) -> None:
        self.kinds = tuple(kinds)
        self.tokens = dict(tokens) if tokens is not None else {DEFAULT_TOKEN: DEFAULT_USER}
        self.store = Store(self.kinds, history_limit)
        self.rules: list[Rule] = []
        self.injected: list[InjectedError] = []
        self.requests: deque[RequestRecord] = deque(maxlen=request_log_limit)
        self.down = False
        self._lock = threading.Lock()
        self._watching: list[Watcher] = []  # the open streams, in the order they opened
        self._watch_changed = threading.Condition(self._lock)
        self._tmp = tempfile.TemporaryDirectory(prefix="kube-server-")
        self.ca_path = Path(self._tmp.name) / "ca.crt"
        self._tls_context = self._make_tls() if tls else None
        self._http = _HttpServer(self, self._tls_context)
        self._thread: threading.Thread | None = None
        scheme = "https" if tls else "http"
        self.port: int = self._http.server_address[1]
        self.url = f"{scheme}://127.0.0.1:{self.port}"

    # -- lifecycle
    def start(self) -> KubeServer:
        self._thread = threading.Thread(
            target=self._http.serve_forever, kwargs={"poll_interval": 0.05}, name="kube-server", daemon=True
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop serving: the port closes, open connections and watches are cut."""
        if self._thread is not None:
            self._http.shutdown()
            self._thread.join()
            self._thread = None
        self.store.end_watches()
        with self._watch_changed:  # let the streams end cleanly before the connections are cut
            self._watch_changed.wait_for(lambda: not self._watching, 2.0)
        self._http.drop_connections()
        self._http.server_close()
        self._tmp.cleanup()

    def __enter__(self) -> KubeServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def go_down(self) -> None:
        """Behave as an unreachable server: every connection is dropped without an answer."""
        self.down = True
        self.store.end_watches()
        self._http.drop_connections()

    def come_up(self) -> None:
        self.down = False

    # -- client side helpers
    @property
    def ca_pem(self) -> bytes:
        return self.ca_path.read_bytes() if self._tls_context is not None else b""

    def client_configuration(self, token: str | None = None) -> kubernetes.client.Configuration:
        """A ``kubernetes.client.Configuration`` for this server, with ``token`` (default: the first)."""
        token = token if token is not None else next(iter(self.tokens))
        config = kubernetes.client.Configuration(
            host=self.url,
            api_key={"authorization": token},
            api_key_prefix={"authorization": "Bearer"},
        )
        if self._tls_context is not None:
            config.ssl_ca_cert = str(self.ca_path)
        return config

    def kubeconfig(self, context: str = "kube-server", namespace: str = "default", token: str | None = None) -> JsonObj:
        """A kubeconfig document with one cluster, user and context pointing here."""
        token = token if token is not None else next(iter(self.tokens))
        cluster: JsonObj = {"server": self.url}
        if self._tls_context is not None:
            cluster["certificate-authority-data"] = base64.b64encode(self.ca_pem).decode()
        return {
            "apiVersion": "v1",
            "kind": "Config",
            "clusters": [{"name": f"{context}-cluster", "cluster": cluster}],
            "users": [{"name": f"{context}-user", "user": {"token": token}}],
            "contexts": [
                {
                    "name": context,
                    "context": {"cluster": f"{context}-cluster", "user": f"{context}-user", "namespace": namespace},
                }
            ],
            "current-context": context,
        }

    def write_kubeconfig(
        self, path: Path, context: str = "kube-server", namespace: str = "default", token: str | None = None
    ) -> Path:
        path.write_text(yaml.safe_dump(self.kubeconfig(context, namespace, token)))
        return path

    def write_in_cluster_files(self, directory: Path, token: str | None = None) -> dict[str, str]:
        """Write ``token`` and ``ca.crt`` as a pod's service-account mount has them; return the environment
        variables (``KUBERNETES_SERVICE_HOST``/``_PORT``) an in-cluster client reads."""
        directory.mkdir(parents=True, exist_ok=True)
        (directory / "token").write_text(token if token is not None else next(iter(self.tokens)))
        (directory / "ca.crt").write_bytes(self.ca_pem)
        (directory / "namespace").write_text("mesh-identity")
        return {"KUBERNETES_SERVICE_HOST": "127.0.0.1", "KUBERNETES_SERVICE_PORT": str(self.port)}

    # -- test controls
    def deny(
        self, verb: str = "*", resource: str = "*", *, group: str = "*", namespace: str = "*", user: str = "*"
    ) -> Rule:
        """Answer 403 Forbidden to matching requests until :meth:`allow` removes the rule."""
        rule = Rule(verb, resource, group, namespace, user)
        with self._lock:
            self.rules.append(rule)
        return rule

    def allow(self, rule: Rule) -> None:
        with self._lock:
            self.rules.remove(rule)

    def inject_error(
        self,
        verb: str = "*",
        resource: str = "*",
        *,
        code: int = 500,
        reason: str = "InternalError",
        message: str = "an error on the server has prevented the request from succeeding",
        times: int | None = 1,
        namespace: str = "*",
        user: str = "*",
    ) -> InjectedError:
        """Answer the next ``times`` matching requests (None: all, until removed) with this Status."""
        injected = InjectedError(Rule(verb, resource, "*", namespace, user), ApiError(code, reason, message), times)
        with self._lock:
            self.injected.append(injected)
        return injected

    def remove_error(self, injected: InjectedError) -> None:
        with self._lock:
            if injected in self.injected:
                self.injected.remove(injected)

    def end_watches(self) -> None:
        """End every open watch stream cleanly, as the real server does when a watch times out."""
        self.store.end_watches()

    def compact(self) -> int:
        """Drop the watch history: a watch from any resourceVersion older than the current one gets 410 Expired.
        Returns the current one, from which a watch still resumes (it missed nothing): to expire what a client
        has seen, write something after its last event first."""
        return self.store.compact()

    def send_bookmarks(self) -> int:
        """Send a BOOKMARK to every open watch that asked for them; returns how many were sent."""
        return self.store.send_bookmarks()

    def wait_for_watches(self, count: int, timeout: float = 10.0) -> bool:
        """Wait until at least ``count`` watch streams are open (so a test can act after a client watches).
        A stream ended by :meth:`end_watches` counts until its handler has closed it; to wait for one client's
        stream, or for a stream re-opened after some point, use :meth:`wait_for_watch`."""
        with self._watch_changed:
            return self._watch_changed.wait_for(lambda: len(self._watching) >= count, timeout)

    def wait_for_watch(
        self, *, user: str | None = None, kind: Kind | None = None, since: int = 0, timeout: float = 10.0
    ) -> bool:
        """Wait until a watch stream of ``user`` (any user if None) on ``kind`` (any) is open that started at
        resourceVersion ``since`` or later (see :attr:`Watcher.resource_version`): a client's first watch, or
        the one it re-opened from a fresh read after :meth:`compact`."""

        def found() -> bool:
            return any(
                (user is None or w.user == user) and (kind is None or w.kind is kind) and w.resource_version >= since
                for w in self._watching
            )

        with self._watch_changed:
            return self._watch_changed.wait_for(found, timeout)

    @property
    def open_watches(self) -> int:
        with self._lock:
            return len(self._watching)

    def objects(self, kind: Kind, namespace: str | None = None, label_selector: str = "") -> list[JsonObj]:
        """The stored objects of a kind, read directly (for assertions)."""
        matcher = parse_label_selector(label_selector) if label_selector else (lambda _labels: True)
        return self.store.select(kind, namespace, lambda obj: matcher(_labels(obj)))

    def put_object(self, kind: Kind, obj: JsonObj) -> JsonObj:
        """Create an object directly (test setup), as if a client had POSTed it."""
        return self.store.create(kind, _meta(obj).get("namespace", ""), obj)

    # -- used by the handler
    def watch_opened(self, watcher: Watcher) -> None:
        with self._watch_changed:
            self._watching.append(watcher)
            self._watch_changed.notify_all()

    def watch_closed(self, watcher: Watcher) -> None:
        with self._watch_changed:
            self._watching.remove(watcher)
            self._watch_changed.notify_all()

    def record(self, record: RequestRecord) -> None:
        self.requests.append(record)

    def authenticate(self, header: str) -> str:
        scheme, _, token = header.partition(" ")
        user = self.tokens.get(token.strip()) if scheme.lower() == "bearer" else None
        if user is None:
            raise ApiError(401, "Unauthorized", "Unauthorized")
        return user

    def authorize(self, user: str, verb: str, route: Route) -> None:
        namespace = route.namespace or ""
        with self._lock:
            for injected in self.injected:
                if injected.rule.matches(user, verb, route.kind.group, route.resource, namespace):
                    if injected.times is not None:
                        injected.times -= 1
                        if injected.times <= 0:
                            self.injected.remove(injected)
                    raise injected.error
            denied = any(r.matches(user, verb, route.kind.group, route.resource, namespace) for r in self.rules)
        if denied:
            kind = route.kind
            subject = f'{kind.qualified} "{route.name}"' if route.name else kind.qualified
            scope = f'in the namespace "{namespace}"' if namespace else "at the cluster scope"
            raise ApiError(
                403,
                "Forbidden",
                f'{subject} is forbidden: User "{user}" cannot {verb} resource "{route.resource}" in API group '
                f'"{kind.group}" {scope}',
                _details(kind, route.name),
            )

    def route(self, path: str) -> Route:
        """Map a resource path to (kind, namespace, name, subresource); 404 NotFound if none."""
        for kind in self.kinds:
            if not path.startswith(kind.prefix + "/"):
                continue
            parts = path[len(kind.prefix) + 1 :].split("/")
            namespaced = len(parts) >= 3 and parts[0] == "namespaces" and parts[2] == kind.plural
            if kind.namespaced and namespaced:
                rest = parts[3:]
                namespace: str | None = parts[1]
            elif parts[0] == kind.plural and (kind.namespaced is False or len(parts) == 1):
                rest = parts[1:]
                namespace = None
            else:
                continue
            if len(rest) == 0:
                return Route(kind, namespace, None, None)
            if len(rest) == 1:
                return Route(kind, namespace, rest[0], None)
            if len(rest) == 2 and rest[1] == "status" and kind.status_subresource:
                return Route(kind, namespace, rest[0], "status")
        raise ApiError(404, "NotFound", "the server could not find the requested resource")

    def matcher(self, route: Route, params: Mapping[str, str]) -> Callable[[JsonObj], bool]:
        labels = parse_label_selector(params.get("labelSelector", ""))
        fields = parse_field_selector(route.kind, params.get("fieldSelector", ""))
        return lambda obj: labels(_labels(obj)) and fields(obj)

    def handle(
        self, method: str, route: Route, params: Mapping[str, str], body: Any, content_type: str
    ) -> tuple[int, JsonObj]:
        kind, store = route.kind, self.store
        namespace = route.namespace or ""
        if method == "GET" and route.name is not None:
            return 200, store.get(kind, namespace, route.name)
        if method == "GET":
            return 200, self._list(route, params)
        if method == "POST":
            if not isinstance(body, dict):
                raise bad_request("the body of the request must be a JSON object")
            if kind.namespaced and route.namespace is None:
                raise ApiError(
                    405, "MethodNotAllowed", "the server does not allow this method on the requested resource"
                )
            return 201, store.create(kind, namespace, body)
        if method == "DELETE" and route.name is None:
            matches = self.matcher(route, params)
            deleted = []
            for obj in store.select(kind, route.namespace, matches):
                with contextlib.suppress(ApiError):
                    if store.delete(kind, _meta(obj).get("namespace", ""), _meta(obj)["name"], {}) is None:
                        deleted.append(obj)
            return 200, {
                "kind": f"{kind.kind}List",
                "apiVersion": kind.api_version,
                "metadata": {"resourceVersion": str(store.resource_version)},
                "items": deleted,
            }
        assert route.name is not None
        name = route.name
        if method == "DELETE":
            options = body if isinstance(body, dict) else {}
            remaining = store.delete(kind, namespace, name, options)
            if remaining is not None:
                return 200, remaining
            details = _details(kind, name)
            return 200, {"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Success", "details": details}
        if method == "PUT":
            if not isinstance(body, dict):
                raise bad_request("the body of the request must be a JSON object")
            return 200, store.update(kind, namespace, name, lambda _current: copy.deepcopy(body), route.subresource)
        media = content_type.split(";", maxsplit=1)[0].strip()
        if media == "application/merge-patch+json" or (
            media == "application/strategic-merge-patch+json" and kind.strategic_merge
        ):
            change: Callable[[JsonObj], JsonObj] = lambda current: merge_patch(current, body)  # noqa: E731
        elif media == "application/json-patch+json":
            change = lambda current: json_patch(current, body)  # noqa: E731
        else:
            accepted = "application/json-patch+json, application/merge-patch+json"
            if kind.strategic_merge:
                accepted += ", application/strategic-merge-patch+json"
            raise ApiError(
                415,
                "UnsupportedMediaType",
                f"the body of the request was in an unknown format - accepted media types include: {accepted}",
            )
        return 200, store.update(kind, namespace, name, change, route.subresource)

    def _list(self, route: Route, params: Mapping[str, str]) -> JsonObj:
        kind = route.kind
        with self.store.lock:
            items = self.store.select(kind, route.namespace, self.matcher(route, params))
            resource_version = str(self.store.resource_version)
        meta: JsonObj = {"resourceVersion": resource_version}
        if params.get("continue"):
            try:
                start = json.loads(base64.urlsafe_b64decode(params["continue"]))
            except (ValueError, binascii.Error):
                raise bad_request("continue key is not valid") from None
            items = [o for o in items if [_meta(o).get("namespace", ""), _meta(o)["name"]] > start]
        limit = int(params.get("limit") or 0)
        if limit and len(items) > limit:
            last = items[limit - 1]
            token = json.dumps([_meta(last).get("namespace", ""), _meta(last)["name"]])
            meta["continue"] = base64.urlsafe_b64encode(token.encode()).decode()
            meta["remainingItemCount"] = len(items) - limit
            items = items[:limit]
        return {"kind": f"{kind.kind}List", "apiVersion": kind.api_version, "metadata": meta, "items": items}

    def discovery(self, path: str) -> JsonObj | None:
        if path == "/version":
            return {
                "major": "1",
                "minor": "31",
                "gitVersion": "v1.31.0-mesh-identity-test",
                "gitCommit": "test",
                "gitTreeState": "clean",
                "buildDate": "2026-01-01T00:00:00Z",
                "goVersion": "go1.23",
                "compiler": "gc",
                "platform": "linux/amd64",
            }
        if path == "/api":
            return {
                "kind": "APIVersions",
                "versions": ["v1"],
                "serverAddressByClientCIDRs": [{"clientCIDR": "0.0.0.0/0", "serverAddress": f"127.0.0.1:{self.port}"}],
            }
        groups: dict[str, list[str]] = {}
        for kind in self.kinds:
            if kind.group:
                versions = groups.setdefault(kind.group, [])
                if kind.version not in versions:
                    versions.append(kind.version)
        if path == "/apis":
            return {
                "kind": "APIGroupList",
                "apiVersion": "v1",
                "groups": [_api_group(g, vs) for g, vs in sorted(groups.items())],
            }
        for group, versions in groups.items():
            if path == f"/apis/{group}":
                return {"kind": "APIGroup", "apiVersion": "v1", **_api_group(group, versions)}
        prefixes = {kind.prefix for kind in self.kinds}
        if path in prefixes:
            kinds = [k for k in self.kinds if k.prefix == path]
            resources: list[JsonObj] = []
            for kind in kinds:
                resources.append(
                    {
                        "name": kind.plural,
                        "singularName": kind.kind.lower(),
                        "namespaced": kind.namespaced,
                        "kind": kind.kind,
                        "verbs": list(ALL_VERBS),
                        "shortNames": list(kind.short_names),
                    }
                )
                if kind.status_subresource:
                    resources.append(
                        {
                            "name": f"{kind.plural}/status",
                            "singularName": "",
                            "namespaced": kind.namespaced,
                            "kind": kind.kind,
                            "verbs": ["get", "patch", "update"],
                        }
                    )
            return {
                "kind": "APIResourceList",
                "apiVersion": "v1",
                "groupVersion": kinds[0].api_version,
                "resources": resources,
            }
        return None

    # -- TLS
    def _make_tls(self) -> ssl.SSLContext:
        now = dt.datetime.now(dt.UTC)
        ca_key = ec.generate_private_key(ec.SECP256R1())
        ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "kube-server test CA")])
        ca_cert = (
            x509.CertificateBuilder()
            .subject_name(ca_name)
            .issuer_name(ca_name)
            .public_key(ca_key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5))
            .not_valid_after(now + dt.timedelta(days=2))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(x509.KeyUsage(False, False, False, False, False, True, True, False, False), critical=True)
            .sign(ca_key, hashes.SHA256())
        )
        key = ec.generate_private_key(ec.SECP256R1())
        cert = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "kube-apiserver")]))
            .issuer_name(ca_name)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5))
            .not_valid_after(now + dt.timedelta(days=1))
            .add_extension(
                x509.SubjectAlternativeName(
                    [
                        x509.IPAddress(ipaddress.ip_address("127.0.0.1")),
                        x509.DNSName("localhost"),
                    ]
                ),
                critical=False,
            )
            .add_extension(x509.ExtendedKeyUsage([x509.oid.ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
            .sign(ca_key, hashes.SHA256())
        )
        directory = Path(self._tmp.name)
        self.ca_path.write_bytes(ca_cert.public_bytes(serialization.Encoding.PEM))
        (directory / "tls.crt").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        (directory / "tls.key").write_bytes(
            key.private_bytes(
                serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
            )
        )
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(directory / "tls.crt", directory / "tls.key")
        return context


def _api_group(group: str, versions: Sequence[str]) -> JsonObj:
    listed = [{"groupVersion": f"{group}/{v}", "version": v} for v in versions]
    return {"name": group, "versions": listed, "preferredVersion": listed[0]}


# ---------------------------------------------------------------------------------------------- fixtures


@pytest.fixture
def kube_server() -> Iterator[KubeServer]:
    """A running :class:`KubeServer` with the default kinds, stopped after the test."""
    with KubeServer() as server:
        yield server


@pytest.fixture
def kube_api_client(kube_server: KubeServer) -> Iterator[kubernetes.client.ApiClient]:
    """A real ``kubernetes.client.ApiClient`` authenticated to :func:`kube_server`."""
    with kubernetes.client.ApiClient(kube_server.client_configuration()) as api:
        yield api
