"""SMI documents in the mesh file: parsed into the policy model of :mod:`mesh_identity.mesh.policy`.

The mesh file lists them under ``policies`` as they would be applied to Kubernetes (SMI's kinds and field names;
``apiVersion`` optional, other ``metadata`` than ``name`` and ``namespace`` ignored)::

    permissive: false                       # true: TrafficTargets are not enforced (OSM's permissive mode)
    policies:
      - kind: HTTPRouteGroup                # specs.smi-spec.io
        metadata: {name: backend-routes, namespace: shop}
        spec:
          matches:
            - {name: read, pathRegex: "/items(/.*)?", methods: [GET, HEAD]}
            - {name: admin, pathRegex: "/admin/.*", methods: ["*"], headers: {x-role: "ops|admin"}}
      - kind: TCPRoute
        metadata: {name: sql, namespace: shop}
        spec: {matches: {ports: [5432]}}    # the destination app's ports; none listed: any
      - kind: TrafficTarget                 # access.smi-spec.io
        metadata: {name: frontend-reads, namespace: shop}
        spec:
          destination: {kind: ServiceAccount, name: backend, namespace: shop}
          sources:
            - {kind: ServiceAccount, name: frontend, namespace: shop}
            - {kind: SpiffeId, id: "spiffe://example.org/batch"}   # an identity not of Kubernetes form
          rules:
            - {kind: HTTPRouteGroup, name: backend-routes, matches: [read]}   # no matches: all of the group
      - kind: TrafficSplit                  # split.smi-spec.io
        metadata: {name: backend-canary, namespace: shop}
        spec:
          service: backend                  # the root service the callers list as their upstream
          backends: [{service: backend-v1, weight: 90}, {service: backend-v2, weight: 10}]

A ``ServiceAccount`` without ``namespace`` is in the namespace of its document (``default`` when none). Path
and header regexes are RE2 (what Envoy runs) and must match the whole path or value.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

from mesh_identity.document import integer, keys, mapping, sequence, shown, string, workload_id
from mesh_identity.errors import ConfigError, InvalidSpiffeIdError
from mesh_identity.mesh.policy import (
    HTTP_METHODS,
    TOTAL_WEIGHT,
    Backend,
    HttpMatch,
    HttpRouteGroup,
    HttpRule,
    Policy,
    Rule,
    TcpRoute,
    TcpRule,
    TrafficSplit,
    TrafficTarget,
)
from mesh_identity.mesh.regex import regex_problem
from mesh_identity.spiffe import SpiffeId, TrustDomain

API_GROUPS = {
    "HTTPRouteGroup": "specs.smi-spec.io",
    "TCPRoute": "specs.smi-spec.io",
    "TrafficTarget": "access.smi-spec.io",
    "TrafficSplit": "split.smi-spec.io",
}
_OBJECT_NAME = re.compile(r"^[a-z0-9]([a-z0-9.-]{0,251}[a-z0-9])?$")
_HEADER = re.compile(r"^:?[a-z0-9!#$%&'*+.^_`|~-]+$")

Document = tuple[str, str, str, Mapping[str, Any], str]
"""``(kind, namespace, name, spec, path)`` of one SMI document."""


def parse_policy(permissive: Any, documents: Any, trust_domain: TrustDomain) -> Policy:
    """The policy of a mesh file's ``permissive`` and ``policies`` keys (None when absent)."""
    if permissive is None:
        permissive = False
    if not isinstance(permissive, bool):
        raise ConfigError(f"permissive: {shown(permissive)} is not true or false")
    items = sequence([] if documents is None else documents, "policies")
    parsed = [_document(item, f"policies[{i}]") for i, item in enumerate(items)]
    seen: dict[tuple[str, str, str], str] = {}
    for kind, namespace, name, _, path in parsed:
        key = (kind, namespace, name)
        if key in seen:
            raise ConfigError(f"{path}.metadata.name: {kind} {namespace}/{name} is already defined at {seen[key]}")
        seen[key] = path
    groups = {(d[1], d[2]): _route_group(d) for d in parsed if d[0] == "HTTPRouteGroup"}
    routes = {(d[1], d[2]): _tcp_route(d) for d in parsed if d[0] == "TCPRoute"}
    targets = tuple(_target(d, trust_domain, groups, routes) for d in parsed if d[0] == "TrafficTarget")
    splits = tuple(_split(d) for d in parsed if d[0] == "TrafficSplit")
    return Policy(permissive, targets, splits, tuple(groups.values()), tuple(routes.values()))


def _document(value: Any, path: str) -> Document:
    section = mapping(value, path)
    keys(section, ("apiVersion", "kind", "metadata", "spec"), ("kind", "metadata", "spec"), path)
    kind = string(section["kind"], f"{path}.kind")
    if kind not in API_GROUPS:
        raise ConfigError(f"{path}.kind: {shown(kind)} is not one of {', '.join(API_GROUPS)}")
    if "apiVersion" in section:
        api = string(section["apiVersion"], f"{path}.apiVersion")
        if api.partition("/")[0] != API_GROUPS[kind]:
            raise ConfigError(f"{path}.apiVersion: a {kind} is in API group {API_GROUPS[kind]}, not {shown(api)}")
    metadata = mapping(section["metadata"], f"{path}.metadata")
    if "name" not in metadata:
        raise ConfigError(f"{path}.metadata.name: required")
    name = _object_name(metadata["name"], f"{path}.metadata.name")
    namespace = _object_name(metadata.get("namespace", "default"), f"{path}.metadata.namespace")
    return kind, namespace, name, mapping(section["spec"], f"{path}.spec"), path


def _object_name(value: Any, path: str) -> str:
    text = string(value, path)
    if not _OBJECT_NAME.match(text):
        raise ConfigError(f"{path}: {text!r} is not a Kubernetes object name (a-z, 0-9, '-', '.'; 253 at most)")
    return text


def _regex(value: Any, path: str) -> str:
    pattern = string(value, path)
    problem = regex_problem(pattern)
    if problem is not None:
        raise ConfigError(f"{path}: {pattern!r} is not a usable regex: {problem}")
    return pattern


def _route_group(document: Document) -> HttpRouteGroup:
    _, namespace, name, spec, path = document
    keys(spec, ("matches",), ("matches",), f"{path}.spec")
    matches = []
    names: set[str] = set()
    for i, item in enumerate(sequence(spec["matches"], f"{path}.spec.matches")):
        where = f"{path}.spec.matches[{i}]"
        match = _http_match(item, where)
        if match.name in names:
            raise ConfigError(f"{where}.name: {match.name!r} is listed twice")
        names.add(match.name)
        matches.append(match)
    if not matches:
        raise ConfigError(f"{path}.spec.matches: an HTTPRouteGroup needs at least one match")
    return HttpRouteGroup(name, namespace, tuple(matches))


def _http_match(value: Any, path: str) -> HttpMatch:
    section = mapping(value, path)
    keys(section, ("name", "pathRegex", "methods", "headers"), ("name",), path)
    name = string(section["name"], f"{path}.name")
    path_regex = _regex(section["pathRegex"], f"{path}.pathRegex") if "pathRegex" in section else None
    methods: list[str] = []
    for i, item in enumerate(sequence(section.get("methods", []), f"{path}.methods")):
        method = string(item, f"{path}.methods[{i}]")
        if method != "*" and method not in HTTP_METHODS:
            raise ConfigError(f"{path}.methods[{i}]: {method!r} is not '*' or one of {', '.join(HTTP_METHODS)}")
        methods.append(method)
    headers = []
    for header, pattern in mapping(section.get("headers", {}), f"{path}.headers").items():
        if not _HEADER.match(header.lower()):
            raise ConfigError(f"{path}.headers: {header!r} is not an HTTP header name")
        headers.append((header.lower(), _regex(pattern, f"{path}.headers.{header}")))
    any_method = not methods or "*" in methods
    return HttpMatch(name, path_regex, () if any_method else tuple(sorted(set(methods))), tuple(sorted(headers)))


def _tcp_route(document: Document) -> TcpRoute:
    _, namespace, name, spec, path = document
    keys(spec, ("matches",), (), f"{path}.spec")
    matches = mapping(spec.get("matches", {}), f"{path}.spec.matches")
    keys(matches, ("ports",), (), f"{path}.spec.matches")
    ports = [
        integer(item, f"{path}.spec.matches.ports[{i}]", 1, 65535)
        for i, item in enumerate(sequence(matches.get("ports", []), f"{path}.spec.matches.ports"))
    ]
    return TcpRoute(name, namespace, tuple(sorted(set(ports))))


def _identity(value: Any, path: str, namespace: str, trust_domain: TrustDomain) -> SpiffeId:
    section = mapping(value, path)
    kind = string(section.get("kind"), f"{path}.kind") if "kind" in section else "ServiceAccount"
    try:
        if kind == "ServiceAccount":
            keys(section, ("kind", "name", "namespace"), ("name",), path)
            name = string(section["name"], f"{path}.name")
            if "namespace" in section:
                namespace = string(section["namespace"], f"{path}.namespace")
            return SpiffeId.for_kubernetes(trust_domain, namespace, name)
        if kind != "SpiffeId":
            raise ConfigError(f"{path}.kind: {shown(kind)} is not one of ServiceAccount, SpiffeId")
        keys(section, ("kind", "id"), ("id",), path)
        identity = SpiffeId.parse(string(section["id"], f"{path}.id"))
    except InvalidSpiffeIdError as err:
        raise ConfigError(f"{path}: {err}") from None
    return workload_id(identity, trust_domain, f"{path}.id")


def _target(
    document: Document,
    trust_domain: TrustDomain,
    groups: Mapping[tuple[str, str], HttpRouteGroup],
    routes: Mapping[tuple[str, str], TcpRoute],
) -> TrafficTarget:
    _, namespace, name, spec, path = document
    keys(spec, ("destination", "sources", "rules"), ("destination", "sources", "rules"), f"{path}.spec")
    destination = _identity(spec["destination"], f"{path}.spec.destination", namespace, trust_domain)
    sources = tuple(
        _identity(item, f"{path}.spec.sources[{i}]", namespace, trust_domain)
        for i, item in enumerate(sequence(spec["sources"], f"{path}.spec.sources"))
    )
    if not sources:
        raise ConfigError(f"{path}.spec.sources: a TrafficTarget needs at least one source")
    rules = tuple(
        _rule(item, f"{path}.spec.rules[{i}]", namespace, groups, routes)
        for i, item in enumerate(sequence(spec["rules"], f"{path}.spec.rules"))
    )
    if not rules:
        raise ConfigError(f"{path}.spec.rules: a TrafficTarget needs at least one rule")
    return TrafficTarget(name, namespace, destination, tuple(dict.fromkeys(sources)), rules, origin=path)


def _rule(
    value: Any,
    path: str,
    namespace: str,
    groups: Mapping[tuple[str, str], HttpRouteGroup],
    routes: Mapping[tuple[str, str], TcpRoute],
) -> Rule:
    section = mapping(value, path)
    keys(section, ("kind", "name", "matches"), ("kind", "name"), path)
    kind = string(section["kind"], f"{path}.kind")
    name = string(section["name"], f"{path}.name")
    if kind == "TCPRoute":
        if "matches" in section:
            raise ConfigError(f"{path}.matches: a TCPRoute rule selects no matches (its ports are the TCPRoute's)")
        route = routes.get((namespace, name))
        if route is None:
            raise ConfigError(f"{path}.name: no TCPRoute {name!r} in namespace {namespace}")
        return TcpRule(name, route.ports)
    if kind != "HTTPRouteGroup":
        raise ConfigError(f"{path}.kind: {shown(kind)} is not one of HTTPRouteGroup, TCPRoute")
    group = groups.get((namespace, name))
    if group is None:
        raise ConfigError(f"{path}.name: no HTTPRouteGroup {name!r} in namespace {namespace}")
    if "matches" not in section:
        return HttpRule(name, group.matches)
    by_name = {m.name: m for m in group.matches}
    selected = []
    for i, item in enumerate(sequence(section["matches"], f"{path}.matches")):
        match_name = string(item, f"{path}.matches[{i}]")
        if match_name not in by_name:
            raise ConfigError(f"{path}.matches[{i}]: HTTPRouteGroup {name!r} has no match {match_name!r}")
        selected.append(by_name[match_name])
    if not selected:
        raise ConfigError(f"{path}.matches: empty (leave it out to select every match of {name!r})")
    return HttpRule(name, tuple(dict.fromkeys(selected)))


def _split(document: Document) -> TrafficSplit:
    _, namespace, name, spec, path = document
    keys(spec, ("service", "backends"), ("service", "backends"), f"{path}.spec")
    service = string(spec["service"], f"{path}.spec.service")
    backends = []
    seen: set[str] = set()
    for i, item in enumerate(sequence(spec["backends"], f"{path}.spec.backends")):
        where = f"{path}.spec.backends[{i}]"
        section = mapping(item, where)
        keys(section, ("service", "weight"), ("service", "weight"), where)
        backend = string(section["service"], f"{where}.service")
        if backend in seen:
            raise ConfigError(f"{where}.service: {backend!r} is listed twice")
        seen.add(backend)
        backends.append(Backend(backend, integer(section["weight"], f"{where}.weight", 0, TOTAL_WEIGHT)))
    if not backends:
        raise ConfigError(f"{path}.spec.backends: a TrafficSplit needs at least one backend")
    total = sum(b.weight for b in backends)
    if total != TOTAL_WEIGHT:
        raise ConfigError(f"{path}.spec.backends: the weights add up to {total}, not {TOTAL_WEIGHT}")
    return TrafficSplit(name, namespace, service, tuple(backends), origin=path)
