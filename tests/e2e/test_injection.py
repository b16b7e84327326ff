"""Sidecar injection end to end, in the world of tests/e2e/injectshop.py (read its docstring for the shop): pods
applied with kubectl come back injected, the tests' kubelet runs them in their own network namespaces, and an
unmodified app's plain call to a ClusterIP is carried over mTLS by its captured sidecar. Needs root, Debian's
iptables and kubectl (deselected without kubectl, as the other kubectl e2e tests)."""

from __future__ import annotations

import base64
import json
import socket
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.e2e.injectshop import CLUSTER_IP, Shop, identity, pod_manifest, running_shop
from tests.waiting import wait_until

pytestmark = pytest.mark.e2e

PODS = {
    "a-0": pod_manifest("a-0", "a", {"app": "a"}),
    "b-0": pod_manifest("b-0", "b", {"app": "b"}),
    "c-0": pod_manifest("c-0", "c", {"app": "c"}),
    "d-0": pod_manifest("d-0", "d", {"app": "d"}, {"mesh-identity.io/inject": "false"}),
    "e-0": pod_manifest("e-0", "e", {"app": "e"}, {"mesh-identity.io/workload-api": "true"}),
}
SPIFFE_CLIENT = Path(__file__).parents[1] / "agent" / "spiffe_client.py"  # the real py-spiffe client


@pytest.fixture(scope="module")
def shop(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Shop]:
    with running_shop(tmp_path_factory.mktemp("injection"), "10.99.77.0/24", PODS) as running:
        yield running


def test_pods_come_back_injected_and_an_opted_out_one_does_not(shop: Shop) -> None:
    for name in ("a-0", "b-0", "c-0", "e-0"):
        spec = shop.applied[name]["spec"]
        assert [c["name"] for c in spec["initContainers"]] == ["mesh-identity-capture"]
        assert [c["name"] for c in spec["containers"]] == ["app", "mesh-identity-envoy", "mesh-identity-agent"]
    assert "initContainers" not in shop.applied["d-0"]["spec"]
    assert [c["name"] for c in shop.applied["d-0"]["spec"]["containers"]] == ["app"]
    assert "MESH_OUTBOUND" in shop.iptables("a-0") and "MESH_INBOUND" in shop.iptables("b-0")
    assert "MESH_" not in shop.iptables("d-0")  # not captured: no rule of ours in its namespace


def test_an_unmodified_app_calls_the_cluster_ip_and_reaches_b_over_mtls_with_its_identity(shop: Shop) -> None:
    _, body = wait_until(
        lambda: next((r for r in [shop.get("a-0", f"http://{CLUSTER_IP}/")] if r[0] == 200), None),
        "a's call to b's ClusterIP",
        60,
    )
    answer = json.loads(body)
    assert answer["service"] == "b-0"
    assert answer["peer"] == str(identity("a"))  # from the XFCC header B's sidecar set: A's SPIFFE ID
    assert f"URI={identity('a')}" in answer["xfcc"]
    stats = shop.envoy_admin("a-0", "/stats?filter=^listener\\.0\\.0\\.0\\.0_15001\\.downstream_cx_total$")
    assert int(stats.split(":")[1]) >= 1  # the app's connection went through the capture listener


def test_a_caller_no_traffic_target_names_gets_403(shop: Shop) -> None:
    wait_until(lambda: shop.get("a-0", f"http://{CLUSTER_IP}/")[0] == 200, "b reachable", 60)
    status, _ = shop.get("c-0", f"http://{CLUSTER_IP}/")
    assert status == 403


def test_bs_ports_refuse_plaintext_from_outside_its_pod(shop: Shop) -> None:
    b = shop.pods["b-0"]
    for port in (8080, 15003):  # the app's port is redirected to the mTLS listener; that one wants TLS
        with socket.create_connection((b.ip, port), timeout=10) as connection:
            connection.sendall(b"GET / HTTP/1.1\r\nHost: b\r\nConnection: close\r\n\r\n")
            connection.settimeout(10)
            received = b""
            try:
                while chunk := connection.recv(4096):
                    received += chunk
            except ConnectionResetError:
                pass
        assert b"HTTP/1." not in received, (port, received[:200])  # no plaintext answer, only the TLS listener's close
    # and the opted-out pod's plain call to b's ClusterIP (kube-proxy's DNAT to b-0:8080) is refused the same way
    status, detail = shop.get("d-0", f"http://{CLUSTER_IP}/")
    assert status is None, detail


def test_envoys_own_traffic_is_not_captured_and_egress_is_denied(shop: Shop) -> None:
    wait_until(lambda: shop.get("a-0", f"http://{CLUSTER_IP}/")[0] == 200, "b reachable", 60)
    rules = shop.iptables("a-0")
    owner = [line for line in rules.splitlines() if "owner UID match 1337" in line]
    assert owner and int(owner[0].split()[0]) > 0  # Envoy's own packets matched its RETURN rule: not redirected
    # a destination outside the mesh: the opted-out pod reaches it, the captured one is closed (egress: deny)
    assert shop.get("d-0", shop.outside.url)[0] == 200
    status, detail = shop.get("a-0", shop.outside.url)
    assert status is None, detail


def test_no_secret_holds_a_private_key_and_no_pod_mounts_one(shop: Shop) -> None:
    secrets = shop.cluster.core.list_secret_for_all_namespaces().items
    for secret in secrets:
        for value in (secret.data or {}).values():
            assert b"PRIVATE KEY" not in base64.b64decode(value), secret.metadata.name
    assert secrets == []  # the product wrote none
    for name, pod in shop.applied.items():
        text = yaml.safe_dump(pod)
        assert "secretName" not in text and "secretKeyRef" not in text and "PRIVATE KEY" not in text, name


def test_no_smi_object_was_refused_while_the_pods_started(shop: Shop) -> None:
    # b's pod runs before its EndpointSlice lists it ready; meanwhile a-to-b (HTTPRouteGroup rules) must hold
    events = shop.cluster.server.objects(shop.cluster.kind("Event"), "shop")
    assert [e["message"] for e in events if e.get("reason") == "InvalidPolicy"] == []


def _spiffe(shop: Shop, pod: str, *args: str, uid: int | None = None) -> tuple[int, Any]:
    done = shop.pods[pod].exec("app", [sys.executable, str(SPIFFE_CLIENT), *args], uid=uid, check=False, timeout=60)
    lines = done.stdout.strip().splitlines()
    return done.returncode, json.loads(lines[-1]) if lines else done.stderr


def test_an_app_that_asks_for_the_workload_api_gets_its_pods_identity_from_the_agent(shop: Shop) -> None:
    code, svids = wait_until(
        lambda: next((r for r in [_spiffe(shop, "e-0", "x509")] if r[0] == 0), None), "e's X.509-SVID", 60
    )
    [svid] = svids
    assert svid["spiffe_id"] == str(identity("e")) and svid["chain"] >= 2
    code, jwt = _spiffe(shop, "e-0", "jwt", "payments")
    assert code == 0 and jwt["spiffe_id"] == str(identity("e")) and jwt["audience"] == ["payments"]
    code, checked = _spiffe(shop, "e-0", "validate", jwt["token"], "payments")
    assert code == 0 and checked["spiffe_id"] == str(identity("e"))


def test_the_workload_api_serves_no_other_user_and_no_pod_that_did_not_ask(shop: Shop) -> None:
    code, answer = _spiffe(shop, "e-0", "x509", uid=4242)  # a user the pod does not name
    assert code == 3 and answer["error"], answer
    assert str(identity("e")) not in json.dumps(answer)
    done = shop.pods["a-0"].exec("app", ["sh", "-c", "test -e /var/run/mesh-identity/sockets"], check=False)
    assert done.returncode == 1  # a-0 did not ask: its app has no socket at all
    assert "SPIFFE_ENDPOINT_SOCKET" not in json.dumps(shop.applied["a-0"]["spec"]["containers"][0])
