"""Pods of the Kubernetes API test server run for real: a cluster, the control plane following it, and for each
pod a test creates its app and a real Envoy sidecar, as a kubelet and a sidecar injector would run them.

* :func:`kube_cluster`: the Kubernetes API test server with the workload kinds, the shipped SMI CRDs and its
  EndpointSlice controller, and a :class:`PodCluster` (the registry tests' :class:`~tests.registry.kube.conftest.
  Cluster`, whose pods get loopback IPs of their own: ``127.77.<block>.<n>``, all of 127/8 being local on
  Linux, ``<block>`` taken from the process id so that two runs do not share addresses).
* :class:`Kubectl`: the real ``kubectl`` pointed at the test server (``--validate=false``: see
  ``tests/registry/kube/test_kube_kubectl.py``).
* :func:`control_plane`: the server of ``mesh-identity serve`` (``compose.build(config, Stage.SERVER)``, the
  built-in CA) with ``registry: {kind: kubernetes, mesh_name: ..., kubeconfig: ...}``.
* :class:`Traffic`: requests to an address, one after another in a thread, counting who answered and what failed.
* :class:`PodRunner`: for a pod the test created, once the registry has it as a sidecar, its app (the demo HTTP
  app, which answers with the caller's SPIFFE ID from ``x-forwarded-client-cert``) on ``<pod IP>:<target
  port>`` and a real Envoy (the product's runner) with node id ``<pod>.<namespace>`` and a bootstrap
  certificate of the pod's identity, pointed at the control plane's xDS listener.

Every wait is bounded (:func:`~tests.waiting.wait_until`); every process started here is stopped by its handle.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import shutil
import threading
from collections import Counter
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import kubernetes
import yaml

from mesh_identity.compose import Stage, System, build
from mesh_identity.config import parse_config
from mesh_identity.demo.apps import DemoApp, get_json
from mesh_identity.demo.envoy import EnvoyProcess
from mesh_identity.mesh.model import Address, Mesh
from mesh_identity.registry.kube import INBOUND_PORT, KubernetesRegistry
from mesh_identity.rotation.engine import RotationEngine
from mesh_identity.spiffe import SpiffeId, TrustDomain
from mesh_identity.svid import X509Svid
from tests.e2e.harness import Envoy
from tests.fakes.kube import DEFAULT_KINDS, KubeServer
from tests.fakes.kube.customresources import install_crds
from tests.fakes.kube.endpointslices import EndpointSliceController
from tests.fakes.kube.kubectl import kubectl_for
from tests.fakes.kube.workloads import workload_kinds
from tests.registry.kube.conftest import CRDS, Cluster
from tests.waiting import wait_until
from xds_sds.mesh.component import XdsComponent
from xds_sds.mesh.publisher import MeshPublisher
from xds_sds.resources.bootstrap import write_bootstrap

KUBECTL = shutil.which("kubectl")
POD_NETWORK = "127.77"  # pods get 127.77.<block>.<n>: loopback addresses no other test binds
CONNECTED = "control_plane.connected_state"


def _block() -> int:
    return os.getpid() % 250 + 1


@dataclass
class PodCluster(Cluster):
    """The registry tests' cluster helper, with pod IPs on the loopback network (see the module docstring)."""

    block: int = field(default_factory=_block)

    def ip_of(self, namespace: str, name: str) -> str:
        key = f"{namespace}/{name}"
        if key not in self._ips:
            if len(self._ips) >= 250:
                raise RuntimeError("out of pod IPs: this cluster hands out 250")
            self._ips[key] = f"{POD_NETWORK}.{self.block}.{len(self._ips) + 2}"
        return self._ips[key]


@contextlib.contextmanager
def kube_cluster() -> Iterator[PodCluster]:
    """The API test server (workload kinds, the shipped CRDs) with its EndpointSlice controller, and a client."""
    server = KubeServer(kinds=(*DEFAULT_KINDS, *workload_kinds()))
    custom = install_crds(server, [CRDS])
    with server, EndpointSliceController(server), kubernetes.client.ApiClient(server.client_configuration()) as api:
        yield PodCluster(server, api, custom)


class Kubectl:
    """The real ``kubectl`` against ``cluster``'s server (its kubeconfig and HOME in ``workdir``)."""

    def __init__(self, cluster: PodCluster, workdir: Path) -> None:
        if KUBECTL is None:
            raise RuntimeError("kubectl is not on the PATH")
        self.workdir = workdir
        self._run = kubectl_for(cluster.server, workdir)
        self._files = 0

    def __call__(self, *args: str) -> str:
        """Run ``kubectl *args``; its stdout (AssertionError, with stderr, when it fails)."""
        return self._run(*args).stdout

    def apply(self, documents: Iterable[Mapping[str, Any]]) -> str:
        """Write ``documents`` to a YAML file and ``kubectl apply -f`` it."""
        self._files += 1
        path = self.workdir / f"apply-{self._files}.yaml"
        path.write_text(yaml.safe_dump_all([dict(d) for d in documents], sort_keys=False))
        return self("apply", "--validate=false", "-f", str(path))


# -- the control plane ------------------------------------------------------------------------------------------


@dataclass
class ControlPlane:
    """The server ``mesh-identity serve`` builds, started, with the Kubernetes registry."""

    system: System

    @property
    def registry(self) -> KubernetesRegistry:
        registry = self.system.registry
        assert isinstance(registry, KubernetesRegistry)
        return registry

    @property
    def engine(self) -> RotationEngine:
        assert self.system.service is not None
        return self.system.service.engine

    @property
    def xds(self) -> XdsComponent:
        assert self.system.xds is not None
        return self.system.xds

    @property
    def publisher(self) -> MeshPublisher:
        assert self.xds.xds is not None
        return self.xds.xds

    def mesh(self) -> Mesh:
        return self.registry.current().mesh

    def status(self) -> dict[str, Any]:
        assert self.system.service is not None
        return self.system.service.status_json()

    def issue(self, identity: SpiffeId) -> X509Svid:
        assert self.system.authority is not None
        return self.system.authority.issue(identity, requested_by="e2e")

    def bundle_pem(self) -> bytes:
        assert self.system.authority is not None
        return self.system.authority.bundle().pem()


@contextlib.contextmanager
def control_plane(
    cluster: PodCluster, workdir: Path, *, mesh_name: str, trust_domain: TrustDomain
) -> Iterator[ControlPlane]:
    """``compose.build(config, Stage.SERVER)`` with the built-in CA and the Kubernetes registry, started (its
    start returns once the registry has a first view of the API); stopped after."""
    workdir.mkdir(parents=True, exist_ok=True)
    kubeconfig = cluster.server.write_kubeconfig(workdir / "kubeconfig")
    config = parse_config(
        {
            "trust_domain": trust_domain.name,
            "state_dir": "state",
            "metrics": {"listen": "127.0.0.1:0"},
            "xds": {"listen": "127.0.0.1:0"},
            "registry": {"kind": "kubernetes", "mesh_name": mesh_name, "kubeconfig": str(kubeconfig)},
            "plugins": {"audit": {"enabled": False}},
        },
        workdir,
    )
    system = build(config, Stage.SERVER, create=True)
    assert system.service is not None and isinstance(system.registry, KubernetesRegistry)
    system.service.start()
    try:
        yield ControlPlane(system)
    finally:
        system.service.stop()


# -- pods, run -----------------------------------------------------------------------------------------------------


@dataclass
class Pod:
    """A pod the test created and runs: its app and its sidecar."""

    namespace: str
    name: str
    ip: str
    identity: SpiffeId
    app: DemoApp
    envoy: Envoy

    @property
    def node(self) -> str:
        return f"{self.name}.{self.namespace}"

    @property
    def inbound(self) -> Address:
        """The sidecar's mTLS listener: the pod's endpoint in the mesh."""
        return Address(self.ip, INBOUND_PORT)

    def at(self, port: int) -> Address:
        """An address on the pod's IP (where its sidecar listens for the Service of that port)."""
        return Address(self.ip, port)

    def connected(self) -> int | None:
        """Envoy's ``control_plane.connected_state`` (1 while its xDS stream is open)."""
        return self.envoy.stats(CONNECTED).get(CONNECTED)

    def endpoints(self, cluster: str) -> set[Address]:
        """The hosts of one of the sidecar's clusters, as Envoy's admin ``/clusters`` lists them."""
        status, text = self.envoy.admin("/clusters?format=json")
        assert status == 200, text
        for item in json.loads(text).get("cluster_statuses", []):
            if item.get("name") == cluster:
                found = set()
                for host in item.get("host_statuses", []):
                    address = host.get("address", {}).get("socket_address", {})
                    found.add(Address(address["address"], int(address["port_value"])))
                return found
        return set()

    def listening(self) -> set[Address]:
        return set(self.envoy.listeners().values())


@dataclass
class Traffic:
    """``GET /`` to ``address`` (an app's upstream listener on its sidecar), one request after another in a
    thread until the ``with`` block ends: which pod answered each success, and every failure (an exception or
    a status that is not 200)."""

    address: Address
    served: Counter[str] = field(default_factory=Counter)
    failures: list[str] = field(default_factory=list)
    phase: str = "start"  # what the test is doing, named in each failure
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    def __enter__(self) -> Traffic:
        self._thread = threading.Thread(target=self._run, name=f"traffic-{self.address}", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(30)

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                status, answer = get_json(self.address, "/")
            except (OSError, ValueError) as err:
                self.failures.append(f"{self.phase}: {type(err).__name__}: {err}")
                continue
            if status == 200 and isinstance(answer, dict):
                self.served[str(answer.get("service"))] += 1
            else:
                self.failures.append(f"{self.phase}: {status}: {answer}")

    def wait_for(self, more: int) -> None:
        """Until ``more`` further requests succeeded (or one failed)."""
        target = self.served.total() + more
        wait_until(lambda: self.served.total() >= target or self.failures, f"{more} more requests to {self.address}")


def _listens(pod: Pod, wanted: set[Address]) -> bool:
    return wanted <= pod.listening()


class PodRunner:
    """Runs the pods a test creates (see the module docstring); :meth:`stop_all` stops every one still running."""

    def __init__(self, cluster: PodCluster, plane: ControlPlane, workdir: Path, trust_domain: TrustDomain) -> None:
        self.cluster = cluster
        self.plane = plane
        self.workdir = workdir
        self.trust_domain = trust_domain
        self.pods: dict[str, Pod] = {}

    def create(
        self,
        namespace: str,
        name: str,
        service_account: str,
        labels: dict[str, str],
        *,
        port: int = 8080,
    ) -> str:
        """Create a pod and report it Running and Ready (as the kubelet does once its containers run); its IP."""
        return self.cluster.pod(namespace, name, service_account, labels, port=port)

    def start(
        self,
        namespace: str,
        name: str,
        service_account: str,
        *,
        port: int = 8080,
        calls: Mapping[str, int] | None = None,
    ) -> Pod:
        """Start the app and the sidecar of a pod created (and running): once the registry has its node with
        the identity of ``service_account``, the app on ``<pod IP>:<port>`` (``calls``: the Services it calls
        and their ports, reached on its own IP) and the Envoy, not waited for (see :meth:`wait_ready`)."""
        identity = SpiffeId.for_kubernetes(self.trust_domain, namespace, service_account)
        node = f"{name}.{namespace}"
        wait_until(  # the xDS server's view: it hears of the registry's change last
            lambda: self.plane.publisher.mesh.node_identity(node) == identity, f"the xDS server to know {node}"
        )
        ip = self.cluster.ip_of(namespace, name)
        upstreams = {service: Address(ip, number) for service, number in (calls or {}).items()}
        app = DemoApp(name, Address(ip, port), upstreams).start()
        directory = self.workdir / node
        try:
            files = write_bootstrap(
                self.plane.issue(identity),
                directory,
                node=node,
                cluster=service_account,
                xds=self.plane.xds.address,
                server_identity=self.plane.xds.server_identity,
            )
            envoy = Envoy(files.bootstrap, directory, name=node)
            directory.mkdir(parents=True, exist_ok=True)
            self.pods[node] = pod = Pod(namespace, name, ip, identity, app, envoy)
            EnvoyProcess.start(envoy)  # the runner's own start: waiting comes later, for several at once
        except BaseException:
            app.stop()
            raise
        return pod

    def wait_ready(self, pods: Iterable[Pod], listeners: Mapping[str, Iterable[Address]] | None = None) -> None:
        """Until each of ``pods``' Envoys is ready, and has the ``listeners`` given for its node active."""
        for pod in pods:
            pod.envoy.wait_ready(60)
            wanted = set((listeners or {}).get(pod.node, ()))
            wait_until(functools.partial(_listens, pod, wanted), f"{pod.node}'s listeners on {sorted(wanted)}")

    def stop(self, pod: Pod) -> None:
        """Stop the pod's sidecar and app (what the kubelet does once a deleted pod's grace period is over)."""
        self.pods.pop(pod.node, None)
        pod.envoy.stop()
        with contextlib.suppress(OSError):
            pod.app.stop()

    def stop_all(self) -> None:
        for pod in list(self.pods.values()):
            self.stop(pod)
