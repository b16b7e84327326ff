"""The cert-manager provider against the test Kubernetes API server and the cert-manager stand-in."""

from __future__ import annotations

import base64
import logging
import re
import subprocess
import threading
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import yaml
from cryptography import x509

from mesh_identity.authority import Authority, AuthoritySettings, workload_csr
from mesh_identity.errors import ConfigError, ProviderError, ProviderRejectedError
from mesh_identity.keys import KeyType, generate_key
from mesh_identity.profile import ca_csr
from mesh_identity.provider import Mode, ProviderContext, SignedCertificate
from mesh_identity.spiffe import SpiffeId, TrustDomain
from mesh_identity.svid import X509Svid, cert_pem, certs_pem, fingerprint_of
from mesh_identity.verify import chain_problem
from plugins.manager import Plugins
from plugins.testing import ProviderContract
from providers.cert_manager import plugin
from providers.cert_manager.errors import (
    IssuerNotFoundError,
    KubeForbiddenError,
    KubeInvalidError,
    KubeNotFoundError,
    KubeTlsError,
    KubeUnauthorizedError,
    KubeUnreachableError,
    RequestDeniedError,
    RequestFailedError,
    RequestTimeoutError,
    TrustBundleError,
)
from providers.cert_manager.provider import SPEC, CertManagerProvider
from tests.fakes.cert_manager import CERTIFICATE_REQUEST, ISSUER, Behaviour, CertManagerSigner
from tests.fakes.kube import CONFIG_MAP, DEFAULT_USER, NAMESPACE, SECRET, KubeServer
from tests.pki import TestCa

TD = TrustDomain("example.org")
NS = "mesh-identity"
WEB = SpiffeId.for_kubernetes(TD, "shop", "web")
API = SpiffeId.for_kubernetes(TD, "shop", "api")


@pytest.fixture(scope="module")
def root() -> TestCa:
    return TestCa.create("cert-manager test root", lifetime=timedelta(days=30))


@pytest.fixture
def signer(cert_manager_signer: CertManagerSigner, root: TestCa) -> CertManagerSigner:
    cert_manager_signer.add_ca_issuer("mesh-ca", root, namespace=NS)
    return cert_manager_signer


MakeProvider = Callable[..., CertManagerProvider]


@pytest.fixture
def make_provider(kube_server: KubeServer, tmp_path: Path) -> Iterator[MakeProvider]:
    made: list[CertManagerProvider] = []
    kubeconfig = kube_server.write_kubeconfig(tmp_path / "kubeconfig", namespace=NS)

    def make(
        mode: Mode = Mode.INTERMEDIATE,
        *,
        clock: Callable[[], datetime] | None = None,
        environ: dict[str, str] | None = None,
        **options: Any,
    ) -> CertManagerProvider:
        raw: dict[str, Any] = {"kubeconfig": str(kubeconfig), "issuer_name": "mesh-ca", "timeout": "5s"}
        raw.update(options)
        raw = {k: v for k, v in raw.items() if v is not None}
        context = ProviderContext(
            TD, tmp_path / "state", KeyType.ECDSA_P256, mode, clock or (lambda: datetime.now(UTC))
        )
        provider = CertManagerProvider(context, SPEC.validate_options(raw), environ=environ or {})
        made.append(provider)
        return provider

    yield make
    for provider in made:
        try:
            provider.close()
        except ProviderError:
            provider.api.close()


@pytest.fixture
def provider(signer: CertManagerSigner, make_provider: MakeProvider) -> CertManagerProvider:
    return make_provider()


def requests_left(server: KubeServer) -> list[dict[str, Any]]:
    return server.objects(CERTIFICATE_REQUEST)


def normalised(message: str) -> str:
    """Generated CertificateRequest names end in 5 random characters."""
    return re.sub(r"mesh-identity-[a-z0-9]{5}\b", "mesh-identity-xxxxx", message)


def openssl_verify(
    tmp_path: Path, leaf: x509.Certificate, chain: tuple[x509.Certificate, ...], roots: tuple[x509.Certificate, ...]
) -> str:
    (tmp_path / "leaf.pem").write_bytes(cert_pem(leaf))
    (tmp_path / "roots.pem").write_bytes(certs_pem(roots))
    args = ["openssl", "verify", "-x509_strict", "-CAfile", str(tmp_path / "roots.pem")]
    if chain:
        (tmp_path / "chain.pem").write_bytes(certs_pem(chain))
        args += ["-untrusted", str(tmp_path / "chain.pem")]
    result = subprocess.run([*args, str(tmp_path / "leaf.pem")], capture_output=True, text=True, check=False)
    return (result.stdout + result.stderr).strip()


def svid_verifies(tmp_path: Path, svid: X509Svid) -> None:
    assert openssl_verify(tmp_path, svid.leaf, svid.chain, svid.bundle.authorities) == f"{tmp_path}/leaf.pem: OK"
    assert chain_problem(svid.leaf, svid.chain, svid.bundle, datetime.now(UTC)) is None


# ------------------------------------------------------------------------------------------- the contract


class TestCertManagerContract(ProviderContract):
    @pytest.fixture
    def provider(self, signer: CertManagerSigner, make_provider: MakeProvider) -> CertManagerProvider:
        return make_provider()


def test_registers_through_the_plugin_hooks() -> None:
    assert plugin.mesh_identity_providers() == [SPEC]
    assert SPEC.name == "cert-manager"
    assert plugin.mesh_identity_validate_provider_options("vault", {"trust_bundle_file": "a"}) == []
    assert plugin.mesh_identity_validate_provider_options(
        "cert-manager", {"trust_bundle_file": "a", "trust_bundle_secret": "b"}
    ) == [
        "ca.provider_options.trust_bundle_secret: give only one of trust_bundle_file, trust_bundle_secret and "
        "trust_bundle_configmap (also set: trust_bundle_file)"
    ]


def test_found_through_the_entry_point_group() -> None:
    plugins = Plugins.load()
    assert plugins.provider("cert-manager") is SPEC
    with pytest.raises(ConfigError) as info:
        plugins.validate_provider_options(
            "cert-manager", {"issuer_name": "x", "in_cluster": True, "context": "prod", "namespace": "A"}
        )
    assert str(info.value) == (
        "ca.provider_options.in_cluster: in-cluster config uses the service account, not context\n"
        "ca.provider_options.namespace: 'A' is not a valid namespace name"
    )


# ------------------------------------------------------------------------------------------------ issuing


def test_intermediate_mode_issues_svids_that_verify(
    kube_server: KubeServer, provider: CertManagerProvider, root: TestCa, tmp_path: Path
) -> None:
    authority = Authority(
        provider,
        AuthoritySettings(
            TD, Mode.INTERMEDIATE, intermediate_ttl=timedelta(hours=6), workload_ttl=timedelta(minutes=30)
        ),
    )
    authority.start()  # a first start learns the bundle (one probe), then gets the intermediate
    assert authority.bundle().authorities == (root.certificate,)

    def creates() -> int:
        return len([r for r in kube_server.requests if r.verb == "create" and r.resource == "certificaterequests"])

    assert creates() == 2
    web, api = authority.issue(WEB), authority.issue(API)
    for svid in (web, api):
        svid_verifies(tmp_path, svid)
    assert authority.signing_ca is not None
    assert web.chain == (authority.signing_ca.certificate,)
    assert creates() == 2  # one request per intermediate lifetime, none per workload
    assert requests_left(kube_server) == []


def test_intermediate_request_asks_for_a_ca(
    kube_server: KubeServer, signer: CertManagerSigner, make_provider: MakeProvider
) -> None:
    provider = make_provider(keep_requests=True, labels={"team": "platform"})
    signed = provider.sign_intermediate(ca_csr(generate_key(KeyType.ECDSA_P256), TD, "test"), timedelta(hours=6))
    [cr] = requests_left(kube_server)
    meta, spec = cr["metadata"], cr["spec"]
    assert spec["isCA"] is True
    assert spec["usages"] == ["digital signature", "cert sign", "crl sign"]
    assert spec["duration"] == "6h0m0s"
    assert spec["issuerRef"] == {"name": "mesh-ca", "kind": "Issuer", "group": "cert-manager.io"}
    assert meta["name"].startswith("mesh-identity-")
    assert meta["labels"] == {
        "team": "platform",
        "app.kubernetes.io/managed-by": "mesh-identity",
        "mesh-identity.io/trust-domain": "example.org",
        "mesh-identity.io/purpose": "intermediate",
        "mesh-identity.io/identity": meta["labels"]["mesh-identity.io/identity"],
        "mesh-identity.io/instance": provider.instance,
    }
    assert meta["annotations"] == {"mesh-identity.io/spiffe-id": "spiffe://example.org"}
    assert signed.certificate.extensions.get_extension_for_class(x509.BasicConstraints).value.ca


def test_per_workload_mode_issues_svids_that_verify(
    kube_server: KubeServer, signer: CertManagerSigner, make_provider: MakeProvider, root: TestCa, tmp_path: Path
) -> None:
    provider = make_provider(Mode.PER_WORKLOAD, keep_requests=True)
    authority = Authority(provider, AuthoritySettings(TD, Mode.PER_WORKLOAD, workload_ttl=timedelta(minutes=30)))
    authority.start()
    svid = authority.issue(WEB)
    svid_verifies(tmp_path, svid)
    assert svid.not_after == svid.leaf.not_valid_after_utc
    workload = [
        cr for cr in requests_left(kube_server) if cr["metadata"]["labels"]["mesh-identity.io/purpose"] == "workload"
    ]
    [cr] = workload
    assert cr["spec"]["isCA"] is False
    assert cr["spec"]["usages"] == ["digital signature", "server auth", "client auth"]
    assert cr["spec"]["duration"] == "0h30m0s"
    assert cr["metadata"]["annotations"] == {"mesh-identity.io/spiffe-id": str(WEB)}


def test_rsa_workloads_ask_for_key_encipherment(
    kube_server: KubeServer, signer: CertManagerSigner, make_provider: MakeProvider
) -> None:
    provider = make_provider(Mode.PER_WORKLOAD, keep_requests=True)
    provider.sign_workload(workload_csr(generate_key(KeyType.RSA_2048), WEB), WEB, timedelta(minutes=5))
    [cr] = requests_left(kube_server)
    assert cr["spec"]["usages"] == ["digital signature", "key encipherment", "server auth", "client auth"]


def test_intermediate_issuer_chain_and_cluster_issuer(
    kube_server: KubeServer,
    cert_manager_signer: CertManagerSigner,
    make_provider: MakeProvider,
    root: TestCa,
    tmp_path: Path,
) -> None:
    upstream = TestCa.create("upstream intermediate", parent=root)
    cert_manager_signer.add_ca_issuer("cluster-ca", upstream)
    provider = make_provider(Mode.PER_WORKLOAD, issuer_name="cluster-ca", issuer_kind="ClusterIssuer")
    signed = provider.sign_workload(workload_csr(generate_key(KeyType.ECDSA_P256), WEB), WEB, timedelta(minutes=5))
    assert signed.chain == (upstream.certificate,)
    assert signed.bundle.authorities == (root.certificate,)
    assert openssl_verify(tmp_path, signed.certificate, signed.chain, signed.bundle.authorities).endswith(": OK")


def test_waits_with_one_shared_watch_not_a_poll(kube_server: KubeServer, provider: CertManagerProvider) -> None:
    def mine() -> list[tuple[str, str]]:
        return sorted(
            (r.verb, r.resource)
            for r in kube_server.requests
            if r.user != "system:serviceaccount:cert-manager:cert-manager"
        )

    kube_server.requests.clear()
    provider.sign_workload(workload_csr(generate_key(KeyType.ECDSA_P256), WEB), WEB, timedelta(minutes=5))
    assert mine() == [
        ("create", "certificaterequests"),
        ("delete", "certificaterequests"),
        ("list", "certificaterequests"),
        ("watch", "certificaterequests"),
    ]
    kube_server.requests.clear()
    for identity in (WEB, API):
        csr = workload_csr(generate_key(KeyType.ECDSA_P256), identity)
        provider.sign_workload(csr, identity, timedelta(minutes=5))
    assert mine() == [("create", "certificaterequests")] * 2 + [("delete", "certificaterequests")] * 2
    assert provider.api.timings.watches == 1


def test_shortened_duration_is_reported(
    kube_server: KubeServer, cert_manager_signer: CertManagerSigner, make_provider: MakeProvider, root: TestCa
) -> None:
    cert_manager_signer.add_ca_issuer("short", root, namespace=NS, max_duration=timedelta(minutes=10))
    provider = make_provider(Mode.PER_WORKLOAD, issuer_name="short")
    signed = provider.sign_workload(workload_csr(generate_key(KeyType.ECDSA_P256), WEB), WEB, timedelta(hours=1))
    assert signed.certificate.not_valid_after_utc - signed.certificate.not_valid_before_utc == timedelta(
        minutes=10, seconds=30
    )
    assert len(signed.warnings) == 1
    assert re.fullmatch(
        r"Issuer mesh-identity/short shortened the duration: asked for 1h, the certificate is "
        r"valid for (9m\d+s|10m) more",
        signed.warnings[0],
    )


# ------------------------------------------------------------------------------------------ trust bundle


def test_trust_bundle_probe_learns_status_ca_once(
    kube_server: KubeServer, signer: CertManagerSigner, make_provider: MakeProvider, root: TestCa, tmp_path: Path
) -> None:
    first = make_provider()
    assert first.trust_bundle().authorities == (root.certificate,)
    probes = [r for r in kube_server.requests if r.verb == "create" and r.resource == "certificaterequests"]
    assert len(probes) == 1
    assert (tmp_path / "state" / "cert-manager" / "ca.pem").read_bytes() == root.pem()
    assert requests_left(kube_server) == []
    second = make_provider()  # same state directory: no probe
    assert second.trust_bundle().authorities == (root.certificate,)
    assert len([r for r in kube_server.requests if r.verb == "create" and r.resource == "certificaterequests"]) == 1


def _bundle_in_file(server: KubeServer, root: TestCa, tmp_path: Path) -> dict[str, str]:
    (tmp_path / "bundle.pem").write_bytes(root.pem())
    return {"trust_bundle_file": str(tmp_path / "bundle.pem")}


def _bundle_in_secret(server: KubeServer, root: TestCa, tmp_path: Path) -> dict[str, str]:
    server.put_object(
        SECRET,
        {
            "metadata": {"name": "mesh-root", "namespace": "cert-manager"},
            "data": {"root.pem": base64.b64encode(root.pem()).decode()},
        },
    )
    return {"trust_bundle_secret": "cert-manager/mesh-root", "trust_bundle_key": "root.pem"}


def _bundle_in_configmap(server: KubeServer, root: TestCa, tmp_path: Path) -> dict[str, str]:
    server.put_object(
        CONFIG_MAP, {"metadata": {"name": "mesh-root", "namespace": NS}, "data": {"ca.crt": root.pem().decode()}}
    )
    return {"trust_bundle_configmap": "mesh-root"}


@pytest.mark.parametrize(
    "configure", [_bundle_in_file, _bundle_in_secret, _bundle_in_configmap], ids=["file", "secret", "configmap"]
)
@pytest.mark.parametrize("mode", list(Mode))
def test_empty_status_ca_uses_the_configured_bundle(
    kube_server: KubeServer,
    cert_manager_signer: CertManagerSigner,
    make_provider: MakeProvider,
    root: TestCa,
    tmp_path: Path,
    configure: Callable[[KubeServer, TestCa, Path], dict[str, str]],
    mode: Mode,
) -> None:
    cert_manager_signer.add_ca_issuer("acme-like", root, namespace=NS, omit_ca=True)
    provider = make_provider(mode, issuer_name="acme-like", **configure(kube_server, root, tmp_path))
    authority = Authority(provider, AuthoritySettings(TD, mode))
    authority.start()
    svid = authority.issue(WEB)
    assert svid.bundle.authorities == (root.certificate,)
    svid_verifies(tmp_path, svid)
    assert not (tmp_path / "state" / "cert-manager" / "ca.pem").exists()  # nothing learned from an empty ca


def test_empty_status_ca_without_a_configured_bundle_fails(
    kube_server: KubeServer,
    cert_manager_signer: CertManagerSigner,
    make_provider: MakeProvider,
    root: TestCa,
    tmp_path: Path,
) -> None:
    cert_manager_signer.add_ca_issuer("acme-like", root, namespace=NS, omit_ca=True)
    provider = make_provider(issuer_name="acme-like")
    with pytest.raises(TrustBundleError) as info:
        provider.trust_bundle()
    assert normalised(str(info.value)) == (
        "cert-manager: CertificateRequest mesh-identity/mesh-identity-xxxxx was issued by Issuer "
        "mesh-identity/acme-like with an empty status.ca, and no root is pinned or trusted yet: set "
        "trust_bundle_file, trust_bundle_secret or trust_bundle_configmap, or add the issuer's root with "
        "`mesh-identity ca trust FILE`"
    )
    assert not (tmp_path / "state" / "cert-manager" / "ca.pem").exists()
    assert requests_left(kube_server) == []


BAD_BUNDLES = [
    (
        "missing file",
        {"trust_bundle_file": "/nonexistent/bundle.pem"},
        TrustBundleError,
        "cert-manager: cannot read trust_bundle_file /nonexistent/bundle.pem: No such file or directory",
    ),
    (
        "missing secret",
        {"trust_bundle_secret": "nope"},
        KubeNotFoundError,
        'cert-manager: cannot read Secret mesh-identity/nope (404 NotFound): secrets "nope" not found',
    ),
    (
        "missing key",
        {"trust_bundle_configmap": "other", "trust_bundle_key": "root.pem"},
        KubeNotFoundError,
        "cert-manager: ConfigMap mesh-identity/other has no key 'root.pem' (it has: ca.crt)",
    ),
    (
        "not pem",
        {"trust_bundle_configmap": "other"},
        TrustBundleError,
        "cert-manager: the trust bundle (ConfigMap mesh-identity/other key 'ca.crt') does not hold valid PEM "
        "certificates (Unable to load PEM file. See https://cryptography.io/en/latest/faq/#why-can-t-i-import-my-pem-"
        "file for more details. MalformedFraming)",
    ),
]


@pytest.mark.parametrize(("options", "error", "message"), [b[1:] for b in BAD_BUNDLES], ids=[b[0] for b in BAD_BUNDLES])
def test_unusable_configured_bundle(
    kube_server: KubeServer,
    signer: CertManagerSigner,
    make_provider: MakeProvider,
    options: dict[str, str],
    error: type[ProviderError],
    message: str,
) -> None:
    kube_server.put_object(CONFIG_MAP, {"metadata": {"name": "other", "namespace": NS}, "data": {"ca.crt": "junk"}})
    provider = make_provider(**options)
    with pytest.raises(error) as info:
        provider.trust_bundle()
    assert str(info.value) == message


# --------------------------------------------------------------- trust: pinned bundle, first use, the operator


def _fp(cert: x509.Certificate) -> str:
    return fingerprint_of(cert)


def _sign(provider: CertManagerProvider, mode: Mode) -> SignedCertificate:
    key = generate_key(KeyType.ECDSA_P256)
    if mode is Mode.INTERMEDIATE:
        return provider.sign_intermediate(ca_csr(key, TD, "test"), timedelta(hours=1))
    return provider.sign_workload(workload_csr(key, WEB), WEB, timedelta(minutes=5))


@pytest.fixture(scope="module")
def rogue() -> TestCa:
    return TestCa.create("rogue root", lifetime=timedelta(days=30))


def _stored(tmp_path: Path) -> Path:
    return tmp_path / "state" / "cert-manager" / "ca.pem"


@pytest.mark.parametrize("mode", list(Mode))
def test_pinned_bundle_refuses_a_chain_to_an_unknown_root(
    kube_server: KubeServer,
    cert_manager_signer: CertManagerSigner,
    make_provider: MakeProvider,
    root: TestCa,
    rogue: TestCa,
    tmp_path: Path,
    mode: Mode,
) -> None:
    """Whoever controls the configured issuer answers under a root of their own: with a pinned bundle, that is
    refused, whatever status.ca says (here it names the rogue root, consistently)."""
    cert_manager_signer.add_ca_issuer("rogue", rogue, namespace=NS)
    provider = make_provider(mode, issuer_name="rogue", **_bundle_in_file(kube_server, root, tmp_path))
    with pytest.raises(ProviderRejectedError) as info:
        _sign(provider, mode)
    assert info.value.retryable is False
    assert normalised(str(info.value)) == (
        "cert-manager: Issuer mesh-identity/rogue answered CertificateRequest mesh-identity/mesh-identity-xxxxx with "
        f"a chain to root 'CN=rogue root' (sha256 {_fp(rogue.certificate)}), which is not in the pinned trust bundle "
        f"(file {tmp_path / 'bundle.pem'}): refused, nothing trusted"
    )
    assert provider.trust_bundle().authorities == (root.certificate,)
    assert not _stored(tmp_path).exists()
    assert requests_left(kube_server) == []


def test_pinned_bundle_ignores_a_forged_status_ca(
    kube_server: KubeServer,
    signer: CertManagerSigner,
    make_provider: MakeProvider,
    root: TestCa,
    rogue: TestCa,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Someone who can write CertificateRequest status puts their root in status.ca: with a pinned bundle it is
    neither used to verify nor kept; the chain verifies against the pinned root and the bundle stays the pinned
    one."""
    caplog.set_level(logging.WARNING, logger="providers.cert_manager")
    signer.forge_status_ca("mesh-ca", rogue.certificate, namespace=NS)
    provider = make_provider(Mode.PER_WORKLOAD, **_bundle_in_file(kube_server, root, tmp_path))
    for _ in range(2):
        signed = _sign(provider, Mode.PER_WORKLOAD)
        assert signed.bundle.authorities == (root.certificate,)
    assert provider.trust_bundle().authorities == (root.certificate,)
    assert not _stored(tmp_path).exists()
    assert [normalised(r.getMessage()) for r in caplog.records] == [  # once, not at every request
        "cert-manager: status.ca of CertificateRequest mesh-identity/mesh-identity-xxxxx names 'CN=rogue root' "
        f"(sha256 {_fp(rogue.certificate)}), which is not trusted: ignored (the chain verified against file "
        f"{tmp_path / 'bundle.pem'})"
    ]


def test_trust_on_first_use_is_loud_and_kept_private(
    kube_server: KubeServer,
    signer: CertManagerSigner,
    make_provider: MakeProvider,
    root: TestCa,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.WARNING, logger="providers.cert_manager")
    provider = make_provider()
    assert provider.trust_bundle().authorities == (root.certificate,)
    [warning] = [r for r in caplog.records if "TRUST ON FIRST USE" in r.getMessage()]
    assert warning.levelno == logging.WARNING
    assert normalised(warning.getMessage()) == (
        "cert-manager: TRUST ON FIRST USE: no trust bundle is pinned, so root 'CN=cert-manager test root' (sha256 "
        f"{_fp(root.certificate)}), named in status.ca of CertificateRequest mesh-identity/mesh-identity-xxxxx by "
        f"Issuer mesh-identity/mesh-ca, is now the mesh's trust anchor (kept in {_stored(tmp_path)}); no other root "
        "will be trusted without `mesh-identity ca trust FILE`. Check this fingerprint against the issuer's CA, then "
        "pin it: set ca.provider_options.trust_bundle_file (or trust_bundle_secret, trust_bundle_configmap)"
    )
    assert _stored(tmp_path).read_bytes() == root.pem()
    assert _stored(tmp_path).stat().st_mode & 0o777 == 0o600
    assert _stored(tmp_path).parent.stat().st_mode & 0o777 == 0o700
    assert not [p for p in _stored(tmp_path).parent.iterdir() if p.name != "ca.pem"]  # no temp file left
    caplog.clear()
    make_provider().trust_bundle()  # a restart trusts what was stored: no second first use
    assert not [r for r in caplog.records if "TRUST ON FIRST USE" in r.getMessage()]


@pytest.mark.parametrize("mode", list(Mode))
def test_after_first_use_a_chain_to_an_unknown_root_is_refused(
    kube_server: KubeServer,
    signer: CertManagerSigner,
    make_provider: MakeProvider,
    root: TestCa,
    rogue: TestCa,
    tmp_path: Path,
    mode: Mode,
) -> None:
    provider = make_provider(mode)
    assert provider.trust_bundle().authorities == (root.certificate,)
    stored = _stored(tmp_path).read_bytes()
    signer.replace_issuer_ca("mesh-ca", rogue, namespace=NS)  # whoever controls the issuer changes its CA
    expected = (
        "cert-manager: Issuer mesh-identity/mesh-ca answered CertificateRequest mesh-identity/mesh-identity-xxxxx "
        f"with a chain to root 'CN=rogue root' (sha256 {_fp(rogue.certificate)}), which is not one of the roots "
        f"trusted in {_stored(tmp_path)} (sha256 {_fp(root.certificate)}): refused, nothing trusted. If the "
        "issuer's root really changed, check the new root out of band and add it with `mesh-identity ca trust FILE`"
    )
    for current in (provider, make_provider(mode)):  # the running provider, and one started afresh
        with pytest.raises(ProviderRejectedError) as info:
            _sign(current, mode)
        assert normalised(str(info.value)) == expected
        assert current.trust_bundle().authorities == (root.certificate,)
    assert _stored(tmp_path).read_bytes() == stored
    assert requests_left(kube_server) == []


def test_a_forged_status_ca_is_never_trusted(
    kube_server: KubeServer,
    signer: CertManagerSigner,
    make_provider: MakeProvider,
    root: TestCa,
    rogue: TestCa,
    tmp_path: Path,
) -> None:
    """status.ca is what the issuer *says* its CA is; the chain is checked against the trusted roots, not
    against the status.ca of the same request."""
    signer.forge_status_ca("mesh-ca", rogue.certificate, namespace=NS)
    provider = make_provider(Mode.PER_WORKLOAD)
    # first use: the forged CA does not sign the chain, so there is nothing to trust on first use
    with pytest.raises(ProviderRejectedError) as info:
        provider.trust_bundle()
    assert normalised(str(info.value)) == (
        "cert-manager: Issuer mesh-identity/mesh-ca answered CertificateRequest mesh-identity/mesh-identity-xxxxx "
        "with a chain that no root of its status.ca signs (status.ca: 'CN=rogue root' sha256 "
        f"{_fp(rogue.certificate)}): nothing to trust on first use; refused, nothing trusted. Pin the issuer's root "
        "with trust_bundle_file, trust_bundle_secret or trust_bundle_configmap, or add it with `mesh-identity ca "
        "trust FILE`"
    )
    assert not _stored(tmp_path).exists()
    # after first use: a forged status.ca changes nothing
    signer.forge_status_ca("mesh-ca", None, namespace=NS)
    assert provider.trust_bundle().authorities == (root.certificate,)
    signer.forge_status_ca("mesh-ca", rogue.certificate, namespace=NS)
    signed = _sign(provider, Mode.PER_WORKLOAD)
    assert signed.bundle.authorities == (root.certificate,)
    assert provider.trust_bundle().authorities == (root.certificate,)
    assert _stored(tmp_path).read_bytes() == root.pem()


def test_stored_roots_are_tightened_and_a_damaged_store_is_not_trusted_again(
    kube_server: KubeServer, signer: CertManagerSigner, make_provider: MakeProvider, root: TestCa, tmp_path: Path
) -> None:
    stored = _stored(tmp_path)
    stored.parent.mkdir(parents=True)
    stored.write_bytes(root.pem())
    stored.chmod(0o644)  # as earlier versions wrote it
    assert make_provider().trust_bundle().authorities == (root.certificate,)
    assert stored.stat().st_mode & 0o777 == 0o600
    stored.write_bytes(b"junk")
    with pytest.raises(TrustBundleError) as info:
        make_provider().trust_bundle()
    assert str(info.value) == (
        f"cert-manager: the roots trusted in {stored} cannot be read (it does not hold valid PEM certificates): fix "
        "the file, or delete it to trust the issuer's root on first use again"
    )
    assert stored.read_bytes() == b"junk"
    assert [r for r in kube_server.requests if r.verb == "create" and r.resource == "certificaterequests"] == []


def test_trust_roots_is_the_operators_step(
    kube_server: KubeServer,
    signer: CertManagerSigner,
    make_provider: MakeProvider,
    root: TestCa,
    rogue: TestCa,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.WARNING, logger="providers.cert_manager")
    running = make_provider(Mode.PER_WORKLOAD)
    assert running.trust_bundle().authorities == (root.certificate,)
    signer.replace_issuer_ca("mesh-ca", rogue, namespace=NS)  # the issuer's root really changes
    with pytest.raises(ProviderRejectedError):
        _sign(running, Mode.PER_WORKLOAD)
    operator = make_provider(Mode.PER_WORKLOAD)  # `mesh-identity ca trust` builds its own provider
    assert operator.trust_roots([rogue.certificate, root.certificate]) == [rogue.certificate]
    assert operator.trust_roots([rogue.certificate]) == []
    assert [r.getMessage() for r in caplog.records if "operator" in r.getMessage()] == [
        f"cert-manager: the operator trusted root 'CN=rogue root' (sha256 {_fp(rogue.certificate)}): added to "
        f"{_stored(tmp_path)}"
    ]
    assert _stored(tmp_path).stat().st_mode & 0o777 == 0o600
    # the running provider reads the change: no restart needed
    signed = _sign(running, Mode.PER_WORKLOAD)
    assert signed.bundle.authorities == (root.certificate, rogue.certificate)
    assert running.trust_bundle().authorities == (root.certificate, rogue.certificate)
    assert {c.name: (c.ok, c.detail) for c in running.doctor()}["trust bundle"] == (
        True,
        f"2 root(s) trusted in {_stored(tmp_path)} (on first use, or by `mesh-identity ca trust`): sha256 "
        f"{_fp(root.certificate)}, sha256 {_fp(rogue.certificate)}; not pinned: set trust_bundle_file, "
        "trust_bundle_secret or trust_bundle_configmap to pin",
    )


def test_trust_roots_before_first_use_means_no_first_use(
    kube_server: KubeServer,
    signer: CertManagerSigner,
    make_provider: MakeProvider,
    root: TestCa,
    rogue: TestCa,
    tmp_path: Path,
) -> None:
    provider = make_provider()
    assert provider.trust_roots([rogue.certificate]) == [rogue.certificate]
    with pytest.raises(ProviderRejectedError):  # the issuer's real root was never trusted: refused, not learned
        _sign(provider, Mode.INTERMEDIATE)
    assert provider.trust_bundle().authorities == (rogue.certificate,)


def test_trust_roots_refuses_with_a_pinned_bundle_and_checks_what_it_is_given(
    kube_server: KubeServer, signer: CertManagerSigner, make_provider: MakeProvider, root: TestCa, tmp_path: Path
) -> None:
    pinned = make_provider(**_bundle_in_file(kube_server, root, tmp_path))
    assert {c.name: (c.ok, c.detail) for c in pinned.doctor()}["trust bundle"] == (
        True,
        f"1 root(s) pinned by file {tmp_path / 'bundle.pem'}: sha256 {_fp(root.certificate)}",
    )
    with pytest.raises(ProviderRejectedError) as info:
        pinned.trust_roots([TestCa.create("new root").certificate])
    assert str(info.value) == (
        f"cert-manager: the trust bundle is pinned (file {tmp_path / 'bundle.pem'}): add the root there; "
        "`mesh-identity ca trust` only adds to the roots the provider keeps without a pinned bundle"
    )
    provider = make_provider()
    intermediate = TestCa.create("an intermediate", parent=root)
    with pytest.raises(ProviderRejectedError) as info:
        provider.trust_roots([intermediate.certificate])
    assert str(info.value) == (
        f"cert-manager: cannot trust 'CN=an intermediate' (sha256 {_fp(intermediate.certificate)}): it is not "
        "self-signed (issued by 'CN=cert-manager test root'): give the root itself"
    )
    assert not _stored(tmp_path).exists()


# ---------------------------------------------------------------------------------------------- failures


def _deny(server: KubeServer, signer: CertManagerSigner) -> None:
    signer.behaviour = Behaviour.DENY


def _fail(server: KubeServer, signer: CertManagerSigner) -> None:
    signer.behaviour = Behaviour.FAIL


def _stall(server: KubeServer, signer: CertManagerSigner) -> None:
    signer.behaviour = Behaviour.STALL


def _no_approver(server: KubeServer, signer: CertManagerSigner) -> None:
    signer.behaviour = Behaviour.IGNORE


def _forbid_create(server: KubeServer, signer: CertManagerSigner) -> None:
    server.deny("create", "certificaterequests", user="system:serviceaccount:mesh-identity:mesh-identity")


def _forbid_watch(server: KubeServer, signer: CertManagerSigner) -> None:
    signer.behaviour = Behaviour.STALL  # so the answer cannot come from the listing before the watch
    server.deny("watch", "certificaterequests", user="system:serviceaccount:mesh-identity:mesh-identity")


def _webhook_refuses(server: KubeServer, signer: CertManagerSigner) -> None:
    server.inject_error(
        "create",
        "certificaterequests",
        code=422,
        reason="Invalid",
        message='admission webhook "webhook.cert-manager.io" denied the request: spec.request: '
        "Invalid value: []byte{...}: failed to decode csr",
    )


def _overloaded(server: KubeServer, signer: CertManagerSigner) -> None:
    server.inject_error(
        "create",
        "certificaterequests",
        code=429,
        reason="TooManyRequests",
        message="Too many requests, please try again later.",
    )


FAILURES: list[
    tuple[str, Callable[[KubeServer, CertManagerSigner], None], dict[str, Any], type[ProviderError], bool, str]
] = [
    (
        "denied",
        _deny,
        {},
        RequestDeniedError,
        False,
        "cert-manager: CertificateRequest mesh-identity/mesh-identity-xxxxx was denied by cert-manager.io: Denied by "
        "mesh-identity test policy",
    ),
    (
        "failed",
        _fail,
        {},
        RequestFailedError,
        True,
        "cert-manager: Issuer mesh-identity/mesh-ca failed CertificateRequest mesh-identity/mesh-identity-xxxxx: "
        "Ready=False (Failed): Failed to sign certificate: the issuing CA refused the request",
    ),
    (
        "stalled",
        _stall,
        {"timeout": "1s"},
        RequestTimeoutError,
        True,
        "cert-manager: CertificateRequest mesh-identity/mesh-identity-xxxxx was not ready after 1s (Ready=False "
        "(Pending): Waiting on certificate issuance from the issuer); is Issuer mesh-identity/mesh-ca working?",
    ),
    (
        "no approver",
        _no_approver,
        {"timeout": "1s"},
        RequestTimeoutError,
        True,
        "cert-manager: CertificateRequest mesh-identity/mesh-identity-xxxxx was not ready after 1s (not approved or "
        "denied yet (no approver running?)); is Issuer mesh-identity/mesh-ca working?",
    ),
    (
        "issuer not found",
        lambda server, signer: None,
        {"issuer_name": "missing"},
        IssuerNotFoundError,
        False,
        'cert-manager: CertificateRequest mesh-identity/mesh-identity-xxxxx: Referenced "Issuer" not found: '
        'issuer.cert-manager.io "missing" not found (check issuer_name, issuer_kind and namespace)',
    ),
    (
        "cluster issuer not found",
        lambda server, signer: None,
        {"issuer_name": "missing", "issuer_kind": "ClusterIssuer"},
        IssuerNotFoundError,
        False,
        'cert-manager: CertificateRequest mesh-identity/mesh-identity-xxxxx: Referenced "ClusterIssuer" not found: '
        'clusterissuer.cert-manager.io "missing" not found (check issuer_name, issuer_kind and namespace)',
    ),
    (
        "forbidden create",
        _forbid_create,
        {},
        KubeForbiddenError,
        False,
        'cert-manager: not allowed to create a CertificateRequest in namespace "mesh-identity" (403 Forbidden): '
        'certificaterequests.cert-manager.io is forbidden: User "system:serviceaccount:mesh-identity:mesh-identity" '
        'cannot create resource "certificaterequests" in API group "cert-manager.io" in the namespace "mesh-identity"',
    ),
    (
        "forbidden watch",
        _forbid_watch,
        {},
        KubeForbiddenError,
        False,
        'cert-manager: not allowed to watch CertificateRequests in namespace "mesh-identity" (403 Forbidden): '
        'certificaterequests.cert-manager.io is forbidden: User "system:serviceaccount:mesh-identity:mesh-identity" '
        'cannot watch resource "certificaterequests" in API group "cert-manager.io" in the namespace "mesh-identity"',
    ),
    (
        "webhook refuses",
        _webhook_refuses,
        {},
        KubeInvalidError,
        False,
        'cert-manager: the API server refused to create a CertificateRequest in namespace "mesh-identity" (422 '
        'Invalid): admission webhook "webhook.cert-manager.io" denied the request: spec.request: Invalid value: '
        "[]byte{...}: failed to decode csr",
    ),
    (
        "throttled",
        _overloaded,
        {},
        ProviderError,
        True,
        "cert-manager: the Kubernetes API at https://127.0.0.1:PORT answered 429 TooManyRequests to create a "
        'CertificateRequest in namespace "mesh-identity": Too many requests, please try again later.',
    ),
]


@pytest.mark.parametrize(
    ("arrange", "options", "error", "retryable", "message"), [f[1:] for f in FAILURES], ids=[f[0] for f in FAILURES]
)
@pytest.mark.parametrize("mode", list(Mode))
def test_failures_say_what_happened_and_leak_nothing(
    kube_server: KubeServer,
    signer: CertManagerSigner,
    make_provider: MakeProvider,
    mode: Mode,
    arrange: Callable[[KubeServer, CertManagerSigner], None],
    options: dict[str, Any],
    error: type[ProviderError],
    retryable: bool,
    message: str,
) -> None:
    provider = make_provider(mode, keep_requests=True, **options)
    arrange(kube_server, signer)
    key = generate_key(KeyType.ECDSA_P256)
    with pytest.raises(error) as info:
        if mode is Mode.INTERMEDIATE:
            provider.sign_intermediate(ca_csr(key, TD, "test"), timedelta(hours=1))
        else:
            provider.sign_workload(workload_csr(key, WEB), WEB, timedelta(minutes=5))
    assert normalised(str(info.value)).replace(str(kube_server.port), "PORT") == message
    assert info.value.retryable is retryable
    left = requests_left(kube_server)
    if error in (RequestDeniedError, RequestFailedError):  # finished, and keep_requests is on
        assert len(left) == 1
    else:
        assert left == []  # timed out or never finished: deleted even with keep_requests
    assert provider.health().healthy is (error is ProviderError)  # a passing 429 leaves no trace


def test_denied_and_failed_requests_are_deleted_by_default(
    kube_server: KubeServer, signer: CertManagerSigner, provider: CertManagerProvider
) -> None:
    for behaviour in (Behaviour.DENY, Behaviour.FAIL):
        signer.behaviour = behaviour
        with pytest.raises(ProviderError):
            provider.sign_workload(workload_csr(generate_key(KeyType.ECDSA_P256), WEB), WEB, timedelta(minutes=5))
    assert requests_left(kube_server) == []


def test_api_server_down(kube_server: KubeServer, signer: CertManagerSigner, make_provider: MakeProvider) -> None:
    provider = make_provider(Mode.PER_WORKLOAD)
    kube_server.go_down()
    with pytest.raises(KubeUnreachableError) as info:
        provider.sign_workload(workload_csr(generate_key(KeyType.ECDSA_P256), WEB), WEB, timedelta(minutes=5))
    assert str(info.value) == (
        f"cert-manager: cannot reach the Kubernetes API at {kube_server.url} to create a "
        'CertificateRequest in namespace "mesh-identity": the connection was dropped'
    )
    assert info.value.retryable
    health = provider.health()
    assert (health.healthy, health.detail) == (
        False,
        (
            f"cert-manager: cannot reach the Kubernetes API at {kube_server.url} to list CertificateRequests in "
            'namespace "mesh-identity": the connection was dropped'
        ),
    )
    kube_server.come_up()
    assert provider.health().healthy


def test_api_server_stopped_is_connection_refused(make_provider: MakeProvider, tmp_path: Path) -> None:
    server = KubeServer().start()
    kubeconfig = server.write_kubeconfig(tmp_path / "stopped")
    server.stop()
    provider = make_provider(kubeconfig=str(kubeconfig))
    with pytest.raises(KubeUnreachableError) as info:
        provider.trust_bundle()
    assert str(info.value) == (
        f"cert-manager: cannot reach the Kubernetes API at {server.url} to create a "
        'CertificateRequest in namespace "default": connection refused'
    )


def test_outage_during_the_wait_is_survived(
    kube_server: KubeServer, signer: CertManagerSigner, make_provider: MakeProvider
) -> None:
    provider = make_provider(Mode.PER_WORKLOAD, timeout="20s")
    signer.behaviour = Behaviour.STALL
    result: list[object] = []
    key = generate_key(KeyType.ECDSA_P256)
    worker = threading.Thread(
        target=lambda: result.append(provider.sign_workload(workload_csr(key, WEB), WEB, timedelta(minutes=5)))
    )
    worker.start()
    assert kube_server.wait_for_watches(2)  # the signer's and the provider's
    kube_server.go_down()
    kube_server.come_up()
    signer.behaviour = Behaviour.ISSUE
    signer.resync()
    worker.join(timeout=30)
    assert len(result) == 1
    assert requests_left(kube_server) == []


def test_expired_watch_is_resumed_from_a_fresh_read(
    kube_server: KubeServer, signer: CertManagerSigner, make_provider: MakeProvider
) -> None:
    provider = make_provider(Mode.PER_WORKLOAD, timeout="20s")
    signer.behaviour = Behaviour.STALL
    result: list[object] = []
    key = generate_key(KeyType.ECDSA_P256)
    worker = threading.Thread(
        target=lambda: result.append(provider.sign_workload(workload_csr(key, WEB), WEB, timedelta(minutes=5)))
    )
    worker.start()
    assert kube_server.wait_for_watch(user=DEFAULT_USER, kind=CERTIFICATE_REQUEST)  # the provider's shared watch
    # The signer approves the request, then leaves it Pending: two writes the provider's watch receives. Once
    # both are done nothing writes a CertificateRequest until the signer is told to issue; one landing between
    # compact() and end_watches() would carry the provider past the compaction, and it would resume with a 200.
    assert signer.wait_for_outcomes(1)
    kube_server.requests.clear()
    kube_server.put_object(SECRET, {"metadata": {"name": "unrelated", "namespace": NS}})  # not watched by it
    compacted = kube_server.compact()  # history now starts after the provider's last seen version
    kube_server.end_watches()  # the provider re-watches from that version, which is too old: 410
    # Its watch from the fresh read (not an ended stream whose handler has not closed it yet): only then may
    # the signer issue, or the provider's deletion of the issued request could come before this watch.
    assert kube_server.wait_for_watch(user=DEFAULT_USER, kind=CERTIFICATE_REQUEST, since=compacted)
    signer.behaviour = Behaviour.ISSUE
    signer.resync()
    worker.join(timeout=30)
    assert len(result) == 1
    mine = [(r.verb, r.code) for r in kube_server.requests if r.user.endswith("mesh-identity:mesh-identity")]
    assert mine[:3] == [("watch", 410), ("list", 200), ("watch", 200)]


def test_failed_deletion_is_retried(
    kube_server: KubeServer, signer: CertManagerSigner, make_provider: MakeProvider
) -> None:
    provider = make_provider(Mode.PER_WORKLOAD)
    kube_server.inject_error(
        "delete", "certificaterequests", code=503, reason="ServiceUnavailable", message="etcd leader changed"
    )
    provider.sign_workload(workload_csr(generate_key(KeyType.ECDSA_P256), WEB), WEB, timedelta(minutes=5))
    assert len(requests_left(kube_server)) == 1
    assert [n.split("/")[0] for n in provider.undeleted] == [NS]
    provider.sign_workload(workload_csr(generate_key(KeyType.ECDSA_P256), API), API, timedelta(minutes=5))
    assert requests_left(kube_server) == []
    assert provider.undeleted == []


def test_forbidden_deletion_does_not_stop_issuance_but_shows_in_health(
    kube_server: KubeServer, signer: CertManagerSigner, make_provider: MakeProvider
) -> None:
    provider = make_provider(Mode.PER_WORKLOAD)
    rule = kube_server.deny("delete", "certificaterequests", user="system:serviceaccount:mesh-identity:mesh-identity")
    for identity in (WEB, API):
        provider.sign_workload(workload_csr(generate_key(KeyType.ECDSA_P256), identity), identity, timedelta(minutes=5))
    assert len(provider.undeleted) == 2
    health = provider.health()
    assert not health.healthy
    assert re.fullmatch(
        r"CertificateRequests not deleted \(mesh-identity/mesh-identity-\w{5}, mesh-identity/mesh-identity-\w{5}\): "
        r"cert-manager: not allowed to delete CertificateRequest mesh-identity/mesh-identity-\w{5} \(403 Forbidden\): "
        r".*cannot delete resource \"certificaterequests\".*",
        health.detail,
    )
    kube_server.allow(rule)
    assert provider.health().healthy
    assert provider.undeleted == []
    assert requests_left(kube_server) == []


def test_close_with_the_api_down_logs_what_is_left(
    kube_server: KubeServer,
    signer: CertManagerSigner,
    make_provider: MakeProvider,
    caplog: pytest.LogCaptureFixture,
) -> None:
    provider = make_provider(Mode.PER_WORKLOAD)
    kube_server.inject_error("delete", "certificaterequests", code=503, reason="ServiceUnavailable", message="x")
    provider.sign_workload(workload_csr(generate_key(KeyType.ECDSA_P256), WEB), WEB, timedelta(minutes=5))
    [left] = provider.undeleted
    kube_server.go_down()
    provider.close()
    assert normalised(caplog.records[-1].getMessage()) == (
        "cert-manager: CertificateRequests left behind (mesh-identity/mesh-identity-xxxxx): cert-manager: cannot "
        f"reach the Kubernetes API at {kube_server.url} to delete CertificateRequest mesh-identity/"
        "mesh-identity-xxxxx: the connection was dropped"
    )
    assert left.startswith("mesh-identity/mesh-identity-")


def test_sweep_deletes_what_a_crashed_process_left(
    kube_server: KubeServer, signer: CertManagerSigner, make_provider: MakeProvider
) -> None:
    crashed = make_provider(keep_requests=True)
    kube_server.put_object(
        CERTIFICATE_REQUEST,
        {  # another trust domain's: not ours to delete
            "metadata": {
                "name": "other-td",
                "namespace": NS,
                "labels": {
                    "app.kubernetes.io/managed-by": "mesh-identity",
                    "mesh-identity.io/trust-domain": "other.org",
                },
            },
            "spec": {"request": "eA==", "issuerRef": {"name": "mesh-ca"}},
        },
    )
    crashed.sign_workload(workload_csr(generate_key(KeyType.ECDSA_P256), WEB), WEB, timedelta(minutes=5))
    pending = crashed.api.create_request(
        NS,
        {
            "metadata": {
                "generateName": "mesh-identity-",
                "labels": {
                    "app.kubernetes.io/managed-by": "mesh-identity",
                    "mesh-identity.io/trust-domain": "example.org",
                },
            },
            "spec": {"request": "eA==", "issuerRef": {"name": "unknown-issuer", "group": "example.com"}},
        },
    )
    assert len(requests_left(kube_server)) == 3
    make_provider(keep_requests=True)  # a new process: keeps the finished one, the fresh pending one
    assert {cr["metadata"]["name"] for cr in requests_left(kube_server)} >= {"other-td", pending["metadata"]["name"]}
    assert len(requests_left(kube_server)) == 3
    later = datetime.now(UTC) + timedelta(hours=1)
    make_provider(clock=lambda: later)  # an hour on, without keep_requests: both of ours go
    assert [cr["metadata"]["name"] for cr in requests_left(kube_server)] == ["other-td"]


def test_failed_rotation_keeps_the_current_intermediate(
    signer: CertManagerSigner, provider: CertManagerProvider, tmp_path: Path
) -> None:
    authority = Authority(provider, AuthoritySettings(TD, Mode.INTERMEDIATE))
    authority.start()
    before = authority.signing_ca
    signer.behaviour = Behaviour.DENY
    with pytest.raises(RequestDeniedError):
        authority.rotate_intermediate()
    assert authority.signing_ca is before
    svid_verifies(tmp_path, authority.issue(WEB))  # still-valid CA keeps serving


# ------------------------------------------------------------------------------------ health and doctor


def test_health(kube_server: KubeServer, signer: CertManagerSigner, provider: CertManagerProvider) -> None:
    health = provider.health()
    assert (health.healthy, health.detail) == (
        True,
        (
            f"Issuer mesh-identity/mesh-ca reachable through {kube_server.url}; CertificateRequests in namespace "
            "mesh-identity"
        ),
    )
    signer.behaviour = Behaviour.FAIL
    with pytest.raises(RequestFailedError):
        provider.sign_workload(workload_csr(generate_key(KeyType.ECDSA_P256), WEB), WEB, timedelta(minutes=5))
    assert normalised(provider.health().detail) == (
        "the last CertificateRequest failed: cert-manager: Issuer mesh-identity/mesh-ca failed CertificateRequest "
        "mesh-identity/mesh-identity-xxxxx: Ready=False (Failed): Failed to sign certificate: the issuing CA refused "
        "the request"
    )
    signer.behaviour = Behaviour.ISSUE
    provider.sign_workload(workload_csr(generate_key(KeyType.ECDSA_P256), WEB), WEB, timedelta(minutes=5))
    assert provider.health().healthy


HEALTH_PROBLEMS = [
    (
        "missing issuer",
        {"issuer_name": "gone"},
        lambda server: None,
        "cert-manager: Issuer mesh-identity/gone does not exist",
    ),
    (
        "issuer not ready",
        {},
        lambda server: server.store.update(
            ISSUER,
            NS,
            "mesh-ca",
            lambda cr: {
                **cr,
                "status": {
                    "conditions": [
                        {
                            "type": "Ready",
                            "status": "False",
                            "reason": "ErrGetKeyPair",
                            "message": 'Error getting keypair for CA issuer: secret "mesh-ca-ca-key-pair" not found',
                        }
                    ]
                },
            },
            "status",
        ),
        "cert-manager: Issuer mesh-identity/mesh-ca is not Ready: Error getting keypair for CA issuer: secret "
        '"mesh-ca-ca-key-pair" not found',
    ),
    (
        "cannot list",
        {},
        lambda server: server.deny("list", "certificaterequests"),
        'cert-manager: not allowed to list CertificateRequests in namespace "mesh-identity" (403 Forbidden): '
        'certificaterequests.cert-manager.io is forbidden: User "system:serviceaccount:mesh-identity:mesh-identity" '
        'cannot list resource "certificaterequests" in API group "cert-manager.io" in the namespace "mesh-identity"',
    ),
    (
        "bad token",
        {},
        lambda server: server.tokens.clear(),
        "cert-manager: the Kubernetes API at https://127.0.0.1:PORT refused the credentials (401 Unauthorized) to "
        'list CertificateRequests in namespace "mesh-identity": check the service-account token or the kubeconfig '
        "user",
    ),
]


@pytest.mark.parametrize(
    ("options", "arrange", "detail"), [h[1:] for h in HEALTH_PROBLEMS], ids=[h[0] for h in HEALTH_PROBLEMS]
)
def test_health_problems(
    kube_server: KubeServer,
    signer: CertManagerSigner,
    make_provider: MakeProvider,
    options: dict[str, str],
    arrange: Callable[[KubeServer], object],
    detail: str,
) -> None:
    provider = make_provider(**options)
    arrange(kube_server)
    health = provider.health()
    assert (health.healthy, health.detail.replace(str(kube_server.port), "PORT")) == (False, detail)


def test_unauthorized_is_an_auth_error(
    kube_server: KubeServer, signer: CertManagerSigner, make_provider: MakeProvider
) -> None:
    provider = make_provider()
    kube_server.tokens.pop(next(iter(kube_server.tokens)))
    with pytest.raises(KubeUnauthorizedError):
        provider.sign_intermediate(ca_csr(generate_key(KeyType.ECDSA_P256), TD, "t"), timedelta(hours=1))


def test_external_issuer_is_not_read_for_health(
    kube_server: KubeServer, signer: CertManagerSigner, make_provider: MakeProvider
) -> None:
    provider = make_provider(
        issuer_name="pca", issuer_kind="AWSPCAClusterIssuer", issuer_group="awspca.cert-manager.io"
    )
    assert provider.health().healthy
    assert not [r for r in kube_server.requests if "issuers" in r.resource and r.user.endswith(":mesh-identity")]


def test_doctor(kube_server: KubeServer, signer: CertManagerSigner, make_provider: MakeProvider) -> None:
    provider = make_provider(issuer_name="gone")
    checks = {c.name: (c.ok, c.detail) for c in provider.doctor()}
    assert checks == {
        "kubernetes api": (
            True,
            f"{kube_server.url} (v1.31.0-mesh-identity-test), via kubeconfig "
            f"{provider.settings.kubeconfig} (context 'kube-server')",
        ),
        "certificaterequests": (True, "can list them in namespace mesh-identity"),
        "issuer": (False, "Issuer mesh-identity/gone does not exist"),
        "trust bundle": (
            True,
            "not pinned, and no root trusted yet: the root of the first answer will be trusted on first use; set "
            "trust_bundle_file, trust_bundle_secret or trust_bundle_configmap to pin it",
        ),
    }


def test_missing_crds(make_provider: MakeProvider, tmp_path: Path) -> None:
    with KubeServer(kinds=(SECRET, CONFIG_MAP, NAMESPACE)) as bare:
        provider = make_provider(kubeconfig=str(bare.write_kubeconfig(tmp_path / "bare", namespace=NS)))
        with pytest.raises(KubeNotFoundError) as info:
            provider.trust_bundle()
        assert str(info.value) == (
            'cert-manager: cannot create a CertificateRequest in namespace "mesh-identity" (404 NotFound): the '
            "server could not find the requested resource (are cert-manager's CRDs installed?)"
        )


def test_tls_trust_failure(kube_server: KubeServer, make_provider: MakeProvider, tmp_path: Path) -> None:
    config = kube_server.kubeconfig(namespace=NS)
    other = TestCa.create("not the API server's CA")
    config["clusters"][0]["cluster"]["certificate-authority-data"] = base64.b64encode(other.pem()).decode()
    (tmp_path / "wrong-ca").write_text(yaml.safe_dump(config))
    provider = make_provider(kubeconfig=str(tmp_path / "wrong-ca"))
    with pytest.raises(KubeTlsError) as info:
        provider.trust_bundle()
    assert str(info.value).startswith(f"cert-manager: TLS with the Kubernetes API at {kube_server.url} failed: ")
    assert "CERTIFICATE_VERIFY_FAILED" in str(info.value)
    assert info.value.retryable is False


# ---------------------------------------------------------------------------------------- configuration


def test_in_cluster_configuration(
    kube_server: KubeServer, signer: CertManagerSigner, make_provider: MakeProvider, tmp_path: Path
) -> None:
    environ = kube_server.write_in_cluster_files(tmp_path / "sa")
    provider = make_provider(kubeconfig=None, service_account_dir=str(tmp_path / "sa"), environ=environ)
    assert provider.connection.source == f"the in-cluster service account ({tmp_path / 'sa'})"
    assert provider.namespace == "mesh-identity"  # from the service account's namespace file
    assert provider.trust_bundle().authorities


def test_kubeconfig_context_and_its_namespace(
    kube_server: KubeServer, signer: CertManagerSigner, make_provider: MakeProvider, tmp_path: Path
) -> None:
    config = kube_server.kubeconfig(context="prod", namespace=NS)
    config["contexts"].append(
        {"name": "elsewhere", "context": {"cluster": "prod-cluster", "user": "prod-user", "namespace": "other"}}
    )
    config["current-context"] = "elsewhere"
    (tmp_path / "multi").write_text(yaml.safe_dump(config))
    assert make_provider(kubeconfig=str(tmp_path / "multi")).namespace == "other"
    chosen = make_provider(kubeconfig=str(tmp_path / "multi"), context="prod")
    assert chosen.namespace == NS
    assert chosen.trust_bundle().authorities
    assert make_provider(kubeconfig=str(tmp_path / "multi"), context="prod", namespace="third").namespace == "third"
    via_env = make_provider(kubeconfig=None, environ={"KUBECONFIG": str(tmp_path / "multi")})
    assert via_env.namespace == "other"


CONFIG_ERRORS = [
    (
        "no kubeconfig",
        {"kubeconfig": "/nonexistent/config"},
        {},
        "ca.provider_options.kubeconfig: no kubeconfig file at /nonexistent/config (and not in a pod: "
        "KUBERNETES_SERVICE_HOST is unset)",
    ),
    (
        "unknown context",
        {"context": "nope"},
        {},
        "ca.provider_options.context: no context 'nope' in KUBECONFIG (it has: kube-server)",
    ),
    (
        "in-cluster without files",
        {"kubeconfig": None, "in_cluster": True, "service_account_dir": "/nonexistent"},
        {"KUBERNETES_SERVICE_HOST": "127.0.0.1", "KUBERNETES_SERVICE_PORT": "1"},
        "ca.provider_options.in_cluster: cannot use the pod's service account in /nonexistent: Service token file "
        "does not exist.",
    ),
    (
        "in-cluster outside a pod",
        {"kubeconfig": None, "in_cluster": True},
        {},
        "ca.provider_options.in_cluster: cannot use the pod's service account in "
        "/var/run/secrets/kubernetes.io/serviceaccount: Service host/port is not set.",
    ),
    (
        "in-cluster and kubeconfig",
        {"in_cluster": True},
        {},
        "ca.provider_options.in_cluster: in-cluster config uses the service account, not kubeconfig",
    ),
    (
        "two bundles",
        {"trust_bundle_file": "/a", "trust_bundle_configmap": "b"},
        {},
        "ca.provider_options.trust_bundle_configmap: give only one of trust_bundle_file, trust_bundle_secret and "
        "trust_bundle_configmap (also set: trust_bundle_file)",
    ),
    (
        "bad namespace",
        {"namespace": "Mesh_Identity"},
        {},
        "ca.provider_options.namespace: 'Mesh_Identity' is not a valid namespace name",
    ),
    (
        "bad bundle reference",
        {"trust_bundle_secret": "a/b/c"},
        {},
        "ca.provider_options.trust_bundle_secret: 'a/b/c' is not [namespace/]name",
    ),
    (
        "bad label",
        {"labels": {"team": "платформа"}},
        {},
        "ca.provider_options.labels.team: 'платформа' is not a valid label value",
    ),
    ("bad label key", {"labels": {"-x": "y"}}, {}, "ca.provider_options.labels: '-x' is not a valid label key"),
    (
        "bad prefix",
        {"name_prefix": "Mesh-"},
        {},
        "ca.provider_options.name_prefix: 'Mesh-' must be lowercase letters, digits, '-' or '.', start with a letter "
        "or digit, and be at most 41 characters",
    ),
    ("short timeout", {"timeout": "500ms"}, {}, "ca.provider_options.timeout: 0.5s is shorter than 1s"),
    (
        "no issuer",
        {"issuer_name": None},
        {},
        "ca.provider_options.issuer_name: required by provider 'cert-manager' (the cert-manager issuer that signs)",
    ),
    (
        "unknown option",
        {"isuer_kind": "Issuer"},
        {},
        "ca.provider_options.isuer_kind: unknown option for provider 'cert-manager' (did you mean 'issuer_kind'?)",
    ),
]


@pytest.mark.parametrize(
    ("options", "environ", "message"), [c[1:] for c in CONFIG_ERRORS], ids=[c[0] for c in CONFIG_ERRORS]
)
def test_configuration_errors(
    make_provider: MakeProvider, tmp_path: Path, options: dict[str, Any], environ: dict[str, str], message: str
) -> None:
    with pytest.raises(ConfigError) as info:
        make_provider(environ=environ, **options)
    assert str(info.value).replace(str(tmp_path / "kubeconfig"), "KUBECONFIG") == message


def test_provider_errors_are_provider_errors() -> None:
    for error in (RequestDeniedError, IssuerNotFoundError, KubeForbiddenError, KubeInvalidError, TrustBundleError):
        assert issubclass(error, ProviderRejectedError)
