"""Transparent capture in real network namespaces: pod A runs the init container's command of
``mesh_identity.inject.rules`` exactly as the webhook writes it, then small TCP servers stand in for Envoy's
listeners (as UID 1337) and the apps, and report what ``SO_ORIGINAL_DST`` says.

Pods: A (captured), B (a peer with an app on 8080 and on the excluded port 9090), C (in an excluded CIDR),
D (the same rules applied one argv at a time, to compare with A).
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from mesh_identity.inject.rules import (
    AGENT_UID,
    OUTBOUND_PORT,
    PROXY_UID,
    CaptureSettings,
    capture_rules,
    shell_command,
)
from mesh_identity.mesh.ports import INBOUND_PORT, STATS_PORT
from tests.fakes.kube.podrunner import Pod, PodNetwork

PYTHON = os.path.realpath(sys.executable)
REPORTER = str(Path(__file__).with_name("reporter.py"))
APP_UID = 1001  # A's app (not Envoy)
PEER_UID = 1002
EXCLUDED_OUT = 9090
EXCLUDED_IN = 9091


@dataclass
class Pods:
    net: PodNetwork
    a: Pod
    b: Pod
    c: Pod
    d: Pod


def serve(pod: Pod, label: str, port: int, uid: int) -> None:
    pod.start([PYTHON, REPORTER, "serve", label, str(port)], uid=uid).expect_line(f"listening {port}")


def connect(pod: Pod, host: object, port: int, uid: int) -> str:
    done = pod.run([PYTHON, REPORTER, "connect", str(host), str(port)], uid=uid, check=False)
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout.strip()


def nat_rules(pod: Pod) -> list[str]:
    return pod.run(["iptables", "-t", "nat", "-S"]).stdout.splitlines()


@pytest.fixture(scope="module")
def pods() -> Iterator[Pods]:
    net = PodNetwork()
    try:
        net.start()
        a, b, c, d = (net.add_pod(name) for name in "abcd")
        settings = CaptureSettings(
            exclude_inbound_ports=(STATS_PORT, EXCLUDED_IN),
            exclude_outbound_ports=(EXCLUDED_OUT,),
            exclude_outbound_cidrs=(f"{c.ip}/32",),
        )
        rules = capture_rules(settings)
        a.run(["sh", "-c", shell_command(rules)])  # the init container's command, as the webhook writes it
        for rule in rules:
            d.run(rule)
        serve(a, "a-outbound", OUTBOUND_PORT, PROXY_UID)  # Envoy's outbound capture listener
        serve(a, "a-inbound", INBOUND_PORT, PROXY_UID)  # Envoy's inbound (mTLS) listener
        serve(a, "a-app", 8080, APP_UID)
        serve(a, "a-excluded-in", EXCLUDED_IN, APP_UID)
        serve(b, "b-app", 8080, PEER_UID)
        serve(b, "b-excluded-out", EXCLUDED_OUT, PEER_UID)
        serve(c, "c-app", 8080, PEER_UID)
        yield Pods(net, a, b, c, d)
    finally:
        net.teardown()
        assert net.leftovers() == []


def test_the_rules_are_in_the_pod_only(pods: Pods) -> None:
    rules = nat_rules(pods.a)
    assert f"-A MESH_IN_REDIRECT -p tcp -j REDIRECT --to-ports {INBOUND_PORT}" in rules
    assert f"-A MESH_OUTBOUND -p tcp -m owner --uid-owner {PROXY_UID} -j RETURN" in rules
    assert rules == nat_rules(pods.d)  # `sh -c` of shell_command == the argv lists one by one
    assert not any("MESH_" in line for line in nat_rules(pods.b))
    host = subprocess.run(["iptables", "-t", "nat", "-S"], capture_output=True, text=True, check=True).stdout
    assert "MESH_" not in host


@pytest.mark.parametrize("uid", [APP_UID, 0])
def test_outbound_is_redirected_to_the_capture_port_with_its_original_destination(pods: Pods, uid: int) -> None:
    answer = connect(pods.a, pods.b.ip, 8080, uid)
    assert answer == f"a-outbound uid={PROXY_UID} local=127.0.0.1:{OUTBOUND_PORT} original_dst={pods.b.ip}:8080"


@pytest.mark.parametrize("uid", [PROXY_UID, AGENT_UID])
def test_envoys_and_the_agents_own_connections_are_not_redirected(pods: Pods, uid: int) -> None:
    assert connect(pods.a, pods.b.ip, 8080, uid).startswith(f"b-app uid={PEER_UID} local={pods.b.ip}:8080 ")


@pytest.mark.parametrize("host", ["127.0.0.1", "own-ip"])
def test_loopback_is_not_redirected(pods: Pods, host: str) -> None:
    target = pods.a.ip if host == "own-ip" else host
    assert connect(pods.a, target, 8080, PEER_UID).startswith(f"a-app uid={APP_UID} local={target}:8080 ")


def test_an_excluded_outbound_port_is_not_redirected(pods: Pods) -> None:
    assert connect(pods.a, pods.b.ip, EXCLUDED_OUT, APP_UID).startswith(f"b-excluded-out uid={PEER_UID} ")


def test_an_excluded_outbound_cidr_is_not_redirected(pods: Pods) -> None:
    assert connect(pods.a, pods.c.ip, 8080, APP_UID).startswith(f"c-app uid={PEER_UID} local={pods.c.ip}:8080 ")


def test_inbound_to_the_app_port_is_redirected_to_the_inbound_listener(pods: Pods) -> None:
    answer = connect(pods.b, pods.a.ip, 8080, PEER_UID)
    assert answer == f"a-inbound uid={PROXY_UID} local={pods.a.ip}:{INBOUND_PORT} original_dst={pods.a.ip}:8080"


def test_inbound_to_the_inbound_port_itself_is_not_redirected_again(pods: Pods) -> None:
    answer = connect(pods.b, pods.a.ip, INBOUND_PORT, PEER_UID)
    assert (
        answer == f"a-inbound uid={PROXY_UID} local={pods.a.ip}:{INBOUND_PORT} original_dst={pods.a.ip}:{INBOUND_PORT}"
    )


def test_an_excluded_inbound_port_is_not_redirected(pods: Pods) -> None:
    answer = connect(pods.b, pods.a.ip, EXCLUDED_IN, PEER_UID)
    assert (
        answer == f"a-excluded-in uid={APP_UID} local={pods.a.ip}:{EXCLUDED_IN} original_dst={pods.a.ip}:{EXCLUDED_IN}"
    )


def test_a_pod_without_the_rules_is_not_captured(pods: Pods) -> None:
    # B has no rules (an opted-out pod): its outbound connections go where they were going
    assert connect(pods.b, pods.c.ip, 8080, PEER_UID).startswith("c-app ")
