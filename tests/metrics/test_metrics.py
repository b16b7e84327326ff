"""The metrics: their own registry, counters fed by events, gauges read from the service's snapshot."""

from __future__ import annotations

import urllib.request

import pytest
from prometheus_client import REGISTRY
from prometheus_client.parser import text_string_to_metric_families

from mesh_identity.assembly import build_service
from mesh_identity.clock import utcnow
from mesh_identity.events import CertificateRotated, CertKind, RotationFailed, Severity
from mesh_identity.server.metrics import Metrics
from mesh_identity.server.service import Service
from tests.rotation.helpers import FlakyPlugin, Recorder, ids, make_config, provider_for

TEAM = ids("web", "api")
FAMILIES = {
    "mesh_identity_certificates_issued",
    "mesh_identity_rotations",
    "mesh_identity_ca_changes",
    "mesh_identity_issuance_duration_seconds",
    "mesh_identity_certificate_expiry_timestamp_seconds",
    "mesh_identity_certificate_next_rotation_timestamp_seconds",
    "mesh_identity_certificate_rotation_failures",
    "mesh_identity_ca_expiry_timestamp_seconds",
    "mesh_identity_ca_next_rotation_timestamp_seconds",
    "mesh_identity_ca_rotation_failures",
    "mesh_identity_provider_up",
    "mesh_identity_outage_budget_seconds",
    "mesh_identity_identities",
    "mesh_identity_root_rotation_phase",
    "mesh_identity_ready",
}


@pytest.fixture
def service(tmp_path):
    config = make_config(tmp_path, identities=TEAM)
    recorder = Recorder()
    service = build_service(config, provider_for(config), events=recorder)
    service.start()
    yield service
    service.stop()


def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def scrape(service: Service) -> str:
    with urllib.request.urlopen(service.url + "/metrics", timeout=30) as response:
        assert response.headers["Content-Type"].startswith("text/plain; version=0.0.4")
        return response.read().decode()


def test_every_family_is_exposed_and_agrees_with_the_status(service):
    before = utcnow()
    text = scrape(service)
    families = {family.name for family in text_string_to_metric_families(text)}
    assert {name for name in families if not name.endswith("_created")} == FAMILIES  # _created: counter births
    values = samples(text)
    snap = service.snapshot()
    for state in snap.identities:
        label = (("spiffe_id", state.subject),)
        assert values[("mesh_identity_certificate_expiry_timestamp_seconds", label)] == state.not_after.timestamp()
        assert values[("mesh_identity_certificate_next_rotation_timestamp_seconds", label)] == pytest.approx(
            state.next_rotation.timestamp()
        )
        assert values[("mesh_identity_certificate_rotation_failures", label)] == 0
    inter = service.engine.intermediate_state()
    root = service.engine.bundles.bundle().authorities[0]
    assert (
        values[("mesh_identity_ca_expiry_timestamp_seconds", (("kind", "intermediate"), ("serial", inter.serial)))]
        == inter.not_after.timestamp()
    )
    root_key = (
        "mesh_identity_ca_expiry_timestamp_seconds",
        (("kind", "root"), ("serial", format(root.serial_number, "x"))),
    )
    assert values[root_key] == root.not_valid_after_utc.timestamp()
    assert values[("mesh_identity_certificates_issued_total", (("kind", "workload"), ("provider", "builtin")))] == 2
    assert values[("mesh_identity_certificates_issued_total", (("kind", "intermediate"), ("provider", "builtin")))] == 1
    assert values[("mesh_identity_issuance_duration_seconds_count", (("provider", "builtin"),))] == 2  # by the engine
    assert values[("mesh_identity_provider_up", (("provider", "builtin"),))] == 1
    assert values[("mesh_identity_identities", ())] == 2
    assert values[("mesh_identity_ready", ())] == 1
    assert [
        values[("mesh_identity_root_rotation_phase", (("phase", p),))] for p in ("steady", "prepared", "activated")
    ] == [1, 0, 0]
    earliest = min(s.not_after for s in snap.identities)
    budget = values[("mesh_identity_outage_budget_seconds", ())]
    assert (earliest - snap.at).total_seconds() <= budget <= (earliest - before).total_seconds()


def test_rotations_and_phases_are_counted(service):
    service.engine.rotate(TEAM[0])
    service.engine.rotate_all()
    service.roots.prepare()
    values = samples(scrape(service))
    assert values[("mesh_identity_rotations_total", (("kind", "workload"), ("result", "success")))] == 3
    assert values[("mesh_identity_ca_changes_total", (("kind", "root"), ("phase", "prepared")))] == 1
    assert values[("mesh_identity_ca_changes_total", (("kind", "intermediate"), ("phase", "activated")))] == 1
    assert values[("mesh_identity_root_rotation_phase", (("phase", "prepared"),))] == 1
    expiries = [k for k in values if k[0] == "mesh_identity_ca_expiry_timestamp_seconds" and ("kind", "root") in k[1]]
    assert len(expiries) == 2


def test_failures_show_per_identity_and_as_a_counter(tmp_path):
    plugin = FlakyPlugin()
    config = make_config(tmp_path, identities=TEAM, provider="flaky", mode="per-workload")
    service = build_service(config, provider_for(config, plugin), events=Recorder())
    service.start(paused=True)
    try:
        plugin.switch.refusing = True
        assert service.engine.rotate(TEAM[1]) is False
        assert service.engine.rotate(TEAM[1]) is False
        values = samples(scrape(service))
        assert values[("mesh_identity_certificate_rotation_failures", (("spiffe_id", str(TEAM[1])),))] == 2
        assert values[("mesh_identity_certificate_rotation_failures", (("spiffe_id", str(TEAM[0])),))] == 0
        assert values[("mesh_identity_rotations_total", (("kind", "workload"), ("result", "failure")))] == 2
        assert values[("mesh_identity_provider_up", (("provider", "flaky"),))] == 0
        assert values[("mesh_identity_ready", ())] == 0  # per-workload: ready follows the provider's health
    finally:
        service.stop()


def test_the_registry_is_its_own():
    before = {m.name for m in REGISTRY.collect()}
    metrics = Metrics()
    metrics.emit(
        RotationFailed("spiffe://example.org/a", CertKind.WORKLOAD, "x", 1, None, None, Severity.ERROR, "p", _now())
    )
    metrics.emit(CertificateRotated("spiffe://example.org/a", CertKind.WORKLOAD, "1", "2", _now(), "p", _now()))
    metrics.observe_issuance("p", CertKind.WORKLOAD, 0.002)
    assert {m.name for m in REGISTRY.collect()} == before
    values = samples(metrics.render().decode())
    assert values[("mesh_identity_rotations_total", (("kind", "workload"), ("result", "failure")))] == 1
    assert values[("mesh_identity_rotations_total", (("kind", "workload"), ("result", "success")))] == 1
    assert values[("mesh_identity_issuance_duration_seconds_bucket", (("le", "0.0025"), ("provider", "p")))] == 1
    assert values[("mesh_identity_issuance_duration_seconds_bucket", (("le", "0.001"), ("provider", "p")))] == 0
    # without a snapshot there is nothing to say about the present
    assert not any(name.startswith("mesh_identity_identities") for name, _ in values)


def _now():
    return utcnow()
