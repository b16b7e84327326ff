"""HA end to end: two ``mesh-identity serve`` processes against one Kubernetes API, real Envoys connected to both,
the leader killed (SIGKILL) in the middle of a root rotation.

The cluster is the Kubernetes API test server (:func:`cluster`): the workload kinds and SMI CRDs, and the CA
Secret, the ConfigMaps and the Leases validated on every write against the official schemas
(``kubernetes_validate`` strict, :func:`tests.fakes.kube.workloads.checked`), each accepted write of a Secret or
a Lease recorded with the server's monotonic time. Two replicas, ``replica-a`` and ``replica-b``, are real
``serve`` subprocesses with one config each: ``registry: kubernetes`` with ``leader_election.identity``, the
built-in CA with ``store: kubernetes`` (the Secret ``mesh-identity-system/mesh-identity-ca``, its keys encrypted
with the passphrase of ``key_encryption_file``), their own xDS and metrics listeners and state directories.
They start at once: one root (the Secret), an intermediate each.

The shop (namespace ``shop``): ``frontend-0``, ``frontend-1`` (sa frontend) call the Service ``backend``
(``backend-0``, ``backend-1``, sa backend) under a TrafficTarget. Each pod runs its app and a real Envoy whose
bootstrap certificate is issued under the Secret's root; ``frontend-0`` and ``backend-0`` have the leader as
their xDS server, the other two the follower, and each bootstrap lists the other replica as a standby
(:func:`~xds_sds.resources.bootstrap.write_bootstrap`'s ``standby_xds``), as one Kubernetes Service in front of
both would let a sidecar reach either. Each bootstrap directory is registered in both replicas' state
directories (``<state_dir>/sidecars/<node>``), so whichever replica lives renews its certificate and bundle.

Requests run through both frontends' sidecars the whole test. ``ca rotate-root prepare`` goes to the leader;
while the Secret's phase is ``prepared`` or ``activated`` the leader is killed. The follower takes the Lease,
finishes the rotation (its driver activates and retires), the killed replica's sidecars reconnect to it, and:
no request failed, one new root only was ever written to the Secret, and the Secret holds the new root alone.
"""

from __future__ import annotations

import base64
import contextlib
import dataclasses
import functools
import json
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import kubernetes
import pytest
import yaml
from cryptography import x509

from mesh_identity.compose import Stage, build
from mesh_identity.config import parse_config
from mesh_identity.demo.apps import DemoApp
from mesh_identity.mesh.model import Address
from mesh_identity.spiffe import SpiffeId, TrustDomain
from mesh_identity.svid import fingerprint_of
from tests.e2e.harness import Envoy, free_port
from tests.e2e.kubepods import PodCluster, Traffic
from tests.fakes.kube import CONFIG_MAP, LEASE, NAMESPACE, SECRET, Kind, KubeServer
from tests.fakes.kube.customresources import install_crds
from tests.fakes.kube.endpointslices import EndpointSliceController
from tests.fakes.kube.workloads import checked, workload_kinds
from tests.registry.kube.conftest import CRDS
from tests.waiting import wait_until
from xds_sds.mesh.component import server_identity
from xds_sds.mesh.sidecars import SidecarDirs
from xds_sds.resources.bootstrap import XDS_CLUSTER, write_bootstrap

pytestmark = pytest.mark.e2e

MESH = "ha-e2e"
TD = TrustDomain("ha.mesh")
NS = "shop"
CONTROL = "mesh-identity-system"
SECRET_NAME = "mesh-identity-ca"
LEADER_LEASE = "mesh-identity-leader"
APP_PORT = 8080
BACKEND_PORT = 8001
LEASE_DURATION = 15.0  # the defaults the replicas run with (client-go's): 15 s duration, 2 s retry period
RETRY_PERIOD = 2.0
PODS = {"frontend-0": "frontend", "backend-0": "backend", "frontend-1": "frontend", "backend-1": "backend"}
ON_LEADER = ("frontend-0", "backend-0")  # the others' xDS server is the follower
TOKENS = {"token-admin": "admin", "token-replica-a": "replica-a", "token-replica-b": "replica-b"}  # one user each


# -- the cluster, its writes recorded ------------------------------------------------------------------------


@dataclass(frozen=True)
class Write:
    at: float  # time.monotonic() when the server took it
    obj: dict[str, Any]


@dataclass
class Writes:
    """Every accepted write of one kind (validated first against the official schemas)."""

    items: list[Write] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def named(self, name: str) -> list[Write]:
        with self.lock:
            return [w for w in self.items if w.obj["metadata"]["name"] == name]


def recorded(kind: Kind, writes: Writes) -> Kind:
    validate = checked(*([kind.validate] if kind.validate is not None else []))

    def record(k: Kind, old: dict[str, Any] | None, new: dict[str, Any]) -> list[str]:
        errors = validate(k, old, new)
        if not errors:
            with writes.lock:
                writes.items.append(Write(time.monotonic(), json.loads(json.dumps(new))))
        return errors

    return dataclasses.replace(kind, validate=record)


@dataclass
class Cluster:
    pods: PodCluster
    secrets: Writes
    leases: Writes

    def manifest(self) -> dict[str, Any]:
        """The manifest (``ca.json``) of the Secret as last written."""
        written = self.secrets.named(SECRET_NAME)
        data = written[-1].obj.get("data", {}) if written else {}
        return json.loads(base64.b64decode(data["ca.json"])) if "ca.json" in data else {}

    def roots_ever(self) -> set[str]:
        """Every root written to the Secret so far."""
        return set().union(*(roots_in(w.obj.get("data", {})) for w in self.secrets.named(SECRET_NAME)))

    def holders(self) -> list[tuple[float, str]]:
        """The leader Lease's holder after each accepted write, with its time."""
        return [(w.at, str(w.obj["spec"].get("holderIdentity") or "")) for w in self.leases.named(LEADER_LEASE)]


def roots_in(data: dict[str, Any]) -> set[str]:
    """The fingerprints of the root certificates (``root-N.pem``) in one written Secret's data."""
    found: set[str] = set()
    for key, value in data.items():
        if key.startswith("root-") and key.endswith(".pem"):
            found.add(fingerprint_of(x509.load_pem_x509_certificate(base64.b64decode(value))))
    return found


@pytest.fixture
def cluster() -> Iterator[Cluster]:
    secrets, leases = Writes(), Writes()
    kinds = (
        recorded(SECRET, secrets),
        dataclasses.replace(CONFIG_MAP, validate=checked(*([CONFIG_MAP.validate] if CONFIG_MAP.validate else []))),
        NAMESPACE,
        recorded(LEASE, leases),
        *workload_kinds(),
    )
    server = KubeServer(kinds=kinds, tokens=TOKENS)
    custom = install_crds(server, [CRDS])
    with server, EndpointSliceController(server), kubernetes.client.ApiClient(server.client_configuration()) as api:
        pods = PodCluster(server, api, custom)
        pods.namespace(CONTROL, mesh=None)
        yield Cluster(pods, secrets, leases)


# -- the replicas: serve processes ------------------------------------------------------------------------------


@dataclass
class Replica:
    name: str  # replica-a, replica-b
    directory: Path
    xds: Address
    proc: subprocess.Popen[bytes] | None = None

    @property
    def config(self) -> Path:
        return self.directory / "config.yaml"

    @property
    def state(self) -> Path:
        return self.directory / "state"

    def write_config(self, server: KubeServer, key_file: Path) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        kubeconfig = server.write_kubeconfig(self.directory / "kubeconfig", token=f"token-{self.name}")
        document = {
            "trust_domain": TD.name,
            "state_dir": str(self.state),
            "metrics": {"listen": f"127.0.0.1:{free_port()}"},
            "xds": {"listen": str(self.xds)},
            "registry": {
                "kind": "kubernetes",
                "mesh_name": MESH,
                "kubeconfig": str(kubeconfig),
                "namespace": CONTROL,
                "leader_election": {"identity": self.name},
            },
            "ca": {
                "provider": "builtin",
                "provider_options": {
                    "store": "kubernetes",
                    "secret_namespace": CONTROL,
                    "secret_name": SECRET_NAME,
                    "kubeconfig": str(kubeconfig),
                    "key_encryption_file": str(key_file),
                },
            },
            "plugins": {"audit": {"enabled": False}},
        }
        self.config.write_text(yaml.safe_dump(document))

    def start(self) -> None:
        with (self.directory / "serve.log").open("ab") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "mesh_identity", "serve", "--config", str(self.config)],
                cwd=self.directory,
                stdout=log,
                stderr=subprocess.STDOUT,
                env={**os.environ, "MESH_IDENTITY_CONFIG": ""},
            )

    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def kill(self) -> None:
        """kill -9: no release of the Lease, no step down, nothing cleaned up."""
        assert self.proc is not None
        os.kill(self.proc.pid, signal.SIGKILL)
        self.proc.wait(30)

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        os.kill(self.proc.pid, signal.SIGTERM)
        try:
            self.proc.wait(60)
        except subprocess.TimeoutExpired:
            os.kill(self.proc.pid, signal.SIGKILL)
            self.proc.wait(30)

    def log(self) -> str:
        path = self.directory / "serve.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def status(self) -> dict[str, Any]:
        url = (self.state / "admin.addr").read_text().strip()
        with urllib.request.urlopen(url + "/status", timeout=10) as response:
            status: dict[str, Any] = json.loads(response.read())
            return status

    def ready(self) -> bool:
        try:
            return bool(self.status()["ca"]["roots"])
        except (OSError, KeyError, ValueError):
            return False

    def cli(self, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "mesh_identity", *args, "--config", str(self.config)],
            capture_output=True,
            text=True,
            timeout=120,
            env={**os.environ, "MESH_IDENTITY_CONFIG": ""},
        )


@contextlib.contextmanager
def logs_on_failure(*replicas: Replica) -> Iterator[None]:
    try:
        yield
    except BaseException:
        for replica in replicas:
            print(f"\n===== {replica.name} (serve, exit {replica.proc and replica.proc.poll()}) =====")
            print(replica.log()[-30_000:])
        raise


@contextlib.contextmanager
def sidecars_on_failure(pods: list[Pod]) -> Iterator[None]:
    """On failure, what each sidecar's Envoy holds and how its xDS connections went: the certificates it serves
    (``/certs``) and its xDS cluster's connection and TLS counters (a stream that cannot move shows why here)."""
    try:
        yield
    except BaseException:
        for pod in pods:
            print(f"\n===== {pod.node}: Envoy /certs and the xDS cluster's counters =====")
            try:
                print(pod.envoy.admin("/certs")[1][-6_000:])
                counters = f"/stats?filter=^cluster\\.{XDS_CLUSTER}\\.(upstream_cx_|ssl\\.)"
                print(pod.envoy.admin(counters)[1][-6_000:])
            except Exception as err:  # its Envoy gone: say so and go on
                print(f"(no answer: {err!r})")
        raise


# -- the pods ----------------------------------------------------------------------------------------------


@dataclass
class Pod:
    name: str
    ip: str
    app: DemoApp
    envoy: Envoy

    @property
    def node(self) -> str:
        return f"{self.name}.{NS}"

    def xds_host(self) -> Address | None:
        """The xDS server the sidecar's stream is on (the host of its xDS cluster with an active request)."""
        status, text = self.envoy.admin("/clusters?format=json")
        assert status == 200, text
        for item in json.loads(text).get("cluster_statuses", []):
            if item.get("name") != XDS_CLUSTER:
                continue
            for host in item.get("host_statuses", []):
                stats = {s.get("name"): int(s.get("value", 0)) for s in host.get("stats", [])}
                if stats.get("rq_active", 0) > 0:
                    address = host["address"]["socket_address"]
                    return Address(address["address"], int(address["port_value"]))
        return None


def issuer_config(directory: Path, replica: Replica) -> Any:
    """A config like the replica's with a state directory of its own: the CLI's ``bootstrap`` would sign with
    the Secret's root this way (an intermediate of its own); the test issues the pods' bootstrap certificates."""
    document = yaml.safe_load(replica.config.read_text())
    document["state_dir"] = str(directory / "issuer-state")
    document.pop("registry")
    document.pop("xds")
    return parse_config(document, directory)


def start_pod(
    cluster: Cluster, issuer: Any, workdir: Path, name: str, xds: Address, standby: Address, replicas: list[Replica]
) -> Pod:
    account = PODS[name]
    identity = SpiffeId.for_kubernetes(TD, NS, account)
    ip = cluster.pods.ip_of(NS, name)
    calls = {"backend": Address(ip, BACKEND_PORT)} if account == "frontend" else {}
    app = DemoApp(name, Address(ip, APP_PORT), calls).start()
    node = f"{name}.{NS}"
    directory = workdir / node
    files = write_bootstrap(
        issuer.authority.issue(identity, requested_by="e2e"), directory, node=node, cluster=account, xds=xds,
        server_identity=server_identity(TD), standby_xds=[standby],
    )  # fmt: skip
    for replica in replicas:  # whichever replica lives renews its certificate and bundle
        SidecarDirs(replica.state).register(node, directory)
    envoy = Envoy(files.bootstrap, directory, name=node)
    pod = Pod(name, ip, app, envoy)
    try:
        envoy.start(90)
    except BaseException:
        app.stop()
        raise
    return pod


def serving_or_gone(replica: Replica) -> bool:
    return replica.ready() or not replica.running()


def streams_to(pod: Pod, xds: Address) -> bool:
    return pod.xds_host() == xds


def phase(cluster: Cluster) -> str:
    return str(cluster.manifest().get("phase", ""))


# -- the test ---------------------------------------------------------------------------------------------------


def test_the_leader_killed_in_a_root_rotation_the_other_replica_finishes_it_no_request_fails(
    cluster: Cluster, tmp_path: Path
) -> None:
    key_file = tmp_path / "ca-key" / "passphrase"
    key_file.parent.mkdir()
    key_file.write_text("a passphrase mounted apart from the Secret\n")
    key_file.chmod(0o600)

    # the shop: its objects first, so that the replicas' first view has the pods
    pods = cluster.pods
    pods.namespace(NS, mesh=MESH)
    for account in ("frontend", "backend"):
        pods.service_account(NS, account)
    pods.service(NS, "backend", {"app": "backend"}, port=BACKEND_PORT, target=APP_PORT)
    pods.service(NS, "frontend", {"app": "frontend"}, port=8000, target=APP_PORT)
    for name, account in PODS.items():
        pods.pod(NS, name, account, {"app": account}, port=APP_PORT)
    group = {"kind": "HTTPRouteGroup", "name": "backend-routes", "matches": ["all"]}
    pods.smi(
        {
            "apiVersion": "specs.smi-spec.io/v1alpha4",
            "kind": "HTTPRouteGroup",
            "metadata": {"name": "backend-routes", "namespace": NS},
            "spec": {"matches": [{"name": "all", "pathRegex": "/.*", "methods": ["*"]}]},
        }
    )
    pods.smi(
        {
            "apiVersion": "access.smi-spec.io/v1alpha3",
            "kind": "TrafficTarget",
            "metadata": {"name": "frontend-to-backend", "namespace": NS},
            "spec": {
                "destination": {"kind": "ServiceAccount", "name": "backend", "namespace": NS},
                "sources": [{"kind": "ServiceAccount", "name": "frontend", "namespace": NS}],
                "rules": [group],
            },
        }
    )

    replicas = [
        Replica(name, tmp_path / name, Address("127.0.0.1", free_port())) for name in ("replica-a", "replica-b")
    ]
    for replica in replicas:
        replica.write_config(cluster.pods.server, key_file)
    running: list[Pod] = []
    with contextlib.ExitStack() as stack:
        for replica in replicas:
            stack.callback(replica.stop)
        stack.enter_context(logs_on_failure(*replicas))
        for replica in replicas:  # at once: they race to create the Secret
            replica.start()
        for replica in replicas:
            wait_until(functools.partial(serving_or_gone, replica), f"{replica.name} to serve", timeout=120)
            assert replica.running(), f"{replica.name} exited"

        # one root (the Secret's, created once), an intermediate each under it
        (old_root,) = cluster.roots_ever()
        statuses = [r.status()["ca"] for r in replicas]
        assert [[root["fingerprint"] for root in s["roots"]] for s in statuses] == [[old_root], [old_root]]
        intermediates = [s["intermediate"]["serial"] for s in statuses]
        assert intermediates[0] and intermediates[1] and intermediates[0] != intermediates[1]

        holder = wait_until(lambda: cluster.holders() and cluster.holders()[-1][1], "a leader", timeout=60)
        leader, follower = sorted(replicas, key=lambda r: r.name != holder)
        issuer = stack.enter_context(build(issuer_config(tmp_path, leader), Stage.AUTHORITY, create=False))

        # the pods' sidecars: half on the leader, half on the follower, each with the other as a standby
        for name in PODS:
            primary, standby = (leader, follower) if name in ON_LEADER else (follower, leader)
            pod = start_pod(cluster, issuer, tmp_path / "pods", name, primary.xds, standby.xds, replicas)
            stack.callback(pod.app.stop)
            stack.callback(pod.envoy.stop)
            running.append(pod)
        stack.enter_context(sidecars_on_failure(running))  # before the stack stops the Envoys
        by_name = {p.name: p for p in running}
        for pod in running:
            expected = leader.xds if pod.name in ON_LEADER else follower.xds
            wait_until(functools.partial(streams_to, pod, expected), f"{pod.node}'s stream on {expected}")
        frontends = [by_name["frontend-0"], by_name["frontend-1"]]
        wait_until(
            lambda: all(Address(f.ip, BACKEND_PORT) in f.envoy.listeners().values() for f in frontends),
            "the frontends' listeners for backend",
        )

        loops = [stack.enter_context(Traffic(Address(f.ip, BACKEND_PORT))) for f in frontends]
        for loop in loops:
            loop.wait_for(10)

        # prepare on the leader; kill it while the rotation is between prepare and retire
        for loop in loops:
            loop.phase = "prepare"
        done = leader.cli("ca", "rotate-root", "prepare")
        assert done.returncode == 0, done.stdout + done.stderr
        seen = wait_until(lambda: phase(cluster) in ("prepared", "activated") and phase(cluster), "the prepared phase")
        leader.kill()
        killed_at = time.monotonic()
        killed_in = phase(cluster)
        for loop in loops:
            loop.phase = f"the leader killed ({killed_in})"

        # the follower takes the Lease once it has expired (on its clock: up to a lease duration after the last
        # renewal it saw). A sanity bound only, not a speed target: a lease duration, three retry periods, and a
        # margin for a loaded machine.
        bound = LEASE_DURATION + 3 * RETRY_PERIOD + 10
        wait_until(lambda: cluster.holders()[-1][1] == follower.name, "the follower to take the Lease", bound + 30)
        took = next(at for at, name in cluster.holders() if at > killed_at and name == follower.name)
        takeover = took - killed_at
        print(
            f"takeover: {takeover:.1f} s after the kill (lease duration {LEASE_DURATION:.0f} s); the Secret's phase "
            f"{seen} before the kill, {killed_in} after it"
        )
        assert takeover < bound

        # it finishes the rotation: steady, the new root alone in the Secret
        for loop in loops:
            loop.phase = "the new leader finishing"
        wait_until(lambda: phase(cluster) == "steady", "the rotation to finish", timeout=180)
        (new_root,) = roots_in(cluster.secrets.named(SECRET_NAME)[-1].obj["data"])
        assert new_root != old_root
        wait_until(
            lambda: [r["fingerprint"] for r in follower.status()["ca"]["roots"]] == [new_root],
            "the new leader serving the new root alone",
            timeout=60,
        )
        # the killed replica's sidecars are on the new leader now
        for pod in running:
            wait_until(functools.partial(streams_to, pod, follower.xds), f"{pod.node}'s stream on {follower.xds}", 60)
        for loop in loops:
            loop.phase = "after the rotation"
            loop.wait_for(20)

        # one new root only over the whole test: every root ever written to the Secret
        assert cluster.roots_ever() == {old_root, new_root}
        # the retire (the last write of the Secret) was the new leader's
        writes = [
            r for r in list(cluster.pods.server.requests)
            if r.resource == "secrets" and r.verb in ("create", "update", "patch") and r.code < 300
        ]  # fmt: skip
        assert writes[-1].user == follower.name, writes[-1]
        print(f"Secret writes: {[(r.verb, r.user) for r in writes]}")
        assert [h for _, h in cluster.holders() if h] and {h for _, h in cluster.holders() if h} <= {
            leader.name,
            follower.name,
        }
    for loop in loops:
        assert loop.failures == []
        assert loop.served["backend-0"] > 0 and loop.served["backend-1"] > 0
