"""The kubelet stand-in (tests/fakes/kube/kubelet.py) in real network namespaces: an injected Pod, as the webhook
patches it, runs with its capture rules, its sidecars' shared socket volume, its downward API, ConfigMap and
token volumes, each container as its user; its status reaches the fake API server; a Service's ClusterIP reaches
its ready pods from another pod, follows its EndpointSlices, and rejects when none is ready; teardown leaves
nothing; refused pods name the container."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from mesh_identity.inject import patch as p
from mesh_identity.registry.kube.bundles import DATA_KEY
from mesh_identity.registry.kube.bundles import NAME as BUNDLE
from tests.fakes.kube import CONFIG_MAP, DEFAULT_KINDS
from tests.fakes.kube.endpointslices import EndpointSliceController
from tests.fakes.kube.kubelet import (
    Image,
    Kubelet,
    KubeletError,
    RunningPod,
    container_argv,
    expand,
    format_map,
    parse_quantity,
)
from tests.fakes.kube.podrunner import FORWARDING_STATE, IP_FORWARD, PodNetwork, netns_names, service_users
from tests.fakes.kube.server import KubeServer
from tests.fakes.kube.workloads import kind_named, workload_kinds
from tests.inject import kit

PYTHON = os.path.realpath(sys.executable)
REPORTER = str(Path(__file__).with_name("reporter.py"))
NS = "shop"
APP_UID = 1001
SERVER_UID = 1002
CLIENT_UID = 1003
CA_PEM = "-----BEGIN CERTIFICATE-----\nMIIB (a test bundle)\n-----END CERTIFICATE-----\n"

# the sidecars' stand-ins: the "agent" serves a Unix socket in the shared sockets volume, the "envoy" reaches it
AGENT = """
import os, socket, sys
token = open("/var/run/secrets/tokens/mesh-identity").read()
path = "/var/run/mesh-identity/sockets/sds.sock"
server = socket.socket(socket.AF_UNIX)
server.bind(path)
os.chmod(path, 0o777)
server.listen(4)
print("agent listening", sys.argv[1:], flush=True)
while True:
    conn, _ = server.accept()
    conn.sendall(f"agent uid={os.getuid()} token-bytes={len(token)}".encode())
    conn.close()
"""
ENVOY = """
import socket, sys, time
print("envoy argv", sys.argv[1:], flush=True)
for _ in range(400):
    try:
        conn = socket.socket(socket.AF_UNIX)
        conn.connect("/var/run/mesh-identity/sockets/sds.sock")
        break
    except OSError:
        time.sleep(0.05)
print("sds answered:", conn.recv(200).decode(), flush=True)
time.sleep(600)
"""

IMAGES: dict[str, Any] = {
    kit.settings().capture_image: Image(),  # the init container's own command: sh -c '<rules>'
    kit.settings().envoy_image: lambda command, args: [PYTHON, "-c", ENVOY, *command, *args],
    kit.settings().agent_image: lambda command, args: [PYTHON, "-c", AGENT, *command, *args],
    "demo/httpapp:1": [PYTHON, "-m", "tests.apps.httpapp"],
    "demo/reporter:1": [PYTHON, REPORTER],
    "busybox:1": Image(cmd=("sleep", "600")),
}


@dataclass
class Cluster:
    server: KubeServer
    network: PodNetwork
    kubelet: Kubelet

    def create(self, kind: str, body: dict[str, Any]) -> dict[str, Any]:
        return self.server.store.create(kind_named(self.server.kinds, kind), NS, body)

    def get(self, kind: str, name: str) -> dict[str, Any]:
        return self.server.store.get(kind_named(self.server.kinds, kind), NS, name)

    def pod(self, name: str, containers: list[dict[str, Any]], **spec: Any) -> dict[str, Any]:
        body = {
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": {"name": name, "labels": spec.pop("labels", {"app": name})},
            "spec": {"containers": containers, **spec},
        }
        return self.create("Pod", body)

    def wait_for_status(self, name: str, check: Any, timeout: float = 10.0) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while True:
            status = self.get("Pod", name).get("status") or {}
            if check(status):
                return status
            assert time.monotonic() < deadline, f"pod {name} status: {status}"
            time.sleep(0.05)


def make_cluster(subnet: str) -> Iterator[Cluster]:
    forwarding, alone = Path(IP_FORWARD).read_text(), not service_users()
    server = KubeServer(kinds=(*DEFAULT_KINDS, *workload_kinds())).start()
    network = PodNetwork(subnet)
    kubelet = None
    try:
        network.start()
        with EndpointSliceController(server):
            kubelet = Kubelet(server, network, IMAGES, volume_timeout=10.0)
            yield Cluster(server, network, kubelet)
            assert kubelet.errors == []  # the background loop's status writes and service rules all worked
            kubelet.stop()
            assert kubelet.leftovers() == []
    finally:
        try:
            if kubelet is not None:
                kubelet.stop()
        finally:
            network.teardown()
            server.stop()
    assert network.leftovers() == []
    if alone and not service_users():  # no other network (of any process) has services now
        assert Path(IP_FORWARD).read_text() == forwarding
        assert not FORWARDING_STATE.exists()


@pytest.fixture(scope="module")
def cluster() -> Iterator[Cluster]:
    yield from make_cluster("10.98.0.0/24")


def status_of(pod: RunningPod, cluster: Cluster) -> dict[str, Any]:
    return cluster.get("Pod", pod.name)["status"]


def condition(status: dict[str, Any], kind: str) -> str:
    return next(c["status"] for c in status["conditions"] if c["type"] == kind)


def proc_uid(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("Uid:"):
            return int(line.split()[1])
    raise AssertionError(pid)


# -- an injected pod ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def injected(cluster: Cluster) -> RunningPod:
    pod = kit.pod(securityContext={"runAsUser": APP_UID})
    pod["metadata"] = {"name": "web", "namespace": NS, "labels": {"app": "web"}}
    pod["spec"]["containers"] = [{"name": "app", "image": "demo/httpapp:1", "args": ["web", "0.0.0.0:8080"]}]
    injected = p.apply_patch(pod, p.pod_patch(pod, NS, kit.settings()))
    cluster.create("Pod", injected)
    # the trust bundle comes a little later: the kubelet waits for it, as kubelet waits for a ConfigMap volume
    bundle = {"metadata": {"name": BUNDLE}, "data": {DATA_KEY: CA_PEM}}
    timer = threading.Timer(0.5, lambda: cluster.server.store.create(CONFIG_MAP, NS, bundle))
    timer.start()
    try:
        running = cluster.kubelet.run_pod(NS, "web")
    finally:
        timer.join()
    running.wait_for_log("app", "listening on")
    running.wait_for_log(p.ENVOY_CONTAINER, "sds answered")
    return running


def test_the_injected_pod_runs_with_its_capture_rules_in_its_own_namespace(injected: RunningPod) -> None:
    assert injected.pod is not None
    rules = injected.pod.run(["iptables", "-t", "nat", "-S"]).stdout
    assert "-A MESH_OUTBOUND -p tcp -m owner --uid-owner 1337 -j RETURN" in rules
    host = subprocess.run(["iptables", "-t", "nat", "-S"], capture_output=True, text=True, check=True).stdout
    assert "MESH_" not in host
    assert injected.init_containers[p.CAPTURE_CONTAINER].exit_code == 0


def test_each_container_runs_as_its_user(injected: RunningPod) -> None:
    uids = {name: proc_uid(process.pid) for name, process in injected.containers.items()}
    assert uids == {"app": APP_UID, p.ENVOY_CONTAINER: 1337, p.AGENT_CONTAINER: 1338}
    assert injected.exec("app", ["id", "-u"]).stdout.strip() == str(APP_UID)


def test_the_envoy_command_line_is_expanded_from_the_downward_api_env(injected: RunningPod) -> None:
    line = injected.wait_for_log(p.ENVOY_CONTAINER, "envoy argv")
    assert "'--service-node', 'web.shop'" in line  # $(POD_NAME).$(POD_NAMESPACE)
    assert "'-c', '/var/run/mesh-identity/config/envoy.json'" in line


def test_two_containers_share_the_memory_volume_and_its_unix_socket(injected: RunningPod) -> None:
    answer = injected.wait_for_log(p.ENVOY_CONTAINER, "sds answered")
    assert "agent uid=1338 token-bytes=" in answer
    kind = injected.exec(p.ENVOY_CONTAINER, ["stat", "-f", "-c", "%T", p.SOCKET_DIR]).stdout.strip()
    assert kind == "tmpfs"
    assert (injected.volume(p.SOCKETS_VOLUME) / "sds.sock").is_socket()


def test_the_downward_api_files_are_the_annotations(injected: RunningPod, cluster: Cluster) -> None:
    annotations = cluster.get("Pod", "web")["metadata"]["annotations"]
    envoy = injected.exec(p.ENVOY_CONTAINER, ["cat", p.ENVOY_BOOTSTRAP_FILE]).stdout
    agent = injected.exec(p.AGENT_CONTAINER, ["cat", p.AGENT_CONFIG_FILE]).stdout
    assert envoy == annotations[p.ENVOY_BOOTSTRAP]
    assert agent == annotations[p.AGENT_CONFIG]


def test_the_config_map_volume_holds_the_bundle_as_kubelet_lays_it_out(injected: RunningPod) -> None:
    assert injected.exec(p.AGENT_CONTAINER, ["cat", f"{p.CA_DIR}/ca.crt"]).stdout == CA_PEM
    listing = injected.exec(p.AGENT_CONTAINER, ["ls", "-a", p.CA_DIR]).stdout.split()
    assert "..data" in listing
    assert os.readlink(injected.volume(p.CA_VOLUME) / "ca.crt") == "..data/ca.crt"


def test_a_config_map_update_reaches_the_volume(injected: RunningPod, cluster: Cluster) -> None:
    newer = CA_PEM + CA_PEM

    def change(current: dict[str, Any]) -> dict[str, Any]:
        current["data"] = {DATA_KEY: newer}
        return current

    cluster.server.store.update(CONFIG_MAP, NS, BUNDLE, change)
    deadline = time.monotonic() + 10
    while injected.exec(p.AGENT_CONTAINER, ["cat", f"{p.CA_DIR}/ca.crt"]).stdout != newer:
        assert time.monotonic() < deadline, "the ConfigMap update did not reach the volume"
        time.sleep(0.1)


def test_the_token_is_accepted_by_the_token_review(injected: RunningPod, cluster: Cluster) -> None:
    token = injected.exec(p.AGENT_CONTAINER, ["cat", p.TOKEN_FILE]).stdout
    answer = cluster.server.token_reviews.review(
        {
            "apiVersion": "authentication.k8s.io/v1",
            "kind": "TokenReview",
            "spec": {"token": token, "audiences": [p.TOKEN_AUDIENCE]},
        }
    )
    status = answer["status"]
    assert status["authenticated"] is True
    assert status["user"]["username"] == "system:serviceaccount:shop:web"
    assert status["audiences"] == [p.TOKEN_AUDIENCE]
    assert status["user"]["extra"]["authentication.kubernetes.io/pod-name"] == ["web"]
    # the pod's containers run as several users (no fsGroup): kubelet writes the defaultMode, 0644
    mode = injected.exec(p.AGENT_CONTAINER, ["stat", "-L", "-c", "%a %u", p.TOKEN_FILE]).stdout.split()
    assert mode == ["644", "0"]


def test_the_configuration_volumes_are_read_only(injected: RunningPod) -> None:
    done = injected.exec(p.AGENT_CONTAINER, ["touch", f"{p.CONFIG_DIR}/x"], check=False)
    assert done.returncode != 0
    assert "Read-only file system" in done.stderr


def test_the_mount_points_exist_in_the_containers_only(injected: RunningPod) -> None:
    assert not Path("/run/mesh-identity").exists()
    assert not Path("/run/secrets/tokens").exists()
    # the app mounts none of the sidecars' volumes
    assert injected.exec("app", ["ls", "/var/run/mesh-identity"], check=False).returncode != 0


def test_the_status_is_written_as_a_kubelet_does(injected: RunningPod, cluster: Cluster) -> None:
    stored = cluster.get("Pod", "web")
    status = stored["status"]
    assert stored["spec"]["nodeName"] == "node1"
    assert status["phase"] == "Running"
    assert status["podIP"] == injected.ip
    assert status["podIPs"] == [{"ip": injected.ip}]
    assert status["hostIP"] == str(cluster.network.gateway)
    assert condition(status, "Ready") == "True"
    assert condition(status, "Initialized") == "True"
    assert {s["name"]: (s["ready"], list(s["state"])) for s in status["containerStatuses"]} == {
        "app": (True, ["running"]),
        p.ENVOY_CONTAINER: (True, ["running"]),
        p.AGENT_CONTAINER: (True, ["running"]),
    }
    (init,) = status["initContainerStatuses"]
    assert init["state"]["terminated"]["exitCode"] == 0
    assert status["qosClass"] == "Burstable"


# -- Services ----------------------------------------------------------------------------------------------------


def reporter_pod(cluster: Cluster, name: str, **spec: Any) -> RunningPod:
    cluster.pod(
        name,
        [
            {
                "name": "server",
                "image": "demo/reporter:1",
                "args": ["serve", name, "8080"],
                "ports": [{"name": "http", "containerPort": 8080}],
            }
        ],
        labels={"app": "reporter"},
        securityContext={"runAsUser": SERVER_UID},
        **spec,
    )
    running = cluster.kubelet.run_pod(NS, name)
    running.wait_for_log("server", "listening 8080")
    return running


def connect(pod: RunningPod, host: str, port: int) -> subprocess.CompletedProcess[str]:
    assert pod.pod is not None
    return pod.pod.run([PYTHON, REPORTER, "connect", host, str(port)], uid=CLIENT_UID, check=False)


@pytest.fixture(scope="module")
def client(cluster: Cluster) -> RunningPod:
    token = {"serviceAccountToken": {"path": "token", "audience": "mesh-identity", "expirationSeconds": 600}}
    cluster.pod(
        "client",
        [
            {
                "name": "sleep",
                "image": "busybox:1",
                "volumeMounts": [{"name": "token", "mountPath": "/tmp/kubelet-token"}],
            }
        ],
        securityContext={"runAsUser": CLIENT_UID},
        volumes=[{"name": "token", "projected": {"sources": [token]}}],
    )
    return cluster.kubelet.run_pod(NS, "client")


def test_a_cluster_ip_reaches_the_ready_pods_and_follows_the_endpoint_slices(
    cluster: Cluster, client: RunningPod
) -> None:
    a = reporter_pod(cluster, "rep-a")
    b = reporter_pod(cluster, "rep-b")
    cluster.create(
        "Service",
        {
            "apiVersion": "v1",
            "kind": "Service",
            "metadata": {"name": "reporter"},
            "spec": {"selector": {"app": "reporter"}, "ports": [{"name": "http", "port": 80, "targetPort": "http"}]},
        },
    )
    cluster_ip = cluster.get("Service", "reporter")["spec"]["clusterIP"]
    assert cluster_ip.startswith("10.96.")
    routes = cluster.kubelet.wait_for_endpoints(NS, "reporter", 2)
    assert sorted(routes[0].endpoints) == sorted([(a.ip, 8080), (b.ip, 8080)])
    seen = set()
    for _attempt in range(60):
        done = connect(client, cluster_ip, 80)
        assert done.returncode == 0, done.stdout + done.stderr
        label, uid, local = done.stdout.split()[:3]
        assert uid == f"uid={SERVER_UID}"
        assert local == f"local={a.ip if label == 'rep-a' else b.ip}:8080"
        seen.add(label)
        if seen == {"rep-a", "rep-b"}:
            break
    assert seen == {"rep-a", "rep-b"}  # both endpoints, chosen at random
    # a pod reaches the ClusterIP of a Service it is itself behind (the hairpin through the host)
    assert connect(a, cluster_ip, 80).returncode == 0
    # a port the Service does not have is refused, not sent out of the machine
    refused = connect(client, cluster_ip, 81)
    assert refused.returncode == 1
    assert "Connection refused" in refused.stdout

    cluster.kubelet.stop_pod(NS, "rep-b")
    assert cluster.get("Pod", "rep-b")["status"]["phase"] == "Failed"  # SIGTERM: exit code 143
    cluster.kubelet.wait_for_endpoints(NS, "reporter", 1)
    for _attempt in range(5):
        assert connect(client, cluster_ip, 80).stdout.startswith("rep-a ")
    # the hairpin: rep-a reaches itself through the ClusterIP (out of its own bridge port and back)
    assert connect(a, cluster_ip, 80).stdout.startswith("rep-a ")
    cluster.kubelet.stop_pod(NS, "rep-a")
    cluster.kubelet.wait_for_endpoints(NS, "reporter", 0)
    done = connect(client, cluster_ip, 80)
    assert done.returncode == 1
    assert "Connection refused" in done.stdout  # kube-proxy's REJECT of a Service without ready endpoints


def test_a_cluster_ip_reaches_a_process_of_this_machine_through_a_manual_endpoint_slice(
    cluster: Cluster, client: RunningPod
) -> None:
    # a control plane running on this machine (not in a pod), reached from the pods by a ClusterIP, as a
    # Service without a selector and an EndpointSlice of the bridge's address (the node's, for the pods)
    gateway = str(cluster.network.gateway)
    listener = socket.create_server((gateway, 0))
    port = listener.getsockname()[1]

    def answer() -> None:
        conn, peer = listener.accept()
        with conn:
            conn.sendall(f"host peer={peer[0]}".encode())

    thread = threading.Thread(target=answer, daemon=True)
    thread.start()
    try:
        cluster.create(
            "Service",
            {
                "apiVersion": "v1",
                "kind": "Service",
                "metadata": {"name": "control-plane"},
                "spec": {"ports": [{"name": "grpc", "port": 8443, "targetPort": port}]},
            },
        )
        cluster.create(
            "EndpointSlice",
            {
                "apiVersion": "discovery.k8s.io/v1",
                "kind": "EndpointSlice",
                "metadata": {"name": "control-plane-1", "labels": {"kubernetes.io/service-name": "control-plane"}},
                "addressType": "IPv4",
                "endpoints": [{"addresses": [gateway], "conditions": {"ready": True}}],
                "ports": [{"name": "grpc", "port": port, "protocol": "TCP"}],
            },
        )
        cluster.kubelet.wait_for_endpoints(NS, "control-plane", 1)
        cluster_ip = cluster.get("Service", "control-plane")["spec"]["clusterIP"]
        done = connect(client, cluster_ip, 8443)
        assert done.returncode == 0, done.stdout
        assert done.stdout.strip() == f"host peer={client.ip}"  # delivered here: no MASQUERADE needed
    finally:
        thread.join(5)
        listener.close()


def test_a_projected_token_is_renewed_after_80_percent_of_its_life(cluster: Cluster) -> None:
    token = {"serviceAccountToken": {"path": "token", "expirationSeconds": 1}}  # API validation would say 600
    cluster.pod(
        "renew",
        [{"name": "sleep", "image": "busybox:1", "volumeMounts": [{"name": "t", "mountPath": "/tmp/kubelet-token"}]}],
        volumes=[{"name": "t", "projected": {"sources": [token]}}],
    )
    running = cluster.kubelet.run_pod(NS, "renew")
    first = running.exec("sleep", ["cat", "/tmp/kubelet-token/token"]).stdout
    deadline = time.monotonic() + 10
    while running.exec("sleep", ["cat", "/tmp/kubelet-token/token"]).stdout == first:
        assert time.monotonic() < deadline, "the token was not renewed"
        time.sleep(0.1)
    cluster.kubelet.stop_pod(NS, "renew")


def test_a_token_of_a_pod_with_one_user_is_its_own(client: RunningPod) -> None:
    stat = client.exec("sleep", ["stat", "-L", "-c", "%a %u", "/tmp/kubelet-token/token"]).stdout.split()
    assert stat == ["600", str(CLIENT_UID)]  # every container runs as one user: kubelet's FsUser
    assert client.exec("sleep", ["cat", "/tmp/kubelet-token/token"]).stdout.count(".") == 2


def test_fs_group_is_a_supplementary_group_and_owns_the_volumes(cluster: Cluster) -> None:
    token = {"serviceAccountToken": {"path": "token"}}
    mounts = [
        {"name": "t", "mountPath": "/tmp/kubelet-token"},
        {"name": "scratch", "mountPath": "/tmp/kubelet-scratch"},
    ]
    cluster.pod(
        "grp",
        [{"name": "sleep", "image": "busybox:1", "volumeMounts": mounts}],
        securityContext={"runAsUser": 1004, "fsGroup": 2000, "supplementalGroups": [2001]},
        volumes=[{"name": "t", "projected": {"sources": [token]}}, {"name": "scratch", "emptyDir": {}}],
    )
    running = cluster.kubelet.run_pod(NS, "grp")
    groups = next(
        line
        for line in Path(f"/proc/{running.containers['sleep'].pid}/status").read_text().splitlines()
        if line.startswith("Groups:")
    )
    assert groups.split()[1:] == ["2000", "2001"]
    stat = running.exec("sleep", ["stat", "-L", "-c", "%a %u %g", "/tmp/kubelet-token/token"]).stdout.split()
    assert stat == ["640", "1004", "2000"]  # kubelet: 0600 for FsUser, then group-readable for fsGroup
    scratch = running.exec("sleep", ["stat", "-c", "%a %g", "/tmp/kubelet-scratch"]).stdout.split()
    assert scratch == ["2777", "2000"]
    cluster.kubelet.stop_pod(NS, "grp")


def test_a_deleted_pod_is_stopped(cluster: Cluster) -> None:
    running = reporter_pod(cluster, "rep-gone")
    process = running.containers["server"]
    cluster.server.store.delete(kind_named(cluster.server.kinds, "Pod"), NS, "rep-gone", {})
    process.popen.wait(10)
    deadline = time.monotonic() + 10
    while any(r.name == "rep-gone" for r in cluster.kubelet.pods):
        assert time.monotonic() < deadline
        time.sleep(0.05)
    assert running.pod is not None
    assert running.pod.netns not in netns_names()


def test_an_exited_container_is_reported_terminated(cluster: Cluster) -> None:
    cluster.pod("once", [{"name": "job", "image": "busybox:1", "command": ["sh", "-c", "echo done; exit 0"]}])
    running = cluster.kubelet.run_pod(NS, "once")
    running.wait_for_log("job", "done")
    status = cluster.wait_for_status("once", lambda s: s.get("phase") == "Succeeded")
    assert condition(status, "Ready") == "False"
    assert status["containerStatuses"][0]["state"]["terminated"]["reason"] == "Completed"
    cluster.kubelet.stop_pod(NS, "once")


# -- refused pods --------------------------------------------------------------------------------------------------


def test_a_failing_init_container_fails_the_pod(cluster: Cluster) -> None:
    cluster.pod(
        "broken",
        [{"name": "app", "image": "busybox:1"}],
        initContainers=[
            {"name": "fail", "image": "busybox:1", "command": ["sh", "-c", "echo no rules for you >&2; exit 3"]}
        ],
    )
    with pytest.raises(KubeletError, match=r"pod shop/broken: init container 'fail' exited 3: no rules for you"):
        cluster.kubelet.run_pod(NS, "broken")
    status = cluster.get("Pod", "broken")["status"]
    assert status["phase"] == "Failed"
    assert status["initContainerStatuses"][0]["state"]["terminated"]["exitCode"] == 3
    assert status["containerStatuses"][0]["state"]["waiting"]["reason"] == "PodInitializing"
    running = cluster.kubelet.pod(NS, "broken")
    assert running.containers == {}  # the app never started
    cluster.kubelet.stop_pod(NS, "broken")
    assert cluster.get("Pod", "broken")["status"]["phase"] == "Failed"


def test_an_image_not_in_the_map_is_refused_with_the_containers_name(cluster: Cluster) -> None:
    cluster.pod("noimage", [{"name": "app", "image": "busybox:1"}, {"name": "extra", "image": "example.org/nope:1"}])
    with pytest.raises(
        KubeletError, match=r"pod shop/noimage: container 'extra': image 'example.org/nope:1' is not in the kubelet"
    ):
        cluster.kubelet.run_pod(NS, "noimage")
    statuses = cluster.get("Pod", "noimage")["status"]["containerStatuses"]
    assert statuses[1]["state"]["waiting"]["reason"] == "ErrImagePull"
    assert "noimage" not in {r.name for r in cluster.kubelet.pods}  # nothing was made for it


def test_an_unsupported_env_source_is_refused_with_its_name(cluster: Cluster) -> None:
    secret = {"secretKeyRef": {"name": "s", "key": "k"}}
    cluster.pod("badenv", [{"name": "app", "image": "busybox:1", "env": [{"name": "PASSWORD", "valueFrom": secret}]}])
    with pytest.raises(KubeletError, match=r"container 'app': env 'PASSWORD': valueFrom secretKeyRef is not supported"):
        cluster.kubelet.run_pod(NS, "badenv")
    statuses = cluster.get("Pod", "badenv")["status"]["containerStatuses"]
    assert statuses[0]["state"]["waiting"]["reason"] == "CreateContainerConfigError"


def test_a_mount_point_with_no_parent_on_this_machine_is_refused(cluster: Cluster) -> None:
    mount = [{"name": "scratch", "mountPath": "/kubelet-no-such-top-level-dir/x"}]
    cluster.pod(
        "toplevel",
        [{"name": "app", "image": "busybox:1", "volumeMounts": mount}],
        volumes=[{"name": "scratch", "emptyDir": {}}],
    )
    with pytest.raises(
        KubeletError, match=r"container 'app': mountPath '/kubelet-no-such-top-level-dir/x': no ancestor"
    ):
        cluster.kubelet.run_pod(NS, "toplevel")


def test_a_container_that_cannot_be_set_up_is_named_with_the_reason(cluster: Cluster) -> None:
    cluster.pod("nowd", [{"name": "app", "image": "busybox:1", "workingDir": "/kubelet-no-such-dir"}])
    with pytest.raises(KubeletError, match=r"container 'app' could not be started: .*/kubelet-no-such-dir"):
        cluster.kubelet.run_pod(NS, "nowd")
    waiting = cluster.get("Pod", "nowd")["status"]["containerStatuses"][0]["state"]["waiting"]
    assert waiting["reason"] == "CreateContainerError"
    cluster.kubelet.stop_pod(NS, "nowd")


def test_a_missing_config_map_is_waited_for_then_named(cluster: Cluster) -> None:
    cluster.kubelet.volume_timeout = 0.3
    try:
        cluster.pod(
            "nocm",
            [{"name": "app", "image": "busybox:1", "volumeMounts": [{"name": "cm", "mountPath": "/tmp/kubelet-cm"}]}],
            volumes=[{"name": "cm", "configMap": {"name": "absent"}}],
        )
        with pytest.raises(KubeletError, match=r"volume 'cm': configmap \"absent\" not found in namespace shop"):
            cluster.kubelet.run_pod(NS, "nocm")
    finally:
        cluster.kubelet.volume_timeout = 10.0
    cluster.kubelet.stop_pod(NS, "nocm")


# -- teardown ------------------------------------------------------------------------------------------------------


def test_teardown_leaves_nothing(cluster: Cluster) -> None:
    assert cluster.kubelet.pods  # the module's kubelet runs pods: its network has services
    clusters = make_cluster("10.97.0.0/24")
    other = next(clusters)
    other.pod(
        "mem",
        [{"name": "app", "image": "busybox:1", "volumeMounts": [{"name": "scratch", "mountPath": "/run/kubelet-x/y"}]}],
        volumes=[{"name": "scratch", "emptyDir": {"medium": "Memory", "sizeLimit": "1Mi"}}],
    )
    running = other.kubelet.run_pod(NS, "mem")
    assert running.exec("app", ["stat", "-f", "-c", "%T", "/run/kubelet-x/y"]).stdout.strip() == "tmpfs"
    assert Path(IP_FORWARD).read_text().strip() == "1"
    prefix = other.network.prefix
    assert any(prefix in line for line in iptables_rules())
    assert other.kubelet.leftovers()  # a pid, a mount, directories, a namespace, chains
    with pytest.raises(StopIteration):
        next(clusters)  # the kubelet's stop(), leftovers() == [], then the network's teardown
    assert not any(prefix in line for line in iptables_rules())
    assert not any(name.startswith(prefix) for name in netns_names())
    # the module's network still has services: ip_forward stays (its teardown writes the value back)
    assert cluster.network.prefix in service_users()
    assert Path(IP_FORWARD).read_text().strip() == "1"
    assert not Path("/run/kubelet-x").exists()
    assert not other.kubelet.directory.exists()
    other.kubelet.stop()  # idempotent
    assert other.kubelet.leftovers() == []


def iptables_rules() -> list[str]:
    found = []
    for table in ("nat", "filter"):
        done = subprocess.run(["iptables", "-t", table, "-S"], capture_output=True, text=True, check=True)
        found += done.stdout.splitlines()
    return found


# -- the rules, without processes ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("command", "args", "argv"),
    [
        ([], [], ["/entry", "--default"]),  # ENTRYPOINT + CMD
        ([], ["--mine"], ["/entry", "--mine"]),  # args replace CMD
        (["run"], [], ["/usr/bin/run"]),  # command replaces ENTRYPOINT, and CMD goes with it
        (["run"], ["-x"], ["/usr/bin/run", "-x"]),
    ],
)
def test_the_kubernetes_command_and_args_rule(command, args, argv) -> None:
    image = Image(entrypoint=("/entry",), cmd=("--default",), binaries={"run": "/usr/bin/run"})
    assert container_argv(image, command, args) == argv
    assert container_argv(["/entry"], [], ["a"]) == ["/entry", "a"]  # a list: the entrypoint
    with pytest.raises(KubeletError, match="no command"):
        container_argv([], [], [])


def test_expansion_and_downward_api_formats() -> None:
    env = {"POD_NAME": "web", "NS": "shop"}
    assert expand("$(POD_NAME).$(NS)", env) == "web.shop"
    assert expand("$$(POD_NAME) $(MISSING) $x $", env) == "$(POD_NAME) $(MISSING) $x $"
    assert format_map({"b": 'say "hi"\n', "a": "1"}) == 'a="1"\nb="say \\"hi\\"\\n"'
    assert (parse_quantity("1Mi"), parse_quantity("64M"), parse_quantity("100")) == (2**20, 64 * 10**6, 100)
