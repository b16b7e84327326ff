"""A cluster for the HA tests: the Kubernetes API test server with one user per replica (so a fault can hit one
replica's requests alone), the workload kinds and the shipped CRDs (the registry watches them), and Leases and
ConfigMaps validated on every write against the official schemas (``kubernetes_validate``, strict, the versions
the workload kinds use): the test server checks neither kind on its own. Every accepted Lease write is recorded
with the server's monotonic time, so tests can check who held the Lease when."""

from __future__ import annotations

import copy
import dataclasses
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any

import kubernetes
import pytest
import yaml

from mesh_identity.config import RegistryConfig
from mesh_identity.registry.kube.client import KubeClient, connect
from mesh_identity.registry.kube.lease import LeaseTiming
from tests.fakes.kube import CONFIG_MAP, LEASE, NAMESPACE, SECRET, Kind, KubeServer
from tests.fakes.kube.customresources import install_crds
from tests.fakes.kube.endpointslices import EndpointSliceController
from tests.fakes.kube.workloads import checked, workload_kinds

ROOT = Path(__file__).resolve().parents[2]
CRDS = ROOT / "deploy" / "crds"
MESH = "demo"
MONITORED = "mesh-identity.io/monitored-by"
CONTROL = "mesh-identity-system"
USERS = {f"token-{name}": f"system:serviceaccount:{CONTROL}:{name}" for name in ("a", "b", "c", "admin")}
FAST = LeaseTiming(duration=2.0, renew_deadline=1.4, retry_period=0.25)  # client-go's ratios, shorter


@dataclass(frozen=True)
class Write:
    """One accepted write of a Lease, as the server took it."""

    at: float  # time.monotonic() on the server
    obj: dict[str, Any]

    @property
    def name(self) -> str:
        return str(self.obj["metadata"]["name"])

    @property
    def holder(self) -> str:
        return str((self.obj.get("spec") or {}).get("holderIdentity") or "")


@dataclass
class Recorder:
    writes: list[Write] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def of(self, name: str) -> list[Write]:
        with self.lock:
            return [w for w in self.writes if w.name == name]


@dataclass
class HaCluster:
    server: KubeServer
    api: kubernetes.client.ApiClient
    leases: Recorder
    directory: Path
    clients: list[KubeClient] = field(default_factory=list)

    @property
    def core(self) -> kubernetes.client.CoreV1Api:
        return kubernetes.client.CoreV1Api(self.api)

    def kubeconfig(self, user: str = "admin", url: str | None = None) -> Path:
        path = self.directory / f"kubeconfig-{user}-{len(self.clients)}"
        config = self.server.kubeconfig(token=f"token-{user}")
        if url is not None:
            config["clusters"][0]["cluster"]["server"] = url
        path.write_text(yaml.safe_dump(config))
        return path

    def settings(self, user: str = "admin", *, timeout: float = 1.0, url: str | None = None) -> RegistryConfig:
        return RegistryConfig(MESH, self.kubeconfig(user, url), timedelta(seconds=timeout), namespace=CONTROL)

    def client(self, user: str = "admin", *, timeout: float = 1.0, url: str | None = None) -> KubeClient:
        """A real client of the server as ``user`` (through ``url`` when given: a relay)."""
        client = connect(self.settings(user, timeout=timeout, url=url))
        self.clients.append(client)
        return client

    def user(self, name: str) -> str:
        return USERS[f"token-{name}"]

    def namespace(self, name: str, mesh: str | None = MESH) -> None:
        labels = {MONITORED: mesh} if mesh else {}
        self.core.create_namespace(
            {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": name, "labels": labels}}
        )

    def unlabel(self, name: str) -> None:
        self.core.patch_namespace(name, {"metadata": {"labels": {MONITORED: None}}})

    def config_maps(self, name: str = "mesh-identity-root-ca") -> dict[str, dict[str, Any]]:
        """The ConfigMaps called ``name``, by namespace."""
        found = self.server.objects(self.kind("ConfigMap"))
        return {cm["metadata"]["namespace"]: cm for cm in found if cm["metadata"]["name"] == name}

    def kind(self, name: str) -> Kind:
        return next(k for k in self.server.kinds if k.kind == name)

    def codes(self, verb: str, resource: str, user: str | None = None) -> list[int]:
        return [
            r.code
            for r in list(self.server.requests)
            if r.verb == verb and r.resource == resource and (user is None or r.user == self.user(user))
        ]


def _recorded(kind: Kind, recorder: Recorder) -> Kind:
    """``kind`` validated against the official schemas, each write it accepts recorded."""
    validate = checked(*([kind.validate] if kind.validate is not None else []))

    def record(k: Kind, old: dict[str, Any] | None, new: dict[str, Any]) -> list[str]:
        errors = validate(k, old, new)
        if not errors:
            with recorder.lock:
                recorder.writes.append(Write(time.monotonic(), copy.deepcopy(new)))
        return errors

    return dataclasses.replace(kind, validate=record)


@pytest.fixture
def ha_cluster(tmp_path: Path) -> Iterator[HaCluster]:
    leases, config_maps = Recorder(), Recorder()
    kinds = (SECRET, _recorded(CONFIG_MAP, config_maps), NAMESPACE, _recorded(LEASE, leases), *workload_kinds())
    server = KubeServer(kinds=kinds, tokens=USERS)
    install_crds(server, [CRDS])
    with (
        server,
        EndpointSliceController(server),
        kubernetes.client.ApiClient(server.client_configuration(token="token-admin")) as api,
    ):
        cluster = HaCluster(server, api, leases, tmp_path)
        cluster.namespace(CONTROL, mesh=None)
        yield cluster
        for client in cluster.clients:
            client.close()
