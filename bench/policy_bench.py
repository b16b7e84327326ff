"""Policy benchmark: config generation and push for a mesh of N services with policies.

    .venv/bin/python bench/policy_bench.py                    # N = 1000, 20 rounds of each change
    .venv/bin/python bench/policy_bench.py --services 2000 --rounds 50

The mesh (one instance per service, all on loopback): service ``s<i>`` calls ``s<i+1>``, ``s<i+2>``, ``s<i+3>``;
every tenth service (``i % 10 == 5``) is TCP, the rest HTTP. Every service is the destination of a
TrafficTarget that admits its three callers, on an HTTPRouteGroup of two matches (HTTP) or a TCPRoute (TCP);
every tenth HTTP service ``s<i>`` (``i % 10 == 0``) is the root of a TrafficSplit 90/10 over itself and
``s<i+1>``.

Measured, in one process on the machine's shared cores:

* parse: the mesh document (YAML already loaded) to the checked model (``parse_mesh``);
* build all: ``MeshPublisher(mesh)``: check, every sidecar's view, listeners/routes/clusters/endpoints for every
  sidecar, packed into the snapshot cache; and a full rebuild (``permissive`` toggled: every inbound policy
  changes) through ``update_mesh``;
* push one change: ``update_mesh`` with one TrafficTarget gaining or losing a source (affects the destination's
  sidecar), or one TrafficSplit's weights moving between 90/10 and 50/50 (affects the root's callers). The
  affected sidecars are real Envoy processes connected over ADS with mTLS; the latency runs from the call to
  ``update_mesh`` until the last affected sidecar has ACKed the new version (the ACK reaches the server), and
  the server-side part (check + views of every sidecar + rebuild of the changed ones + cache) is reported apart.
  The other sidecars have no Envoy: the cache tells whether they would have been pushed anything (they are not).
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from mesh_identity.mesh.model import Mesh, parse_mesh  # noqa: E402
from mesh_identity.spiffe import SpiffeId, TrustDomain  # noqa: E402
from tests.e2e.conftest import AuthorityIssuer, builtin_authority  # noqa: E402
from tests.e2e.harness import SERVER_PATH, Envoy, free_address  # noqa: E402
from tests.waiting import wait_until  # noqa: E402
from xds_sds.mesh.publisher import MeshPublisher  # noqa: E402
from xds_sds.protocol.acks import AckEvent  # noqa: E402
from xds_sds.protocol.typeurls import CLUSTER, ENDPOINT, LISTENER, ROUTE, SECRET  # noqa: E402
from xds_sds.resources.bootstrap import write_bootstrap  # noqa: E402

TD = TrustDomain("bench.mesh")
TYPES = (CLUSTER, ENDPOINT, LISTENER, ROUTE, SECRET)


class Ports:
    """Loopback addresses on ports free right now, never the same one twice."""

    def __init__(self) -> None:
        self.used: set[int] = set()

    def __call__(self) -> str:
        while True:
            address = free_address()
            if address.port not in self.used:
                self.used.add(address.port)
                return str(address)


def name(i: int, n: int) -> str:
    return f"s{i % n}"


def is_tcp(i: int) -> bool:
    return i % 10 == 5


def mesh_document(n: int) -> dict[str, Any]:
    services: dict[str, Any] = {}
    port = Ports()
    for i in range(n):
        services[name(i, n)] = {
            "identity": {"namespace": "bench", "service_account": name(i, n)},
            "protocol": "tcp" if is_tcp(i) else "http",
            "instances": [{"node": f"{name(i, n)}-1", "app": port(), "inbound": port()}],
            "upstreams": [{"service": name(i + k, n), "listen": port()} for k in (1, 2, 3)],
        }
    policies: list[dict[str, Any]] = [
        {
            "kind": "HTTPRouteGroup",
            "metadata": {"name": "api", "namespace": "bench"},
            "spec": {
                "matches": [
                    {"name": "read", "pathRegex": "/api/.*", "methods": ["GET", "HEAD"]},
                    {
                        "name": "write",
                        "pathRegex": "/api/items/[0-9]+",
                        "methods": ["PUT"],
                        "headers": {"x-tenant": "[a-z]+"},
                    },
                ]
            },
        },
        {
            "kind": "TCPRoute",
            "metadata": {"name": "any-port", "namespace": "bench"},
            "spec": {"matches": {"ports": []}},
        },
    ]
    for i in range(n):
        rule = {"kind": "TCPRoute", "name": "any-port"} if is_tcp(i) else {"kind": "HTTPRouteGroup", "name": "api"}
        policies.append(target(i, n, [name(i - k, n) for k in (1, 2, 3)], rule))
        if i % 10 == 0 and not is_tcp(i + 1):
            policies.append(split(i, n, 90))
    return {"services": services, "policies": policies}


def target(i: int, n: int, sources: list[str], rule: dict[str, Any]) -> dict[str, Any]:
    return {
        "kind": "TrafficTarget",
        "metadata": {"name": f"to-{name(i, n)}", "namespace": "bench"},
        "spec": {
            "destination": {"kind": "ServiceAccount", "name": name(i, n)},
            "sources": [{"kind": "ServiceAccount", "name": s} for s in sources],
            "rules": [rule],
        },
    }


def split(i: int, n: int, weight: int) -> dict[str, Any]:
    return {
        "kind": "TrafficSplit",
        "metadata": {"name": f"split-{name(i, n)}", "namespace": "bench"},
        "spec": {
            "service": name(i, n),
            "backends": [
                {"service": name(i, n), "weight": weight},
                {"service": name(i + 1, n), "weight": 100 - weight},
            ],
        },
    }


def with_policy(document: dict[str, Any], index: int, policy: dict[str, Any]) -> dict[str, Any]:
    policies = list(document["policies"])
    policies[index] = policy
    return document | {"policies": policies}


def index_of(document: dict[str, Any], kind: str, object_name: str) -> int:
    for i, policy in enumerate(document["policies"]):
        if policy["kind"] == kind and policy["metadata"]["name"] == object_name:
            return i
    raise KeyError(object_name)


class AckClock:
    """When the last of a set of nodes ACKed a given version of a resource (from the server's ACK events)."""

    def __init__(self, xds: MeshPublisher) -> None:
        self.xds = xds
        self.lock = threading.Lock()
        self.done = threading.Event()
        self.waiting: dict[tuple[str, str, str], str] = {}
        self.at = 0.0
        xds.acks.subscribe(self._event)

    def expect(self, wanted: dict[tuple[str, str, str], str]) -> None:
        """Wait for these (node, type, name) -> version ACKs; those already in count as arriving now."""
        with self.lock:
            self.waiting = {
                key: version
                for key, version in wanted.items()
                if (acked := self.xds.acks.acked(*key)) is None or acked.version != version
            }
            self.done.clear()
            if not self.waiting:
                self.at = time.perf_counter()
                self.done.set()

    def _event(self, event: AckEvent) -> None:
        if event.nack is not None:
            return
        now = time.perf_counter()
        with self.lock:
            for key, version in list(self.waiting.items()):
                node, type_url, resource = key
                acked = self.xds.acks.acked(node, type_url, resource)
                if node == event.node_id and acked is not None and acked.version == version:
                    del self.waiting[key]
            if not self.waiting and not self.done.is_set():
                self.at = now
                self.done.set()


def changed_resources(
    before: dict[str, dict[str, dict[str, str]]], xds: MeshPublisher
) -> dict[tuple[str, str, str], str]:
    out = {}
    for node, types in before.items():
        for type_url, versions in types.items():
            for resource_name, resource in xds.cache.get(node, type_url).resources.items():
                if versions.get(resource_name) != resource.version:
                    out[(node, type_url, resource_name)] = resource.version
    return out


def caught_up(xds: MeshPublisher, node: str) -> bool:
    return all(
        (acked := xds.acks.acked(node, t, r)) is not None and acked.version == resource.version
        for t in (CLUSTER, ENDPOINT, LISTENER, ROUTE)
        for r, resource in xds.cache.get(node, t).resources.items()
    )


def snapshot_versions(xds: MeshPublisher, nodes: list[str]) -> dict[str, dict[str, dict[str, str]]]:
    return {
        node: {t: {r: v.version for r, v in xds.cache.get(node, t).resources.items()} for t in TYPES} for node in nodes
    }


def measure_push(
    xds: MeshPublisher, clock: AckClock, meshes: list[Mesh], rounds: int, envoy_nodes: list[str]
) -> tuple[list[float], list[float], set[int]]:
    server_ms, ack_ms, rebuilt_counts = [], [], set()
    all_nodes = sorted(xds.cache.nodes())
    for r in range(rounds):
        mesh = meshes[r % 2]
        before = snapshot_versions(xds, all_nodes)
        start = time.perf_counter()
        rebuilt = xds.update_mesh(mesh)
        server_done = time.perf_counter()
        wanted = changed_resources(before, xds)
        assert {k[0] for k in wanted} == set(rebuilt), (rebuilt, wanted.keys())
        assert set(rebuilt) <= set(envoy_nodes), rebuilt
        clock.expect(wanted)
        assert clock.done.wait(60), f"no ACK of {clock.waiting}"
        end = clock.at
        server_ms.append((server_done - start) * 1000)
        ack_ms.append((end - start) * 1000)
        rebuilt_counts.add(len(rebuilt))
    return server_ms, ack_ms, rebuilt_counts


def summary(values: list[float]) -> str:
    ordered = sorted(values)
    p90 = ordered[min(len(ordered) - 1, int(0.9 * len(ordered)))]
    return f"median {statistics.median(ordered):.1f} ms, p90 {p90:.1f} ms, max {ordered[-1]:.1f} ms"


def run(n: int, rounds: int) -> None:
    document = mesh_document(n)
    start = time.perf_counter()
    mesh = parse_mesh(document, TD)
    parse_s = time.perf_counter() - start
    proxies = len(mesh.nodes())
    print(f"mesh: {n} services, {proxies} sidecars, {len(mesh.policy.targets)} TrafficTargets, "
          f"{len(mesh.policy.splits)} TrafficSplits")  # fmt: skip
    print(f"parse + check: {parse_s * 1000:.0f} ms")

    workdir = Path(tempfile.mkdtemp(prefix="policy-bench-"))
    issuer = AuthorityIssuer(builtin_authority(workdir / "ca", TD))
    server_svid = issuer.issue(SpiffeId(TD, SERVER_PATH))
    start = time.perf_counter()
    xds = MeshPublisher(mesh, server_svid)
    build_s = time.perf_counter() - start
    print(f"build all sidecars' snapshots (MeshPublisher init): {build_s * 1000:.0f} ms, "
          f"{build_s / proxies * 1e6:.0f} us per sidecar")  # fmt: skip
    xds.update_bundle(issuer.bundle())
    for identity in sorted(mesh.identities):
        xds.update_identity(issuer.issue(identity))
    start = time.perf_counter()
    rebuilt = xds.update_mesh(parse_mesh(document | {"permissive": True}, TD))
    full_s = time.perf_counter() - start
    print(f"full rebuild through update_mesh (permissive on: {len(rebuilt)} sidecars changed): {full_s * 1000:.0f} ms")
    xds.update_mesh(mesh)

    # the changes: a source added to s1's TrafficTarget; s0's split moving 90/10 <-> 50/50
    t_index = index_of(document, "TrafficTarget", "to-s1")
    sources = [name(1 - k, n) for k in (1, 2, 3)] + [name(n // 2, n)]
    widened = with_policy(document, t_index, target(1, n, sources, {"kind": "HTTPRouteGroup", "name": "api"}))
    s_index = index_of(document, "TrafficSplit", "split-s0")
    shifted = with_policy(document, s_index, split(0, n, 50))
    target_meshes = [parse_mesh(widened, TD), mesh]
    split_meshes = [parse_mesh(shifted, TD), mesh]
    callers = [f"{s.name}-1" for s in mesh.callers_of("s0")]
    envoy_nodes = ["s1-1", *callers]

    xds.start()
    envoys = []
    try:
        for node in envoy_nodes:
            found = mesh.instance(node)
            assert found is not None
            files = write_bootstrap(
                issuer.issue(found[0].identity), workdir / node, node=node, xds=xds.address,
                server_identity=xds.server_identity, cluster=found[0].name,
            )  # fmt: skip
            envoys.append(Envoy(files.bootstrap, workdir / node, name=node, log_level="warning").start())
        for node in envoy_nodes:
            wait_until(lambda node=node: caught_up(xds, node), f"{node} to apply its first config", 60)
        clock = AckClock(xds)
        server, acked, counts = measure_push(xds, clock, target_meshes, rounds, envoy_nodes)
        print(f"push a TrafficTarget change (sidecars rebuilt per change: {sorted(counts)}):")
        print(f"  server side (check + {proxies} views + rebuild + cache): {summary(server)}")
        print(f"  until every affected Envoy ACKed: {summary(acked)}")
        server, acked, counts = measure_push(xds, clock, split_meshes, rounds, envoy_nodes)
        print(f"push a TrafficSplit weight change (sidecars rebuilt per change: {sorted(counts)}):")
        print(f"  server side (check + {proxies} views + rebuild + cache): {summary(server)}")
        print(f"  until every affected Envoy ACKed: {summary(acked)}")
    finally:
        for envoy in envoys:
            envoy.stop()
        xds.stop(None)
        shutil.rmtree(workdir, ignore_errors=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--services", type=int, default=1000)
    parser.add_argument("--rounds", type=int, default=20, help="changes of each kind (alternating back and forth)")
    args = parser.parse_args()
    run(args.services, args.rounds)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
