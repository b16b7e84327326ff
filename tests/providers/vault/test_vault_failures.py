"""Failures only the test server can stage: outage, sealing, 5xx, dropped connections, TLS and namespaces.

Each failure is a specific error with the message a user sees; ``retryable`` tells the rotation engine whether
backing off may help.
"""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from mesh_identity.authority import workload_csr
from mesh_identity.errors import ConfigError
from mesh_identity.keys import KeyType, generate_key
from mesh_identity.provider import Mode, ProviderContext
from mesh_identity.spiffe import SpiffeId, TrustDomain
from providers.vault.errors import (
    VaultSealedError,
    VaultServerError,
    VaultTlsError,
    VaultTokenExpiredError,
    VaultUnreachableError,
)
from providers.vault.provider import SPEC, VaultProvider
from tests.fakes.vault import ListenerTLS, VaultServer
from tests.providers.vault.targets import set_up_pki

TD = TrustDomain("example.org")
WORKLOAD = SpiffeId.for_kubernetes(TD, "default", "web")


def make_provider(
    vault: VaultServer, directory: Path, mode: Mode = Mode.INTERMEDIATE, token: str | None = None, **options: Any
) -> VaultProvider:
    token_file = directory / "token"
    token_file.write_text(token or vault.create_token(policies=["mesh"]))
    raw = {"address": vault.url, "token_file": str(token_file), "pki_role": "spiffe", **options}
    context = ProviderContext(TD, directory, KeyType.ECDSA_P256, mode, lambda: datetime.now(UTC))
    return VaultProvider(context, SPEC.validate_options(raw))


@pytest.fixture
def pki(vault: VaultServer) -> VaultServer:
    set_up_pki(vault)
    return vault


@pytest.fixture
def provider(pki: VaultServer, tmp_path: Path) -> Iterator[VaultProvider]:
    made = make_provider(pki, tmp_path)
    yield made
    made.close()


def sign(provider: VaultProvider) -> Any:
    key = generate_key(KeyType.ECDSA_P256)
    return provider.sign_workload(workload_csr(key, WORKLOAD), WORKLOAD, timedelta(minutes=10))


def test_unreachable_vault(pki: VaultServer, provider: VaultProvider):
    pki.stop()
    with pytest.raises(VaultUnreachableError) as caught:
        provider.trust_bundle()
    assert str(caught.value) == (
        f"vault: read the CA chain of mount 'pki': cannot reach Vault at {pki.url} (connection refused); check the "
        "address and that Vault is up (issued certificates stay in use; retrying with backoff)"
    )
    assert caught.value.retryable is True


def test_an_outage_keeps_the_last_known_bundle_and_is_unhealthy_until_it_ends(
    pki: VaultServer, provider: VaultProvider
):
    bundle = provider.trust_bundle()
    sign(provider)
    pki.stop()
    assert provider.trust_bundle() == bundle
    health = provider.health()
    assert (health.healthy, health.detail) == (
        False,
        f"vault: check Vault's health: cannot reach Vault at {pki.url} (connection refused); check the address and "
        "that Vault is up (issued certificates stay in use; retrying with backoff)",
    )
    with pytest.raises(VaultUnreachableError):
        sign(provider)
    pki.start()
    assert provider.health().healthy
    assert sign(provider).certificate


def test_sealed_vault(pki: VaultServer, provider: VaultProvider):
    sign(provider)
    pki.seal()
    with pytest.raises(VaultSealedError) as caught:
        sign(provider)
    assert str(caught.value) == (
        f"vault: sign {WORKLOAD} at pki/sign/spiffe: Vault at {pki.url} is sealed (Vault is sealed); unseal it "
        "(vault operator unseal) (issued certificates stay in use; retrying with backoff)"
    )
    assert caught.value.retryable is True
    health = provider.health()
    assert (health.healthy, health.detail) == (
        False,
        f"vault: Vault at {pki.url} is sealed; unseal it (vault operator unseal)",
    )
    pki.unseal()
    assert sign(provider).certificate


@pytest.mark.parametrize(
    ("status", "errors", "message"),
    [
        (
            500,
            ["storage unavailable"],
            "Vault answered 500 to POST pki/sign/spiffe: storage unavailable; retrying with backoff",
        ),
        (502, ["upstream"], "Vault answered 502 to POST pki/sign/spiffe: upstream; retrying with backoff"),
        (429, ["rate limited"], "Vault is rate limiting requests (429 on POST pki/sign/spiffe); backing off"),
    ],
)
def test_server_errors_are_retryable(pki: VaultServer, provider: VaultProvider, status, errors, message):
    sign(provider)
    pki.fail_next(1, status, errors, path="/v1/pki/sign/spiffe")
    with pytest.raises(VaultServerError) as caught:
        sign(provider)
    assert str(caught.value) == f"vault: sign {WORKLOAD} at pki/sign/spiffe: {message}"
    assert caught.value.retryable is True
    assert sign(provider).certificate


def test_a_connection_cut_mid_request(pki: VaultServer, provider: VaultProvider):
    sign(provider)
    pki.drop_next(1, path="/v1/pki/sign/spiffe")
    with pytest.raises(VaultUnreachableError) as caught:
        sign(provider)
    assert "(connection closed without an answer)" in str(caught.value)


def test_vault_not_initialized(pki: VaultServer, provider: VaultProvider):
    pki.set_initialized(False)
    health = provider.health()
    assert (health.healthy, health.detail) == (
        False,
        f"vault: Vault at {pki.url} is not initialized; run vault operator init",
    )


# --- TLS ------------------------------------------------------------------------------------------------


@pytest.fixture
def pki_tls(vault_tls: VaultServer) -> VaultServer:
    set_up_pki(vault_tls)
    return vault_tls


def test_tls_with_the_ca_of_vaults_certificate(pki_tls: VaultServer, listener_tls: ListenerTLS, tmp_path: Path):
    provider = make_provider(pki_tls, tmp_path, ca_cert=str(listener_tls.ca_file))
    try:
        assert provider.health().healthy
        assert sign(provider).certificate
    finally:
        provider.close()


@pytest.mark.parametrize(
    ("server_names", "options", "reason"),
    [
        (("localhost",), {"other_ca": True}, "certificate verify failed"),
        (("vault.internal",), {}, "certificate name mismatch"),
    ],
    ids=["unknown-ca", "name-mismatch"],
)
def test_tls_failures_are_not_retryable_and_say_what_to_check(tmp_path: Path, server_names, options, reason):
    listener = ListenerTLS.create(
        tmp_path / "listener", hostnames=server_names, ips=() if "vault.internal" in server_names else ("127.0.0.1",)
    )
    ca = ListenerTLS.create(tmp_path / "other").ca_file if options.get("other_ca") else listener.ca_file
    with VaultServer(tls=listener) as vault:
        set_up_pki(vault)
        provider = make_provider(vault, tmp_path, ca_cert=str(ca))
        try:
            with pytest.raises(VaultTlsError) as caught:
                provider.trust_bundle()
        finally:
            provider.close()
    assert str(caught.value) == (
        f"vault: read the CA chain of mount 'pki': TLS with Vault at {vault.url} failed ({reason}); check ca_cert "
        "(the CA that signed Vault's certificate), tls_server_name, and client_cert/client_key if Vault asks for one"
    )
    assert caught.value.retryable is False


def test_tls_server_name_verifies_another_name_than_the_address(tmp_path: Path):
    listener = ListenerTLS.create(tmp_path / "listener", hostnames=("vault.internal",), ips=())
    with VaultServer(tls=listener) as vault:
        set_up_pki(vault)
        provider = make_provider(vault, tmp_path, ca_cert=str(listener.ca_file), tls_server_name="vault.internal")
        try:
            assert sign(provider).certificate
        finally:
            provider.close()


def test_a_client_certificate_when_vault_asks_for_one(listener_tls: ListenerTLS, tmp_path: Path):
    with VaultServer(tls=listener_tls, require_client_cert=True) as vault:
        set_up_pki(vault)
        without = make_provider(vault, tmp_path, ca_cert=str(listener_tls.ca_file))
        with_cert = make_provider(
            vault,
            tmp_path,
            ca_cert=str(listener_tls.ca_file),
            client_cert=str(listener_tls.client_cert_file),
            client_key=str(listener_tls.client_key_file),
        )
        try:
            with pytest.raises((VaultTlsError, VaultUnreachableError)):
                without.trust_bundle()
            assert sign(with_cert).certificate
        finally:
            without.close()
            with_cert.close()


def test_skip_verify_is_refused(vault_tls: VaultServer, tmp_path: Path):
    with pytest.raises(ConfigError) as caught:
        make_provider(vault_tls, tmp_path, tls_skip_verify=True)
    assert str(caught.value) == (
        "ca.provider_options.tls_skip_verify: not supported: Vault's TLS certificate is always verified; set ca_cert "
        "to the CA that signed it (and tls_server_name if its name differs from the address)"
    )


# --- namespaces -----------------------------------------------------------------------------------------


def test_a_namespace_holds_the_mount_and_the_token(vault: VaultServer, tmp_path: Path):
    set_up_pki(vault, namespace="team-a")
    token = vault.create_token(policies=["mesh"], namespace="team-a")
    provider = make_provider(vault, tmp_path, token=token, namespace="team-a")
    try:
        assert sign(provider).certificate
        assert vault.request_count("/v1/pki/sign/spiffe", namespace="team-a") == 1
    finally:
        provider.close()


def test_a_token_of_another_namespace_is_refused(vault: VaultServer, tmp_path: Path):
    set_up_pki(vault, namespace="team-a")
    vault.add_namespace("team-b")
    token = vault.create_token(policies=["default"], namespace="team-b")
    provider = make_provider(vault, tmp_path, token=token, namespace="team-a")
    try:
        with pytest.raises(VaultTokenExpiredError) as caught:
            sign(provider)
    finally:
        provider.close()
    assert str(caught.value) == (
        f"vault: the Vault token from token_file {tmp_path / 'token'} is expired, revoked or not valid in namespace "
        "'team-a'; give a new token (token_file is re-read), or use approle or kubernetes auth, which log in again (a valid token also needs the default "
        "policy, for auth/token/lookup-self)"
    )
