"""Kubernetes registry benchmark: a mesh of P pods in N namespaces behind S Services, read from the Kubernetes API
test server by the real control plane (``registry: {kind: kubernetes}``), down to every sidecar's xDS snapshot.

    .venv/bin/python bench/kube_registry.py                      # 1,000 pods, 100 namespaces, 300 Services
    .venv/bin/python bench/kube_registry.py --quick              # same mesh, a 10 s window, 20 pods created
    .venv/bin/python bench/kube_registry.py --profile /tmp/kube.prof   # and a profile of the registry's thread

Two processes, as in a cluster: this one runs the Kubernetes API test server (:class:`tests.fakes.kube.KubeServer`,
HTTPS, with its EndpointSlice controller) and writes the objects; a child process runs the control plane exactly
as ``mesh-identity serve`` builds it (``compose.build`` at ``Stage.SERVER`` from a config with ``registry: {kind:
kubernetes}`` and ``xds.listen``: built-in CA, rotation engine, membership, xDS component, prober, scrape
targets), talking to the test server through the real ``kubernetes`` client with its own token. No Envoy
connects: a sidecar's snapshot is *ready* when the xDS server's snapshot cache holds, for node ``<pod>.<ns>``,
the config of a sidecar of its Service (an app, so an inbound listener) and its certificate secret.

The mesh: namespaces ``bench-<n>``, each with S/N Services ``s<j>`` (one ServiceAccount each, pods labelled
``app: s<j>``, spread evenly); Service ``s<j>`` has port ``9000 + (j mod 3)`` (distinct in a namespace, and distinct
among the three Services any sidecar calls), target port 8080; every tenth is TCP (``appProtocol: tcp``). Each
Service's ServiceAccount is the destination of one TrafficTarget admitting the ServiceAccounts of ``s<j-1>``,
``s<j-2>``, ``s<j-3>`` (crossing namespaces at the edges) on an HTTPRouteGroup of two matches or a TCPRoute; every
tenth namespace has a TrafficSplit ``front`` (a Service with no pods) over its first two Services, 90/10. Pod IPs
are on loopback (127.1.0.0/16) so the prober's connections are refused at once instead of hanging.

Measured (times are CLOCK_MONOTONIC, which both processes read):

1. initial sync: from the registry's ``start()`` until the snapshot of every one of the P sidecars is ready; the
   first publication of the registry (lists read, translated, identities issued) on the way; and, for
   attribution, ``translate()`` alone on the registry's snapshot and the xDS views of every sidecar
   (``proxy_views``), each the median of 5 runs in the control plane's process;
2. pod created -> snapshot ready: K pods created one at a time into the synced mesh (the Pod POSTed as a user
   does; once the control plane has taken that in and is idle, and ``--gap`` seconds later, its status written as
   the kubelet writes it: Running, an IP, Ready; the test server's controller then adds it to its Service's
   EndpointSlice), from the status write to the new sidecar's snapshot ready; p50 and p99, with the registry's
   publication on the way, against the status write's own round trip as the reference, and the translations the
   registry ran per pod;
3. memory per pod: the control plane process's resident set (after ``gc.collect()``) synced with P pods minus
   synced with none (same Services, ServiceAccounts and policy; a fresh process each), divided by P. The test
   server is in the other process and not counted;
4. API requests in steady state: every request of the control plane's user in the test server's request records
   during ``--window`` seconds in which nothing changes, by verb and resource; goal none (the open watches are
   counted apart: they are streams opened before the window).
"""

from __future__ import annotations

import argparse
import cProfile
import gc
import io
import json
import pstats
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

CRDS = ROOT / "deploy" / "crds"
TD_NAME = "bench.mesh"
MESH = "bench"
MONITORED = "mesh-identity.io/monitored-by"
CP_TOKEN = "control-plane-token"
CP_USER = "system:serviceaccount:mesh-identity:mesh-identity"
DRIVER_TOKEN = "driver-token"
DRIVER_USER = "system:node:bench"
TARGET_PORT = 8080
FIRST_PORT = 9000
SPLIT_PORT = 9003
STAMP = "2026-01-01T00:00:00Z"


def rss_kib() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError("no VmRSS in /proc/self/status")


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))]


# -- the mesh ---------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Shape:
    pods: int
    namespaces: int
    services: int

    def namespace(self, j: int) -> str:
        return f"bench-{(j % self.services) * self.namespaces // self.services:02d}"

    def service(self, j: int) -> str:
        return f"s{j % self.services}"

    def pods_of(self, j: int) -> int:
        return self.pods // self.services + (1 if j < self.pods % self.services else 0)

    def nodes(self) -> list[str]:
        return [
            f"{self.service(j)}-{k}.{self.namespace(j)}" for j in range(self.services) for k in range(self.pods_of(j))
        ]


def is_tcp(j: int) -> bool:
    return j % 10 == 5


def pod_ip(index: int) -> str:
    return f"127.1.{index // 250}.{index % 250 + 2}"


def namespace_doc(name: str) -> dict[str, Any]:
    return {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": name, "labels": {MONITORED: MESH}}}


def service_account_doc(namespace: str, name: str) -> dict[str, Any]:
    return {"apiVersion": "v1", "kind": "ServiceAccount", "metadata": {"name": name, "namespace": namespace}}


def service_doc(namespace: str, name: str, port: int, tcp: bool, selector: str) -> dict[str, Any]:
    entry: dict[str, Any] = {"name": "tcp-data" if tcp else "http", "port": port, "targetPort": TARGET_PORT}
    if tcp:
        entry["appProtocol"] = "tcp"
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": name, "namespace": namespace},
        "spec": {"selector": {"app": selector}, "ports": [entry]},
    }


def pod_doc(namespace: str, name: str, app: str, node: str) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name, "namespace": namespace, "labels": {"app": app}},
        "spec": {
            "serviceAccountName": app,
            "nodeName": node,
            "containers": [
                {"name": "app", "image": "example.org/app:1", "ports": [{"name": "app", "containerPort": TARGET_PORT}]}
            ],
        },
    }


def running_status(ip: str) -> dict[str, Any]:
    """What the kubelet reports once the pod's containers run and are ready."""
    return {
        "phase": "Running",
        "podIP": ip,
        "podIPs": [{"ip": ip}],
        "hostIP": "192.168.0.10",
        "startTime": STAMP,
        "conditions": [
            {"type": "Ready", "status": "True", "lastTransitionTime": STAMP},
            {"type": "ContainersReady", "status": "True", "lastTransitionTime": STAMP},
        ],
    }


def policy_docs(shape: Shape) -> list[dict[str, Any]]:
    docs: list[dict[str, Any]] = []
    namespaces = sorted({shape.namespace(j) for j in range(shape.services)})
    for ns in namespaces:
        docs.append(
            {
                "apiVersion": "specs.smi-spec.io/v1alpha4",
                "kind": "HTTPRouteGroup",
                "metadata": {"name": "api", "namespace": ns},
                "spec": {
                    "matches": [
                        {"name": "read", "pathRegex": "/api/.*", "methods": ["GET", "HEAD"]},
                        {"name": "write", "pathRegex": "/api/items/[0-9]+", "methods": ["PUT"],
                         "headers": {"x-tenant": "[a-z]+"}},
                    ]
                },
            }
        )  # fmt: skip
        docs.append(
            {
                "apiVersion": "specs.smi-spec.io/v1alpha4",
                "kind": "TCPRoute",
                "metadata": {"name": "data", "namespace": ns},
                "spec": {"matches": {"ports": [TARGET_PORT]}},
            }
        )
    for j in range(shape.services):
        rule = {"kind": "TCPRoute", "name": "data"} if is_tcp(j) else {"kind": "HTTPRouteGroup", "name": "api"}
        sources = [
            {"kind": "ServiceAccount", "name": shape.service(j - k), "namespace": shape.namespace(j - k)}
            for k in (1, 2, 3)
        ]
        docs.append(
            {
                "apiVersion": "access.smi-spec.io/v1alpha3",
                "kind": "TrafficTarget",
                "metadata": {"name": f"to-{shape.service(j)}", "namespace": shape.namespace(j)},
                "spec": {
                    "destination": {
                        "kind": "ServiceAccount",
                        "name": shape.service(j),
                        "namespace": shape.namespace(j),
                    },
                    "sources": sources,
                    "rules": [rule],
                },
            }
        )
    for ns, first in split_roots(shape):
        docs.append(
            {
                "apiVersion": "split.smi-spec.io/v1alpha4",
                "kind": "TrafficSplit",
                "metadata": {"name": "front", "namespace": ns},
                "spec": {
                    "service": "front",
                    "backends": [
                        {"service": shape.service(first), "weight": 90},
                        {"service": shape.service(first + 1), "weight": 10},
                    ],
                },
            }
        )
    return docs


def split_roots(shape: Shape) -> list[tuple[str, int]]:
    """(namespace, its first Service's index) of every tenth namespace whose first two Services are HTTP."""
    firsts: dict[str, int] = {}
    for j in range(shape.services):
        firsts.setdefault(shape.namespace(j), j)
    return [
        (ns, j)
        for i, (ns, j) in enumerate(sorted(firsts.items()))
        if i % 10 == 0 and shape.namespace(j + 1) == ns and not is_tcp(j) and not is_tcp(j + 1)
    ]


# -- the cluster (this process) -----------------------------------------------------------------------------------


class Cluster:
    """The test API server with its EndpointSlice controller, set up directly through its store (fast), and a
    real client as the kubelet and users, for the measured writes."""

    def __init__(self, shape: Shape, validate: bool) -> None:
        import kubernetes

        from tests.fakes.kube import DEFAULT_KINDS, KubeServer
        from tests.fakes.kube.customresources import install_crds
        from tests.fakes.kube.endpointslices import EndpointSliceController
        from tests.fakes.kube.workloads import kind_named, workload_kinds

        self.shape = shape
        checked = workload_kinds()  # every kind checked against the official schemas
        kinds = checked
        if not validate:  # the set-up objects unchecked (fast); what the product writes (Events) checked still
            kinds = (*(k for k in workload_kinds(versions=()) if k.kind != "Event"), kind_named(checked, "Event"))
        self.server = KubeServer(
            kinds=(*DEFAULT_KINDS, *kinds), tokens={CP_TOKEN: CP_USER, DRIVER_TOKEN: DRIVER_USER},
            history_limit=50_000, request_log_limit=1_000_000,
        )  # fmt: skip
        self.server.start()
        self.smi = install_crds(self.server, [CRDS])
        self.controller = EndpointSliceController(self.server).start()
        self.api = kubernetes.client.ApiClient(self.server.client_configuration(DRIVER_TOKEN))
        self.core = kubernetes.client.CoreV1Api(self.api)
        self.kind = lambda name: kind_named(self.server.kinds, name)
        self.ips = 0

    def close(self) -> None:
        self.api.close()
        self.controller.stop()
        self.server.stop()

    def put(self, kind: str, obj: dict[str, Any]) -> None:
        self.server.put_object(self.smi[kind] if kind in self.smi else self.kind(kind), obj)

    def set_up_services(self) -> None:
        shape = self.shape
        for ns in sorted({shape.namespace(j) for j in range(shape.services)}):
            self.put("Namespace", namespace_doc(ns))
        for j in range(shape.services):
            ns, name = shape.namespace(j), shape.service(j)
            self.put("ServiceAccount", service_account_doc(ns, name))
            self.put("Service", service_doc(ns, name, FIRST_PORT + j % 3, is_tcp(j), name))
        for ns, _ in split_roots(shape):
            self.put("Service", service_doc(ns, "front", SPLIT_PORT, False, "front"))
        for doc in policy_docs(shape):
            self.put(str(doc["kind"]), doc)

    def set_up_pods(self) -> None:
        """Every pod, created and then run (its status written), as the kubelet would."""
        pods = self.kind("Pod")
        shape = self.shape
        for j in range(shape.services):
            ns, name = shape.namespace(j), shape.service(j)
            for k in range(shape.pods_of(j)):
                self.put("Pod", pod_doc(ns, f"{name}-{k}", name, f"node-{self.ips % 10}"))
                status = running_status(pod_ip(self.ips))
                self.ips += 1
                self.server.store.update(pods, ns, f"{name}-{k}", lambda obj, s=status: {**obj, "status": s}, "status")

    def endpoints(self) -> int:
        return sum(len(s.get("endpoints") or []) for s in self.server.objects(self.kind("EndpointSlice")))

    def wait_endpoints(self, count: int, timeout: float = 120.0) -> None:
        deadline = time.monotonic() + timeout
        while self.endpoints() < count:
            if time.monotonic() > deadline:
                raise RuntimeError(f"the EndpointSlice controller listed {self.endpoints()} of {count} pods")
            time.sleep(0.1)

    def requests(self) -> int:
        return len(self.server.requests)

    def requests_since(self, mark: int, user: str = CP_USER) -> list[Any]:
        return [r for r in list(self.server.requests)[mark:] if r.user == user]


# -- the control plane (a child process) ------------------------------------------------------------------------


class ControlPlane:
    """The child process, driven by JSON lines on its stdin; its log goes to ``log``."""

    def __init__(self, workdir: Path, kubeconfig: Path, name: str) -> None:
        workdir.mkdir(parents=True, exist_ok=True)
        self.log_path = workdir / f"{name}.log"
        self._log = self.log_path.open("w")
        self.proc = subprocess.Popen(
            [sys.executable, __file__, "--control-plane", str(workdir), str(kubeconfig)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self._log, text=True,
        )  # fmt: skip

    def ask(self, **command: Any) -> dict[str, Any]:
        assert self.proc.stdin is not None
        assert self.proc.stdout is not None
        self.proc.stdin.write(json.dumps(command) + "\n")
        self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"the control plane exited ({self.proc.poll()}); see {self.log_path}")
        answer: dict[str, Any] = json.loads(line)
        if "error" in answer:
            raise RuntimeError(f"the control plane: {answer['error']} (see {self.log_path})")
        return answer

    def stop(self) -> None:
        try:
            if self.proc.poll() is None:
                self.ask(cmd="stop")
            self.proc.wait(60)
        except (RuntimeError, OSError, subprocess.TimeoutExpired):
            if self.proc.poll() is None:
                self.proc.kill()
                self.proc.wait(10)
        finally:
            self._log.close()


def control_plane_main(workdir: Path, kubeconfig: Path) -> int:
    """The child: build the control plane, then answer commands (see :class:`Agent`) until ``stop``."""
    import logging

    logging.basicConfig(level=logging.WARNING, stream=sys.stderr, format="%(asctime)s %(name)s %(message)s")
    agent = Agent(workdir, kubeconfig)
    for line in sys.stdin:
        command = json.loads(line)
        try:
            answer = agent.handle(command)
        except Exception as err:  # reported to the parent, which stops
            logging.exception("command %s failed", command.get("cmd"))
            answer = {"error": f"{type(err).__name__}: {err}"}
        print(json.dumps(answer), flush=True)
        if command.get("cmd") == "stop":
            return 0
    agent.stop()
    return 0


class Agent:
    """The control plane's side: the system, a timed wrapper on the registry's translating round, the times of
    its publications, and per-node readiness from the snapshot cache's watchers."""

    def __init__(self, workdir: Path, kubeconfig: Path) -> None:
        from mesh_identity.compose import Stage, build
        from mesh_identity.config import parse_config
        from mesh_identity.registry.kube import KubernetesRegistry

        config = parse_config(
            {
                "trust_domain": TD_NAME,
                "state_dir": str(workdir / "state"),
                "metrics": {"listen": "127.0.0.1:0"},
                "xds": {"listen": "127.0.0.1:0"},
                "plugins": {"audit": {"enabled": False}},
                "registry": {"kind": "kubernetes", "mesh_name": MESH, "kubeconfig": str(kubeconfig)},
            },
            workdir,
        )
        self.system = build(config, Stage.SERVER, create=True)
        registry = self.system.registry
        assert isinstance(registry, KubernetesRegistry)
        assert self.system.service is not None
        self.registry = registry
        self.published: list[float] = []
        self.refreshes: list[tuple[float, float]] = []  # (start, seconds) of each translating round
        self.profile: cProfile.Profile | None = None
        self.running = False  # a translating round is under way
        self.started_at = 0.0
        self.ready: dict[str, threading.Event] = {}
        self.ready_at: dict[str, float] = {}
        self.cancels: dict[str, Callable[[], None]] = {}
        registry.subscribe(lambda _w: self.published.append(time.monotonic()))  # after the membership's
        refresh = registry._refresh  # the registry thread's round: translate, publish (membership, xDS)

        def timed() -> None:
            self.running = True
            start = time.monotonic()
            profile = self.profile
            if profile is not None:
                profile.enable()
            try:
                refresh()
            finally:
                if profile is not None:
                    profile.disable()
                self.refreshes.append((start, time.monotonic() - start))
                self.running = False

        registry._refresh = timed  # type: ignore[method-assign]
        start = registry.start

        def timed_start() -> None:
            self.started_at = time.monotonic()
            start()

        registry.start = timed_start  # type: ignore[method-assign]
        component = self.system.xds
        assert component is not None
        component_start = component.start
        self.xds_start = (0.0, 0.0)

        def timed_component_start() -> int:
            began = time.monotonic()
            port = component_start()
            self.xds_start = (began, time.monotonic() - began)
            return port

        component.start = timed_component_start  # type: ignore[method-assign]

    @property
    def publisher(self) -> Any:
        assert self.system.xds is not None
        assert self.system.xds.xds is not None
        return self.system.xds.xds

    def is_ready(self, node: str) -> bool:
        from xds_sds.protocol.auth import tls_secret_name
        from xds_sds.protocol.typeurls import LISTENER, SECRET

        xds = self.publisher
        found = xds.mesh.instance(node)
        if found is None or found[1].app is None:  # not (yet) a sidecar of its Service
            return False
        secrets = xds.cache.get(node, SECRET).resources
        return bool(xds.cache.get(node, LISTENER).resources) and tls_secret_name(found[0].identity) in secrets

    def handle(self, command: dict[str, Any]) -> dict[str, Any]:
        cmd = command["cmd"]
        if cmd == "start":
            return self.start(json.loads(Path(command["nodes"]).read_text()), float(command["timeout"]))
        if cmd == "rss":
            gc.collect()
            return {"rss_kib": rss_kib()}
        if cmd == "attribute":
            return self.attribute()
        if cmd == "expect":
            self.expect(command["node"])
            return {"idle_after": self.idle(tuple(command["pod"]), float(command["timeout"]))}
        if cmd == "wait":
            return self.wait(command["node"], float(command["after"]), float(command["timeout"]))
        if cmd == "profile":
            return self.toggle_profile(command.get("path"))
        if cmd == "stop":
            self.stop()
            return {}
        raise ValueError(f"unknown command {cmd!r}")

    def start(self, nodes: list[str], timeout: float) -> dict[str, Any]:
        service = self.system.service
        assert service is not None
        called = time.monotonic()
        service.start()
        returned = time.monotonic()
        missing = [node for node in nodes if not self.is_ready(node)]
        for node in missing:
            self.expect(node)
        missing = [node for node in missing if not self.ready[node].is_set() and not self.is_ready(node)]
        deadline = time.monotonic() + timeout
        for node in missing:
            self.ready[node].wait(max(0.0, deadline - time.monotonic()))
        still = [node for node in missing if not self.ready[node].is_set()]
        if still:
            raise RuntimeError(f"{len(still)} of {len(nodes)} sidecars not ready after {timeout}s, e.g. {still[:3]}")
        ready = max([returned, *(self.ready_at.get(node, 0.0) for node in missing)])
        for node in list(self.cancels):
            self.cancels.pop(node)()
        gc.collect()
        return {
            "called": called,
            "registry_started": self.started_at,
            "published": self.published[0] if self.published else None,
            "returned": returned,
            "xds_start": self.xds_start,
            "ready": ready,
            "late": len(missing),
            "rss_kib": rss_kib(),
            "refreshes": len(self.refreshes),
        }

    def attribute(self) -> dict[str, Any]:
        """translate() on the registry's snapshot, and the views of every sidecar, each the median of 5 runs."""
        from mesh_identity.registry.kube.translate import Snapshot, translate
        from xds_sds.resources.proxy import proxy_views

        registry = self.registry
        snapshot = Snapshot({resource: watch.objects() for resource, watch in registry.watches.items()})
        times, views = [], []
        for _ in range(5):
            start = time.perf_counter()
            result = translate(snapshot, MESH, registry.trust_domain, {})
            times.append(time.perf_counter() - start)
            start = time.perf_counter()
            proxy_views(result.mesh)
            views.append(time.perf_counter() - start)
        return {
            "translate_s": statistics.median(times),
            "views_s": statistics.median(views),
            "sidecars": len(result.mesh.nodes()),
            "services": len(result.mesh.services),
            "identities": len(result.mesh.identities),
            "refusals": [r.message for r in result.refusals][:5],
            "notes": list(result.notes)[:5],
        }

    def expect(self, node: str) -> None:
        event = self.ready.setdefault(node, threading.Event())
        self.ready_at.pop(node, None)
        event.clear()

        def changed(node_id: str, types: frozenset[str]) -> None:
            if not event.is_set() and self.is_ready(node_id):
                self.ready_at[node_id] = time.monotonic()
                event.set()

        self.cancels[node] = self.publisher.cache.watch(node, changed)

    def idle(self, pod: tuple[str, str], timeout: float) -> float:
        """Wait until the registry has seen ``pod`` and has no round running or pending (its private flag: this
        is a benchmark); returns when that was."""
        from mesh_identity.registry.kube.resources import PODS

        registry = self.registry
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if pod in registry.watches[PODS].objects() and not self.running:
                with registry._cond:
                    if not registry._dirty and not self.running:
                        return time.monotonic()
            time.sleep(0.002)
        raise RuntimeError(f"the registry did not settle within {timeout}s after pod {pod[0]}/{pod[1]} was created")

    def wait(self, node: str, after: float, timeout: float) -> dict[str, Any]:
        event = self.ready[node]
        if not event.wait(timeout):
            raise RuntimeError(f"{node}: no snapshot ready after {timeout}s")
        self.cancels.pop(node)()
        ready = self.ready_at[node]
        publications = [t for t in self.published if after <= t <= ready]
        rounds = [(s, d) for s, d in self.refreshes if s >= after and s <= ready]
        return {
            "ready": ready,
            "published": publications[-1] if publications else None,
            "rounds": len(rounds),
            "round_s": [d for _, d in rounds],
        }

    def toggle_profile(self, path: str | None) -> dict[str, Any]:
        if self.profile is None:
            self.profile = cProfile.Profile()
            return {}
        profile, self.profile = self.profile, None
        time.sleep(0.5)  # a round in progress finishes with it
        assert path is not None
        profile.dump_stats(path)
        out = io.StringIO()
        stats = pstats.Stats(path, stream=out)
        rows = []
        for (file, line, function), (_cc, calls, tottime, cumtime, _callers) in stats.stats.items():  # type: ignore[attr-defined]
            rows.append((cumtime, tottime, calls, f"{Path(file).parent.name}/{Path(file).name}:{line}({function})"))
        refresh = [cum for cum, _own, _calls, name in rows if name.endswith("(_refresh)")]
        total = max(refresh or [1e-9])  # the rounds' own time: the shares are of it
        top_cum = sorted(rows, reverse=True)[:25]
        top_own = sorted(rows, key=lambda r: r[1], reverse=True)[:15]
        return {
            "total_s": total,
            "cumulative": [(name, round(cum / total, 3), calls) for cum, _own, calls, name in top_cum],
            "own": [(name, round(own / total, 3), calls) for _cum, own, calls, name in top_own],
        }

    def stop(self) -> None:
        service = self.system.service
        if service is not None:
            service.stop()


# -- the run ----------------------------------------------------------------------------------------------------


def ms(seconds: float) -> str:
    return f"{seconds * 1000:.0f} ms" if seconds < 10 else f"{seconds:.1f} s"


def memory_without_pods(workdir: Path, kubeconfig: Path, out: IO[str]) -> int:
    plane = ControlPlane(workdir / "cp-empty", kubeconfig, "control-plane-empty")
    try:
        empty = workdir / "no-nodes.json"
        empty.write_text("[]")
        result = plane.ask(cmd="start", nodes=str(empty), timeout=60)
        print(f"control plane synced with no pods: RSS {result['rss_kib'] / 1024:.1f} MiB", file=out)
        return int(result["rss_kib"])
    finally:
        plane.stop()


def run(args: argparse.Namespace, out: IO[str] = sys.stdout) -> dict[str, Any]:
    shape = Shape(args.pods, args.namespaces, args.services)
    workdir = Path(tempfile.mkdtemp(prefix="kube-bench-"))
    figures: dict[str, Any] = {}
    cluster = Cluster(shape, args.validate)
    try:
        kubeconfig = cluster.server.write_kubeconfig(workdir / "kubeconfig", token=CP_TOKEN)
        cluster.set_up_services()
        print(f"mesh: {shape.pods} pods, {shape.namespaces} namespaces, {shape.services} Services "
              f"({sum(1 for j in range(shape.services) if is_tcp(j))} TCP), {shape.services} TrafficTargets, "
              f"{len(split_roots(shape))} TrafficSplits", file=out)  # fmt: skip
        rss_empty = memory_without_pods(workdir, kubeconfig, out)
        start = time.monotonic()
        cluster.set_up_pods()
        cluster.wait_endpoints(shape.pods)
        print(f"cluster set up ({shape.pods} pods running, in their EndpointSlices): {ms(time.monotonic() - start)}",
              file=out)  # fmt: skip

        nodes = shape.nodes()
        nodes_file = workdir / "nodes.json"
        nodes_file.write_text(json.dumps(nodes))
        plane = ControlPlane(workdir / "cp", kubeconfig, "control-plane")
        try:
            mark = cluster.requests()
            sync = plane.ask(cmd="start", nodes=str(nodes_file), timeout=300)
            total = sync["ready"] - sync["registry_started"]
            published = (sync["published"] or sync["ready"]) - sync["registry_started"]
            attribution = plane.ask(cmd="attribute")
            figures.update(
                initial_sync_s=total, first_publication_s=published, translate_s=attribution["translate_s"],
                views_s=attribution["views_s"], service_start_s=sync["returned"] - sync["called"],
            )  # fmt: skip
            print(
                f"1. initial sync, registry start -> all {len(nodes)} sidecars' snapshots ready: {ms(total)}", file=out
            )
            print(f"   of which the registry's first publication (lists, translation, {attribution['identities']} "
                  f"identities issued): {ms(published)}; the whole service start: "
                  f"{ms(sync['returned'] - sync['called'])}", file=out)  # fmt: skip
            began, took = sync["xds_start"]
            figures.update(xds_start_s=took)
            after = began - sync["registry_started"]
            print(f"   the xDS component's start (every sidecar's snapshot built), {ms(after)} after the registry's "
                  f"start: {ms(took)}", file=out)  # fmt: skip
            print(f"   translate() alone on the synced snapshot: {ms(attribution['translate_s'])} "
                  f"({attribution['translate_s'] / total:.1%} of the sync); xDS views of every sidecar: "
                  f"{ms(attribution['views_s'])}", file=out)  # fmt: skip
            print(
                f"   mesh: {attribution['services']} mesh services, {attribution['sidecars']} sidecars; "
                f"refusals {attribution['refusals'] or 'none'}; notes {attribution['notes'] or 'none'}",
                file=out,
            )
            initial = cluster.requests_since(mark)
            print(f"   API requests of the sync: {dict(sorted(Counter(r.verb for r in initial).items()))}", file=out)

            rss_full = int(sync["rss_kib"])
            per_pod = (rss_full - rss_empty) / shape.pods
            figures.update(rss_empty_kib=rss_empty, rss_full_kib=rss_full, kib_per_pod=per_pod)
            print(
                f"3. memory: RSS {rss_empty / 1024:.1f} MiB without pods -> {rss_full / 1024:.1f} MiB with "
                f"{shape.pods}: {per_pod:.1f} KiB per pod (resident set after gc, fresh process each)",
                file=out,
            )

            steady(cluster, args.window, figures, out)
            created(cluster, plane, shape, args, figures, out)
            if args.profile:
                profiled(cluster, plane, shape, args, figures, out)
        finally:
            plane.stop()
    finally:
        cluster.close()
        shutil.rmtree(workdir, ignore_errors=True)
    return figures


def settle(cluster: Cluster, quiet: float = 2.0, bound: float = 120.0) -> tuple[float, list[Any]]:
    """Wait until the control plane's start-up work is done: ``quiet`` seconds with no request of it but Lease
    ones (at most ``bound``); returns how long that took and the other requests it made meanwhile."""
    mark = cluster.requests()
    began = time.monotonic()
    others: list[Any] = []
    while time.monotonic() - began < bound:
        time.sleep(quiet)
        seen = [r for r in cluster.requests_since(mark) if r.resource != "leases"]
        mark = cluster.requests()
        if not seen:
            break
        others.extend(seen)
    return time.monotonic() - began - quiet, others


def steady(cluster: Cluster, window: float, figures: dict[str, Any], out: IO[str]) -> None:
    waited, startup = settle(cluster)
    if startup:
        by = Counter(f"{r.verb} {r.resource}" for r in startup)
        print(f"   after the sync, {waited:.1f} s of start-up requests (not Leases): {dict(by)}", file=out)
    watches = cluster.server.open_watches
    mark = cluster.requests()
    time.sleep(window)
    seen = cluster.requests_since(mark)
    by_verb = Counter(r.verb for r in seen)
    by_resource = Counter(f"{r.verb} {r.resource}" for r in seen)
    per_minute = len(seen) * 60 / window
    figures.update(steady_requests=len(seen), steady_per_minute=per_minute, open_watches=watches,
                   steady_by_resource=dict(by_resource))  # fmt: skip
    print(f"4. steady state, {window:.0f} s with nothing changing: {len(seen)} API requests of the control plane "
          f"({per_minute:.1f} per minute) {dict(by_verb) or ''}; {watches} watch streams open", file=out)  # fmt: skip
    if seen:
        print(f"   by verb and resource: {dict(by_resource)}", file=out)


def create_one(cluster: Cluster, plane: ControlPlane, shape: Shape, i: int, gap: float) -> dict[str, float]:
    j = (i * 37) % shape.services  # spread over Services and namespaces
    ns, app = shape.namespace(j), shape.service(j)
    name = f"{app}-new{i}"
    node = f"{name}.{ns}"
    posted = time.monotonic()
    cluster.core.create_namespaced_pod(ns, pod_doc(ns, name, app, f"node-{i % 10}"))
    idle = plane.ask(cmd="expect", node=node, pod=[ns, name], timeout=60)["idle_after"]
    time.sleep(gap)  # the kubelet starts the containers (the control plane has taken the POST in: it is idle)
    status = running_status(pod_ip(cluster.ips))
    cluster.ips += 1
    written = time.monotonic()
    cluster.core.patch_namespaced_pod_status(name, ns, {"status": status})
    answered = time.monotonic()
    result = plane.ask(cmd="wait", node=node, after=written, timeout=60)
    published = result["published"]
    return {
        "total": result["ready"] - written,
        "write": answered - written,
        "published": (published - written) if published is not None else float("nan"),
        "posted": idle - posted,
        "rounds": result["rounds"],
        "round_s": statistics.mean(result["round_s"]) if result["round_s"] else float("nan"),
    }


def created(
    cluster: Cluster, plane: ControlPlane, shape: Shape, args: argparse.Namespace, figures: dict[str, Any], out: IO[str]
) -> None:
    results = [create_one(cluster, plane, shape, i, args.gap) for i in range(args.created)]
    total = [r["total"] for r in results]
    write = [r["write"] for r in results]
    pub = [r["published"] for r in results if r["published"] == r["published"]]
    rounds = [r["rounds"] for r in results]
    round_s = [r["round_s"] for r in results if r["round_s"] == r["round_s"]]
    posted = [r["posted"] for r in results]
    p50, p99 = statistics.median(total), percentile(total, 0.99)
    figures.update(create_p50_s=p50, create_p99_s=p99, write_p50_s=statistics.median(write), create_all_s=total)
    print(f"2. pod status written (Running, IP, Ready) -> its sidecar's snapshot ready, {len(results)} pods created "
          f"one at a time ({args.gap:g} s after each POST was taken in): p50 {ms(p50)}, p99 {ms(p99)}, "
          f"max {ms(max(total))}", file=out)  # fmt: skip
    print(f"   reference, the status write's round trip: p50 {ms(statistics.median(write))} "
          f"(ratio {p50 / statistics.median(write):.1f}); registry published: p50 "
          f"{ms(statistics.median(pub)) if pub else 'n/a'}; translating rounds per pod: "
          f"{statistics.mean(rounds):.1f}, each {ms(statistics.mean(round_s)) if round_s else 'n/a'} on average; "
          f"the POST (pod Pending) taken in: p50 {ms(statistics.median(posted))}", file=out)  # fmt: skip


def profiled(
    cluster: Cluster, plane: ControlPlane, shape: Shape, args: argparse.Namespace, figures: dict[str, Any], out: IO[str]
) -> None:
    plane.ask(cmd="profile")
    for i in range(args.created, args.created + 10):
        create_one(cluster, plane, shape, i, args.gap)
    result = plane.ask(cmd="profile", path=str(Path(args.profile).resolve()))
    figures["profile"] = result
    print(f"profile of the registry thread's rounds over 10 more pods ({result['total_s']:.2f} s in them, profiled), "
          f"written to {args.profile}; share of that time, cumulative:", file=out)  # fmt: skip
    for name, share, calls in result["cumulative"]:
        print(f"   {share:6.1%}  {calls:>8}  {name}", file=out)
    print("   own time:", file=out)
    for name, share, calls in result["own"]:
        print(f"   {share:6.1%}  {calls:>8}  {name}", file=out)


def main() -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--pods", type=int, default=1000)
    parser.add_argument("--namespaces", type=int, default=100)
    parser.add_argument("--services", type=int, default=300)
    parser.add_argument("--created", type=int, default=100, help="pods created one at a time (measurement 2)")
    parser.add_argument(
        "--gap",
        type=float,
        default=0.2,
        help="seconds between the control plane taking in a pod's POST and its status write",
    )
    parser.add_argument("--window", type=float, default=60.0, help="seconds of steady state (measurement 4)")
    parser.add_argument("--quick", action="store_true", help="a 10 s window and 20 pods created")
    parser.add_argument("--validate", action="store_true", help="check the set-up objects against the schemas too")
    parser.add_argument("--profile", metavar="FILE", help="then profile the registry thread over 10 more pods")
    parser.add_argument("--json", action="store_true", help="print the figures as JSON at the end")
    parser.add_argument("--control-plane", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.control_plane:
        return control_plane_main(Path(args.control_plane[0]), Path(args.control_plane[1]))
    if args.quick:
        args.window, args.created = min(args.window, 10.0), min(args.created, 20)
    if args.services > args.pods or args.namespaces > args.services or min(args.pods, args.namespaces) < 1:
        parser.error("need 1 <= namespaces <= services <= pods")
    figures = run(args)
    if args.json:
        print(json.dumps({k: v for k, v in figures.items() if k != "profile"}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
