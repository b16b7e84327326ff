"""Real Envoy sidecars with mTLS from our xDS server, on the built-in CA."""

from __future__ import annotations

import socket
import ssl
from collections.abc import Iterator
from pathlib import Path

import pytest
from envoy.config.listener.v3 import listener_components_pb2, listener_pb2

from mesh_identity.demo.apps import get_json
from mesh_identity.mesh.model import Address
from tests.e2e.conftest import TRUST_DOMAIN, AuthorityIssuer, builtin_authority
from tests.e2e.harness import (
    RequestLoop,
    RunningMesh,
    loopback_mesh,
    peer_certificate,
    start_mesh,
    tls_client_context,
    tls_get,
    xfcc_hash,
)
from tests.waiting import wait_until
from xds_sds.protocol.typeurls import LISTENER
from xds_sds.resources.packing import pack, socket_address

pytestmark = pytest.mark.e2e

FRONTEND = "spiffe://e2e.mesh/ns/e2e/sa/frontend"
BACKEND = "spiffe://e2e.mesh/ns/e2e/sa/backend"


@pytest.fixture(params=["sotw", "delta"])
def running(request: pytest.FixtureRequest, issuer: AuthorityIssuer, tmp_path: Path) -> Iterator[RunningMesh]:
    mesh = loopback_mesh(TRUST_DOMAIN, {"frontend": ["backend"], "backend": []})
    with start_mesh(issuer, mesh, tmp_path / "mesh", delta=request.param == "delta") as running:
        yield running


def test_traffic_flows_over_mtls_and_the_server_app_sees_the_client_identity(running: RunningMesh) -> None:
    status, answer = running.request("frontend", "backend")
    assert status == 200, answer
    assert (answer["service"], answer["peer"]) == ("backend", FRONTEND)
    frontend_svid = running.svids[running.mesh.service("frontend").identity]
    assert answer["xfcc"] == f"By={BACKEND};Hash={xfcc_hash(frontend_svid)};URI={FRONTEND}"


def test_admin_certs_show_our_svids_and_bundle(running: RunningMesh) -> None:
    for service in ("frontend", "backend"):
        svid = running.svids[running.mesh.service(service).identity]
        envoy = running.sidecar(service)
        assert svid.leaf.serial_number in envoy.cert_serials(svid.spiffe_id)
        assert {c.serial_number for c in running.issuer.bundle().authorities} <= envoy.ca_serials()


def test_config_dump_shows_the_versions_we_served(running: RunningMesh) -> None:
    for node, envoy in running.sidecars.items():
        served = running.xds.cache.get(node, LISTENER)
        dump = envoy.config_dump("dynamic_listeners")
        applied = {c["name"]: c["active_state"]["version_info"] for c in dump["configs"]}
        if running.delta:  # incremental: each resource carries its own version
            assert applied == {name: r.version for name, r in served.resources.items()}
        else:  # state of the world: the version of the whole set
            assert applied == dict.fromkeys(served.resources, served.version)


def test_inbound_port_requires_a_mesh_client_certificate(running: RunningMesh, tmp_path: Path) -> None:
    inbound = running.inbound("backend")
    trusted = running.issuer.bundle().pem()
    # a mesh certificate gets in, and the app sees its SPIFFE ID (so the refusals below are meaningful)
    insider = running.issuer.issue(running.mesh.service("frontend").identity)
    answer = tls_get(inbound, tls_client_context(trusted, insider, tmp_path / "insider"))
    assert answer.startswith(b"HTTP/1.1 200")
    assert f'"peer": "{FRONTEND}"'.encode() in answer

    envoy = running.sidecar("backend")
    prefix = f"listener.{inbound.host}_{inbound.port}.ssl."
    with pytest.raises(ssl.SSLError):
        tls_get(inbound, tls_client_context(trusted, None, tmp_path / "none"))
    assert envoy.stats(prefix + "fail_verify_no_cert") == {prefix + "fail_verify_no_cert": 1}

    foreign = AuthorityIssuer(builtin_authority(tmp_path / "foreign-ca")).issue(insider.spiffe_id)
    with pytest.raises(ssl.SSLError):
        tls_get(inbound, tls_client_context(trusted, foreign, tmp_path / "foreign"))
    assert envoy.stats(prefix + "fail_verify_error") == {prefix + "fail_verify_error": 1}

    with socket.create_connection((inbound.host, inbound.port), timeout=10) as plain:
        plain.sendall(b"GET / HTTP/1.1\r\nhost: backend\r\n\r\n")
        assert plain.recv(65536) == b""  # closed: no plaintext answer


def test_rotation_under_traffic_has_zero_failures_and_no_restart(running: RunningMesh, tmp_path: Path) -> None:
    pids = {name: envoy.pid for name, envoy in running.sidecars.items()}
    old_backend = running.svids[running.mesh.service("backend").identity]
    with RequestLoop(running) as loop:
        loop.wait_for(20)
        for round_ in range(2):
            new_backend = running.rotate("backend")
            new_frontend = running.rotate("frontend")
            running.wait_serving("backend", new_backend)
            running.wait_serving("frontend", new_frontend)
            # the hop between the sidecars now uses the new client certificate ...
            loop.wait_for_hash(xfcc_hash(new_frontend))
            # ... and a new connection to backend's inbound port is served with its new certificate
            client = running.issuer.issue(running.mesh.service("frontend").identity)
            context = tls_client_context(running.issuer.bundle().pem(), client, tmp_path / f"round{round_}")
            assert peer_certificate(running.inbound("backend"), context).serial_number == new_backend.leaf.serial_number
            loop.wait_for(20)
    assert loop.failures == []
    assert loop.ok >= 60
    assert loop.peers == {FRONTEND}
    assert old_backend.leaf.serial_number not in running.sidecar("backend").cert_serials(BACKEND)
    assert {name: envoy.pid for name, envoy in running.sidecars.items()} == pids
    assert all(envoy.process is not None and envoy.process.poll() is None for envoy in running.sidecars.values())


def test_control_plane_restart_envoys_reconnect_and_traffic_continues(running: RunningMesh) -> None:
    nodes = set(running.mesh.nodes())
    wait_until(lambda: running.xds.connected_nodes() == nodes, "every sidecar to be connected")
    with RequestLoop(running) as loop:
        loop.wait_for(10)
        running.stop_control_plane()
        for envoy in running.sidecars.values():
            wait_until(
                lambda e=envoy: e.stats("control_plane.connected_state").get("control_plane.connected_state") == 0,
                f"{envoy.name} to notice the control plane is gone",
            )
        loop.wait_for(10)  # the sidecars keep their config while the control plane is down
        restarted = running.start_control_plane()
        wait_until(lambda: restarted.connected_nodes() == nodes, "every sidecar to reconnect")
        # resynced: a rotation after the restart reaches the sidecar and is used
        new_frontend = running.rotate("frontend")
        running.wait_serving("frontend", new_frontend)
        loop.wait_for_hash(xfcc_hash(new_frontend))
        loop.wait_for(10)
    assert loop.failures == []


def test_a_rejected_config_is_nacked_and_the_last_good_one_stays(running: RunningMesh) -> None:
    node = running.mesh.service("backend").instances[0].node
    broken = listener_pb2.Listener(
        name="broken",
        address=socket_address(Address("127.0.0.1", 1)),
        filter_chains=[
            listener_components_pb2.FilterChain(
                filters=[
                    listener_components_pb2.Filter(name="no.such.filter", typed_config=pack(listener_pb2.Listener()))
                ]
            )
        ],
    )
    running.xds.cache.update_resources(node, LISTENER, {"broken": broken})
    nack = wait_until(lambda: running.xds.acks.last_nack(node, LISTENER), "backend's sidecar to reject the listener")
    assert "broken" in nack.error
    assert running.xds.server.metrics.value("mesh_identity_xds_nacks_total", type="Listener") >= 1
    assert "broken" not in running.sidecar("backend").listeners()
    status, answer = running.request("frontend", "backend")
    assert (status, answer["peer"]) == (200, FRONTEND)


def test_demo_app_shows_both_hops(running: RunningMesh) -> None:
    frontend_app = running.mesh.service("frontend").instances[0].app
    status, answer = get_json(frontend_app, "/call/backend")
    assert status == 200, answer
    assert answer["service"] == "frontend"
    assert (answer["upstream"]["service"], answer["upstream"]["peer"]) == ("backend", FRONTEND)
