"""The pod runner itself: pods on a bridge reach each other, processes run as the uid asked for, and teardown
removes every namespace, veth and bridge by name, idempotently, also after a failure."""

from __future__ import annotations

import ipaddress
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.fakes.kube.podrunner import PodNetwork, PodRunnerError, link_exists, netns_names

PYTHON = os.path.realpath(sys.executable)
REPORTER = str(Path(__file__).with_name("reporter.py"))


def gone(net: PodNetwork) -> None:
    assert net.leftovers() == []
    namespaces = netns_names()
    assert not any(name.startswith(net.prefix) for name in namespaces), namespaces
    for pod in net.pods.values():
        assert not link_exists(pod.host_veth)
    assert not link_exists(net.bridge)


def test_pods_reach_each_other_and_run_as_their_uid() -> None:
    net = PodNetwork()
    try:
        net.start()
        a, b = net.add_pod("a"), net.add_pod("b")
        assert (a.ip, b.ip) == (ipaddress.IPv4Address("10.99.0.2"), ipaddress.IPv4Address("10.99.0.3"))
        assert f"inet {a.ip}/24" in a.run(["ip", "-4", "addr", "show", "dev", "eth0"]).stdout
        assert "default via 10.99.0.1 dev eth0" in a.run(["ip", "route"]).stdout
        server = b.start([PYTHON, REPORTER, "serve", "b-app", "8080"], uid=1002)
        server.expect_line("listening 8080")
        answer = a.run([PYTHON, REPORTER, "connect", str(b.ip), "8080"], uid=1001).stdout.strip()
        assert answer == f"b-app uid=1002 local={b.ip}:8080 original_dst=-"  # no NAT in B: no record
        assert a.run(["id", "-u"], uid=1001).stdout.strip() == "1001"
        assert a.run(["id", "-G"], uid=1001).stdout.strip() == "1001"
        # B's server is in B's namespace only: the host does not listen on 8080 on loopback
        assert b.run([PYTHON, REPORTER, "connect", "127.0.0.1", "8080"]).stdout.startswith("b-app")
        assert a.run([PYTHON, REPORTER, "connect", "127.0.0.1", "8080"], check=False).returncode == 1
    finally:
        net.teardown()
    gone(net)
    assert server.popen.poll() is not None  # stopped by its pid
    net.teardown()  # idempotent
    gone(net)


def test_teardown_after_a_failure_inside_the_block() -> None:
    with pytest.raises(RuntimeError, match="the test failed"), PodNetwork() as net:
        pod = net.add_pod("a")
        pod.start(["sleep", "600"], uid=1001)
        raise RuntimeError("the test failed")
    gone(net)


def test_teardown_of_a_half_made_pod_and_of_parts_already_gone() -> None:
    net = PodNetwork()
    try:
        net.start()
        a = net.add_pod("a")
        os.system(f"ip netns del {a.netns}")  # gone behind the runner's back (its veth pair with it)
        # the next pod's veth name is taken: its namespace exists, its veth cannot be made
        taken = f"{net.prefix}v1"
        assert os.system(f"ip link add {taken} type bridge") == 0
        with pytest.raises(PodRunnerError, match=f"ip link add {taken} type veth"):
            net.add_pod("b")
        assert net.pods["b"].netns in netns_names()
    finally:
        net.teardown()
    gone(net)


def test_a_process_left_inside_a_namespace_is_stopped() -> None:
    with PodNetwork() as net:
        pod = net.add_pod("a")
        # a grandchild that outlives its parent: not one of the runner's pids, but inside its namespace
        pod.run(["sh", "-c", "setsid sleep 600 >/dev/null 2>&1 < /dev/null &"])
        inside = subprocess.run(["ip", "netns", "pids", pod.netns], capture_output=True, text=True, check=True)
        assert inside.stdout.split()
    gone(net)


def test_the_subnet_must_be_free() -> None:
    with (
        PodNetwork() as net,
        pytest.raises(PodRunnerError, match=r"subnet 10\.99\.0\.0/24 overlaps the route 10\.99\.0\.0/24 dev mi"),
    ):
        PodNetwork().start()
    gone(net)


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda net: net.add_pod("A"), "pod name: 1-8 lowercase letters or digits, starting with a letter, got 'A'"),
        (lambda net: net.add_pod("toolongname"), "pod name: 1-8 lowercase letters or digits"),
        (lambda net: net.add_pod("a") and net.add_pod("a"), "pod name: 'a' already exists in mi"),
        (lambda net: net.add_pod("a").run("id"), "argv: an argv list of non-empty strings is required, got 'id'"),
        (lambda net: net.add_pod("a").run(["id", ""]), "argv: an argv list of non-empty strings is required"),
        (lambda net: net.add_pod("a").start(["id"], uid=-1), "uid: an integer 0..65534 is required, got -1"),
        (lambda net: net.add_pod("a").run(["false"]), "'ip netns exec mi.* false' exited 1"),
    ],
)
def test_refused_inputs_name_the_field(call, message) -> None:
    with PodNetwork() as net, pytest.raises(PodRunnerError, match=message):
        call(net)
    gone(net)


@pytest.mark.parametrize(
    ("subnet", "message"),
    [("10.99.0.0/25", "subnet: a /24 or larger is required, got '10.99.0.0/25'"), ("nope", "subnet: an IPv4 network")],
)
def test_refused_subnets(subnet, message) -> None:
    with pytest.raises(PodRunnerError, match=message):
        PodNetwork(subnet)


def test_add_pod_needs_a_started_network() -> None:
    net = PodNetwork()
    with pytest.raises(PodRunnerError, match=r"add_pod: start\(\) the network first"):
        net.add_pod("a")
    net.teardown()
    gone(net)
