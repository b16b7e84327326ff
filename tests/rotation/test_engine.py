"""The rotation engine driven with an injected clock: the scheduler is paused, the test calls rotate() and moves
the clock. Certificates are real, from the real built-in CA (directly, or behind the flaky test provider)."""

from __future__ import annotations

import itertools
import random
from datetime import timedelta

import pytest
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from mesh_identity.assembly import build_authority
from mesh_identity.errors import IssuanceError
from mesh_identity.events import CertificateRotated, CertKind, RotationFailed, Severity
from mesh_identity.rotation.engine import HEALTH_JOB, INTERMEDIATE_JOB, RotationEngine, RotationSettings
from mesh_identity.rotation.roots import root_of
from mesh_identity.rotation.schedule import RetryPolicy, Validity, due_bounds
from tests.rotation.helpers import FakeClock, FlakyPlugin, Recorder, ids, make_config, provider_for, verify_problem

WEB, API = ids("web", "api")
MINUTE = timedelta(minutes=1)


def public_der(svid):
    return svid.leaf.public_key().public_bytes(Encoding.DER, PublicFormat.SubjectPublicKeyInfo)


@pytest.fixture
def clock():
    return FakeClock()


@pytest.fixture
def make_engine(tmp_path, clock):
    engines: list[RotationEngine] = []

    def make(*, plugin=None, retry=None, jitter=0.1, **ca):
        config = make_config(tmp_path, provider="flaky" if plugin else "builtin", jitter=jitter, **ca)
        recorder = Recorder()
        authority = build_authority(config, provider_for(config, plugin, clock), events=recorder, clock=clock)
        authority.start()
        settings = RotationSettings(config.ca.rotate_after, jitter, retry=retry)
        engine = RotationEngine(authority, settings, events=recorder, clock=clock, rng=random.Random(7))
        engine.start(paused=True)
        engines.append(engine)
        return engine, recorder

    yield make
    for engine in engines:
        engine.stop()


def test_one_job_per_identity_due_from_its_own_certificate(make_engine, clock):
    engine, _ = make_engine()
    team = ids("a", "b", "c")
    engine.add_all(team)
    jobs = engine.job_times()
    assert set(jobs) == {*map(str, team), INTERMEDIATE_JOB, HEALTH_JOB}
    for spiffe_id in team:
        state = engine.state(spiffe_id)
        svid = engine.source(spiffe_id).svid()
        earliest, latest = due_bounds(Validity.of(svid.leaf, clock.now), 0.5, 0.1)
        assert earliest <= state.next_rotation <= latest
        assert latest == clock.now + 30 * MINUTE  # half of the hour from receipt, not from the backdated NotBefore
        assert jobs[str(spiffe_id)] == state.next_rotation
    inter = engine.intermediate_state()
    assert inter is not None and inter.next_rotation == jobs[INTERMEDIATE_JOB]
    assert clock.now + timedelta(hours=10, minutes=48) <= inter.next_rotation <= clock.now + timedelta(hours=12)


def test_adding_twice_gives_the_same_source(make_engine):
    engine, _ = make_engine()
    assert engine.add(WEB) is engine.add(WEB)
    assert engine.identities() == [WEB]


def test_every_rotation_brings_a_fresh_key_and_moves_the_job(make_engine, clock):
    engine, recorder = make_engine()
    source = engine.add(WEB)
    seen = [source.svid()]
    for _ in range(5):
        clock.advance(31 * MINUTE)
        assert engine.rotate(WEB) is True
        seen.append(source.svid())
        state = engine.state(WEB)
        assert engine.job_times()[str(WEB)] == state.next_rotation
        earliest, latest = due_bounds(Validity.of(seen[-1].leaf, clock.now), 0.5, 0.1)
        assert earliest <= state.next_rotation <= latest
        assert verify_problem(seen[-1], engine.bundles.bundle(), clock.now) is None
    assert len({public_der(svid) for svid in seen}) == 6
    assert len({svid.serial for svid in seen}) == 6
    rotated = recorder.of(CertificateRotated)
    assert [(e.old_serial, e.new_serial) for e in rotated] == [
        (a.serial, b.serial) for a, b in itertools.pairwise(seen)
    ]
    assert all(e.kind is CertKind.WORKLOAD and e.subject == str(WEB) for e in rotated)


def test_rotate_all_renews_everyone(make_engine):
    engine, _ = make_engine()
    team = ids(*(f"w{i}" for i in range(20)))
    before = {s.spiffe_id: s.svid().serial for s in engine.add_all(team)}
    summary = engine.rotate_all()
    assert (summary.rotated, summary.failed) == (20, ())
    assert all(engine.source(i).svid().serial != before[i] for i in team)


def test_after_a_mass_renewal_no_job_runs_later_than_its_identity_is_due(make_engine, clock):
    engine, _ = make_engine()
    team = ids(*(f"w{i}" for i in range(50)))
    engine.add_all(team)
    for step in (timedelta(seconds=2), 20 * MINUTE):  # renewed soon after issue, and in mid-life
        clock.advance(step)
        engine.rotate_all()
        jobs = engine.job_times()
        for spiffe_id in team:
            state = engine.state(spiffe_id)
            earliest, latest = due_bounds(Validity.of(engine.source(spiffe_id).svid().leaf, clock.now), 0.5, 0.1)
            assert earliest <= state.next_rotation <= latest
            assert jobs[str(spiffe_id)] <= state.next_rotation


def test_a_failing_renewal_keeps_serving_backs_off_and_escalates(make_engine, clock):
    plugin = FlakyPlugin()
    policy = RetryPolicy(10 * timedelta(seconds=1), timedelta(seconds=80))
    engine, recorder = make_engine(plugin=plugin, retry=policy, mode="per-workload", jitter=0.0)
    source = engine.add(WEB)
    served = source.svid()
    assert engine.state(WEB).next_rotation == clock.now + 30 * MINUTE
    clock.advance(30 * MINUTE)
    plugin.switch.refusing = True
    severities = []
    while clock.now < served.not_after - 2 * MINUTE:
        assert engine.rotate(WEB) is False
        failure = recorder.of(RotationFailed)[-1]
        attempt = len(recorder.of(RotationFailed))
        backoff = min(policy.initial * 2 ** (attempt - 1), policy.maximum)
        delay = failure.next_attempt - clock.now
        assert backoff / 2 <= delay <= backoff
        assert (failure.attempt, failure.expires, failure.kind) == (attempt, served.not_after, CertKind.WORKLOAD)
        assert failure.error == f"flaky: upstream CA unreachable while signing {WEB}"
        assert engine.job_times()[str(WEB)] == failure.next_attempt == engine.state(WEB).next_rotation
        # the still-valid certificate keeps being served
        assert source.svid() is served
        assert verify_problem(served, engine.bundles.bundle(), clock.now) is None
        severities.append((served.not_after - clock.now, failure.severity))
        clock.now = failure.next_attempt
    assert all(sev is Severity.WARNING for left, sev in severities if left > 15 * MINUTE)
    assert all(sev is Severity.ERROR for left, sev in severities if left <= 15 * MINUTE)
    assert {sev for _, sev in severities} == {Severity.WARNING, Severity.ERROR}
    health = engine.health()
    assert health is not None and not health.healthy
    assert health.detail == f"a signing request failed: flaky: upstream CA unreachable while signing {WEB}"
    assert engine.state(WEB).failures == len(severities)

    plugin.switch.refusing = False
    assert engine.rotate(WEB) is True
    state = engine.state(WEB)
    assert (state.failures, state.last_error) == (0, None)
    assert source.svid().serial != served.serial
    assert recorder.of(CertificateRotated)[-1].old_serial == served.serial
    health = engine.health()
    assert health is not None and health.healthy


def test_a_refusal_retrying_cannot_fix_is_an_error_at_once_and_retried_slowly(make_engine, clock):
    plugin = FlakyPlugin()
    policy = RetryPolicy(timedelta(seconds=10), timedelta(seconds=80))
    engine, recorder = make_engine(plugin=plugin, retry=policy, mode="per-workload")
    engine.add(WEB)
    clock.advance(30 * MINUTE)
    plugin.switch.rejecting = True
    assert engine.rotate(WEB) is False
    failure = recorder.of(RotationFailed)[-1]
    assert failure.severity is Severity.ERROR
    assert failure.error == f"flaky: upstream CA refused to sign {WEB}"
    assert timedelta(seconds=40) <= failure.next_attempt - clock.now <= timedelta(seconds=80)
    health = engine.health()
    assert health is not None and health.healthy  # the CA answered; it refused


def test_a_first_issuance_that_fails_keeps_the_identity_and_retries(make_engine, clock):
    plugin = FlakyPlugin()
    engine, recorder = make_engine(plugin=plugin, mode="per-workload")
    plugin.switch.refusing = True
    source = engine.add(WEB)
    assert source.current() is None
    failure = recorder.of(RotationFailed)[-1]
    assert (failure.severity, failure.expires, failure.attempt) == (Severity.ERROR, None, 1)
    state = engine.state(WEB)
    assert (state.serial, state.failures) == (None, 1)
    assert engine.job_times()[str(WEB)] == state.next_rotation == failure.next_attempt
    plugin.switch.refusing = False
    clock.now = failure.next_attempt
    assert engine.rotate(WEB) is True
    assert source.svid().spiffe_id == WEB


def test_the_intermediate_renews_and_leaves_are_cut_to_it_while_it_cannot(make_engine, clock):
    plugin = FlakyPlugin()
    engine, recorder = make_engine(plugin=plugin, mode="intermediate", workload_ttl="1h", intermediate_ttl="24h")
    source = engine.add(WEB)
    first = engine.authority.signing_ca
    assert first is not None
    root = engine.bundles.bundle().authorities[0]

    clock.advance(timedelta(hours=23, minutes=30))  # the intermediate has 30 min left
    plugin.switch.refusing = True
    assert engine.rotate_intermediate() is False
    failure = recorder.of(RotationFailed)[-1]
    assert (failure.kind, failure.severity, failure.subject) == (
        CertKind.INTERMEDIATE,
        Severity.ERROR,
        "spiffe://example.org",
    )
    state = engine.intermediate_state()
    assert state is not None and state.failures == 1 and state.next_rotation == engine.job_times()[INTERMEDIATE_JOB]

    # workloads keep being signed locally, cut to the intermediate's NotAfter instead of refused
    assert engine.rotate(WEB) is True
    cut = source.svid()
    assert cut.chain[0] == first.certificate
    assert cut.not_after <= first.certificate.not_valid_after_utc
    assert cut.not_after - clock.now < 30 * MINUTE
    assert verify_problem(cut, engine.bundles.bundle(), clock.now) is None

    plugin.switch.refusing = False
    assert engine.rotate_intermediate() is True
    second = engine.authority.signing_ca
    assert second is not None and second.serial != first.serial
    rotated = recorder.of(CertificateRotated)[-1]
    assert (rotated.kind, rotated.old_serial, rotated.new_serial) == (
        CertKind.INTERMEDIATE,
        first.serial,
        second.serial,
    )
    assert engine.rotate(WEB) is True
    moved = source.svid()
    assert moved.chain[0] == second.certificate
    assert timedelta(minutes=59, seconds=59) < moved.not_after - clock.now <= timedelta(hours=1)  # whole seconds
    fingerprint = root_of(root, [root])
    assert root_of(first.certificate, [root]) == root_of(second.certificate, [root]) == fingerprint
    assert verify_problem(moved, engine.bundles.bundle(), clock.now) is None


def test_removing_an_identity_drops_its_job_and_closes_its_source(make_engine):
    engine, _ = make_engine()
    source = engine.add(WEB)
    engine.add(API)
    engine.remove(WEB)
    engine.remove(WEB)
    assert str(WEB) not in engine.job_times()
    assert source.closed
    assert engine.identities() == [API]
    with pytest.raises(IssuanceError) as raised:
        engine.rotate(WEB)
    assert str(raised.value) == f"{WEB} is not managed by the rotation engine"
