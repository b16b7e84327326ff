"""The injection e2e's world (tests/e2e/test_injection.py, bench/inject_pod_start.py): pods applied with the real kubectl come back injected by the control plane's
webhook, and the tests' kubelet runs them in network namespaces of their own, as their UIDs: the init
container's iptables rules exactly as written, the real Envoy, the node agent (authenticating with the pod's
projected service-account token) and an unmodified app. Service ClusterIPs are reachable from the pods as
kube-proxy makes them.

The shop (namespace ``shop``, monitored)::

    a-0   (sa a)  no Service    its app calls http://<b's ClusterIP>/ in plain HTTP; TrafficTarget a -> b
    b-0   (sa b)  Service b     10.96.77.20:80 -> 8080; the demo app answers with the caller's SPIFFE ID (XFCC)
    c-0   (sa c)  no Service    not a source of any TrafficTarget of b: 403
    d-0   (sa d)  no Service    mesh-identity.io/inject: "false": no sidecar, no capture
    e-0   (sa e)  no Service    mesh-identity.io/workload-api: "true": its app fetches SVIDs from the agent

The control plane (``compose.build`` with ``inject``, the built-in CA) listens on the pod bridge's address for
xDS, the signing API and Attest, and on loopback for the webhook, which the API test server reaches as the
Service ``mesh-identity-injector.mesh-identity-system.svc`` (its certificate verified against the caBundle the
control plane wrote). Needs root, Debian's iptables and kubectl (deselected without kubectl, as the other
kubectl e2e tests).
"""

from __future__ import annotations

import contextlib
import json
import shutil
import subprocess
import sys
import threading
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import kubernetes

from mesh_identity.compose import Stage, System, build
from mesh_identity.config import parse_config
from mesh_identity.ports import free_port
from mesh_identity.spiffe import SpiffeId, TrustDomain
from tests.e2e.harness import ENVOY
from tests.e2e.kubepods import Kubectl, PodCluster, kube_cluster
from tests.fakes.kube.admission import MutatingWebhooks
from tests.fakes.kube.kubelet import Image, Kubelet, RunningPod
from tests.fakes.kube.podrunner import PodNetwork
from tests.waiting import wait_until

MESH = "inject-e2e"
NS = "shop"
TD = TrustDomain("cluster.local")
CLUSTER_IP = "10.96.77.20"
APP_IMAGE = "example.org/shop-app:1"
ENVOY_IMAGE = "docker.io/envoyproxy/envoy:v1.36.2"
AGENT_IMAGE = "ghcr.io/mesh-identity/mesh-identity:0.1.0"
APP_UID = 1000
WEBHOOK = ("mesh-identity-system", "mesh-identity-injector")
BIN = Path(sys.executable).parent


def identity(account: str) -> SpiffeId:
    return SpiffeId.for_kubernetes(TD, NS, account)


def pod_manifest(
    name: str, account: str, labels: dict[str, str], annotations: dict[str, str] | None = None
) -> dict[str, Any]:
    metadata: dict[str, Any] = {"name": name, "namespace": NS, "labels": labels}
    if annotations:
        metadata["annotations"] = annotations
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": metadata,
        "spec": {
            "serviceAccountName": account,
            "securityContext": {"runAsUser": APP_UID},
            "containers": [
                {
                    "name": "app",
                    "image": APP_IMAGE,
                    "args": [name, "0.0.0.0:8080"],
                    "ports": [{"name": "http", "containerPort": 8080}],
                }
            ],
        },
    }


def shop_objects() -> list[dict[str, Any]]:
    accounts = [
        {"apiVersion": "v1", "kind": "ServiceAccount", "metadata": {"name": a, "namespace": NS}} for a in "abcde"
    ]
    service = {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": "b", "namespace": NS},
        "spec": {
            "clusterIP": CLUSTER_IP,
            "selector": {"app": "b"},
            "ports": [{"name": "http", "port": 80, "targetPort": 8080, "protocol": "TCP"}],
        },
    }
    routes = {
        "apiVersion": "specs.smi-spec.io/v1alpha4",
        "kind": "HTTPRouteGroup",
        "metadata": {"name": "b-routes", "namespace": NS},
        "spec": {"matches": [{"name": "all", "pathRegex": "/.*", "methods": ["*"]}]},
    }
    target = {
        "apiVersion": "access.smi-spec.io/v1alpha3",
        "kind": "TrafficTarget",
        "metadata": {"name": "a-to-b", "namespace": NS},
        "spec": {
            "destination": {"kind": "ServiceAccount", "name": "b", "namespace": NS},
            "sources": [{"kind": "ServiceAccount", "name": "a", "namespace": NS}],
            "rules": [{"kind": "HTTPRouteGroup", "name": "b-routes", "matches": ["all"]}],
        },
    }
    return [*accounts, service, routes, target]


class Outside(ThreadingHTTPServer):
    """A plain HTTP server on this machine's bridge address: a destination outside the mesh."""

    daemon_threads = True

    def __init__(self, host: str) -> None:
        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                body = b"outside\n"
                self.send_response(200)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: object) -> None:
                pass

        super().__init__((host, 0), Handler)
        self.thread = threading.Thread(target=self.serve_forever, args=(0.1,), daemon=True)
        self.thread.start()

    @property
    def url(self) -> str:
        return f"http://{self.server_address[0]}:{self.server_address[1]}/"

    def stop(self) -> None:
        self.shutdown()
        self.thread.join()
        self.server_close()


@dataclass
class Shop:
    cluster: PodCluster
    network: PodNetwork
    kubelet: Kubelet
    system: System
    pods: dict[str, RunningPod]
    outside: Outside
    applied: dict[str, dict[str, Any]]
    kubectl: Kubectl

    def get(self, pod: str, url: str, *, timeout: float = 5.0) -> tuple[int | None, str]:
        """GET ``url`` from pod ``pod``'s app container as its user, in plain HTTP with no proxy (an unmodified
        app): the status (None: no HTTP answer, the connection refused, reset or closed) and the body."""
        script = (
            "import sys, urllib.request, urllib.error\n"
            "opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))\n"
            "try:\n"
            f"    answer = opener.open({url!r}, timeout={timeout})\n"
            "    print(answer.status); print(answer.read().decode())\n"
            "except urllib.error.HTTPError as err:\n"
            "    print(err.code); print(err.read().decode())\n"
            "except Exception as err:\n"
            "    print('none'); print(type(err).__name__, err)\n"
        )
        done = self.pods[pod].exec("app", [sys.executable, "-c", script], timeout=timeout + 20)
        first, _, rest = done.stdout.partition("\n")
        return (None if first == "none" else int(first)), rest

    def iptables(self, pod: str) -> str:
        """``iptables -t nat -L -v -n -x`` in pod ``pod``'s network namespace (what its init container wrote)."""
        running = self.pods[pod]
        assert running.pod is not None
        return subprocess.run(
            ["ip", "netns", "exec", running.pod.netns, "iptables", "-t", "nat", "-L", "-v", "-n", "-x"],
            capture_output=True, text=True, timeout=30, check=True,
        ).stdout  # fmt: skip

    def envoy_admin(self, pod: str, path: str) -> str:
        script = (
            "import urllib.request\n"
            f"print(urllib.request.urlopen('http://127.0.0.1:15000{path}', timeout=5).read().decode())\n"
        )
        return self.pods[pod].exec("mesh-identity-envoy", [sys.executable, "-c", script]).stdout


def _config(workdir: Path, kubeconfig: Path, gateway: str, ports: dict[str, int]) -> dict[str, Any]:
    return {
        "trust_domain": TD.name,
        "state_dir": "state",
        "metrics": {"listen": "127.0.0.1:0"},
        "xds": {"listen": f"{gateway}:{ports['xds']}", "secrets": "agent"},
        "signing": {
            "listen": f"{gateway}:{ports['signing']}",
            "attest_listen": f"{gateway}:{ports['attest']}",
            "kubernetes": {"kubeconfig": str(kubeconfig)},
        },
        "registry": {
            "kind": "kubernetes",
            "mesh_name": MESH,
            "kubeconfig": str(kubeconfig),
            "namespace": WEBHOOK[0],
            "egress": "deny",
        },
        "plugins": {"audit": {"enabled": False}},
        "inject": {
            "listen": f"127.0.0.1:{ports['webhook']}",
            "webhook": {"service": {"namespace": WEBHOOK[0], "name": WEBHOOK[1]}},
            "sidecars": {name: f"{gateway}:{ports[name]}" for name in ("xds", "signing", "attest")},
            "images": {"envoy": ENVOY_IMAGE, "agent": AGENT_IMAGE},
        },
    }


def _images() -> dict[str, Image]:
    python = sys.executable
    return {
        APP_IMAGE: Image(entrypoint=(python, "-u", "-m", "tests.apps.httpapp")),
        ENVOY_IMAGE: Image(binaries={"envoy": str(ENVOY)}),
        AGENT_IMAGE: Image(binaries={"mesh-identity": str(BIN / "mesh-identity"), "sh": shutil.which("sh") or "sh"}),
    }


def envoy_ready(shop: Shop, pod: str, listener: str) -> bool:
    try:
        return listener in shop.envoy_admin(pod, "/listeners")
    except Exception:  # the container not up yet, or its admin not listening yet
        return False


@contextlib.contextmanager
def running_shop(workdir: Path, subnet: str, manifests: Mapping[str, dict[str, Any]]) -> Iterator[Shop]:
    """The control plane with ``inject``, the API test server, the kubelet on a pod network ``subnet``, the shop's
    objects applied with kubectl, then ``manifests`` (name: Pod) applied and run; each caller's Envoy has its
    capture listener and b's its inbound listener before this yields. Everything is stopped after."""
    with PodNetwork(subnet) as network, kube_cluster() as cluster:
        gateway = str(network.gateway)
        webhooks = MutatingWebhooks.install(cluster.server)
        ports = {name: free_port(gateway) for name in ("xds", "signing", "attest")}
        ports["webhook"] = free_port()
        webhooks.route_service(*WEBHOOK, address=("127.0.0.1", ports["webhook"]))
        cluster.namespace(WEBHOOK[0], None)
        cluster.namespace(NS, MESH)
        kubectl = Kubectl(cluster, workdir)
        kubectl.apply(shop_objects())
        kubeconfig = cluster.server.write_kubeconfig(workdir / "kubeconfig")
        system = build(parse_config(_config(workdir, kubeconfig, gateway, ports), workdir), Stage.SERVER, create=True)
        assert system.service is not None
        system.service.start()
        outside = Outside(gateway)
        kubelet = Kubelet(cluster.server, network, _images())
        try:
            api = kubernetes.client.AdmissionregistrationV1Api(cluster.api)
            wait_until(lambda: api.list_mutating_webhook_configuration().items, "the webhook configuration", 30)
            kubectl.apply(manifests.values())
            applied = {name: json.loads(kubectl("get", "pod", "-n", NS, name, "-o", "json")) for name in manifests}
            pods = {name: kubelet.run_pod(NS, name) for name in manifests}
            shop = Shop(cluster, network, kubelet, system, pods, outside, applied, kubectl)
            if "b-0" in pods:
                kubelet.wait_for_endpoints(NS, "b", 1, timeout=60)
            for name, pod in applied.items():
                if pod["metadata"].get("annotations", {}).get("mesh-identity.io/injected") == "true":
                    listener = "inbound|b.shop" if name == "b-0" else "outbound-capture"
                    wait_until(
                        lambda n=name, w=listener: envoy_ready(shop, n, w), f"{name}'s Envoy with {listener}", 90
                    )
            yield shop
        finally:
            kubelet.stop()
            outside.stop()
            system.service.stop()
        assert kubelet.leftovers() == []
