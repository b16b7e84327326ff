"""A mesh described only by Kubernetes objects, with real Envoys for its pods.

Namespaces, ServiceAccounts, Pods and Services are written through the ``kubernetes`` client (Pods' status as
the kubelet reports it), the SMI objects with the real ``kubectl apply``; the control plane is the server of
``mesh-identity serve`` (``compose.build``, the built-in CA) following the API test server with its Kubernetes
registry; each pod the test creates gets its app and a real Envoy (:mod:`tests.e2e.kubepods`). Then: mTLS
between the sidecars, the TrafficTargets enforced by the destination's sidecar, a TrafficSplit changed with
kubectl moving the traffic, pods scaled up and down adding and removing endpoints, and the last pod of a
service account deleted ending its identity's rotation and its sidecar's stream.

The shop (namespace ``shop``, its Services' ports distinct, as each caller's sidecar listens for each Service it
may call on its own pod IP and that Service's port)::

    frontend-0    (sa frontend)  Service frontend   :8000   calls backend (the split's root), -v1, -v2
    backend-v1-0  (sa backend)   Service backend-v1 :8002   } Service backend :8001 selects both: the root of
    backend-v2-0  (sa backend)   Service backend-v2 :8003   } TrafficSplit backend-split (v1 100, v2 0)
    intruder-0    (sa intruder)  no Service: a client-only sidecar; its TrafficTarget admits /admin/* only
    stranger-0    (sa stranger)  no Service, no TrafficTarget: may call nothing

(Deselected where kubectl is not installed, like ``tests/registry/kube/test_kube_kubectl.py``.)
"""

from __future__ import annotations

import socket
import ssl
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from mesh_identity.demo.apps import get_json
from mesh_identity.mesh.model import Address
from mesh_identity.registry.kube import INBOUND_PORT
from mesh_identity.registry.kube.smi import mesh_service_name
from mesh_identity.spiffe import SpiffeId, TrustDomain
from tests.e2e.harness import tls_client_context, tls_get, xfcc_hash
from tests.e2e.kubepods import (
    ControlPlane,
    Kubectl,
    Pod,
    PodCluster,
    PodRunner,
    Traffic,
    control_plane,
    kube_cluster,
)
from tests.e2e.test_policy import DENIED, call
from tests.waiting import wait_until
from xds_sds.resources.names import inbound, outbound

pytestmark = pytest.mark.e2e  # deselected, with the reason in the header, where kubectl is absent (conftest.py)

MESH = "kube-e2e"
NS = "shop"
TD = TrustDomain("kube.mesh")
APP_PORT = 8080  # every Service's targetPort: the apps listen on <pod IP>:8080
PORTS = {"frontend": 8000, "backend": 8001, "backend-v1": 8002, "backend-v2": 8003, "batch": 8004}
BACKENDS = {name: PORTS[name] for name in ("backend", "backend-v1", "backend-v2")}
V1 = {"app": "backend", "version": "v1"}
V2 = {"app": "backend", "version": "v2"}


def identity(service_account: str) -> SpiffeId:
    return SpiffeId.for_kubernetes(TD, NS, service_account)


FRONTEND, BACKEND, INTRUDER, STRANGER = (identity(a) for a in ("frontend", "backend", "intruder", "stranger"))
PODS = {  # pod: (service account, labels, the Services its app calls)
    "frontend-0": ("frontend", {"app": "frontend"}, BACKENDS),
    "backend-v1-0": ("backend", V1, {}),
    "backend-v2-0": ("backend", V2, {}),
    "intruder-0": ("intruder", {"app": "intruder"}, BACKENDS),
    "stranger-0": ("stranger", {"app": "stranger"}, {}),
}
SERVICES = {"frontend": {"app": "frontend"}, "backend": {"app": "backend"}, "backend-v1": V1, "backend-v2": V2}


# -- the SMI objects, as a user writes them for kubectl --------------------------------------------------------


def smi(api_version: str, kind: str, name: str, spec: dict[str, Any]) -> dict[str, Any]:
    return {"apiVersion": api_version, "kind": kind, "metadata": {"name": name, "namespace": NS}, "spec": spec}


def account(name: str) -> dict[str, str]:
    return {"kind": "ServiceAccount", "name": name, "namespace": NS}


ROUTES = smi(
    "specs.smi-spec.io/v1alpha4",
    "HTTPRouteGroup",
    "backend-routes",
    {
        "matches": [
            {"name": "read", "pathRegex": "/.*", "methods": ["GET"]},
            {"name": "admin", "pathRegex": "/admin/.*", "methods": ["*"], "headers": {"x-role": "ops"}},
        ]
    },
)


def target(name: str, source: str, match: str) -> dict[str, Any]:
    rules = [{"kind": "HTTPRouteGroup", "name": "backend-routes", "matches": [match]}]
    spec = {"destination": account("backend"), "sources": [account(source)], "rules": rules}
    return smi("access.smi-spec.io/v1alpha3", "TrafficTarget", name, spec)


def split(v1: int, v2: int) -> dict[str, Any]:
    backends = [{"service": "backend-v1", "weight": v1}, {"service": "backend-v2", "weight": v2}]
    return smi(
        "split.smi-spec.io/v1alpha4", "TrafficSplit", "backend-split", {"service": "backend", "backends": backends}
    )


# -- the running mesh -------------------------------------------------------------------------------------------


@dataclass
class KubeMesh:
    cluster: PodCluster
    kubectl: Kubectl
    plane: ControlPlane
    runner: PodRunner

    def pod(self, name: str) -> Pod:
        return self.runner.pods[f"{name}.{NS}"]


def expected_listeners(cluster: PodCluster) -> dict[str, set[Address]]:
    """What each pod's sidecar listens on at least: the inbound port of a pod in a Service; a port for each of
    backend's Services its identity may call (the destinations of the TrafficTargets naming it, and the split's
    root). (A Service no TrafficTarget names is open to the mesh: every sidecar gets its port too.)"""
    out: dict[str, set[Address]] = {}
    for name, (_, _, calls) in PODS.items():
        ip = cluster.ip_of(NS, name)
        listening = {Address(ip, port) for port in calls.values()}
        if name.startswith(("frontend", "backend")):
            listening.add(Address(ip, INBOUND_PORT))
        out[f"{name}.{NS}"] = listening
    return out


@pytest.fixture(scope="module")
def mesh(tmp_path_factory: pytest.TempPathFactory) -> Iterator[KubeMesh]:
    workdir = tmp_path_factory.mktemp("kube-mesh")
    with kube_cluster() as cluster:
        cluster.namespace(NS, mesh=MESH)
        for service_account in sorted({a for a, _, _ in PODS.values()}):
            cluster.service_account(NS, service_account)
        for name, selector in SERVICES.items():
            cluster.service(NS, name, selector, port=PORTS[name], target=APP_PORT)
        for name, (service_account, labels, _) in PODS.items():
            cluster.pod(NS, name, service_account, labels, port=APP_PORT)
        kubectl = Kubectl(cluster, workdir / "kubectl")
        applied = kubectl.apply(
            [
                ROUTES,
                target("frontend-reads-backend", "frontend", "read"),
                target("intruder-admin", "intruder", "admin"),
                split(100, 0),
            ]
        )
        assert "trafficsplit.split.smi-spec.io/backend-split created" in applied, applied
        with control_plane(cluster, workdir / "control-plane", mesh_name=MESH, trust_domain=TD) as plane:
            runner = PodRunner(cluster, plane, workdir / "pods", TD)
            try:
                pods = [runner.start(NS, name, a, port=APP_PORT, calls=calls) for name, (a, _, calls) in PODS.items()]
                runner.wait_ready(pods, expected_listeners(cluster))
                yield KubeMesh(cluster, kubectl, plane, runner)
            finally:
                runner.stop_all()


def served_by(address: Address, path: str = "/") -> str | None:
    """Which pod's app answered a request to ``address`` (None: not a 200)."""
    status, answer = get_json(address, path)
    return str(answer["service"]) if status == 200 and isinstance(answer, dict) else None


# -- mTLS -------------------------------------------------------------------------------------------------------


def test_the_objects_make_the_mesh_and_its_sidecars_talk_mtls(mesh: KubeMesh, tmp_path: Path) -> None:
    model = mesh.plane.mesh()
    assert {node: model.node_identity(node) for node in mesh.runner.pods} == {
        f"{name}.{NS}": identity(a) for name, (a, _, _) in PODS.items()
    }
    assert not mesh.plane.registry.refusals
    frontend, backend = mesh.pod("frontend-0"), mesh.pod("backend-v1-0")

    # frontend's app calls backend-v1 on its own pod IP, in plaintext; its sidecar carries the call over mTLS
    status, answer = get_json(frontend.app.address, "/call/backend-v1")
    assert status == 200, answer
    reply = answer["upstream"]
    svid = mesh.plane.engine.source(FRONTEND).svid()
    assert (reply["service"], reply["peer"]) == ("backend-v1-0", str(FRONTEND))
    assert reply["xfcc"] == f"By={BACKEND};Hash={xfcc_hash(svid)};URI={FRONTEND}"

    # backend's endpoint in the mesh is its sidecar's port on the pod IP: TLS with a mesh certificate only
    with socket.create_connection((backend.inbound.host, backend.inbound.port), timeout=10) as plain:
        plain.sendall(b"GET / HTTP/1.1\r\nhost: backend-v1\r\n\r\n")
        assert plain.recv(65536) == b""  # closed: no plaintext answer
    with pytest.raises(ssl.SSLError):
        tls_get(backend.inbound, tls_client_context(mesh.plane.bundle_pem(), None, tmp_path / "none"))


# -- SMI access control -----------------------------------------------------------------------------------------


def test_the_traffic_targets_are_enforced_by_the_destinations_sidecar(mesh: KubeMesh, tmp_path: Path) -> None:
    backend, intruder, stranger = mesh.pod("backend-v1-0"), mesh.pod("intruder-0"), mesh.pod("stranger-0")
    prefix = f"http.{inbound(mesh_service_name('backend-v1', NS))}.rbac."
    before = backend.envoy.stats(prefix)

    # intruder's TrafficTarget admits the admin routes only: its sidecar carries any call, backend's refuses
    assert call(intruder.at(PORTS["backend-v1"])) == (403, DENIED)
    status, body = call(intruder.at(PORTS["backend-v1"]), "/admin/reindex", headers={"x-role": "ops"})
    assert status == 404 and f'"peer": "{INTRUDER}"' in body  # let through: the demo app has no such path
    after = backend.envoy.stats(prefix)
    assert after[prefix + "denied"] == before.get(prefix + "denied", 0) + 1
    assert after[prefix + "allowed"] == before.get(prefix + "allowed", 0) + 1

    # stranger may call nothing: no listener on its IP for backend's Services, and with its own SVID the
    # backend's sidecar refuses it
    for port in BACKENDS.values():
        with pytest.raises(ConnectionRefusedError):
            call(stranger.at(port))
    bundle = mesh.plane.bundle_pem()
    own = mesh.plane.engine.source(STRANGER).svid()
    answer = tls_get(backend.inbound, tls_client_context(bundle, own, tmp_path / "stranger"))
    assert answer.startswith(b"HTTP/1.1 403") and answer.endswith(DENIED.encode()), answer
    allowed = tls_get(backend.inbound, tls_client_context(bundle, mesh.plane.issue(FRONTEND), tmp_path / "frontend"))
    assert allowed.startswith(b"HTTP/1.1 200") and f'"peer": "{FRONTEND}"'.encode() in allowed


# -- TrafficSplit -------------------------------------------------------------------------------------------------


def test_a_traffic_split_changed_with_kubectl_moves_the_traffic(mesh: KubeMesh) -> None:
    root = mesh.pod("frontend-0").at(PORTS["backend"])
    assert Counter(served_by(root) for _ in range(20)) == {"backend-v1-0": 20}

    applied = mesh.kubectl.apply([split(0, 100)])
    assert "trafficsplit.split.smi-spec.io/backend-split configured" in applied, applied
    wait_until(lambda: served_by(root) == "backend-v2-0", "frontend's sidecar to send backend's calls to v2")
    assert Counter(served_by(root) for _ in range(20)) == {"backend-v2-0": 20}

    mesh.kubectl.apply([split(100, 0)])
    wait_until(lambda: served_by(root) == "backend-v1-0", "the calls back on v1")


# -- scaling --------------------------------------------------------------------------------------------------------


def test_a_pod_scaled_up_becomes_an_endpoint_once_ready_and_scaled_down_leaves_with_no_request_failing(
    mesh: KubeMesh,
) -> None:
    frontend, first = mesh.pod("frontend-0"), mesh.pod("backend-v1-0")
    v1 = outbound(mesh_service_name("backend-v1", NS))
    assert frontend.endpoints(v1) == {first.inbound}
    with Traffic(frontend.at(PORTS["backend-v1"])) as traffic:  # frontend's app calling backend-v1 throughout
        traffic.wait_for(5)

        # the kubelet starts the new pod: Running with its IP, not Ready until its containers (the sidecar) are
        traffic.phase = "a new pod starting"
        mesh.cluster.pod(NS, "backend-v1-1", "backend", V1, port=APP_PORT, run=False)
        mesh.cluster.run(NS, "backend-v1-1", ready=False)
        second = mesh.runner.start(NS, "backend-v1-1", "backend", port=APP_PORT)
        mesh.runner.wait_ready([second])
        assert frontend.endpoints(v1) == {first.inbound}  # not ready: not an endpoint yet
        # meanwhile it is a client-only sidecar of service account backend; backend's policy stays as it was
        assert call(mesh.pod("intruder-0").at(PORTS["backend-v1"])) == (403, DENIED)
        traffic.phase = "the new pod ready"
        mesh.cluster.run(NS, "backend-v1-1", ready=True)
        mesh.runner.wait_ready([second], {second.node: {second.inbound}})
        wait_until(lambda: frontend.endpoints(v1) == {first.inbound, second.inbound}, "the new pod in frontend's EDS")
        wait_until(
            lambda: traffic.served["backend-v1-1"] or traffic.failures, "requests through frontend to reach the new pod"
        )

        traffic.phase = "the new pod deleted"
        mesh.cluster.delete_pod(NS, "backend-v1-1")
        wait_until(lambda: frontend.endpoints(v1) == {first.inbound}, "the deleted pod out of frontend's EDS")
        wait_until(lambda: second.node not in mesh.plane.publisher.connected_nodes(), "its sidecar's stream to close")
        traffic.phase = "the deleted pod's sidecar stopped"
        mesh.runner.stop(second)  # the kubelet, once the grace period is over
        after = traffic.served["backend-v1-1"]
        traffic.wait_for(10)
    # Callers get the new endpoint in the same push as the new sidecar its inbound listener, so a request may try
    # the pod before that listener is bound; the outbound route retries a failed connect on another endpoint
    # (xds_sds.resources.routes), so no phase loses a request.
    assert traffic.failures == []
    assert traffic.served["backend-v1-1"] == after and traffic.served["backend-v1-0"] > 0
    assert BACKEND in mesh.plane.engine.identities()  # the service account still has pods


def test_the_first_pod_of_a_service_account_adds_its_identity_and_deleting_the_last_stops_its_rotation(
    mesh: KubeMesh,
) -> None:
    batch = identity("batch")
    engine = mesh.plane.engine
    assert batch not in engine.identities()

    mesh.cluster.service_account(NS, "batch")
    mesh.cluster.service(NS, "batch", {"app": "batch"}, port=PORTS["batch"], target=APP_PORT)
    mesh.cluster.pod(NS, "batch-0", "batch", {"app": "batch"}, port=APP_PORT)
    pod = mesh.runner.start(NS, "batch-0", "batch", port=APP_PORT)  # once the registry has it
    wait_until(lambda: batch in engine.identities(), "batch's identity in the rotation engine")
    source = engine.source(batch)
    mesh.runner.wait_ready([pod], {pod.node: {pod.inbound}})
    serial = source.svid().leaf.serial_number
    wait_until(lambda: serial in pod.envoy.cert_serials(batch), "batch's SVID in its sidecar")
    assert str(batch) in {i["subject"] for i in mesh.plane.status()["identities"]}

    mesh.cluster.delete_pod(NS, "batch-0")
    wait_until(lambda: batch not in engine.identities(), "batch's identity to leave the rotation engine")
    assert source.closed and str(batch) not in engine.job_times()  # its renewal job is gone
    assert str(batch) not in {i["subject"] for i in mesh.plane.status()["identities"]}
    wait_until(lambda: pod.node not in mesh.plane.publisher.connected_nodes(), "its sidecar's stream to close")
    wait_until(lambda: pod.connected() == 0, "its Envoy to see the stream closed")
    mesh.runner.stop(pod)
    assert {FRONTEND, BACKEND, INTRUDER, STRANGER} <= set(engine.identities())
