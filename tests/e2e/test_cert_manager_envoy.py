"""A real Envoy pair runs mTLS on cert-manager-issued SVIDs, in both modes (the test Kubernetes API server and
its cert-manager stand-in, driven through the ``kubernetes`` client).

Two CA issuers sign with the same root: ``mesh-ca`` answers with it in ``status.ca``; ``acme-like`` leaves
``status.ca`` empty, as ACME and several external issuers do, and the bundle comes from ``trust_bundle_file``.
"""

from __future__ import annotations

import base64
from collections.abc import Iterator
from typing import Any

import pytest
from cryptography import x509

from mesh_identity.authority import Authority, AuthoritySettings
from mesh_identity.clock import utcnow
from mesh_identity.keys import KeyType
from mesh_identity.provider import Mode, ProviderContext
from mesh_identity.spiffe import TrustDomain
from providers.cert_manager.provider import SPEC
from tests.e2e.provider_pair import ProviderPair, provider_pair
from tests.fakes.cert_manager import CERTIFICATE_REQUEST, CertManagerSigner
from tests.fakes.kube import KubeServer
from tests.pki import TestCa

pytestmark = pytest.mark.e2e

TRUST_DOMAIN = TrustDomain("example.org")
NAMESPACE = "mesh-identity"
CASES = [(issuer, mode) for issuer in ("mesh-ca", "acme-like") for mode in Mode]
Case = tuple[str, Mode]


@pytest.fixture(scope="module")
def root() -> TestCa:
    return TestCa.create("cert-manager e2e root")


@pytest.fixture(scope="module")
def kube(root: TestCa) -> Iterator[KubeServer]:
    with KubeServer() as server, CertManagerSigner(server) as signer:
        signer.add_ca_issuer("mesh-ca", root, namespace=NAMESPACE)
        signer.add_ca_issuer("acme-like", root, namespace=NAMESPACE, omit_ca=True)
        yield server


@pytest.fixture(scope="module")
def authorities(
    kube: KubeServer, root: TestCa, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[dict[Case, Authority]]:
    directory = tmp_path_factory.mktemp("cert-manager")
    kubeconfig = kube.write_kubeconfig(directory / "kubeconfig", namespace=NAMESPACE)
    (directory / "bundle.pem").write_bytes(root.pem())
    made: dict[Case, Authority] = {}
    for issuer, mode in CASES:
        options: dict[str, Any] = {"kubeconfig": str(kubeconfig), "issuer_name": issuer, "keep_requests": True}
        if issuer == "acme-like":
            options["trust_bundle_file"] = str(directory / "bundle.pem")
        context = ProviderContext(TRUST_DOMAIN, directory / f"{issuer}-{mode}", KeyType.ECDSA_P256, mode, utcnow)
        provider = SPEC.factory(context, SPEC.validate_options(options))
        made[issuer, mode] = Authority(provider, AuthoritySettings(TRUST_DOMAIN, mode))
        made[issuer, mode].start()
    yield made
    for authority in made.values():
        authority.provider.close()


@pytest.fixture(scope="module")
def pair(authorities: dict[Case, Authority], tmp_path_factory: pytest.TempPathFactory) -> Iterator[ProviderPair]:
    first = authorities["mesh-ca", Mode.INTERMEDIATE]
    with provider_pair(first, TRUST_DOMAIN, tmp_path_factory.mktemp("pair")) as pair:
        yield pair


def answered(kube: KubeServer, cert: x509.Certificate) -> dict[str, Any]:
    """The CertificateRequest whose ``status.certificate`` begins with ``cert`` (kept: ``keep_requests``)."""
    for request in kube.objects(CERTIFICATE_REQUEST, NAMESPACE):
        pem = base64.b64decode(request.get("status", {}).get("certificate", ""))
        if pem and x509.load_pem_x509_certificates(pem)[0] == cert:
            return request
    raise AssertionError(f"no CertificateRequest answered with serial {cert.serial_number:x}")


@pytest.mark.parametrize(("issuer", "mode"), CASES, ids=[f"{issuer}-{mode}" for issuer, mode in CASES])
def test_envoy_pair_runs_mtls_on_cert_manager_issued_svids(
    pair: ProviderPair, authorities: dict[Case, Authority], kube: KubeServer, root: TestCa, issuer: str, mode: Mode
) -> None:
    assert pair.bundle.authorities == (root.certificate,)
    authority = authorities[issuer, mode]
    served = pair.check_mtls(pair.switch(authority), f"{issuer}-{mode}")

    if mode is Mode.INTERMEDIATE:  # the leaf is ours, under the intermediate cert-manager signed
        assert authority.signing_ca is not None
        assert served[1:] == (authority.signing_ca.certificate,)
    else:
        assert served[1:] == ()
    request = answered(kube, served[-1])  # the certificate cert-manager returned is what Envoy serves
    assert request["spec"]["issuerRef"]["name"] == issuer
    assert request["spec"]["isCA"] is (mode is Mode.INTERMEDIATE)
    status_ca = base64.b64decode(request["status"].get("ca", ""))
    assert (x509.load_pem_x509_certificates(status_ca) if status_ca else []) == (
        [] if issuer == "acme-like" else [root.certificate]
    )


def test_rotation_under_traffic_fails_no_request(pair: ProviderPair, authorities: dict[Case, Authority]) -> None:
    loop = pair.rotate_under_traffic(
        [authorities["acme-like", Mode.PER_WORKLOAD], authorities["mesh-ca", Mode.INTERMEDIATE]]
    )
    assert loop.failures == []
    assert loop.peers == {str(pair.running.mesh.service("frontend").identity)}
