"""The Vault provider against a Vault: the test server, and a real Vault when VAULT_ADDR is set (``target``).

Everything here runs the same way on both, set up through the API (``targets.py``).
"""

from __future__ import annotations

import re
import subprocess
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import rsa

from mesh_identity.authority import Authority, AuthoritySettings, workload_csr
from mesh_identity.errors import ProviderError
from mesh_identity.keys import KeyType, generate_key
from mesh_identity.profile import ca_csr, is_ca
from mesh_identity.provider import Mode
from mesh_identity.spiffe import SpiffeId, TrustDomain
from mesh_identity.svid import X509Svid, certs_pem
from plugins.testing import ProviderContract
from providers.vault.errors import (
    VaultPermissionDeniedError,
    VaultRoleError,
    VaultTokenExpiredError,
    VaultTtlError,
)
from providers.vault.provider import VaultProvider
from tests.providers.vault.targets import TRUST_DOMAIN, VaultTarget
from tests.waiting import wait_until

WORKLOAD = SpiffeId.for_kubernetes(TRUST_DOMAIN, "default", "web")


@pytest.fixture
def provider(target: VaultTarget, tmp_path: Path) -> Iterator[VaultProvider]:
    made = target.provider(tmp_path)
    yield made
    made.close()


class TestVaultProviderContract(ProviderContract):
    """The shared suite every provider passes (``plugins/testing.py``), on a Vault root mount."""


def openssl_verify(svid: X509Svid, directory: Path) -> str:
    """``openssl verify`` of the SVID against its bundle, with its chain as untrusted intermediates."""
    bundle, chain, leaf = directory / "bundle.pem", directory / "chain.pem", directory / "leaf.pem"
    bundle.write_bytes(svid.bundle.pem())
    leaf.write_bytes(certs_pem([svid.leaf]))
    args = ["openssl", "verify", "-x509_strict", "-CAfile", str(bundle)]
    if svid.chain:
        chain.write_bytes(certs_pem(svid.chain))
        args += ["-untrusted", str(chain)]
    result = subprocess.run([*args, str(leaf)], capture_output=True, text=True, check=False)
    return (result.stdout + result.stderr).strip()


def issue_in(provider: VaultProvider, mode: Mode) -> tuple[Authority, X509Svid]:
    authority = Authority(
        provider,
        AuthoritySettings(
            TRUST_DOMAIN, mode=mode, workload_ttl=timedelta(minutes=20), intermediate_ttl=timedelta(hours=2)
        ),
    )
    authority.start()
    return authority, authority.issue(WORKLOAD)


@pytest.mark.parametrize("mode", list(Mode))
def test_both_modes_issue_svids_that_openssl_verifies(provider: VaultProvider, mode: Mode, tmp_path: Path):
    _, svid = issue_in(provider, mode)
    assert openssl_verify(svid, tmp_path) == f"{tmp_path / 'leaf.pem'}: OK"
    assert svid.bundle == provider.trust_bundle()
    assert len(svid.chain) == (1 if mode is Mode.INTERMEDIATE else 0)
    uris = svid.leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert uris.get_values_for_type(x509.UniformResourceIdentifier) == [str(WORKLOAD)]
    assert svid.not_after == svid.leaf.not_valid_after_utc


@pytest.mark.parametrize("mode", list(Mode))
def test_a_vault_side_intermediate_is_in_the_chain_and_its_root_in_the_bundle(
    target_with_vault_intermediate: VaultTarget, mode: Mode, tmp_path: Path
):
    target = target_with_vault_intermediate
    provider = target.provider(tmp_path)
    try:
        bundle = provider.trust_bundle()
        (root,) = bundle.authorities
        assert root.issuer == root.subject
        _, svid = issue_in(provider, mode)
        vault_intermediate = svid.chain[-1]
        assert vault_intermediate.issuer == root.subject
        assert is_ca(vault_intermediate)
        assert len(svid.chain) == (2 if mode is Mode.INTERMEDIATE else 1)
        assert openssl_verify(svid, tmp_path) == f"{tmp_path / 'leaf.pem'}: OK"
    finally:
        provider.close()


def test_expiry_is_read_from_the_certificate_when_the_role_caps_the_ttl(provider: VaultProvider):
    key = generate_key(KeyType.ECDSA_P256)
    signed = provider.sign_workload(workload_csr(key, WORKLOAD), WORKLOAD, timedelta(hours=48))
    not_after = signed.certificate.not_valid_after_utc
    assert not_after <= datetime.now(UTC) + timedelta(hours=24)
    vault_warning, ours = signed.warnings
    assert vault_warning == 'TTL "48h0m0s" is longer than permitted maxTTL "24h0m0s", so maxTTL is being used'
    assert re.fullmatch(
        r"Vault issued it until \S+Z, (1d|23h59m) short of the 2d asked \(the role's or mount's max TTL, or the "
        r"CA's expiry\)",
        ours,
    ), ours


def test_an_intermediate_is_cut_at_the_ca_expiry_with_a_warning(target_short_ca: VaultTarget, tmp_path: Path):
    provider = target_short_ca.provider(tmp_path)
    try:
        root = provider.trust_bundle().authorities[0]
        key = generate_key(KeyType.ECDSA_P256)
        signed = provider.sign_intermediate(ca_csr(key, TRUST_DOMAIN, "short"), timedelta(hours=24))
        assert signed.certificate.not_valid_after_utc == root.not_valid_after_utc
        (warning,) = signed.warnings
        assert warning.startswith(f"Vault issued it until {root.not_valid_after_utc:%Y-%m-%dT%H:%M:%SZ}, ")
    finally:
        provider.close()


def test_a_workload_ttl_past_the_ca_expiry_is_refused(target_short_ca: VaultTarget, tmp_path: Path):
    target = target_short_ca
    provider = target.provider(tmp_path, mode=Mode.PER_WORKLOAD)
    try:
        key = generate_key(KeyType.ECDSA_P256)
        with pytest.raises(VaultTtlError) as caught:
            provider.sign_workload(workload_csr(key, WORKLOAD), WORKLOAD, timedelta(hours=2))
    finally:
        provider.close()
    assert re.fullmatch(
        rf"vault: sign {WORKLOAD} at {target.mount}/sign/spiffe: Vault refused the TTL 7200s \(cannot satisfy "
        r"request, as TTL would result in notAfter of \S+ that is beyond the expiration of the CA certificate at "
        rf"\S+\); ask for a shorter TTL or renew the CA of mount '{target.mount}'",
        str(caught.value),
    ), str(caught.value)
    assert caught.value.retryable is False


RSA_KEY = rsa.generate_private_key(public_exponent=65537, key_size=2048)


@pytest.mark.parametrize(
    ("role", "spiffe_id", "key", "message"),
    [
        (
            "nope",
            WORKLOAD,
            None,
            "vault: sign {id} at {mount}/sign/nope: PKI role 'nope' does not exist on mount '{mount}'; create it or "
            "fix pki_role",
        ),
        (
            "spiffe",
            SpiffeId.for_kubernetes(TrustDomain("other.org"), "default", "web"),
            None,
            "vault: sign {id} at {mount}/sign/spiffe: role 'spiffe' on mount '{mount}' refused it: URI Subject "
            "Alternative Names were provided via CSR which are not valid for this role; allow our SPIFFE IDs with "
            "allowed_uri_sans (e.g. spiffe://<trust domain>/*) on the role",
        ),
        (
            "ec-only",
            WORKLOAD,
            RSA_KEY,
            "vault: sign {id} at {mount}/sign/ec-only: role 'ec-only' on mount '{mount}' refused it: role requires "
            "keys of type ec; set key_type=any on the role, or a ca.key_type the role accepts",
        ),
        (
            "needs-cn",
            WORKLOAD,
            None,
            "vault: sign {id} at {mount}/sign/needs-cn: role 'needs-cn' on mount '{mount}' refused it: the "
            'common_name field is required, or must be provided in a CSR with "use_csr_common_name" set to true, '
            'unless "require_cn" is set to false; set require_cn=false on the role, or set common_name in the '
            "provider options",
        ),
    ],
    ids=["unknown-role", "uri-outside-allowed", "key-type", "require-cn"],
)
def test_role_refusals_say_what_to_fix(target: VaultTarget, tmp_path: Path, role, spiffe_id, key, message):
    target.add_role("ec-only", allowed_uri_sans="spiffe://example.org/*", require_cn=False, key_type="ec")
    target.add_role("needs-cn", allowed_uri_sans="spiffe://example.org/*", key_type="any")
    provider = target.provider(tmp_path, mode=Mode.PER_WORKLOAD, pki_role=role)
    try:
        with pytest.raises(VaultRoleError) as caught:
            provider.sign_workload(
                workload_csr(key or generate_key(KeyType.ECDSA_P256), spiffe_id), spiffe_id, timedelta(minutes=10)
            )
    finally:
        provider.close()
    assert str(caught.value) == message.format(id=spiffe_id, mount=target.mount)
    assert caught.value.retryable is False


def test_permission_denied_names_the_path_and_capability(target: VaultTarget, tmp_path: Path):
    admin = target.admin()
    admin.sys.create_or_update_policy(
        f"{target.policy}-sign-only", f'path "{target.mount}/sign/*" {{ capabilities = ["update"] }}'
    )
    target.policies.append(f"{target.policy}-sign-only")
    token_file = target.token_file(tmp_path, policies=[f"{target.policy}-sign-only"])
    provider = target.provider(tmp_path, token_file=str(token_file))
    try:
        key = generate_key(KeyType.ECDSA_P256)
        with pytest.raises(VaultPermissionDeniedError) as caught:
            provider.sign_intermediate(ca_csr(key, TRUST_DOMAIN, "denied"), timedelta(hours=1))
        # the token itself is fine: per-workload signing is allowed
        assert provider.sign_workload(workload_csr(key, WORKLOAD), WORKLOAD, timedelta(minutes=5)).certificate
    finally:
        provider.close()
    path = f"{target.mount}/root/sign-intermediate"
    namespace = f" in namespace '{target.namespace}'" if target.namespace else ""
    assert str(caught.value) == (
        f"vault: sign the intermediate CA CSR at {path}: permission denied on POST {path}{namespace}; the token's "
        f"policies must grant 'update' on path \"{path}\""
    )


def test_a_revoked_token_is_an_auth_error_until_the_token_file_holds_a_new_one(target: VaultTarget, tmp_path: Path):
    token_file = target.token_file(tmp_path)
    provider = target.provider(tmp_path, token_file=str(token_file))
    key = generate_key(KeyType.ECDSA_P256)
    try:
        assert provider.sign_workload(workload_csr(key, WORKLOAD), WORKLOAD, timedelta(minutes=5)).certificate
        target.admin().auth.token.revoke(token_file.read_text().strip())
        with pytest.raises(VaultTokenExpiredError) as caught:
            provider.sign_workload(workload_csr(key, WORKLOAD), WORKLOAD, timedelta(minutes=5))
        assert str(caught.value) == (
            f"vault: the Vault token from token_file {token_file} is expired, revoked or not valid; give a new "
            "token (token_file is re-read), or use approle or kubernetes auth, which log in again (a valid token also needs the default "
            "policy, for auth/token/lookup-self)"
        )
        assert caught.value.retryable is False
        token_file.write_text(target.token())
        assert provider.sign_workload(workload_csr(key, WORKLOAD), WORKLOAD, timedelta(minutes=5)).certificate
    finally:
        provider.close()


@pytest.mark.slow
def test_a_short_lived_token_is_renewed_before_it_expires(target: VaultTarget, tmp_path: Path):
    token_file = target.token_file(tmp_path, ttl="3s", explicit_max_ttl="2m", renewable=True)
    provider = target.provider(tmp_path, token_file=str(token_file))
    key = generate_key(KeyType.ECDSA_P256)
    try:
        provider.sign_workload(workload_csr(key, WORKLOAD), WORKLOAD, timedelta(minutes=5))
        started = time.monotonic()
        wait_until(lambda: provider.keeper.renewals >= 2, "two renewals", timeout=15)
        assert time.monotonic() - started > 3  # the token lived past its first lease...
        assert provider.sign_workload(workload_csr(key, WORKLOAD), WORKLOAD, timedelta(minutes=5)).certificate
        assert provider.keeper.logins == 1  # ...by renewals, never a new login
    finally:
        provider.close()


def test_health_describes_vault_the_token_and_the_ca(provider: VaultProvider):
    provider.trust_bundle()
    health = provider.health()
    assert health.healthy, health.detail
    assert re.fullmatch(
        r"Vault \S+ at \S+ is unsealed and active; token auth, token valid for (59m\d*s?|1h|\d+m\d*s?) \(renewable\); "
        r"CA of mount '\S+' valid until \S+Z",
        health.detail,
    ), health.detail


def test_limits_read_from_vault(provider: VaultProvider, target: VaultTarget):
    limits = provider.limits()
    root = provider.trust_bundle().authorities[0]
    assert (limits.max_workload_ttl, limits.max_intermediate_ttl, limits.ca_not_after) == (
        timedelta(hours=24),
        timedelta(hours=87600),
        root.not_valid_after_utc,
    )
    assert limits.notes == ("role 'spiffe' max_ttl 1d", f"mount '{target.mount}' max_lease_ttl 3650d")


@pytest.mark.parametrize("mode", list(Mode))
def test_doctor_passes_on_a_good_configuration(target: VaultTarget, tmp_path: Path, mode: Mode):
    provider = target.provider(tmp_path, mode=mode)
    try:
        checks = provider.doctor(workload_ttl=timedelta(hours=1), intermediate_ttl=timedelta(hours=24))
    finally:
        provider.close()
    assert [(c.name, c.ok) for c in checks] == [
        ("vault server", True),
        ("vault auth", True),
        ("vault CA", True),
        ("vault policy", True),
        ("vault role", True),
        *([("vault mount TTL", True)] if mode is Mode.INTERMEDIATE else []),
    ], [c.detail for c in checks]
    policy = next(c for c in checks if c.name == "vault policy")
    sign = f"{target.mount}/sign/spiffe"
    expected = f"{target.mount}/root/sign-intermediate, {sign}" if mode is Mode.INTERMEDIATE else sign
    assert policy.detail == f"the token may write {expected}"


def test_doctor_names_every_problem_of_the_role(target: VaultTarget, tmp_path: Path):
    target.add_role("strict", allowed_uri_sans="spiffe://other.org/*", key_type="rsa", max_ttl="10m")
    provider = target.provider(tmp_path, mode=Mode.PER_WORKLOAD, pki_role="strict")
    try:
        checks = {c.name: c for c in provider.doctor(workload_ttl=timedelta(hours=1))}
    finally:
        provider.close()
    role = checks["vault role"]
    assert not role.ok
    assert role.detail == (
        "role 'strict': allowed_uri_sans spiffe://other.org/*, key_type rsa, max_ttl 10m; allowed_uri_sans "
        "(spiffe://other.org/*) does not allow spiffe://example.org/ns/default/sa/doctor: add "
        "spiffe://example.org/*; key_type rsa/2048 does not accept our ecdsa-p256 keys: set key_type=any on the "
        "role; require_cn is true but no common_name is set: set require_cn=false on the role; max_ttl 10m is "
        "shorter than the 1h wanted: Vault caps each certificate (with a warning)"
    )


def test_errors_are_provider_errors_with_the_provider_name(target: VaultTarget, tmp_path: Path):
    provider = target.provider(tmp_path, pki_mount="no-such-mount")
    try:
        with pytest.raises(ProviderError) as caught:
            provider.trust_bundle()
    finally:
        provider.close()
    namespace = f" in namespace '{target.namespace}'" if target.namespace else ""
    assert str(caught.value) == (
        f"vault: read the CA chain of mount 'no-such-mount'{namespace}: no PKI secrets engine is mounted at mount "
        f"'no-such-mount'{namespace}; enable one (vault secrets enable -path=no-such-mount pki) or fix pki_mount"
    )
