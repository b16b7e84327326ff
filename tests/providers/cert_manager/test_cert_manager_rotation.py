"""cert-manager failures during rotation: the rotation engine keeps serving the still-valid certificates, backs
off, reports the provider unhealthy, and recovers; no CertificateRequest is left behind."""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from mesh_identity.events import CertificateRotated, RotationFailed, Severity
from mesh_identity.keys import KeyType
from mesh_identity.provider import Mode, ProviderContext
from mesh_identity.rotation.engine import RotationEngine
from mesh_identity.spiffe import SpiffeId, TrustDomain
from providers.cert_manager.provider import SPEC, CertManagerProvider
from tests.fakes.cert_manager import CERTIFICATE_REQUEST, Behaviour, CertManagerSigner
from tests.fakes.kube import KubeServer
from tests.pki import TestCa
from tests.rotation.helpers import Recorder, engine_over

TD = TrustDomain("example.org")
NS = "mesh-identity"
WEB = SpiffeId.for_kubernetes(TD, "shop", "web")


@pytest.fixture
def make_engine(
    kube_server: KubeServer, cert_manager_signer: CertManagerSigner, tmp_path: Path
) -> Iterator[Callable[..., tuple[RotationEngine, Recorder]]]:
    cert_manager_signer.add_ca_issuer("mesh-ca", TestCa.create("rotation root"), namespace=NS)
    kubeconfig = kube_server.write_kubeconfig(tmp_path / "kubeconfig", namespace=NS)
    made: list[tuple[RotationEngine, CertManagerProvider]] = []

    def make(mode: Mode, workload_ttl: timedelta) -> tuple[RotationEngine, Recorder]:
        context = ProviderContext(TD, tmp_path / "state", KeyType.ECDSA_P256, mode, lambda: datetime.now(UTC))
        options = {"kubeconfig": str(kubeconfig), "issuer_name": "mesh-ca", "timeout": "1s"}
        provider = CertManagerProvider(context, SPEC.validate_options(options), environ={})
        engine, recorder = engine_over(provider, mode, workload_ttl, seed=7, paused=True)
        made.append((engine, provider))
        return engine, recorder

    yield make
    for engine, provider in made:
        engine.stop()
        provider.close()


def _down(server: KubeServer, signer: CertManagerSigner) -> Callable[[], None]:
    server.go_down()
    return server.come_up


def _behaviour(behaviour: Behaviour) -> Callable[[KubeServer, CertManagerSigner], Callable[[], None]]:
    def arrange(server: KubeServer, signer: CertManagerSigner) -> Callable[[], None]:
        signer.behaviour = behaviour

        def restore() -> None:
            signer.behaviour = Behaviour.ISSUE

        return restore

    return arrange


OUTAGES = [
    (
        "api down",
        _down,
        Severity.WARNING,
        "cert-manager: cannot reach the Kubernetes API at URL to create a "
        'CertificateRequest in namespace "mesh-identity": the connection was dropped',
    ),
    (
        "stalled",
        _behaviour(Behaviour.STALL),
        Severity.WARNING,
        "cert-manager: CertificateRequest mesh-identity/mesh-identity-xxxxx was not ready after 1s (Ready=False "
        "(Pending): Waiting on certificate issuance from the issuer); is Issuer mesh-identity/mesh-ca working?",
    ),
    (
        "failed",
        _behaviour(Behaviour.FAIL),
        Severity.WARNING,
        "cert-manager: Issuer mesh-identity/mesh-ca failed CertificateRequest mesh-identity/mesh-identity-xxxxx: "
        "Ready=False (Failed): Failed to sign certificate: the issuing CA refused the request",
    ),
    (
        "denied",
        _behaviour(Behaviour.DENY),
        Severity.ERROR,  # retrying cannot fix a policy: an error at once
        "cert-manager: CertificateRequest mesh-identity/mesh-identity-xxxxx was denied by cert-manager.io: Denied by "
        "mesh-identity test policy",
    ),
]


@pytest.mark.parametrize(("arrange", "severity", "error"), [o[1:] for o in OUTAGES], ids=[o[0] for o in OUTAGES])
def test_per_workload_failure_keeps_serving_and_recovers(
    kube_server: KubeServer,
    cert_manager_signer: CertManagerSigner,
    make_engine: Callable[..., tuple[RotationEngine, Recorder]],
    arrange: Callable[[KubeServer, CertManagerSigner], Callable[[], None]],
    severity: Severity,
    error: str,
) -> None:
    engine, recorder = make_engine(Mode.PER_WORKLOAD, timedelta(hours=1))
    source = engine.add(WEB)
    first = source.svid()
    restore = arrange(kube_server, cert_manager_signer)
    assert engine.rotate(WEB) is False
    (failure,) = recorder.of(RotationFailed)
    shown = failure.error.replace(kube_server.url, "URL")
    assert re.sub(r"mesh-identity-[a-z0-9]{5}\b", "mesh-identity-xxxxx", shown) == error
    assert failure.severity is severity
    assert datetime.now(UTC) < failure.next_attempt < first.not_after
    assert source.svid() is first  # the still-valid certificate is still served
    assert not engine.check_health().healthy
    restore()
    assert engine.rotate(WEB) is True
    assert source.svid().serial != first.serial
    assert recorder.of(CertificateRotated)[-1].old_serial == first.serial
    assert engine.check_health().healthy
    assert kube_server.objects(CERTIFICATE_REQUEST) == []


def test_intermediate_mode_keeps_issuing_locally_while_cert_manager_is_down(
    kube_server: KubeServer, make_engine: Callable[..., tuple[RotationEngine, Recorder]]
) -> None:
    engine, recorder = make_engine(Mode.INTERMEDIATE, timedelta(minutes=10))
    source = engine.add(WEB)
    first = source.svid()
    kube_server.go_down()
    assert engine.rotate_intermediate() is False
    assert engine.rotate(WEB) is True  # signed locally by the still-valid intermediate
    assert source.svid().serial != first.serial
    (failure,) = recorder.of(RotationFailed)
    assert failure.error.startswith("cert-manager: cannot reach the Kubernetes API at ")
    kube_server.come_up()
    assert engine.rotate_intermediate() is True
    assert kube_server.objects(CERTIFICATE_REQUEST) == []
