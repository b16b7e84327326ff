"""The bootstrap as Envoy sees it: valid, and its certificate renewable without a restart."""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from mesh_identity.mesh.model import Address
from mesh_identity.spiffe import SpiffeId
from tests.e2e.conftest import TRUST_DOMAIN, AuthorityIssuer
from tests.e2e.harness import ENVOY, RunningMesh, loopback_mesh, start_mesh
from tests.waiting import wait_until
from xds_sds.resources.bootstrap import renew_bootstrap, write_bootstrap

pytestmark = pytest.mark.e2e


@pytest.mark.parametrize("delta", [False, True])
def test_envoy_validates_the_bootstrap(issuer: AuthorityIssuer, tmp_path: Path, delta: bool) -> None:
    identity = SpiffeId.for_kubernetes(TRUST_DOMAIN, "e2e", "web")
    files = write_bootstrap(
        issuer.issue(identity), tmp_path, node="web-1", xds=Address("127.0.0.1", 1),
        server_identity=SpiffeId(TRUST_DOMAIN, "/mesh-identity/xds"), delta=delta,
    )  # fmt: skip
    result = subprocess.run(
        [str(ENVOY), "--mode", "validate", "-c", str(files.bootstrap), "--disable-hot-restart"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "configuration '" in result.stdout + result.stderr


@pytest.fixture
def running(issuer: AuthorityIssuer, tmp_path: Path) -> Iterator[RunningMesh]:
    mesh = loopback_mesh(TRUST_DOMAIN, {"frontend": ["backend"], "backend": []})
    with start_mesh(issuer, mesh, tmp_path / "mesh") as running:
        yield running


def test_bootstrap_certificate_renews_without_restart_and_is_used_to_reconnect(running: RunningMesh) -> None:
    node = "backend-1"
    envoy = running.sidecars[node]
    pid = envoy.pid
    identity = running.mesh.service("backend").identity
    [first] = [s for s in running.xds.server.streams() if s.node_id == node]
    renewed = running.issuer.issue(identity)
    renew_bootstrap(renewed, running.bootstraps[node].directory)
    wait_until(
        lambda: renewed.leaf.serial_number in envoy.cert_serials(identity), "Envoy to load the renewed bootstrap cert"
    )
    assert int(first.serial, 16) not in envoy.cert_serials(identity)
    assert envoy.pid == pid

    # the next connection to the control plane presents the renewed certificate
    running.stop_control_plane()
    restarted = running.start_control_plane()
    stream = wait_until(lambda: [s for s in restarted.server.streams() if s.node_id == node], f"{node} to reconnect")[0]
    assert stream.serial == renewed.serial
    status, answer = running.request("frontend", "backend")
    assert (status, answer["service"]) == (200, "backend")
