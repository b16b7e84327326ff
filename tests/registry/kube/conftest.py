"""A cluster for the Kubernetes registry's tests: the Kubernetes API test server serving the workload kinds
(:mod:`tests.fakes.kube.workloads`, every object written checked against the official schemas of two versions)
and the shipped SMI CRDs (``deploy/crds``, custom resources checked against their ``openAPIV3Schema``), with its
EndpointSlice controller running; objects are written through the real ``kubernetes`` client, as a user or
the kubelet would write them."""

from __future__ import annotations

import shutil
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any

import kubernetes
import pytest

from mesh_identity.config import RegistryConfig
from mesh_identity.registry.kube import Backoff, KubernetesRegistry
from mesh_identity.spiffe import TrustDomain
from tests.fakes.kube import DEFAULT_KINDS, Kind, KubeServer
from tests.fakes.kube.customresources import install_crds
from tests.fakes.kube.endpointslices import EndpointSliceController
from tests.fakes.kube.workloads import kind_named, workload_kinds

ROOT = Path(__file__).resolve().parents[3]
CRDS = ROOT / "deploy" / "crds"
EXAMPLES = ROOT / "deploy" / "examples"
TD = TrustDomain("cluster.mesh")
MESH = "demo"
MONITORED = "mesh-identity.io/monitored-by"
SMI_VERSIONS = {
    "TrafficTarget": ("access.smi-spec.io", "v1alpha3", "traffictargets"),
    "HTTPRouteGroup": ("specs.smi-spec.io", "v1alpha4", "httproutegroups"),
    "TCPRoute": ("specs.smi-spec.io", "v1alpha4", "tcproutes"),
    "TrafficSplit": ("split.smi-spec.io", "v1alpha4", "trafficsplits"),
}


@dataclass
class Cluster:
    """The test API server and a real client of it, with helpers that write objects as users and the kubelet do."""

    server: KubeServer
    api: kubernetes.client.ApiClient
    custom_kinds: dict[str, Kind]
    _ips: dict[str, str] = field(default_factory=dict)

    @property
    def core(self) -> kubernetes.client.CoreV1Api:
        return kubernetes.client.CoreV1Api(self.api)

    @property
    def custom(self) -> kubernetes.client.CustomObjectsApi:
        return kubernetes.client.CustomObjectsApi(self.api)

    def kind(self, name: str) -> Kind:
        return kind_named(self.server.kinds, name)

    # -- namespaces and identities
    def namespace(self, name: str, mesh: str | None = MESH) -> None:
        labels = {MONITORED: mesh} if mesh else {}
        self.core.create_namespace(
            {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": name, "labels": labels}}
        )

    def label_namespace(self, name: str, mesh: str | None) -> None:
        self.core.patch_namespace(name, {"metadata": {"labels": {MONITORED: mesh}}})

    def service_account(self, namespace: str, name: str) -> None:
        body = {"apiVersion": "v1", "kind": "ServiceAccount", "metadata": {"name": name, "namespace": namespace}}
        self.core.create_namespaced_service_account(namespace, body)

    # -- pods, as a user creates them and the kubelet runs them
    def ip_of(self, namespace: str, name: str) -> str:
        key = f"{namespace}/{name}"
        if key not in self._ips:
            self._ips[key] = f"10.1.{len(self._ips) // 250}.{len(self._ips) % 250 + 2}"
        return self._ips[key]

    def pod(
        self,
        namespace: str,
        name: str,
        service_account: str,
        labels: dict[str, str],
        *,
        port: int = 8080,
        node: str = "node-a",
        run: bool = True,
    ) -> str:
        """Create a pod (and, with ``run``, start it: Running, an IP, Ready); returns its IP."""
        body: dict[str, Any] = {
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": {"name": name, "namespace": namespace, "labels": labels},
            "spec": {
                "serviceAccountName": service_account,
                "nodeName": node,
                "containers": [
                    {"name": "app", "image": "example.org/app:1", "ports": [{"name": "http", "containerPort": port}]}
                ],
            },
        }
        self.core.create_namespaced_pod(namespace, body)
        if run:
            self.run(namespace, name)
        return self.ip_of(namespace, name)

    def run(self, namespace: str, name: str, *, ready: bool = True) -> None:
        """What the kubelet reports once the pod's containers run."""
        ip = self.ip_of(namespace, name)
        stamp = "2026-01-01T00:00:00Z"
        status = {
            "phase": "Running",
            "podIP": ip,
            "podIPs": [{"ip": ip}],
            "hostIP": "192.168.0.10",
            "startTime": stamp,
            "conditions": [
                {"type": "Ready", "status": "True" if ready else "False", "lastTransitionTime": stamp},
                {"type": "ContainersReady", "status": "True" if ready else "False", "lastTransitionTime": stamp},
            ],
        }
        self.core.patch_namespaced_pod_status(name, namespace, {"status": status})

    def delete_pod(self, namespace: str, name: str) -> None:
        """Delete a pod (the fake removes it at once, as after its grace period; the answer is a Status)."""
        response = self.core.delete_namespaced_pod(name, namespace, _preload_content=False)
        response.read()
        response.release_conn()

    def service(
        self,
        namespace: str,
        name: str,
        selector: dict[str, str],
        *,
        port: int = 80,
        target: int | str = 8080,
        port_name: str = "http",
        app_protocol: str | None = None,
        protocol: str = "TCP",
    ) -> None:
        entry: dict[str, Any] = {"name": port_name, "port": port, "targetPort": target, "protocol": protocol}
        if app_protocol:
            entry["appProtocol"] = app_protocol
        body = {
            "apiVersion": "v1",
            "kind": "Service",
            "metadata": {"name": name, "namespace": namespace},
            "spec": {"selector": selector, "ports": [entry]},
        }
        self.core.create_namespaced_service(namespace, body)

    # -- SMI custom resources
    def smi(self, obj: dict[str, Any]) -> dict[str, Any]:
        group, version, plural = SMI_VERSIONS[obj["kind"]]
        namespace = obj["metadata"]["namespace"]
        body = {"apiVersion": f"{group}/{version}", **obj}
        created: dict[str, Any] = self.custom.create_namespaced_custom_object(group, version, namespace, plural, body)
        return created

    def replace_smi(self, obj: dict[str, Any]) -> dict[str, Any]:
        """Replace an SMI object's spec (a PUT with its current resourceVersion, as ``kubectl apply`` does)."""
        group, version, plural = SMI_VERSIONS[obj["kind"]]
        namespace, name = obj["metadata"]["namespace"], obj["metadata"]["name"]
        current = self.custom.get_namespaced_custom_object(group, version, namespace, plural, name)
        current["spec"] = obj["spec"]
        replaced: dict[str, Any] = self.custom.replace_namespaced_custom_object(
            group, version, namespace, plural, name, current
        )
        return replaced

    def delete_smi(self, kind: str, namespace: str, name: str) -> None:
        group, version, plural = SMI_VERSIONS[kind]
        self.custom.delete_namespaced_custom_object(group, version, namespace, plural, name)

    def events(self, namespace: str | None = None) -> list[dict[str, Any]]:
        return self.server.objects(self.kind("Event"), namespace)


@pytest.fixture
def install_shipped_crds() -> bool:
    """Whether :func:`cluster` starts with the CRDs of ``deploy/crds`` installed (a module may say no, and
    install them itself: the CustomResourceDefinition kind is served either way)."""
    return True


@pytest.fixture
def cluster(install_shipped_crds: bool) -> Iterator[Cluster]:
    server = KubeServer(kinds=(*DEFAULT_KINDS, *workload_kinds()))
    custom = install_crds(server, [CRDS] if install_shipped_crds else [])
    with server, EndpointSliceController(server), kubernetes.client.ApiClient(server.client_configuration()) as api:
        yield Cluster(server, api, custom)


Start = Callable[..., KubernetesRegistry]


@pytest.fixture
def start_registry(cluster: Cluster, tmp_path: Path) -> Iterator[Start]:
    """Start a registry for the cluster (stopped after the test): ``start_registry(timeout=..., sync_timeout=...)``."""
    started: list[KubernetesRegistry] = []

    def start(
        *, timeout: float = 2.0, sync_timeout: float = 10.0, kubeconfig: Path | None = None
    ) -> KubernetesRegistry:
        path = kubeconfig or cluster.server.write_kubeconfig(tmp_path / f"kubeconfig-{len(started)}")
        settings = RegistryConfig(MESH, path, timedelta(seconds=timeout))
        registry = KubernetesRegistry(settings, TD, backoff=Backoff(0.05, 0.5), sync_timeout=sync_timeout)
        started.append(registry)
        registry.start()
        return registry

    yield start
    for registry in started:
        registry.stop()


# -- the real kubectl: its tests run where the binary is, and are deselected (with the reason in the header) where not

KUBECTL = shutil.which("kubectl")
KUBECTL_TESTS = "test_kube_kubectl.py"


def pytest_report_header(config: pytest.Config) -> str | None:
    if KUBECTL is None:
        return f"kubectl: not on the PATH; tests/registry/kube/{KUBECTL_TESTS} is deselected"
    return None


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if KUBECTL is not None:
        return
    mine = [i for i in items if Path(str(i.path)).name == KUBECTL_TESTS]
    if mine:
        config.hook.pytest_deselected(items=mine)
        items[:] = [i for i in items if i not in mine]
