"""SMI policies in the mesh file: what they parse into, and exact errors for bad input."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest
import yaml

from mesh_identity.errors import ConfigError
from mesh_identity.mesh.model import Mesh, check_mesh, load_mesh, parse_mesh
from mesh_identity.mesh.policy import (
    Backend,
    HttpMatch,
    HttpRule,
    Policy,
    TcpRule,
    TrafficSplit,
    TrafficTarget,
)
from mesh_identity.spiffe import SpiffeId, TrustDomain

TD = TrustDomain("example.org")
FRONTEND = SpiffeId.parse("spiffe://example.org/ns/shop/sa/frontend")
BACKEND = SpiffeId.parse("spiffe://example.org/ns/shop/sa/backend")
BATCH = SpiffeId.parse("spiffe://example.org/batch")

MESH = """
services:
  frontend:
    identity: {namespace: shop, service_account: frontend}
    instances: [{node: frontend-1, app: "127.0.0.1:8080", inbound: "127.0.0.1:15080"}]
    upstreams: [{service: backend, listen: "127.0.0.1:16081"}, {service: ledger, listen: "127.0.0.1:16082"}]
  backend:
    identity: {namespace: shop, service_account: backend}
    instances: []
  backend-v1:
    identity: {namespace: shop, service_account: backend}
    instances: [{node: backend-v1-1, app: "127.0.0.1:8081", inbound: "127.0.0.1:15081"}]
  backend-v2:
    identity: {namespace: shop, service_account: backend}
    instances: [{node: backend-v2-1, app: "127.0.0.1:8083", inbound: "127.0.0.1:15083"}]
  ledger:
    identity: {namespace: shop, service_account: ledger}
    protocol: tcp
    instances: [{node: ledger-1, app: "127.0.0.1:5432", inbound: "127.0.0.1:15082"}]
policies:
  - apiVersion: specs.smi-spec.io/v1alpha4
    kind: HTTPRouteGroup
    metadata: {name: backend-routes, namespace: shop, labels: {team: shop}}
    spec:
      matches:
        - {name: read, pathRegex: "/items(/.*)?", methods: [HEAD, GET]}
        - {name: admin, pathRegex: "/admin/.*", methods: ["*"], headers: {X-Role: "ops|admin"}}
        - {name: anything}
  - kind: TCPRoute
    metadata: {name: sql, namespace: shop}
    spec: {matches: {ports: [5432]}}
  - apiVersion: access.smi-spec.io/v1alpha3
    kind: TrafficTarget
    metadata: {name: frontend-reads, namespace: shop}
    spec:
      destination: {kind: ServiceAccount, name: backend}
      sources:
        - {kind: ServiceAccount, name: frontend, namespace: shop}
        - {kind: SpiffeId, id: "spiffe://example.org/batch"}
      rules: [{kind: HTTPRouteGroup, name: backend-routes, matches: [read, admin]}]
  - kind: TrafficTarget
    metadata: {name: frontend-sql, namespace: shop}
    spec:
      destination: {kind: ServiceAccount, name: ledger, namespace: shop}
      sources: [{kind: ServiceAccount, name: frontend}]
      rules: [{kind: TCPRoute, name: sql}]
  - apiVersion: split.smi-spec.io/v1alpha4
    kind: TrafficSplit
    metadata: {name: backend-canary, namespace: shop}
    spec:
      service: backend
      backends: [{service: backend-v1, weight: 90}, {service: backend-v2, weight: 10}]
"""


def document() -> dict[str, Any]:
    loaded: dict[str, Any] = yaml.safe_load(MESH)
    return loaded


def test_the_policies_of_a_mesh_file(tmp_path: Path) -> None:
    path = tmp_path / "mesh.yaml"
    path.write_text(MESH)
    mesh = load_mesh(path, TD)
    policy = mesh.policy
    assert policy.permissive is False
    read = HttpMatch("read", "/items(/.*)?", ("GET", "HEAD"))
    admin = HttpMatch("admin", "/admin/.*", (), (("x-role", "ops|admin"),))
    assert policy.route_groups[0].matches == (read, admin, HttpMatch("anything"))
    reads = TrafficTarget(
        "frontend-reads", "shop", BACKEND, (FRONTEND, BATCH), (HttpRule("backend-routes", (read, admin)),)
    )
    ledger = SpiffeId.parse("spiffe://example.org/ns/shop/sa/ledger")
    sql = TrafficTarget("frontend-sql", "shop", ledger, (FRONTEND,), (TcpRule("sql", (5432,)),))
    assert policy.targets == (reads, sql)
    assert policy.targets[0].where == "policies[2]"
    assert policy.access_to(BACKEND) == (reads,)
    assert policy.access_to(FRONTEND) is None  # named by no TrafficTarget: open to the mesh
    canary = TrafficSplit("backend-canary", "shop", "backend", (Backend("backend-v1", 90), Backend("backend-v2", 10)))
    assert policy.splits == (canary,)
    assert policy.split_of("backend") == canary
    assert policy.split_of("backend-v1") is None
    assert mesh.service("backend").instances == ()  # the root of a split needs none


def test_permissive_mode_keeps_targets_but_enforces_none() -> None:
    data = document() | {"permissive": True}
    policy = parse_mesh(data, TD).policy
    assert len(policy.targets) == 2
    assert policy.access_to(BACKEND) is None
    assert policy.split_of("backend") is not None  # splits apply in both modes


def test_a_mesh_without_policies_is_open() -> None:
    policy = parse_mesh({"services": {}}, TD).policy
    assert policy == Policy()
    assert policy.access_to(BACKEND) is None


def _edit(path: str, value: Any) -> dict[str, Any]:
    """The example document with one value replaced (``path`` like ``policies.4.spec.backends.1.weight``)."""
    data = copy.deepcopy(document())
    *parents, last = path.split(".")
    node: Any = data
    for key in parents:
        node = node[int(key)] if isinstance(node, list) else node[key]
    if isinstance(node, list):
        node[int(last)] = value
    else:
        node[last] = value
    return data


def _delete(path: str) -> dict[str, Any]:
    data = copy.deepcopy(document())
    *parents, last = path.split(".")
    node: Any = data
    for key in parents:
        node = node[int(key)] if isinstance(node, list) else node[key]
    del node[int(last) if isinstance(node, list) else last]
    return data


FOREIGN = {"kind": "SpiffeId", "id": "spiffe://partner.example/ns/shop/sa/frontend"}


@pytest.mark.parametrize(
    ("data", "message"),
    [
        # the four the issue names
        (
            _edit("policies.4.spec.service", "payments"),
            "policies[4].spec.service: 'payments' is not a service of this mesh",
        ),
        (
            _edit("policies.4.spec.backends.1.service", "backend-v3"),
            "policies[4].spec.backends[1].service: 'backend-v3' is not a service of this mesh",
        ),
        (
            _edit("policies.4.spec.backends.1.weight", 5),
            "policies[4].spec.backends: the weights add up to 95, not 100",
        ),
        (
            _edit("policies.0.spec.matches.0.pathRegex", "/items(/.*"),
            "policies[0].spec.matches[0].pathRegex: '/items(/.*' is not a usable regex: it does not compile: "
            "missing ), unterminated subpattern at position 6",
        ),
        (
            _edit("policies.0.spec.matches.1.headers", {"x-role": "(?=admin)"}),
            "policies[0].spec.matches[1].headers.x-role: '(?=admin)' is not a usable regex: it uses a lookahead, "
            "which Envoy's RE2 does not support",
        ),
        (
            _edit("policies.2.spec.sources.1", FOREIGN),
            "policies[2].spec.sources[1].id: spiffe://partner.example/ns/shop/sa/frontend is not in trust domain "
            "example.org",
        ),
        (
            _edit("policies.2.spec.destination", FOREIGN),
            "policies[2].spec.destination.id: spiffe://partner.example/ns/shop/sa/frontend is not in trust domain "
            "example.org",
        ),
        # documents
        (_edit("policies", {}), "policies: {} is not a list"),
        (
            _edit("policies.0.kind", "HTTPRoute"),
            "policies[0].kind: 'HTTPRoute' is not one of HTTPRouteGroup, TCPRoute, TrafficTarget, TrafficSplit",
        ),
        (
            _edit("policies.4.apiVersion", "access.smi-spec.io/v1alpha3"),
            "policies[4].apiVersion: a TrafficSplit is in API group split.smi-spec.io, not "
            "'access.smi-spec.io/v1alpha3'",
        ),
        (_edit("policies.1.metadata", {"namespace": "shop"}), "policies[1].metadata.name: required"),
        (
            _edit("policies.1.metadata.name", "SQL"),
            "policies[1].metadata.name: 'SQL' is not a Kubernetes object name (a-z, 0-9, '-', '.'; 253 at most)",
        ),
        (
            _edit("policies.3.metadata.name", "frontend-reads"),
            "policies[3].metadata.name: TrafficTarget shop/frontend-reads is already defined at policies[2]",
        ),
        (_edit("permissive", "yes"), "permissive: 'yes' is not true or false"),
        # HTTPRouteGroup
        (_edit("policies.0.spec.matches", []), "policies[0].spec.matches: an HTTPRouteGroup needs at least one match"),
        (
            _edit("policies.0.spec.matches.2", {"name": "read"}),
            "policies[0].spec.matches[2].name: 'read' is listed twice",
        ),
        (
            _edit("policies.0.spec.matches.0.methods", ["GET", "FETCH"]),
            "policies[0].spec.matches[0].methods[1]: 'FETCH' is not '*' or one of GET, HEAD, POST, PUT, DELETE, "
            "CONNECT, OPTIONS, TRACE, PATCH",
        ),
        (
            _edit("policies.0.spec.matches.1.headers", {"x role": "a"}),
            "policies[0].spec.matches[1].headers: 'x role' is not an HTTP header name",
        ),
        (
            _edit("policies.0.spec.matches.0.path", "/items"),
            "policies[0].spec.matches[0].path: unknown key (known: name, pathRegex, methods, headers)",
        ),
        # TCPRoute
        (
            _edit("policies.1.spec.matches.ports", [5432, 70000]),
            "policies[1].spec.matches.ports[1]: 70000 is out of range (1-65535)",
        ),
        (
            _edit("policies.1.spec.matches.ports", ["5432"]),
            "policies[1].spec.matches.ports[0]: '5432' is not an integer",
        ),
        # TrafficTarget
        (_edit("policies.2.spec.sources", []), "policies[2].spec.sources: a TrafficTarget needs at least one source"),
        (_edit("policies.2.spec.rules", []), "policies[2].spec.rules: a TrafficTarget needs at least one rule"),
        (_delete("policies.2.spec.rules"), "policies[2].spec.rules: required"),
        (
            _edit("policies.2.spec.sources.0", {"kind": "Group", "name": "x"}),
            "policies[2].spec.sources[0].kind: 'Group' is not one of ServiceAccount, SpiffeId",
        ),
        (
            _edit("policies.2.spec.sources.0", {"kind": "SpiffeId", "id": "spiffe://example.org/a/../b"}),
            "policies[2].spec.sources[0]: Invalid SPIFFE ID 'spiffe://example.org/a/../b': path segment '..' is "
            "not allowed",
        ),
        (
            _edit("policies.2.spec.destination", {"kind": "ServiceAccount", "name": "nobody"}),
            "policies[2].spec.destination: spiffe://example.org/ns/shop/sa/nobody is not the identity of a service "
            "of this mesh",
        ),
        (
            _edit("policies.2.spec.rules.0.name", "routes"),
            "policies[2].spec.rules[0].name: no HTTPRouteGroup 'routes' in namespace shop",
        ),
        (
            _edit("policies.2.spec.rules.0.matches", ["read", "write"]),
            "policies[2].spec.rules[0].matches[1]: HTTPRouteGroup 'backend-routes' has no match 'write'",
        ),
        (
            _edit("policies.2.spec.rules.0", {"kind": "TCPRoute", "name": "sql"}),
            "policies[2].spec.rules[0]: TCPRoute rules apply to tcp services; spiffe://example.org/ns/shop/sa/backend "
            "serves http",
        ),
        (
            _edit("policies.3.spec.rules.0", {"kind": "HTTPRouteGroup", "name": "backend-routes"}),
            "policies[3].spec.rules[0]: HTTPRouteGroup rules apply to http services; "
            "spiffe://example.org/ns/shop/sa/ledger serves tcp",
        ),
        (
            _edit("policies.3.spec.rules.0", {"kind": "TCPRoute", "name": "sql", "matches": ["x"]}),
            "policies[3].spec.rules[0].matches: a TCPRoute rule selects no matches (its ports are the TCPRoute's)",
        ),
        # TrafficSplit
        (
            _edit("policies.4.spec.backends.1", {"service": "backend-v1", "weight": 10}),
            "policies[4].spec.backends[1].service: 'backend-v1' is listed twice",
        ),
        (
            _edit("policies.4.spec.backends.1.weight", -10),
            "policies[4].spec.backends[1].weight: -10 is out of range (0-100)",
        ),
        (
            _edit("policies.4.spec.backends.1.weight", 10.0),
            "policies[4].spec.backends[1].weight: 10.0 is not an integer",
        ),
        (_edit("policies.4.spec.backends", []), "policies[4].spec.backends: a TrafficSplit needs at least one backend"),
        (
            _edit("policies.4.spec.backends.1.service", "ledger"),
            "policies[4].spec.backends[1].service: 'ledger' speaks tcp, the root service 'backend' http",
        ),
        (
            _edit("policies.4.spec.backends.1.service", "backend"),
            "policies[4].spec.backends[1].service: 'backend' has no instances to send traffic to",
        ),
        (
            _delete("policies.4"),
            "services.backend.instances: a service needs at least one instance",
        ),
    ],
)
def test_bad_policies_are_refused_with_the_key_path(data: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse_mesh(data, TD)
    assert str(info.value) == message


def test_a_client_only_service_serves_no_protocol_its_identitys_targets_must_match() -> None:
    data = document()
    # ledger's identity also has client-only sidecars (no app) in an http service: they serve nothing, so the
    # TCPRoute rules of frontend-sql still apply to all that ledger serves (as while a Kubernetes pod starts)
    data["services"]["ledger-jobs"] = {
        "identity": {"namespace": "shop", "service_account": "ledger"},
        "instances": [{"node": "ledger-jobs-1", "inbound": "127.0.0.2:15084"}],
    }
    assert parse_mesh(copy.deepcopy(data), TD).services["ledger-jobs"].endpoints == ()
    del data["services"]["ledger"]  # now that identity serves nothing at all: its targets' rules constrain nothing
    data["services"]["frontend"]["upstreams"] = [{"service": "backend", "listen": "127.0.0.1:16081"}]
    mesh = parse_mesh(data, TD)
    assert [t.name for t in mesh.policy.targets] == ["frontend-reads", "frontend-sql"]
    data["services"]["ledger-jobs"]["instances"][0]["app"] = "127.0.0.2:8084"  # an http app: the TCPRoute is wrong
    with pytest.raises(ConfigError) as info:
        parse_mesh(data, TD)
    assert str(info.value) == (
        "policies[3].spec.rules[0]: TCPRoute rules apply to tcp services; spiffe://example.org/ns/shop/sa/ledger "
        "serves http"
    )


def test_a_second_split_of_one_root_and_nested_splits_are_refused() -> None:
    data = document()
    data["policies"].append(
        {
            "kind": "TrafficSplit",
            "metadata": {"name": "again", "namespace": "shop"},
            "spec": {"service": "backend", "backends": [{"service": "backend-v1", "weight": 100}]},
        }
    )
    with pytest.raises(ConfigError) as info:
        parse_mesh(data, TD)
    assert str(info.value) == "policies[5].spec.service: 'backend' is already split by policies[4]"
    data["policies"][5]["spec"]["service"] = "backend-v2"
    with pytest.raises(ConfigError) as info:
        parse_mesh(data, TD)
    assert str(info.value) == (
        "policies[4].spec.backends[1].service: 'backend-v2' is the root of policies[5]; splits do not nest"
    )


def test_a_model_built_in_code_is_checked_the_same_way() -> None:
    good = parse_mesh(document(), TD)
    foreign = SpiffeId.parse("spiffe://partner.example/ns/shop/sa/frontend")
    cases = [
        (
            Policy(targets=(TrafficTarget("t", "shop", BACKEND, (foreign,), (HttpRule("g", (HttpMatch("m"),)),)),)),
            "TrafficTarget shop/t.spec.sources[0]: spiffe://partner.example/ns/shop/sa/frontend is not in trust "
            "domain example.org",
        ),
        (
            Policy(
                targets=(TrafficTarget("t", "shop", BACKEND, (FRONTEND,), (HttpRule("g", (HttpMatch("m", "a\\1"),)),)),)
            ),
            "TrafficTarget shop/t.spec.rules[0] match 'm' pathRegex: 'a\\\\1' is not a usable regex: it does not "
            "compile: invalid group reference 1 at position 2",
        ),
        (
            Policy(
                targets=(
                    TrafficTarget("t", "shop", BACKEND, (FRONTEND,), (HttpRule("g", (HttpMatch("m", "(a)\\1"),)),)),
                )
            ),
            "TrafficTarget shop/t.spec.rules[0] match 'm' pathRegex: '(a)\\\\1' is not a usable regex: it uses a "
            "backreference, which Envoy's RE2 does not support",
        ),
        (
            Policy(
                targets=(
                    TrafficTarget(
                        "t", "shop", BACKEND, (FRONTEND,), (HttpRule("g", (HttpMatch("m", None, ("GET", "GRAB")),)),)
                    ),
                )
            ),
            "TrafficTarget shop/t.spec.rules[0] match 'm': 'GRAB' is not a method",
        ),
        (
            Policy(
                splits=(TrafficSplit("s", "shop", "backend", (Backend("backend-v1", 60), Backend("backend-v2", 60))),)
            ),
            "TrafficSplit shop/s.spec.backends: the weights add up to 120, not 100",
        ),
        (
            Policy(
                splits=(TrafficSplit("s", "shop", "backend", (Backend("backend-v1", 110), Backend("backend-v2", -10))),)
            ),
            "TrafficSplit shop/s.spec.backends: a weight is not within 0-100",
        ),
    ]
    for policy, message in cases:
        with pytest.raises(ConfigError) as info:
            check_mesh(Mesh(TD, good.services, policy))
        assert str(info.value) == message
