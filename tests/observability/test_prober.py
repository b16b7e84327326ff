"""The prober of served certificates against real TLS servers (real handshakes, a real engine and CA).

Each sidecar here is a :class:`~tests.observability.tlsserver.TlsServer` presenting the chain a test chooses;
the clock is the test's, so "how long" is exact.
"""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from types import MappingProxyType

import pytest
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from mesh_identity.assembly import build_service
from mesh_identity.mesh.model import Address, Instance, Mesh, Protocol, Service
from mesh_identity.registry.base import StaticRegistry, control_plane_identity
from mesh_identity.server.service import Service as Server
from tests.e2e.conftest import builtin_authority
from tests.e2e.harness import free_address
from tests.observability.promserver import PROMTOOL
from tests.observability.tlsserver import TlsServer
from tests.rotation.helpers import TD, FakeClock, ids, make_config, provider_for
from tests.waiting import wait_until
from xds_sds.mesh.prober import SidecarProber, probe_interval, reload_grace

WEB, API = ids("web", "api")
CONTROL_PLANE = control_plane_identity(TD)


def mesh_of(**inbound: Address) -> Mesh:
    services = {
        name: Service(name, identity, Protocol.HTTP, (Instance(f"{name}-1", free_address(), inbound[name]),))
        for name, identity in (("web", WEB), ("api", API))
        if name in inbound
    }
    return Mesh(TD, MappingProxyType(services))


@dataclass
class Setup:
    server: Server
    clock: FakeClock
    prober: SidecarProber
    registry: StaticRegistry
    web: TlsServer
    api: TlsServer
    metrics: CollectorRegistry


@pytest.fixture
def setup(tmp_path: Path) -> Iterator[Setup]:
    clock = FakeClock()
    config = make_config(tmp_path)
    server = build_service(config, provider_for(config, clock=clock), identities=[WEB, API, CONTROL_PLANE], clock=clock)
    server.start(paused=True)
    roots = server.engine.bundles.bundle().pem()
    web = TlsServer(tmp_path / "web", roots).serve(server.engine.source(WEB).svid()).start()
    api = TlsServer(tmp_path / "api", roots).serve(server.engine.source(API).svid()).start()
    registry = StaticRegistry(mesh_of(web=web.address, api=api.address))
    metrics = CollectorRegistry()
    prober = SidecarProber(
        server.engine, registry, interval=timedelta(seconds=3), grace=timedelta(seconds=7.5), metrics=metrics,
        clock=clock,
    )  # fmt: skip
    prober.follow()
    try:
        yield Setup(server, clock, prober, registry, web, api, metrics)
    finally:
        prober.stop()
        web.stop()
        api.stop()
        server.stop()


def samples(metrics: CollectorRegistry) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    text = generate_latest(metrics).decode()
    return {
        (s.name, tuple(sorted((k, v) for k, v in s.labels.items() if k not in ("service", "spiffe_id")))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def test_a_sidecar_serving_its_newest_certificate(setup: Setup) -> None:
    found = {probe.target.node: probe for probe in setup.prober.probe_all()}
    web = setup.server.engine.source(WEB).svid()
    probe = found["web-1"]
    assert (probe.up, probe.serial, probe.newest, probe.chain_problem) == (True, web.serial, True, None)
    assert probe.not_after == web.not_after and probe.stale_seconds(setup.clock()) == 0
    # it presented the control plane's own SVID (the server records it once its side of the handshake is done)
    wait_until(lambda: setup.web.clients == [str(CONTROL_PLANE)], "the server to see the prober's certificate")
    values = samples(setup.metrics)
    node = (("node", "web-1"),)
    assert values[("mesh_identity_sidecar_probe_up", node)] == 1
    assert values[("mesh_identity_sidecar_served_certificate_info", (("node", "web-1"), ("serial", web.serial)))] == 1
    assert values[("mesh_identity_sidecar_certificate_newest", node)] == 1
    assert values[("mesh_identity_sidecar_certificate_stale_seconds", node)] == 0
    assert values[("mesh_identity_sidecar_certificate_chain_valid", node)] == 1
    assert values[("mesh_identity_sidecar_certificate_expiry_timestamp_seconds", node)] == web.not_after.timestamp()
    assert values[("mesh_identity_sidecar_reload_grace_seconds", ())] == 7.5
    assert values[("mesh_identity_sidecar_probes_total", (("result", "ok"),))] == 2


def test_a_superseded_certificate_is_stale_from_when_its_successor_was_issued(setup: Setup) -> None:
    engine = setup.server.engine
    old = engine.source(WEB).svid()
    setup.clock.advance(timedelta(seconds=5))
    assert engine.rotate(WEB)  # the sidecar misses it: the server keeps presenting the old one
    setup.clock.advance(timedelta(seconds=12))
    probe = _probe(setup, "web-1")
    assert (probe.serial, probe.newest, probe.chain_problem) == (old.serial, False, None)
    assert probe.stale_seconds(setup.clock()) == 12
    values = samples(setup.metrics)
    assert values[("mesh_identity_sidecar_certificate_newest", (("node", "web-1"),))] == 0
    assert values[("mesh_identity_sidecar_certificate_stale_seconds", (("node", "web-1"),))] == 12
    setup.clock.advance(timedelta(seconds=3))
    assert samples(setup.metrics)[("mesh_identity_sidecar_certificate_stale_seconds", (("node", "web-1"),))] == 15
    # the sidecar loads it: newest again
    setup.web.serve(engine.source(WEB).svid())
    probe = _probe(setup, "web-1")
    assert (probe.newest, probe.stale_seconds(setup.clock())) == (True, 0)


def test_two_generations_behind_counts_from_the_first_successor(setup: Setup) -> None:
    engine = setup.server.engine
    assert engine.rotate(WEB)
    setup.clock.advance(timedelta(seconds=4))
    assert engine.rotate(WEB)
    setup.clock.advance(timedelta(seconds=1))
    assert _probe(setup, "web-1").stale_seconds(setup.clock()) == 5


def test_a_certificate_the_prober_never_saw_issued_counts_from_the_first_probe(setup: Setup, tmp_path: Path) -> None:
    stranger = setup.server.authority.issue(WEB, requested_by="test")  # not through the engine: e.g. before a restart
    setup.web.serve(stranger)
    assert _probe(setup, "web-1").stale_seconds(setup.clock()) == 0
    setup.clock.advance(timedelta(seconds=6))
    probe = _probe(setup, "web-1")
    assert (probe.newest, probe.stale_seconds(setup.clock()), probe.chain_problem) == (False, 6, None)


def test_a_chain_that_does_not_verify_to_the_bundle(setup: Setup, tmp_path: Path) -> None:
    web = setup.server.engine.source(WEB).svid()
    setup.web.serve(web, chain=())  # the leaf without its intermediate
    probe = _probe(setup, "web-1")
    assert probe.newest is True  # the right certificate ...
    assert (
        probe.chain_problem is not None and "does not chain to any authority" in probe.chain_problem
    )  # ... badly sent
    assert samples(setup.metrics)[("mesh_identity_sidecar_certificate_chain_valid", (("node", "web-1"),))] == 0
    # a certificate of another CA with the right SPIFFE ID: refused (the handshake works: our client does not
    # verify, it reports)
    foreign = builtin_authority(tmp_path / "foreign", TD).issue(WEB, requested_by="test")
    setup.web.serve(foreign)
    probe = _probe(setup, "web-1")
    assert probe.up and probe.newest is False and probe.chain_problem is not None


def test_an_unreachable_sidecar_has_no_certificate_series(setup: Setup) -> None:
    setup.api.stop()
    probe = _probe(setup, "api-1")
    assert not probe.up and probe.problem is not None and "connection refused" in probe.problem
    values = samples(setup.metrics)
    assert values[("mesh_identity_sidecar_probe_up", (("node", "api-1"),))] == 0
    assert ("mesh_identity_sidecar_certificate_newest", (("node", "api-1"),)) not in values
    assert values[("mesh_identity_sidecar_probes_total", (("result", "failed"),))] == 1


def test_a_sidecar_that_left_the_mesh_is_forgotten(setup: Setup) -> None:
    setup.prober.probe_all()
    setup.registry.replace(mesh_of(web=setup.web.address))
    assert set(setup.prober.probes()) == {"web-1"}
    assert {t.node for t in [p.target for p in setup.prober.probe_all()]} == {"web-1"}


def test_the_exposition_passes_promtool(setup: Setup) -> None:
    assert setup.server.engine.rotate(WEB)
    setup.api.stop()
    setup.prober.probe_all()
    text = generate_latest(setup.metrics)
    checked = subprocess.run([PROMTOOL, "check", "metrics"], input=text, capture_output=True, check=False)
    assert (checked.returncode, checked.stdout + checked.stderr) == (0, b"")


def test_the_interval_and_grace_follow_the_renewal_window() -> None:
    assert probe_interval(timedelta(seconds=30), 0.5) == timedelta(seconds=1.5)
    assert reload_grace(timedelta(seconds=30), 0.5) == timedelta(seconds=3.75)
    assert probe_interval(timedelta(minutes=1), 0.5) == timedelta(seconds=3)
    assert reload_grace(timedelta(minutes=1), 0.5) == timedelta(seconds=7.5)
    assert probe_interval(timedelta(hours=1), 0.5) == timedelta(seconds=30)
    assert reload_grace(timedelta(hours=1), 0.5) == timedelta(minutes=2)
    assert probe_interval(timedelta(seconds=4), 0.5) == timedelta(seconds=1)
    assert reload_grace(timedelta(seconds=4), 0.5) == timedelta(seconds=2)  # never under two probes


def _probe(setup: Setup, node: str):  # type: ignore[no-untyped-def]
    [probe] = [p for p in setup.prober.probe_all() if p.target.node == node]
    return probe
