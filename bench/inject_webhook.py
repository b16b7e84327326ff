"""Latency of the sidecar injector's admission webhook over real HTTPS, as the API server calls it.

    .venv/bin/python bench/inject_webhook.py                              # 1,000 admissions of each kind
    .venv/bin/python bench/inject_webhook.py --n 3000 --json
    .venv/bin/python bench/inject_webhook.py --profile /tmp/inject.prof   # and a profile of the server side

The webhook runs in a process of its own, as it does in the control plane: the product's
:class:`~mesh_identity.inject.server.WebhookServer` with the :class:`~mesh_identity.inject.review.Injector` that
``mesh-identity serve`` builds (``compose.injector_settings`` of the deployed config, ``deploy/config.yaml``,
with its sidecar documents and its admission metrics), serving a leaf signed by an intermediate (the chain in the
certificate file, as the mesh CA's intermediate mode has it). This process is the API server: it verifies the
chain and the service's DNS name (``mesh-identity-injector.mesh-identity-system.svc``, sent as SNI), and POSTs
``/mutate?timeout=10s`` with ``http.client`` over ``ssl``.

The pod is what a Deployment's ReplicaSet creates, as the webhook receives it (after the API server's defaults
and its built-in admission plugins): ``generateName`` and no name, the ReplicaSet's ownerReference and its
managedFields entry, four annotations, two containers (an app with three named ports, liveness and readiness
probes on its health port, env, resources, mounts; a log shipper with its own probe), the service-account token
volume and three more. Its probes' ports are excluded from capture (``mesh-identity.io/exclude-inbound-ports``), so
the answer is an injection without warnings. Each review has its own uid; the bodies are encoded before the clock
runs; every answer is checked afterwards (its uid, allowed, a JSONPatch that injects).

Measured, client side, from the request's first byte sent to the answer's last byte read:

1. **keep-alive**: ``--n`` admissions on one connection (an API server holds its connections to a webhook open),
   interleaved one by one with as many ``GET /healthz`` on the same connection: the reference, the cost of the
   transport itself (TLS records, ``http.server``'s request parsing, a thread per connection); reported p50, p90,
   p99, max, and the ratios admission / healthz;
2. **new connection per request**: the same with a fresh TLS connection for each request (full handshake, no
   session resumption, as Go's client does on a new connection);
3. **in process**: the webhook's own work without HTTP, ``Injector.review(json.loads(body))`` and the JSON
   encoding of the answer, in this process (for attribution).

Goal: p99 <= 20 ms for an admission (the API server's default timeout for a webhook is 10 s; the injector is on
the path of every pod creation).

``--profile FILE`` then runs a second webhook process under cProfile (each connection's thread) for ``--n`` more
keep-alive admissions and prints where the server's time per request goes.

The first run of this benchmark found every answer 44 ms late: the server writes an answer's headers and its body
as two TLS records, and with Nagle's algorithm the second waited for the client's delayed ACK of the first (40 ms
on Linux). The webhook's handler now sets TCP_NODELAY (bench/README.md has both runs).
"""

from __future__ import annotations

import argparse
import copy
import cProfile
import http.client
import json
import math
import os
import pstats
import selectors
import socket
import ssl
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import yaml  # noqa: E402
from cryptography.hazmat.primitives import serialization  # noqa: E402

from mesh_identity.compose import injector_settings  # noqa: E402
from mesh_identity.config import parse_config  # noqa: E402
from mesh_identity.inject import patch as p  # noqa: E402
from mesh_identity.inject.component import InjectorMetrics  # noqa: E402
from mesh_identity.inject.review import Injector  # noqa: E402
from tests.pki import TestCa, key_pem  # noqa: E402

SERVICE_NAME = "mesh-identity-injector.mesh-identity-system.svc"
MUTATE = "/mutate?timeout=10s"  # what the real API server sends for timeoutSeconds: 10
HEALTH = "/healthz"
NAMESPACE = "shop"
HEADERS = {
    "Content-Type": "application/json",
    "Accept": "application/json, */*",
    "User-Agent": "kube-apiserver-admission",
}
GOAL_P99_MS = 20.0
START_TIMEOUT = 60.0


# ------------------------------------------------------------------------------------------------ the inputs


def injector() -> Injector:
    """The injector as ``mesh-identity serve`` builds it from the deployed config."""
    document = yaml.safe_load((ROOT / "deploy" / "config.yaml").read_text())
    config = parse_config(yaml.safe_load(document["data"]["config.yaml"]), Path(tempfile.gettempdir()))
    return Injector(injector_settings(config), observe=InjectorMetrics().observe)


def deployment_pod() -> dict[str, Any]:
    """A pod of a Deployment as the mutating webhook receives it (see the module docstring)."""
    template = "7d4b9c6f8d"
    owner = f"web-{template}"
    token_volume = "kube-api-access-x7k2p"
    api_mount = {
        "name": token_volume,
        "readOnly": True,
        "mountPath": "/var/run/secrets/kubernetes.io/serviceaccount",
    }
    container_defaults = {
        "terminationMessagePath": "/dev/termination-log",
        "terminationMessagePolicy": "File",
        "imagePullPolicy": "IfNotPresent",
    }
    namespace_field = {"apiVersion": "v1", "fieldPath": "metadata.namespace"}
    probe_defaults: dict[str, Any] = {
        "timeoutSeconds": 1,
        "periodSeconds": 10,
        "successThreshold": 1,
        "failureThreshold": 3,
    }
    web: dict[str, Any] = {
        "name": "web",
        "image": "ghcr.io/example/web:2.4.1",
        "args": ["--listen=:8080", "--health=:8081", "--metrics=:9100"],
        "ports": [
            {"name": "http", "containerPort": 8080, "protocol": "TCP"},
            {"name": "health", "containerPort": 8081, "protocol": "TCP"},
            {"name": "metrics", "containerPort": 9100, "protocol": "TCP"},
        ],
        "env": [
            {"name": "LOG_LEVEL", "value": "info"},
            {"name": "CACHE_DIR", "value": "/var/cache/web"},
            {"name": "POD_NAME", "valueFrom": {"fieldRef": {"apiVersion": "v1", "fieldPath": "metadata.name"}}},
            {"name": "POD_IP", "valueFrom": {"fieldRef": {"apiVersion": "v1", "fieldPath": "status.podIP"}}},
        ],
        "resources": {"requests": {"cpu": "250m", "memory": "256Mi"}, "limits": {"memory": "512Mi"}},
        "livenessProbe": {"httpGet": {"path": "/livez", "port": "health", "scheme": "HTTP"}, **probe_defaults},
        "readinessProbe": {
            "httpGet": {"path": "/readyz", "port": "health", "scheme": "HTTP"},
            "initialDelaySeconds": 2,
            **probe_defaults,
        },
        "volumeMounts": [
            {"name": "config", "mountPath": "/etc/web", "readOnly": True},
            {"name": "cache", "mountPath": "/var/cache/web"},
            {"name": "logs", "mountPath": "/var/log/web"},
            api_mount,
        ],
        "securityContext": {"allowPrivilegeEscalation": False, "readOnlyRootFilesystem": True},
        **container_defaults,
    }
    shipper: dict[str, Any] = {
        "name": "log-shipper",
        "image": "cr.fluentbit.io/fluent/fluent-bit:3.2.4",
        "ports": [{"name": "shipper-http", "containerPort": 2020, "protocol": "TCP"}],
        "resources": {"requests": {"cpu": "20m", "memory": "32Mi"}, "limits": {"memory": "64Mi"}},
        "livenessProbe": {
            "httpGet": {"path": "/api/v1/health", "port": 2020, "scheme": "HTTP"},
            **probe_defaults,
        },
        "volumeMounts": [{"name": "logs", "mountPath": "/var/log/web", "readOnly": True}, api_mount],
        **container_defaults,
    }
    fields = {
        "f:metadata": {
            "f:annotations": {".": {}, "f:kubectl.kubernetes.io/restartedAt": {}, "f:prometheus.io/port": {}},
            "f:generateName": {},
            "f:labels": {".": {}, "f:app.kubernetes.io/name": {}, "f:pod-template-hash": {}},
            "f:ownerReferences": {".": {}, f'k:{{"uid":"{uuid.UUID(int=7)}"}}': {}},
        },
        "f:spec": {
            'f:containers': {
                'k:{"name":"web"}': {".": {}, "f:image": {}, "f:livenessProbe": {}, "f:ports": {}, "f:env": {}},
                'k:{"name":"log-shipper"}': {".": {}, "f:image": {}, "f:livenessProbe": {}},
            },
            "f:securityContext": {}, "f:volumes": {},
        },
    }  # fmt: skip
    return {
        "kind": "Pod",
        "apiVersion": "v1",
        "metadata": {
            "generateName": f"{owner}-",
            "namespace": NAMESPACE,
            "creationTimestamp": None,
            "labels": {"app.kubernetes.io/name": "web", "app.kubernetes.io/version": "2.4.1",
                       "pod-template-hash": template},
            "annotations": {
                "kubectl.kubernetes.io/restartedAt": "2026-12-01T10:00:00Z",
                "prometheus.io/scrape": "true",
                "prometheus.io/port": "9100",
                p.EXCLUDE_INBOUND_PORTS: "8081,2020",
            },
            "ownerReferences": [{"apiVersion": "apps/v1", "kind": "ReplicaSet", "name": owner,
                                 "uid": str(uuid.UUID(int=7)), "controller": True, "blockOwnerDeletion": True}],
            "managedFields": [{"manager": "kube-controller-manager", "operation": "Update", "apiVersion": "v1",
                               "time": "2026-12-02T09:00:00Z", "fieldsType": "FieldsV1", "fieldsV1": fields}],
        },
        "spec": {
            "volumes": [
                {"name": "config", "configMap": {"name": "web-config", "defaultMode": 420}},
                {"name": "cache", "emptyDir": {}},
                {"name": "logs", "emptyDir": {"sizeLimit": "1Gi"}},
                {"name": token_volume, "projected": {"defaultMode": 420, "sources": [
                    {"serviceAccountToken": {"expirationSeconds": 3607, "path": "token"}},
                    {"configMap": {"name": "kube-root-ca.crt", "items": [{"key": "ca.crt", "path": "ca.crt"}]}},
                    {"downwardAPI": {"items": [{"path": "namespace", "fieldRef": namespace_field}]}},
                ]}},
            ],
            "containers": [web, shipper],
            "restartPolicy": "Always",
            "terminationGracePeriodSeconds": 30,
            "dnsPolicy": "ClusterFirst",
            "serviceAccountName": "web",
            "serviceAccount": "web",
            "securityContext": {"runAsNonRoot": True, "runAsUser": 1000, "fsGroup": 1000},
            "schedulerName": "default-scheduler",
            "tolerations": [
                {"key": "node.kubernetes.io/not-ready", "operator": "Exists", "effect": "NoExecute",
                 "tolerationSeconds": 300},
                {"key": "node.kubernetes.io/unreachable", "operator": "Exists", "effect": "NoExecute",
                 "tolerationSeconds": 300},
            ],
            "priority": 0,
            "enableServiceLinks": True,
            "preemptionPolicy": "PreemptLowerPriority",
        },
        "status": {},
    }  # fmt: skip


def review(pod: dict[str, Any], uid: str) -> dict[str, Any]:
    """The AdmissionReview the API server sends for the ReplicaSet controller's create of ``pod``."""
    identity = {"group": "", "version": "v1", "kind": "Pod"}
    resource = {"group": "", "version": "v1", "resource": "pods"}
    return {
        "kind": "AdmissionReview",
        "apiVersion": "admission.k8s.io/v1",
        "request": {
            "uid": uid,
            "kind": identity,
            "resource": resource,
            "requestKind": identity,
            "requestResource": resource,
            "namespace": NAMESPACE,
            "operation": "CREATE",
            "userInfo": {
                "username": "system:serviceaccount:kube-system:replicaset-controller",
                "uid": str(uuid.UUID(int=11)),
                "groups": ["system:serviceaccounts", "system:serviceaccounts:kube-system", "system:authenticated"],
            },
            "object": pod,
            "oldObject": None,
            "dryRun": False,
            "options": {"kind": "CreateOptions", "apiVersion": "meta.k8s.io/v1"},
        },
    }


def bodies(count: int) -> tuple[list[str], list[bytes]]:
    pod = deployment_pod()
    uids = [str(uuid.uuid4()) for _ in range(count)]
    return uids, [json.dumps(review(copy.deepcopy(pod), uid)).encode() for uid in uids]


def serving_files(directory: Path) -> bytes:
    """A root, an intermediate and the webhook's leaf (chain in tls.crt); the root's PEM (the caBundle)."""
    root = TestCa.create("bench mesh root")
    intermediate = TestCa.create("bench mesh intermediate", parent=root)
    leaf, key = intermediate.leaf(dns=[SERVICE_NAME, "localhost"], ips=["127.0.0.1"])
    (directory / "tls.crt").write_bytes(leaf.public_bytes(serialization.Encoding.PEM) + intermediate.pem())
    (directory / "tls.key").write_bytes(key_pem(key))
    return root.pem()


# -------------------------------------------------------------------------------------------- the webhook side


def serve_main(cert: Path, key: Path, profile: str | None) -> int:
    """The webhook process: serve until stdin closes; with ``profile``, each connection's thread under cProfile."""
    from mesh_identity.inject import server as webhook_server

    server = webhook_server.WebhookServer(injector(), cert, key, host="127.0.0.1", port=0)
    profiler = cProfile.Profile() if profile else None
    if profiler is not None:
        inner = server._server  # the bench wraps the connection's work; the product is unchanged
        original = inner.finish_request

        def profiled(request: Any, client_address: Any) -> None:
            profiler.enable()
            try:
                original(request, client_address)
            finally:
                profiler.disable()

        inner.finish_request = profiled  # type: ignore[method-assign]
    with server:
        print(f"listening {server.address[1]}", flush=True)
        sys.stdin.read()  # until the benchmark closes it
    if profiler is not None and profile:
        profiler.dump_stats(profile)
    return 0


class Webhook:
    """The webhook process, stopped by its pid (stdin closed, then killed if it does not end)."""

    def __init__(self, directory: Path, profile: str | None = None) -> None:
        command = [sys.executable, str(Path(__file__).resolve()), "--serve", str(directory / "tls.crt"),
                   str(directory / "tls.key")]  # fmt: skip
        if profile:
            command += ["--profile", profile]
        self.process = subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, cwd=ROOT)
        self.port = self._port()

    def _port(self) -> int:
        assert self.process.stdout is not None
        deadline = time.monotonic() + START_TIMEOUT
        with selectors.DefaultSelector() as selector:
            selector.register(self.process.stdout, selectors.EVENT_READ)
            while (left := deadline - time.monotonic()) > 0:
                if not selector.select(left):
                    continue
                line = self.process.stdout.readline()
                if not line:
                    break
                if line.startswith("listening "):
                    return int(line.split()[1])
        self.stop()
        raise RuntimeError(f"the webhook process did not start within {START_TIMEOUT:.0f} s")

    def cpu_seconds(self) -> float:
        fields = Path(f"/proc/{self.process.pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def stop(self) -> None:
        if self.process.stdin is not None and not self.process.stdin.closed:
            self.process.stdin.close()
        try:
            self.process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(timeout=30)


# -------------------------------------------------------------------------------------------- the client side


class Connection(http.client.HTTPConnection):
    """HTTPS to 127.0.0.1:``port``, the certificate checked for the service's DNS name (sent as SNI and Host)."""

    def __init__(self, port: int, context: ssl.SSLContext) -> None:
        super().__init__(SERVICE_NAME, port, timeout=30)
        self._tls = context

    def connect(self) -> None:
        raw = socket.create_connection(("127.0.0.1", self.port), self.timeout)
        raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)  # as Go's net/http
        try:
            self.sock = self._tls.wrap_socket(raw, server_hostname=self.host)
        except BaseException:
            raw.close()
            raise


def _exchange(connection: Connection, method: str, target: str, body: bytes | None) -> tuple[float, bytes]:
    started = time.perf_counter()
    connection.request(method, target, body, HEADERS if body is not None else {})
    answer = connection.getresponse()
    data = answer.read()
    took = time.perf_counter() - started
    if answer.status != 200:
        raise RuntimeError(f"{method} {target}: {answer.status} {data[:300]!r}")
    return took, data


def keep_alive(
    port: int, context: ssl.SSLContext, requests: Sequence[bytes], *, health_too: bool = True
) -> tuple[list[float], list[float], list[bytes]]:
    """Admissions and healthz interleaved on one connection (ABBA order); their times and the answers."""
    mutate, health, answers = [], [], []
    connection = Connection(port, context)
    try:
        connection.connect()
        for index, body in enumerate(requests):
            if health_too and index % 2:
                health.append(_exchange(connection, "GET", HEALTH, None)[0])
            took, data = _exchange(connection, "POST", MUTATE, body)
            mutate.append(took)
            answers.append(data)
            if health_too and not index % 2:
                health.append(_exchange(connection, "GET", HEALTH, None)[0])
    finally:
        connection.close()
    return mutate, health, answers


def new_connections(
    port: int, context: ssl.SSLContext, requests: Sequence[bytes]
) -> tuple[list[float], list[float], list[bytes]]:
    """The same with a new TLS connection for each request (the handshake counted)."""
    mutate, health, answers = [], [], []

    def once(method: str, target: str, body: bytes | None) -> tuple[float, bytes]:
        connection = Connection(port, context)
        try:
            started = time.perf_counter()
            connection.connect()
            _, data = _exchange(connection, method, target, body)
            return time.perf_counter() - started, data
        finally:
            connection.close()

    for index, body in enumerate(requests):
        if index % 2:
            health.append(once("GET", HEALTH, None)[0])
        took, data = once("POST", MUTATE, body)
        mutate.append(took)
        answers.append(data)
        if not index % 2:
            health.append(once("GET", HEALTH, None)[0])
    return mutate, health, answers


def in_process(requests: Sequence[bytes]) -> list[float]:
    """The webhook's own work on each body, without HTTP: decode, review, encode."""
    webhook = injector()
    times = []
    for body in requests:
        started = time.perf_counter()
        answer = webhook.review(json.loads(body))
        json.dumps(answer, separators=(",", ":")).encode()
        times.append(time.perf_counter() - started)
    return times


def check_answers(answers: Sequence[bytes], uids: Sequence[str]) -> dict[str, Any]:
    """Every answer is the injection of its own request; the first one's patch applied is an injected pod."""
    import base64

    for data, uid in zip(answers, uids, strict=True):
        response = json.loads(data)["response"]
        if (
            response.get("uid") != uid
            or response.get("allowed") is not True
            or response.get("patchType") != "JSONPatch"
        ):
            raise RuntimeError(f"not an injection of {uid}: {data[:300]!r}")
        if response.get("warnings"):
            raise RuntimeError(f"unexpected warnings: {response['warnings']}")
    first = json.loads(answers[0])["response"]
    ops = json.loads(base64.b64decode(first["patch"]))
    injected = p.apply_patch(deployment_pod(), ops)
    names = [c["name"] for c in injected["spec"]["containers"]]
    if names != ["web", "log-shipper", p.ENVOY_CONTAINER, p.AGENT_CONTAINER]:
        raise RuntimeError(f"the patch did not inject the sidecars: {names}")
    return {"patch_ops": len(ops), "answer_bytes": len(answers[0]), "patch_bytes": len(first["patch"])}


# ------------------------------------------------------------------------------------------------ the figures


def percentile(sorted_values: Sequence[float], fraction: float) -> float:
    """Nearest rank."""
    return sorted_values[max(0, math.ceil(fraction * len(sorted_values)) - 1)]


def figures(times: Sequence[float]) -> dict[str, float]:
    ordered = sorted(t * 1000 for t in times)
    return {
        "p50": percentile(ordered, 0.50),
        "p90": percentile(ordered, 0.90),
        "p99": percentile(ordered, 0.99),
        "max": ordered[-1],
        "mean": statistics.fmean(ordered),
    }


def _row(label: str, found: dict[str, float], reference: dict[str, float] | None = None) -> str:
    cells = f"{found['p50']:7.2f} {found['p90']:7.2f} {found['p99']:7.2f} {found['max']:8.2f}"
    if reference is not None:
        cells += f"   x{found['p50'] / reference['p50']:.2f}  x{found['p99'] / reference['p99']:.2f}"
    return f"  {label:32} {cells}"


def report(result: dict[str, Any]) -> None:
    print(
        f"{result['n']} admissions of a {result['review_bytes']:,}-byte review ({result['patch_ops']} patch "
        f"operations, a {result['answer_bytes']:,}-byte answer), ms:"
    )
    print(f"  {'':32} {'p50':>7} {'p90':>7} {'p99':>7} {'max':>8}   ratio to healthz p50, p99")
    keep, fresh = result["keep_alive"], result["new_connection"]
    print(_row("keep-alive: POST /mutate", keep["mutate"], keep["healthz"]))
    print(_row("keep-alive: GET /healthz", keep["healthz"]))
    print(_row("new connection: POST /mutate", fresh["mutate"], fresh["healthz"]))
    print(_row("new connection: GET /healthz", fresh["healthz"]))
    print(_row("in process: review + JSON", result["in_process"]))
    print(f"  webhook CPU per keep-alive admission + healthz pair: {result['server_cpu_ms_per_pair']:.2f} ms")
    for label, found in (("keep-alive", keep["mutate"]), ("new connection", fresh["mutate"])):
        verdict = "met" if found["p99"] <= GOAL_P99_MS else "NOT met"
        print(f"  goal p99 <= {GOAL_P99_MS:.0f} ms, {label}: {verdict} ({found['p99']:.2f} ms)")


# ------------------------------------------------------------------------------------------------ the profile


def _groups(stats: dict[tuple[str, int, str], Any]) -> list[tuple[str, list[tuple[str, int, str]]]]:
    """The profile's entries of each group. ``Answer.review`` and ``Injector.review`` share a name: Answer's is
    the one defined first in review.py."""
    reviews = sorted(k for k in stats if k[0].endswith("inject/review.py") and k[2] == "review")
    answer, injector = (reviews[:1], reviews[1:]) if len(reviews) == 2 else ([], reviews)

    def where(file: str, *names: str) -> list[tuple[str, int, str]]:
        return [k for k in stats if k[0].endswith(file) and k[2] in names]

    def named(*names: str) -> list[tuple[str, int, str]]:
        return [k for k in stats if k[2] in names]

    return [
        ("Injector.review (decision, patch, answer)", injector),
        ("  the documents callable (compose.documents)", where("compose.py", "documents")),
        ("    Envoy bootstrap: agent_bootstrap", named("agent_bootstrap")),
        ("    Envoy bootstrap: json_format.MessageToDict", named("MessageToDict")),
        ("    agent config: yaml.safe_dump", named("safe_dump")),
        ("  parse_review", named("parse_review")),
        ("  pod_patch", named("pod_patch")),
        ("  Answer.review (patch JSON + base64)", answer),
        ("  metrics (InjectorMetrics.observe)", where("inject/component.py", "observe")),
        ("json.loads (the review)", where("json/__init__.py", "loads")),
        ("json.dumps (every call)", where("json/__init__.py", "dumps")),
        ("body read (_body)", where("inject/server.py", "_body")),
        ("answer written (_reply)", where("inject/server.py", "_reply")),
    ]


def profile_summary(path: str, requests: int) -> dict[str, Any]:
    stats = pstats.Stats(path).stats  # type: ignore[attr-defined]
    post = [v for k, v in stats.items() if k[2] == "do_POST" and k[0].endswith("inject/server.py")]
    base = post[0][3] if post else 0.0
    groups = [(label, sum(stats[k][3] for k in keys)) for label, keys in _groups(stats)]
    parse = sum(v[3] for k, v in stats.items() if k[2] == "parse_request")
    own = sorted(((v[2], f"{Path(k[0]).name}:{k[1]} {k[2]}") for k, v in stats.items()), reverse=True)[:12]
    return {
        "do_post_ms": base * 1000 / requests,
        "parse_request_ms": parse * 1000 / requests,
        "groups": groups,
        "own": own,
        "base": base,
        "requests": requests,
    }


def print_profile(found: dict[str, Any]) -> None:
    base, requests = found["base"], found["requests"]
    print(
        f"profile of the webhook process ({requests} keep-alive admissions, no healthz, under cProfile, which "
        "slows Python code):"
    )
    print(f"  request line and headers (parse_request): {found['parse_request_ms']:.3f} ms per admission")
    print(f"  do_POST (body read -> answer written): {found['do_post_ms']:.2f} ms per admission; share of it:")
    for label, total in found["groups"]:
        share = total / base if base else 0.0
        print(f"    {share:6.1%}  {total * 1000 / requests:6.3f} ms  {label}")
    print("  most own time (all of the process's profiled threads):")
    for own, name in found["own"]:
        print(f"    {own * 1000 / requests:6.3f} ms  {name}")


# ------------------------------------------------------------------------------------------------------ main


def run(args: argparse.Namespace) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="inject-bench-") as name:
        directory = Path(name)
        root = serving_files(directory)
        context = ssl.create_default_context(cadata=root.decode())
        _, warm = bodies(args.warmup)
        uids, requests = bodies(args.n)
        fresh_uids, fresh_requests = bodies(args.new_connections)
        result: dict[str, Any] = {"n": args.n, "review_bytes": len(requests[0])}
        webhook = Webhook(directory)
        try:
            keep_alive(webhook.port, context, warm)
            cpu = webhook.cpu_seconds()
            mutate, health, answers = keep_alive(webhook.port, context, requests)
            result["server_cpu_ms_per_pair"] = (webhook.cpu_seconds() - cpu) * 1000 / args.n
            result.update(check_answers(answers, uids))
            result["keep_alive"] = {"mutate": figures(mutate), "healthz": figures(health)}
            mutate, health, answers = new_connections(webhook.port, context, fresh_requests)
            check_answers(answers, fresh_uids)
            result["new_connection"] = {"mutate": figures(mutate), "healthz": figures(health)}
        finally:
            webhook.stop()
        result["in_process"] = figures(in_process(warm + requests)[len(warm) :])
        for kind in ("keep_alive", "new_connection"):
            found = result[kind]
            found["ratio_p50"] = found["mutate"]["p50"] / found["healthz"]["p50"]
            found["ratio_p99"] = found["mutate"]["p99"] / found["healthz"]["p99"]
        report(result)
        if args.profile:
            profiled = Webhook(directory, args.profile)
            try:
                keep_alive(profiled.port, context, warm, health_too=False)
                _, _, answers = keep_alive(profiled.port, context, requests, health_too=False)
            finally:
                profiled.stop()
            check_answers(answers, uids)
            summary = profile_summary(args.profile, args.n + args.warmup)
            print_profile(summary)
            result["profile_do_post_ms"] = summary["do_post_ms"]
        return result


def main() -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--n", type=int, default=1000, help="admissions (and as many healthz) per measurement")
    parser.add_argument("--new-connections", type=int, help="admissions on new connections (default: --n)")
    parser.add_argument("--warmup", type=int, default=50)
    parser.add_argument("--profile", metavar="FILE", help="then profile the webhook process over --n admissions")
    parser.add_argument("--json", action="store_true", help="print the figures as JSON at the end")
    parser.add_argument("--serve", nargs=2, metavar=("CERT", "KEY"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve:
        return serve_main(Path(args.serve[0]), Path(args.serve[1]), args.profile)
    if args.n < 1 or args.warmup < 1:
        parser.error("--n and --warmup must be at least 1")
    args.new_connections = args.new_connections or args.n
    result = run(args)
    if args.json:
        print(json.dumps(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
