"""Real time, real scheduler: certificates of a few seconds get replaced while the test watches.

These wait for rotations (seconds each), hence the ``slow`` marker; they run in CI all the same. Waits have
deadlines against hanging; nothing asserts how fast anything was.
"""

from __future__ import annotations

import threading
import urllib.request

import pytest
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat
from prometheus_client.parser import text_string_to_metric_families

from mesh_identity.assembly import build_service
from mesh_identity.clock import utcnow
from mesh_identity.events import CertificateRotated, CertKind, RotationFailed, Severity
from mesh_identity.rotation.roots import root_of
from mesh_identity.server.service import Service
from mesh_identity.svid import X509Svid
from tests.rotation.helpers import FlakyPlugin, Recorder, ids, make_config, provider_for, verify_problem
from tests.waiting import wait_until

pytestmark = pytest.mark.slow


@pytest.fixture
def make_service(tmp_path):
    services: list[Service] = []

    def make(identities, *, plugin=None, **ca):
        config = make_config(tmp_path, identities=identities, provider="flaky" if plugin else "builtin", **ca)
        recorder = Recorder()
        service = build_service(config, provider_for(config, plugin), events=recorder)
        services.append(service)
        service.start()
        return service, recorder

    yield make
    for service in services:
        service.stop()


class Watch:
    """Subscribes to sources and checks every SVID as it arrives: valid chain against the served bundle, new key,
    and the one it replaces still unexpired."""

    def __init__(self, service: Service) -> None:
        self.service = service
        self.lock = threading.Lock()
        self.seen: dict[str, list[X509Svid]] = {}
        self.problems: list[str] = []
        for source in service.engine.sources():
            self.seen[str(source.spiffe_id)] = [source.svid()]
            source.subscribe(self.on_svid)

    def on_svid(self, svid: X509Svid) -> None:
        now = utcnow()
        with self.lock:
            history = self.seen[str(svid.spiffe_id)]
            previous = history[-1]
            history.append(svid)
        problem = verify_problem(svid, self.service.engine.bundles.bundle(), now)
        if problem:
            self.problems.append(f"{svid.serial}: {problem}")
        if previous.not_after <= now:
            self.problems.append(f"{previous.serial} expired before it was replaced")
        if key(previous) == key(svid):
            self.problems.append(f"{svid.serial} reuses the key of {previous.serial}")

    def count(self) -> int:
        with self.lock:
            return min(len(history) for history in self.seen.values())


def key(svid: X509Svid) -> bytes:
    return svid.leaf.public_key().public_bytes(Encoding.DER, PublicFormat.SubjectPublicKeyInfo)


def test_certificates_are_replaced_with_new_keys_before_they_expire(make_service):
    service, recorder = make_service(ids("web", "api", "db"), workload_ttl="4s", intermediate_ttl="1h")
    watch = Watch(service)
    wait_until(lambda: watch.count() >= 4, "three rotations of every identity", timeout=60)
    assert watch.problems == []
    for history in watch.seen.values():
        assert len({svid.serial for svid in history}) == len(history)
        assert len({key(svid) for svid in history}) == len(history)
    rotated = recorder.of(CertificateRotated)
    assert {e.subject for e in rotated} == set(watch.seen)
    assert recorder.of(RotationFailed) == []


def test_the_intermediate_rotates_and_workloads_follow_it(make_service):
    service, recorder = make_service(ids("web", "api"), workload_ttl="2s", intermediate_ttl="8s", jitter=0.0)
    watch = Watch(service)
    first = service.authority.signing_ca
    assert first is not None

    def intermediates() -> list[CertificateRotated]:
        return [e for e in recorder.of(CertificateRotated) if e.kind is CertKind.INTERMEDIATE]

    wait_until(lambda: len(intermediates()) >= 2, "two intermediate rotations", timeout=60)
    current = service.authority.signing_ca
    assert current is not None
    serials = [first.serial, *(e.new_serial for e in intermediates())]
    assert len(set(serials)) == len(serials)
    # each workload moves to the current intermediate at its own next renewal
    wait_until(
        lambda: all(h[-1].chain[0] == current.certificate for h in watch.seen.values()),
        "workloads on the new intermediate",
        timeout=60,
    )
    root = service.engine.bundles.bundle().authorities[0]
    chained_roots = {root_of(h.chain[0], [root]) for history in watch.seen.values() for h in history}
    assert chained_roots == {root_of(root, [root])}
    assert watch.problems == []


def scrape(service: Service) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    with urllib.request.urlopen(service.url + "/metrics", timeout=30) as response:
        text = response.read().decode()
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def test_a_provider_that_refuses_then_recovers(make_service):
    plugin = FlakyPlugin()
    web = ids("web")[0]
    service, recorder = make_service([web], plugin=plugin, mode="per-workload", workload_ttl="6s", jitter=0.0)
    source = service.engine.source(web)
    wait_until(lambda: len(recorder.of(CertificateRotated)) >= 1, "a first renewal", timeout=60)
    plugin.switch.refusing = True
    refused_from = len(recorder.of(RotationFailed))
    served = source.svid()

    recorder.wait_for(lambda events: len([e for e in events if isinstance(e, RotationFailed)]) >= refused_from + 3)
    failures = recorder.of(RotationFailed)[refused_from:]
    # the old certificate keeps being served, still valid
    assert source.svid() is served
    assert verify_problem(served, service.engine.bundles.bundle(), utcnow()) is None
    # attempts are numbered and back off: each wait at least as long as the one before
    assert [f.attempt for f in failures[:3]] == [1, 2, 3]
    waits = [f.next_attempt - f.at for f in failures[:3]]
    assert waits == sorted(waits)
    assert all(f.expires == served.not_after for f in failures)
    metrics = scrape(service)
    assert metrics[("mesh_identity_rotations_total", (("kind", "workload"), ("result", "failure")))] >= 3
    assert metrics[("mesh_identity_certificate_rotation_failures", (("spiffe_id", str(web)),))] >= 1
    assert metrics[("mesh_identity_provider_up", (("provider", "flaky"),))] == 0.0

    # close to expiry the failure is an error, not a silent retry
    recorder.wait_for(
        lambda events: any(isinstance(e, RotationFailed) and e.severity is Severity.ERROR for e in events)
    )
    assert source.svid() is served
    plugin.switch.refusing = False
    wait_until(lambda: source.svid() is not served, "rotation after recovery", timeout=60)
    recovered = source.svid()
    assert recovered.serial != served.serial and key(recovered) != key(served)
    state = service.engine.state(web)
    assert (state.failures, state.last_error) == (0, None)
    metrics = scrape(service)
    assert metrics[("mesh_identity_certificate_rotation_failures", (("spiffe_id", str(web)),))] == 0
    assert metrics[("mesh_identity_provider_up", (("provider", "flaky"),))] == 1.0
    assert metrics[("mesh_identity_rotations_total", (("kind", "workload"), ("result", "success")))] >= 2
