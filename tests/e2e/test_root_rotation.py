"""Root rotation end to end through real Envoy: prepare, activate, retire; traffic never fails.

Each step is gated on evidence from the sidecars' ACKs (``MeshPublisher.nodes_trusting`` / ``nodes_serving``),
the way the rotation engine gates it.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from mesh_identity.svid import fingerprint_of
from tests.e2e.conftest import TRUST_DOMAIN, AuthorityIssuer
from tests.e2e.harness import RequestLoop, RunningMesh, loopback_mesh, start_mesh, xfcc_hash
from tests.waiting import wait_until
from xds_sds.resources.bootstrap import renew_bootstrap, renew_bootstrap_bundle

pytestmark = pytest.mark.e2e

FRONTEND = "spiffe://e2e.mesh/ns/e2e/sa/frontend"


@pytest.fixture
def running(issuer: AuthorityIssuer, tmp_path: Path) -> Iterator[RunningMesh]:
    mesh = loopback_mesh(TRUST_DOMAIN, {"frontend": ["backend"], "backend": []})
    with start_mesh(issuer, mesh, tmp_path / "mesh") as running:
        yield running


def _publish_bundle(running: RunningMesh) -> None:
    bundle = running.issuer.bundle()
    running.xds.update_bundle(bundle)
    for files in running.bootstraps.values():
        renew_bootstrap_bundle(bundle, files.directory)


def test_root_rotation_prepare_activate_retire_under_traffic(running: RunningMesh, issuer: AuthorityIssuer) -> None:
    authority, provider = issuer.authority, issuer.authority.provider
    nodes = frozenset(running.mesh.nodes())
    [old_root] = authority.bundle().authorities
    with RequestLoop(running) as loop:
        loop.wait_for(10)

        # prepare: the new root joins the bundle; wait until every sidecar has acknowledged it
        new_root = provider.prepare_root()
        authority.refresh_bundle()
        _publish_bundle(running)
        wait_until(lambda: running.xds.nodes_trusting(fingerprint_of(new_root)) == nodes, "all to trust the new root")
        for envoy in running.sidecars.values():
            wait_until(lambda e=envoy: new_root.serial_number in e.ca_serials(), f"{envoy.name} to load the new root")
        loop.wait_for(10)

        # activate: the new root signs a new intermediate, which signs every workload, the server, the bootstraps
        provider.activate_root()
        authority.rotate_intermediate(requested_by="e2e")
        served = {service: running.rotate(service) for service in running.mesh.services}
        running.xds.update_server_svid(issuer.issue(running.xds.server_identity))
        for node, files in running.bootstraps.items():
            found = running.mesh.instance(node)
            assert found is not None
            renew_bootstrap(issuer.issue(found[0].identity), files.directory)
        for service, svid in served.items():
            assert svid.chain[-1].issuer == new_root.subject
            running.wait_serving(service, svid)
            wait_until(lambda s=svid: running.xds.nodes_serving(s), f"{service}'s sidecar to acknowledge its SVID")
        loop.wait_for_hash(xfcc_hash(served["frontend"]))  # the hop uses the new-root certificate
        loop.wait_for(10)

        # retire: only the new root is left; wait until no sidecar trusts the old one any more
        provider.retire_root()
        authority.refresh_bundle()
        assert [fingerprint_of(c) for c in authority.bundle().authorities] == [fingerprint_of(new_root)]
        _publish_bundle(running)
        # A sidecar whose xDS stream still ran on its old-root bootstrap certificate has that stream ended by the
        # server here and reconnects with the renewed one before it can acknowledge the new bundle: on a loaded
        # machine that cycle has taken 10-60 s (over 30 s twice in full runs), hence the bound (why so long: open).
        try:
            wait_until(
                lambda: not running.xds.nodes_trusting(fingerprint_of(old_root)), "the old root to be dropped", 150.0
            )
        except AssertionError as err:
            still = sorted(running.xds.nodes_trusting(fingerprint_of(old_root)))
            raise AssertionError(f"{err}; sidecars still acknowledging a bundle with the old root: {still}") from None
        for envoy in running.sidecars.values():
            wait_until(
                lambda e=envoy: old_root.serial_number not in e.ca_serials(), f"{envoy.name} to drop the old root"
            )
        loop.wait_for(20)
    assert loop.failures == []
    assert loop.peers == {FRONTEND}
