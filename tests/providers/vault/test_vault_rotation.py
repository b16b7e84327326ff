"""A Vault outage during rotation: the rotation engine backs off, keeps serving the still-valid certificates, and
recovers when Vault is back. The provider is the real Vault provider; Vault is the test server, stopped and
started again on the same port."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from mesh_identity.events import CertificateRotated, RotationFailed, Severity
from mesh_identity.keys import KeyType
from mesh_identity.provider import Mode, ProviderContext
from mesh_identity.rotation.engine import RotationEngine
from mesh_identity.spiffe import SpiffeId, TrustDomain
from providers.vault.provider import SPEC, VaultProvider
from tests.fakes.vault import VaultServer
from tests.providers.vault.targets import set_up_pki
from tests.rotation.helpers import Recorder, engine_over

TD = TrustDomain("example.org")
WEB = SpiffeId.for_kubernetes(TD, "default", "web")


@pytest.fixture
def pki(vault: VaultServer) -> VaultServer:
    set_up_pki(vault)
    return vault


@pytest.fixture
def make_engine(pki: VaultServer, tmp_path: Path) -> Iterator:
    made: list[tuple[RotationEngine, VaultProvider]] = []

    def make(mode: Mode, workload_ttl: timedelta, paused: bool = True) -> tuple[RotationEngine, Recorder]:
        token_file = tmp_path / "token"
        token_file.write_text(pki.create_token(policies=["mesh"]))
        options = {"address": pki.url, "token_file": str(token_file), "pki_role": "spiffe"}
        context = ProviderContext(TD, tmp_path, KeyType.ECDSA_P256, mode, lambda: datetime.now(UTC))
        provider = VaultProvider(context, SPEC.validate_options(options))
        engine, recorder = engine_over(provider, mode, workload_ttl, seed=5, paused=paused)
        made.append((engine, provider))
        return engine, recorder

    yield make
    for engine, provider in made:
        engine.stop()
        provider.close()


def test_per_workload_outage_backs_off_keeps_serving_and_recovers(pki: VaultServer, make_engine):
    engine, recorder = make_engine(Mode.PER_WORKLOAD, timedelta(hours=1))
    source = engine.add(WEB)
    first = source.svid()
    pki.stop()
    assert engine.rotate(WEB) is False
    assert engine.rotate(WEB) is False
    failures = recorder.of(RotationFailed)
    assert [f.attempt for f in failures] == [1, 2]
    assert all(f.severity is Severity.WARNING for f in failures)
    assert failures[0].error == (
        f"vault: sign {WEB} at pki/sign/spiffe: cannot reach Vault at {pki.url} (connection refused); check the "
        "address and that Vault is up (issued certificates stay in use; retrying with backoff)"
    )
    waits = [f.next_attempt - f.at for f in failures]
    assert timedelta(0) < waits[0] <= waits[1]  # backing off, not retrying at once
    assert all(f.next_attempt < first.not_after for f in failures)  # never past the expiry
    assert source.svid() is first  # the still-valid certificate is still the one served
    assert first.not_after > datetime.now(UTC)
    health = engine.health()
    assert health is not None
    assert not health.healthy
    pki.start()
    assert engine.rotate(WEB) is True
    assert source.svid().serial != first.serial
    assert engine.state(WEB).failures == 0
    assert recorder.of(CertificateRotated)[-1].old_serial == first.serial


def test_intermediate_mode_keeps_rotating_workloads_locally_during_an_outage(pki: VaultServer, make_engine):
    engine, recorder = make_engine(Mode.INTERMEDIATE, timedelta(minutes=10))
    source = engine.add(WEB)
    first = source.svid()
    signs = pki.request_count("/v1/pki/root/sign-intermediate")
    pki.stop()
    assert engine.rotate_intermediate() is False
    assert engine.rotate(WEB) is True  # signed locally by the still-valid intermediate
    assert source.svid().serial != first.serial
    (failure,) = recorder.of(RotationFailed)
    assert failure.error.startswith(
        "vault: sign the intermediate CA CSR at pki/root/sign-intermediate: cannot reach Vault"
    )
    pki.start()
    assert engine.rotate_intermediate() is True
    assert pki.request_count("/v1/pki/root/sign-intermediate") == signs + 1


@pytest.mark.slow
def test_outage_in_real_time_with_the_scheduler_running(pki: VaultServer, make_engine):
    """Short-lived certificates, the scheduler really running: Vault goes away, renewals fail and back off while
    the served certificate stays valid, then Vault comes back and the next retry renews."""
    engine, recorder = make_engine(Mode.PER_WORKLOAD, timedelta(seconds=8), paused=False)
    source = engine.add(WEB)
    first = source.svid()
    pki.stop()
    recorder.wait_for(lambda events: sum(isinstance(e, RotationFailed) for e in events) >= 2, timeout=30)
    assert source.svid() is first
    assert datetime.now(UTC) < first.not_after
    pki.start()
    recorder.wait_for(lambda events: any(isinstance(e, CertificateRotated) for e in events), timeout=30)
    assert source.svid().serial != first.serial
