"""Mesh policy through real Envoy: SMI access control (HTTP and TCP) and traffic splits, changed live.

Every policy reaches the sidecars through ``MeshPublisher.update_mesh``; the tests wait until the sidecar has
acknowledged the served version, then check behaviour. Statistical checks use the exact binomial acceptance
region of the configured weight (see :func:`binomial_band`).
"""

from __future__ import annotations

import http.client
import json
import math
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from envoy.config.rbac.v3 import rbac_pb2
from envoy.extensions.filters.http.rbac.v3 import rbac_pb2 as http_rbac_pb2

from mesh_identity.errors import ConfigError
from mesh_identity.mesh.model import Address, Mesh, load_mesh, parse_mesh
from mesh_identity.mesh.policy import Backend, HttpMatch, HttpRule, Policy, TrafficSplit, TrafficTarget
from mesh_identity.spiffe import SpiffeId, TrustDomain
from tests.apps.echo import echo
from tests.e2e.conftest import TRUST_DOMAIN, AuthorityIssuer
from tests.e2e.harness import RunningMesh, free_address, start_mesh
from tests.policy.test_policy_regex import ACCEPTED, UNSUPPORTED_FEATURES
from tests.waiting import wait_until
from xds_sds.protocol.cache import Resource
from xds_sds.protocol.typeurls import CLUSTER, ENDPOINT, LISTENER, ROUTE
from xds_sds.resources.packing import pack
from xds_sds.resources.rbac import HTTP_RBAC, http_permission
from xds_sds.resources.routes import to_cluster

pytestmark = pytest.mark.e2e

FRONTEND = "spiffe://e2e.mesh/ns/e2e/sa/frontend"
DENIED = "RBAC: access denied"
FALSE_ALARM = 1e-6
"""Chance that a correct split falls outside its band in one check (two-sided, exact)."""


# -- building meshes ------------------------------------------------------------------------------------------


def services(spec: dict[str, tuple[str, list[str]]]) -> dict[str, Any]:
    """The ``services`` of a mesh file from ``{name: (protocol, [upstreams])}``: one instance each, free ports.

    A protocol of ``"root"`` makes an HTTP service without instances (the root of a TrafficSplit).
    """
    used: set[int] = set()

    def address() -> str:
        while (found := free_address()).port in used:
            pass
        used.add(found.port)
        return str(found)

    out: dict[str, Any] = {}
    for name, (protocol, upstreams) in spec.items():
        instances = [] if protocol == "root" else [{"node": f"{name}-1", "app": address(), "inbound": address()}]
        out[name] = {
            "identity": {"namespace": "e2e", "service_account": name},
            "protocol": "http" if protocol == "root" else protocol,
            "instances": instances,
            "upstreams": [{"service": u, "listen": address()} for u in upstreams],
        }
    return out


def mesh_of(services_doc: dict[str, Any], *policies: dict[str, Any], permissive: bool = False) -> Mesh:
    return parse_mesh({"services": services_doc, "policies": list(policies), "permissive": permissive}, TRUST_DOMAIN)


def doc(kind: str, name: str, spec: dict[str, Any]) -> dict[str, Any]:
    return {"kind": kind, "metadata": {"name": name, "namespace": "e2e"}, "spec": spec}


def sa(name: str) -> dict[str, str]:
    return {"kind": "ServiceAccount", "name": name, "namespace": "e2e"}


def target(name: str, destination: str, sources: list[str], rules: list[dict[str, Any]]) -> dict[str, Any]:
    spec = {"destination": sa(destination), "sources": [sa(s) for s in sources], "rules": rules}
    return doc("TrafficTarget", name, spec)


def split(root: str, weights: dict[str, int]) -> dict[str, Any]:
    backends = [{"service": s, "weight": w} for s, w in weights.items()]
    return doc("TrafficSplit", f"{root}-split", {"service": root, "backends": backends})


BACKEND_ROUTES = doc(
    "HTTPRouteGroup",
    "backend-routes",
    {
        "matches": [
            {"name": "root", "pathRegex": "/", "methods": ["GET"]},
            {"name": "calls", "pathRegex": "/call/.*", "methods": ["GET"], "headers": {"x-tenant": "a|b"}},
        ]
    },
)
FRONTEND_TO_BACKEND = target(
    "frontend-to-backend", "backend", ["frontend"], [{"kind": "HTTPRouteGroup", "name": "backend-routes"}]
)


# -- waiting for what was served ------------------------------------------------------------------------------


def applied(running: RunningMesh, node: str) -> bool:
    """Whether ``node`` has acknowledged every resource the server holds for it, with no listener still warming.

    (The listener versions in ``/config_dump`` cannot tell: when only a filter chain changes, Envoy updates the
    listener in place and keeps reporting the version it was created with.)
    """
    for type_url in (CLUSTER, ENDPOINT, LISTENER, ROUTE):
        acked = running.xds.acks.acked_versions(node, type_url)
        served = running.xds.cache.get(node, type_url).resources
        if any(acked.get(name) != resource.version for name, resource in served.items()):
            return False
    dump = running.sidecars[node].config_dump("dynamic_listeners")
    return not any("warming_state" in config for config in dump["configs"])


def push(running: RunningMesh, mesh: Mesh) -> tuple[str, ...]:
    """Serve ``mesh`` and wait until every sidecar applied it; the nodes whose config was rebuilt."""
    rebuilt = running.xds.update_mesh(mesh)
    running.mesh = mesh
    for node in running.sidecars:
        wait_until(lambda n=node: applied(running, n), f"{node} to apply the new config")
    return rebuilt


# -- HTTP requests as an app sends them --------------------------------------------------------------------------


def call(
    address: Address, path: str = "/", method: str = "GET", headers: dict[str, str] | None = None
) -> tuple[int, str]:
    """One request to a sidecar's plaintext outbound listener: status and body."""
    connection = http.client.HTTPConnection(address.host, address.port, timeout=10)
    try:
        connection.request(method, path, headers=headers or {})
        response = connection.getresponse()
        return response.status, response.read().decode()
    finally:
        connection.close()


def peer_of(body: str) -> str | None:
    answer = json.loads(body)
    return answer.get("peer") if isinstance(answer, dict) else None


def count_backends(address: Address, n: int) -> Counter[str]:
    """``n`` requests on one keep-alive connection; how many each backend service answered."""
    seen: Counter[str] = Counter()
    connection = http.client.HTTPConnection(address.host, address.port, timeout=10)
    try:
        for _ in range(n):
            connection.request("GET", "/")
            response = connection.getresponse()
            body = response.read()
            assert response.status == 200, body
            seen[json.loads(body)["service"]] += 1
    finally:
        connection.close()
    return seen


def binomial_band(n: int, p: float, alpha: float = FALSE_ALARM) -> tuple[int, int]:
    """The exact two-sided acceptance region ``[lo, hi]`` of Binomial(n, p): P(X < lo) <= alpha/2 and
    P(X > hi) <= alpha/2, each bound as tight as that allows."""
    pmf = [math.comb(n, k) * p**k * (1 - p) ** (n - k) for k in range(n + 1)]
    lo, tail = 0, 0.0
    while tail + pmf[lo] <= alpha / 2:
        tail += pmf[lo]
        lo += 1
    hi, tail = n, 0.0
    while tail + pmf[hi] <= alpha / 2:
        tail += pmf[hi]
        hi -= 1
    return lo, hi


def test_binomial_band_is_tight_and_rejects_a_wrong_weight() -> None:
    lo, hi = binomial_band(1000, 0.1)
    assert (lo, hi) == (57, 149)
    assert not lo <= 200 <= hi  # an 80/20 split is told apart from 90/10
    assert binomial_band(1000, 0.5) == (423, 577)


# -- fixtures ---------------------------------------------------------------------------------------------------


@pytest.fixture
def http_mesh(issuer: AuthorityIssuer, tmp_path: Path) -> Iterator[tuple[RunningMesh, dict[str, Any]]]:
    """frontend and intruder both call backend; backend admits only frontend, on its route group."""
    spec = services({"frontend": ("http", ["backend"]), "intruder": ("http", ["backend"]), "backend": ("http", [])})
    with start_mesh(issuer, mesh_of(spec, BACKEND_ROUTES, FRONTEND_TO_BACKEND), tmp_path / "mesh") as running:
        yield running, spec


# -- HTTP access control ------------------------------------------------------------------------------------------


def test_allowed_source_reaches_the_destination_and_others_get_403(
    http_mesh: tuple[RunningMesh, dict[str, Any]],
) -> None:
    running, _ = http_mesh
    status, body = call(running.outbound("frontend", "backend"))
    assert (status, peer_of(body)) == (200, FRONTEND)
    assert call(running.outbound("intruder", "backend")) == (403, DENIED)
    # a forged client-cert header is no identity: principals come from the verified certificate only
    forged = {"x-forwarded-client-cert": f"By=spiffe://e2e.mesh/ns/e2e/sa/backend;URI={FRONTEND}"}
    assert call(running.outbound("intruder", "backend"), headers=forged) == (403, DENIED)
    stats = running.sidecar("backend").stats("http.inbound|backend.rbac.")
    assert (stats["http.inbound|backend.rbac.allowed"], stats["http.inbound|backend.rbac.denied"]) == (1, 2)


def test_a_path_method_or_header_outside_the_route_group_is_refused(
    http_mesh: tuple[RunningMesh, dict[str, Any]],
) -> None:
    running, _ = http_mesh
    backend = running.outbound("frontend", "backend")
    assert call(backend, "/", "POST") == (403, DENIED)
    assert call(backend, "/elsewhere") == (403, DENIED)
    assert call(backend, "/call/x", headers={"x-tenant": "c"}) == (403, DENIED)
    assert call(backend, "/call/x") == (403, DENIED)
    # inside the group: RBAC lets it through and the app answers (404: the demo app has no upstream 'x')
    status, body = call(backend, "/call/x", headers={"x-tenant": "a"})
    assert (status, json.loads(body)["error"]) == (404, "backend has no upstream 'x'")
    # a path is normalised before it is matched: '/call/../elsewhere' is '/elsewhere'
    assert call(backend, "/call/../elsewhere", headers={"x-tenant": "a"}) == (403, DENIED)


def test_policy_changes_reach_the_sidecars_live(
    http_mesh: tuple[RunningMesh, dict[str, Any]],
) -> None:
    running, spec = http_mesh
    pids = {name: envoy.pid for name, envoy in running.sidecars.items()}
    intruder = running.outbound("intruder", "backend")
    assert call(intruder) == (403, DENIED)

    # intruder added to the sources: only the backend's sidecar is rebuilt, and intruder gets in
    widened = target(
        "frontend-to-backend",
        "backend",
        ["frontend", "intruder"],
        [{"kind": "HTTPRouteGroup", "name": "backend-routes"}],
    )
    assert push(running, mesh_of(spec, BACKEND_ROUTES, widened)) == ("backend-1",)
    status, body = call(intruder)
    assert (status, peer_of(body)) == (200, "spiffe://e2e.mesh/ns/e2e/sa/intruder")

    # back to frontend only
    push(running, mesh_of(spec, BACKEND_ROUTES, FRONTEND_TO_BACKEND))
    assert call(intruder) == (403, DENIED)

    # permissive mode: the TrafficTargets stay but are not enforced
    push(running, mesh_of(spec, BACKEND_ROUTES, FRONTEND_TO_BACKEND, permissive=True))
    assert call(intruder, "/anything", "POST")[0] == 501  # the demo app has no POST: RBAC let it through

    # no TrafficTarget names backend any more: open to the mesh
    push(running, mesh_of(spec))
    assert call(intruder)[0] == 200
    assert {name: envoy.pid for name, envoy in running.sidecars.items()} == pids


# -- bad policies -----------------------------------------------------------------------------------------------


def _versions(running: RunningMesh) -> dict[str, dict[str, str]]:
    return {
        node: {t: running.xds.cache.get(node, t).version for t in (CLUSTER, ENDPOINT, LISTENER, ROUTE)}
        for node in running.sidecars
    }


def test_a_bad_policy_is_refused_and_the_last_good_config_stays_on_every_sidecar(
    http_mesh: tuple[RunningMesh, dict[str, Any]], tmp_path: Path
) -> None:
    running, spec = http_mesh
    good = running.mesh
    served = _versions(running)
    applied_before = {node: running.sidecars[node].config_dump("dynamic_route_configs") for node in running.sidecars}
    backend = good.service("backend").identity
    foreign = SpiffeId.parse("spiffe://partner.example/ns/e2e/sa/frontend")
    everything = HttpRule("backend-routes", (HttpMatch("all", "/.*"),))
    bad_models = [
        (
            Policy(splits=(TrafficSplit("s", "e2e", "payments", (Backend("backend", 100),)),)),
            "TrafficSplit e2e/s.spec.service: 'payments' is not a service of this mesh",
        ),
        (
            Policy(splits=(TrafficSplit("s", "e2e", "backend", (Backend("backend", 95),)),)),
            "TrafficSplit e2e/s.spec.backends: the weights add up to 95, not 100",
        ),
        (
            Policy(targets=(TrafficTarget("t", "e2e", backend, (foreign,), (everything,)),)),
            "TrafficTarget e2e/t.spec.sources[0]: spiffe://partner.example/ns/e2e/sa/frontend is not in trust "
            "domain e2e.mesh",
        ),
        (
            Policy(
                targets=(TrafficTarget("t", "e2e", backend, (backend,), (HttpRule("g", (HttpMatch("m", "(/x"),)),)),)
            ),
            "TrafficTarget e2e/t.spec.rules[0] match 'm' pathRegex: '(/x' is not a usable regex: it does not "
            "compile: missing ), unterminated subpattern at position 0",
        ),
    ]
    for policy, message in bad_models:
        with pytest.raises(ConfigError) as info:
            running.xds.update_mesh(Mesh(good.trust_domain, good.services, policy))
        assert str(info.value) == message
    # the same through the mesh file, as a reload would read it
    bad_file = tmp_path / "bad-mesh.json"
    bad_file.write_text(json.dumps({"services": spec, "policies": [split("backend", {"backend": 90})]}))
    with pytest.raises(ConfigError) as info:
        load_mesh(bad_file, TrustDomain("e2e.mesh"))
    assert str(info.value) == "policies[0].spec.backends: the weights add up to 90, not 100"

    assert _versions(running) == served
    assert running.xds.mesh is good
    for node, envoy in running.sidecars.items():
        assert running.xds.acks.last_nack(node, ROUTE) is None
        assert envoy.config_dump("dynamic_route_configs") == applied_before[node]
    assert call(running.outbound("intruder", "backend")) == (403, DENIED)
    assert call(running.outbound("frontend", "backend"))[0] == 200


# -- traffic split -------------------------------------------------------------------------------------------------


def test_a_90_10_split_lands_in_its_binomial_band_and_a_live_change_to_50_50_takes_effect(
    issuer: AuthorityIssuer, tmp_path: Path
) -> None:
    spec = services(
        {
            "frontend": ("http", ["backend"]),
            "backend": ("root", []),
            "backend-v1": ("http", []),
            "backend-v2": ("http", []),
        }
    )
    n = 1000
    mesh = mesh_of(spec, split("backend", {"backend-v1": 90, "backend-v2": 10}))
    with start_mesh(issuer, mesh, tmp_path / "mesh") as running:
        pids = {name: envoy.pid for name, envoy in running.sidecars.items()}
        address = running.outbound("frontend", "backend")
        seen = count_backends(address, n)
        lo, hi = binomial_band(n, 0.1)
        assert sum(seen.values()) == n
        assert lo <= seen["backend-v2"] <= hi, (seen, (lo, hi))

        rebuilt = push(running, mesh_of(spec, split("backend", {"backend-v1": 50, "backend-v2": 50})))
        assert rebuilt == ("frontend-1",)  # only the caller's sidecar holds the split
        seen = count_backends(address, n)
        lo, hi = binomial_band(n, 0.5)
        assert sum(seen.values()) == n
        assert lo <= seen["backend-v2"] <= hi, (seen, (lo, hi))
        assert {name: envoy.pid for name, envoy in running.sidecars.items()} == pids


# -- TCP ----------------------------------------------------------------------------------------------------------


def test_a_tcp_service_echoes_to_an_allowed_identity_and_closes_on_a_denied_one(
    issuer: AuthorityIssuer, tmp_path: Path
) -> None:
    spec = services({"teller": ("http", ["ledger"]), "thief": ("http", ["ledger"]), "ledger": ("tcp", [])})
    port = int(spec["ledger"]["instances"][0]["app"].rsplit(":", 1)[1])
    route = doc("TCPRoute", "ledger-port", {"matches": {"ports": [port]}})
    rules = [{"kind": "TCPRoute", "name": "ledger-port"}]
    with start_mesh(
        issuer, mesh_of(spec, route, target("teller-to-ledger", "ledger", ["teller"], rules)), tmp_path / "m"
    ) as running:
        assert echo(running.outbound("teller", "ledger"), b"balance?") == b"balance?"
        assert echo(running.outbound("thief", "ledger"), b"balance?") == b""
        stats = running.sidecar("ledger").stats("inbound|ledger.rbac.")
        assert (stats["inbound|ledger.rbac.allowed"], stats["inbound|ledger.rbac.denied"]) == (1, 1)

        # live: thief added; new connections get the new filter chain
        push(running, mesh_of(spec, route, target("teller-to-ledger", "ledger", ["teller", "thief"], rules)))
        assert echo(running.outbound("thief", "ledger"), b"balance?") == b"balance?"
        # a TCPRoute for another port grants nothing
        other = doc("TCPRoute", "ledger-port", {"matches": {"ports": [port + 1 if port < 65535 else port - 1]}})
        push(running, mesh_of(spec, other, target("teller-to-ledger", "ledger", ["teller", "thief"], rules)))
        assert echo(running.outbound("teller", "ledger"), b"balance?") == b""


# -- our regex check against Envoy's RE2 --------------------------------------------------------------------------


def test_envoy_accepts_the_regexes_we_accept_and_rejects_those_we_refuse(
    http_mesh: tuple[RunningMesh, dict[str, Any]],
) -> None:
    """Each pattern goes to backend's sidecar in its inbound route's RBAC; Envoy ACKs or NACKs it."""
    running, _ = http_mesh
    node, name = "backend-1", "inbound|backend"
    original = dict(running.xds.cache.get(node, ROUTE).resources)
    verdicts: dict[str, str] = {}
    for pattern in [*ACCEPTED, *(p for p, _ in UNSUPPORTED_FEATURES)]:
        rules = rbac_pb2.RBAC(
            policies={
                "p": rbac_pb2.Policy(
                    permissions=[http_permission(HttpMatch("m", pattern))], principals=[rbac_pb2.Principal(any=True)]
                )
            }
        )
        per_route = pack(http_rbac_pb2.RBACPerRoute(rbac=http_rbac_pb2.RBAC(rules=rules)))
        route = to_cluster(name, "inbound|backend|app", {HTTP_RBAC: per_route})
        version = Resource.pack(name, route).version
        running.xds.cache.update_resources(node, ROUTE, {name: route})

        def verdict(version: str = version) -> str | None:
            acked = running.xds.acks.acked(node, ROUTE, name)
            if acked is not None and acked.version == version:
                return "ack"
            nack = running.xds.acks.last_nack(node, ROUTE)
            return "nack" if nack is not None and nack.versions.get(name) == version else None

        verdicts[pattern] = wait_until(verdict, f"backend's sidecar to answer for {pattern!r}")
    running.xds.cache.update_resources(node, ROUTE, original)
    assert {p for p, v in verdicts.items() if v == "ack"} == set(ACCEPTED)
    assert {p for p, v in verdicts.items() if v == "nack"} == {p for p, _ in UNSUPPORTED_FEATURES}
