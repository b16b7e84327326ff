"""HTTP for the Kubernetes fake: mapping a path to a kind, namespace, name and subresource (:func:`resolve`),
the request verb (get, list, watch, create, update, patch, delete, deletecollection), the discovery documents
(``/version``, ``/api``, ``/api/v1``, ``/apis``, ``/apis/<group>``, ``/apis/<group>/<version>``), the answer to
each verb (lists with ``limit``/``continue``, patches by media type), and the request handler that
authenticates, authorizes, records and answers every request (watches are streamed by
:mod:`~tests.fakes.kube.watch`)."""

from __future__ import annotations

import base64
import binascii
import contextlib
import copy
import http.server
import json
import select
import socket
import ssl
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qs, unquote, urlsplit

from tests.fakes.kube import tokenreview, watch
from tests.fakes.kube.errors import ApiError, JsonObj, bad_request, details, method_not_allowed
from tests.fakes.kube.kinds import ALL_VERBS, Kind
from tests.fakes.kube.patches import json_patch, merge_patch
from tests.fakes.kube.selectors import matcher
from tests.fakes.kube.store import Store, meta

if TYPE_CHECKING:
    from tests.fakes.kube.server import HttpServer, Warnings


@dataclass(frozen=True)
class Route:
    kind: Kind
    namespace: str | None  # None: all namespaces (a list or watch), or a cluster-scoped kind
    name: str | None
    subresource: str | None

    @property
    def resource(self) -> str:
        return f"{self.kind.plural}/{self.subresource}" if self.subresource else self.kind.plural


def resolve(kinds: Sequence[Kind], path: str) -> Route:
    """Map a resource path to (kind, namespace, name, subresource); 404 NotFound if none."""
    for kind in kinds:
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


def verb(method: str, route: Route, params: Mapping[str, str]) -> str:
    if method == "GET":
        if route.name is not None:
            return "get"
        return "watch" if params.get("watch") in ("true", "1") else "list"
    if method == "POST":
        if route.name is not None:
            raise method_not_allowed()
        return "create"
    if route.name is None:
        if method == "DELETE":
            return "deletecollection"
        raise method_not_allowed()
    return {"PUT": "update", "PATCH": "patch", "DELETE": "delete"}[method]


# -------------------------------------------------------------------------------------------- answers


def handle(
    store: Store,
    method: str,
    route: Route,
    params: Mapping[str, str],
    body: Any,
    content_type: str,
    *,
    dry_run: bool = False,  # a create only (KubeServer.dry_run refuses it on the other verbs)
) -> tuple[int, JsonObj]:
    kind = route.kind
    namespace = route.namespace or ""
    if method == "GET" and route.name is not None:
        return 200, store.get(kind, namespace, route.name)
    if method == "GET":
        return 200, _list(store, route, params)
    if method == "POST":
        if not isinstance(body, dict):
            raise bad_request("the body of the request must be a JSON object")
        if kind.namespaced and route.namespace is None:
            raise method_not_allowed()
        return 201, store.create(kind, namespace, body, dry_run=dry_run)
    if method == "DELETE" and route.name is None:
        matches = matcher(kind, params)
        deleted = []
        for obj in store.select(kind, route.namespace, matches):
            with contextlib.suppress(ApiError):
                if store.delete(kind, meta(obj).get("namespace", ""), meta(obj)["name"], {}) is None:
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
        found = details(kind, name)
        return 200, {"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Success", "details": found}
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


def _list(store: Store, route: Route, params: Mapping[str, str]) -> JsonObj:
    kind = route.kind
    with store.lock:
        items = store.select(kind, route.namespace, matcher(kind, params))
        resource_version = str(store.resource_version)
    list_meta: JsonObj = {"resourceVersion": resource_version}
    if params.get("continue"):
        try:
            start = json.loads(base64.urlsafe_b64decode(params["continue"]))
        except (ValueError, binascii.Error):
            raise bad_request("continue key is not valid") from None
        items = [o for o in items if [meta(o).get("namespace", ""), meta(o)["name"]] > start]
    limit = int(params.get("limit") or 0)
    if limit and len(items) > limit:
        last = items[limit - 1]
        token = json.dumps([meta(last).get("namespace", ""), meta(last)["name"]])
        list_meta["continue"] = base64.urlsafe_b64encode(token.encode()).decode()
        list_meta["remainingItemCount"] = len(items) - limit
        items = items[:limit]
    return {"kind": f"{kind.kind}List", "apiVersion": kind.api_version, "metadata": list_meta, "items": items}


def discovery(kinds: Sequence[Kind], port: int, path: str) -> JsonObj | None:
    """The discovery document at ``path``, or None when ``path`` is not a discovery path."""
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
            "serverAddressByClientCIDRs": [{"clientCIDR": "0.0.0.0/0", "serverAddress": f"127.0.0.1:{port}"}],
        }
    groups: dict[str, list[str]] = {}
    for kind in kinds:
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
    prefixes = {kind.prefix for kind in kinds}
    if path in prefixes:
        served = [k for k in kinds if k.prefix == path]
        resources: list[JsonObj] = []
        for kind in served:
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
            "groupVersion": served[0].api_version,
            "resources": resources,
        }
    return None


def _api_group(group: str, versions: Sequence[str]) -> JsonObj:
    listed = [{"groupVersion": f"{group}/{v}", "version": v} for v in versions]
    return {"name": group, "versions": listed, "preferredVersion": listed[0]}


# ------------------------------------------------------------------------------------------- handler


class Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: HttpServer
    disable_nagle_algorithm = True
    warnings: Warnings | None = None  # the Warning headers of the request being answered (KubeServer.warn)

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
        for value in self.warnings.headers() if self.warnings is not None else ():
            self.send_header("Warning", value)
        self.end_headers()
        self.wfile.write(data)

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
        self.warnings = owner.open_warnings()
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
            if path == tokenreview.PATH:
                self._review(record, method, user, body)
                return
            document = discovery(owner.kinds, owner.port, path)
            if document is not None:
                record["verb"], record["resource"] = "get", path
                if method != "GET":
                    raise method_not_allowed(f"the server does not allow this method on {path}")
                self._answer(record, 200, document)
                return
            route = resolve(owner.kinds, path)
            request_verb = verb(method, route, params)
            record.update(
                verb=request_verb, resource=route.resource, namespace=route.namespace or "", name=route.name or ""
            )
            owner.authorize(user, request_verb, route)
            if request_verb == "watch":
                watch.serve(self, route, params, record)  # records the request once the stream has opened
                return
            dry_run = owner.dry_run(request_verb, params)  # dryRun=All on a create; 400 on another verb
            if request_verb == "create" and isinstance(body, dict):
                body = owner.admit(user, route, body, params)  # admission (none by default): KubeServer.add_admission
            content_type = self.headers.get("Content-Type", "")
            code, result = handle(owner.store, method, route, params, body, content_type, dry_run=dry_run)
            self._answer(record, code, result)
        except ApiError as err:
            self._answer(record, err.code, err.status())
        except (ConnectionError, ssl.SSLError, OSError):
            self.close_connection = True
        finally:
            self.record(record)

    def _review(self, record: dict[str, Any], method: str, user: str, body: Any) -> None:
        """A TokenReview (create only, never stored): see :mod:`~tests.fakes.kube.tokenreview`."""
        record.update(verb="create", resource=tokenreview.TOKEN_REVIEW.plural)
        if method != "POST":
            raise method_not_allowed()
        route = Route(tokenreview.TOKEN_REVIEW, None, None, None)
        self.server.owner.authorize(user, "create", route)
        self._answer(record, 201, self.server.owner.token_reviews.review(body))

    def _answer(self, record: dict[str, Any], code: int, body: JsonObj) -> None:
        """Record the request, then answer it (so a client that got its answer finds the record)."""
        record["code"] = code
        self.record(record)
        self._send(code, body)

    def record(self, record: dict[str, Any]) -> None:
        """Log the request (once) in :attr:`KubeServer.requests`."""
        if not record.get("recorded"):
            record["recorded"] = True
            self.server.owner.record({k: v for k, v in record.items() if k != "recorded"})

    # -- streaming (for watches)
    def start_stream(self) -> None:
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()

    def chunk(self, data: bytes) -> None:
        self.wfile.write(f"{len(data):X}\r\n".encode() + data + b"\r\n")

    def peer_gone(self) -> bool:
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
