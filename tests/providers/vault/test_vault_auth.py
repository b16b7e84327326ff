"""Logging in to Vault (token, AppRole, Kubernetes) and keeping the token alive, on the test server."""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from mesh_identity.authority import workload_csr
from mesh_identity.keys import KeyType, generate_key
from mesh_identity.provider import Mode, ProviderContext
from mesh_identity.spiffe import SpiffeId, TrustDomain
from providers.vault.errors import VaultLoginError, VaultTokenExpiredError
from providers.vault.provider import SPEC, VaultProvider
from tests.fakes.vault import VaultServer
from tests.providers.vault.targets import set_up_pki
from tests.waiting import wait_until

TD = TrustDomain("example.org")
WORKLOAD = SpiffeId.for_kubernetes(TD, "default", "web")


def provider_for(directory: Path, options: dict[str, Any]) -> VaultProvider:
    context = ProviderContext(TD, directory, KeyType.ECDSA_P256, Mode.INTERMEDIATE, lambda: datetime.now(UTC))
    return VaultProvider(context, SPEC.validate_options({"pki_role": "spiffe", **options}))


def sign(provider: VaultProvider) -> Any:
    key = generate_key(KeyType.ECDSA_P256)
    return provider.sign_workload(workload_csr(key, WORKLOAD), WORKLOAD, timedelta(minutes=10))


def denied(vault: VaultServer) -> list[str]:
    """Requests Vault answered 403: a token used after it expired shows up here."""
    return [r.path for r in vault.requests if r.status == 403]


@pytest.fixture
def pki(vault: VaultServer) -> VaultServer:
    set_up_pki(vault)
    return vault


def approle(vault: VaultServer, directory: Path, **role: Any) -> tuple[dict[str, Any], Path]:
    role_id, secret_id = vault.add_approle("mesh", policies=["mesh"], **role)
    secret_file = directory / "secret-id"
    secret_file.write_text(secret_id + "\n")
    return (
        {
            "address": vault.url,
            "auth_method": "approle",
            "approle_role_id": role_id,
            "approle_secret_id_file": str(secret_file),
        },
        secret_file,
    )


def kubernetes(vault: VaultServer, directory: Path, service_account: tuple[str, str], **role: Any) -> dict[str, Any]:
    vault.add_kubernetes_role(
        "mesh",
        service_account_names=["mesh-identity"],
        service_account_namespaces=["mesh-system"],
        policies=["mesh"],
        mount="k8s-prod",
        **role,
    )
    jwt_file = directory / "token.jwt"
    jwt_file.write_text(vault.service_account_jwt(*service_account))
    return {
        "address": vault.url,
        "auth_method": "kubernetes",
        "kubernetes_role": "mesh",
        "kubernetes_mount": "k8s-prod",
        "kubernetes_jwt_file": str(jwt_file),
    }


def test_approle_login_signs(pki: VaultServer, tmp_path: Path):
    options, _ = approle(pki, tmp_path)
    provider = provider_for(tmp_path, options)
    try:
        assert sign(provider).certificate
        assert provider.keeper.lease is not None
        assert provider.keeper.lease.policies == ("default", "mesh")
    finally:
        provider.close()
    assert pki.request_count("/v1/auth/approle/login") == 1


def test_approle_login_refused(pki: VaultServer, tmp_path: Path):
    options, secret_file = approle(pki, tmp_path)
    secret_file.write_text("not-the-secret-id")
    provider = provider_for(tmp_path, options)
    try:
        with pytest.raises(VaultLoginError) as caught:
            sign(provider)
    finally:
        provider.close()
    assert str(caught.value) == (
        "vault: AppRole login at auth/approle refused: invalid role or secret ID; check approle_role_id and the "
        f"secret ID in {secret_file} (it may have expired or been used up)"
    )
    assert caught.value.retryable is True


def test_missing_secret_id_file(pki: VaultServer, tmp_path: Path):
    options, secret_file = approle(pki, tmp_path)
    secret_file.unlink()
    provider = provider_for(tmp_path, options)
    try:
        with pytest.raises(VaultLoginError) as caught:
            sign(provider)
    finally:
        provider.close()
    assert (
        str(caught.value) == f"vault: cannot read the AppRole secret ID from {secret_file}: No such file or directory"
    )


def test_kubernetes_login_on_a_custom_mount(pki: VaultServer, tmp_path: Path):
    provider = provider_for(tmp_path, kubernetes(pki, tmp_path, ("mesh-system", "mesh-identity")))
    try:
        assert sign(provider).certificate
    finally:
        provider.close()
    assert pki.request_count("/v1/auth/k8s-prod/login") == 1


@pytest.mark.parametrize(
    ("service_account", "role", "says", "hint"),
    [
        (("mesh-system", "intruder"), "mesh", "service account name not authorized", "bound"),
        (("default", "mesh-identity"), "mesh", "namespace not authorized", "bound"),
        (("mesh-system", "mesh-identity"), "other", 'invalid role name "other"', "role"),
    ],
)
def test_kubernetes_login_refused(pki: VaultServer, tmp_path: Path, service_account, role, says, hint):
    options = kubernetes(pki, tmp_path, service_account)
    provider = provider_for(tmp_path, {**options, "kubernetes_role": role})
    try:
        with pytest.raises(VaultLoginError) as caught:
            sign(provider)
    finally:
        provider.close()
    fix = (
        "create that role or fix kubernetes_role"
        if hint == "role"
        else "the role's bound_service_account_names and bound_service_account_namespaces must include the service "
        f"account whose token is {tmp_path / 'token.jwt'}"
    )
    assert str(caught.value) == f"vault: Kubernetes login at auth/k8s-prod as role {role!r} refused: {says}; {fix}"


@pytest.mark.parametrize("method", ["approle", "kubernetes"])
def test_an_expired_token_means_a_new_login_and_one_retry(pki: VaultServer, tmp_path: Path, method: str):
    options = (
        approle(pki, tmp_path)[0]
        if method == "approle"
        else kubernetes(pki, tmp_path, ("mesh-system", "mesh-identity"))
    )
    provider = provider_for(tmp_path, options)
    try:
        sign(provider)
        assert provider.keeper.lease is not None
        pki.set_token_ttl(provider.keeper.lease.token, 0)  # expired behind our back (our clock does not know)
        assert sign(provider).certificate
        assert provider.keeper.logins == 2
    finally:
        provider.close()


@pytest.mark.slow
def test_approle_renews_then_logs_in_again_before_the_max_ttl(pki: VaultServer, tmp_path: Path):
    options, _ = approle(pki, tmp_path, token_ttl=4, token_max_ttl=8)
    provider = provider_for(tmp_path, options)
    try:
        sign(provider)
        wait_until(lambda: provider.keeper.logins >= 2, "a second login", timeout=20)
        assert provider.keeper.renewals >= 1
        assert sign(provider).certificate
    finally:
        provider.close()
    assert denied(pki) == []  # never a request with an expired token
    assert pki.request_count("/v1/auth/token/renew-self") >= 1


@pytest.mark.slow
def test_kubernetes_token_renewed_in_the_background(pki: VaultServer, tmp_path: Path):
    provider = provider_for(
        tmp_path, kubernetes(pki, tmp_path, ("mesh-system", "mesh-identity"), token_ttl=2, token_max_ttl=60)
    )
    try:
        sign(provider)
        wait_until(lambda: provider.keeper.renewals >= 3, "three renewals", timeout=20)
        assert sign(provider).certificate
        assert provider.keeper.logins == 1
    finally:
        provider.close()
    assert denied(pki) == []


@pytest.mark.slow
def test_a_static_token_that_cannot_be_renewed_expires_with_a_clear_error(pki: VaultServer, tmp_path: Path):
    token = pki.create_token(policies=["mesh"], ttl=2, renewable=False)
    token_file = tmp_path / "token"
    token_file.write_text(token)
    provider = provider_for(tmp_path, {"address": pki.url, "token_file": str(token_file)})
    try:
        checks = {c.name: c for c in provider.doctor()}
        assert not checks["vault auth"].ok
        assert checks["vault auth"].detail.endswith(
            "it cannot be renewed, so signing stops when it expires: use approle or kubernetes"
        )
        sign(provider)
        wait_until(lambda: _expired(pki, token), "the token to expire", timeout=20)
        with pytest.raises(VaultTokenExpiredError):
            sign(provider)
        assert not provider.health().healthy
    finally:
        provider.close()


def _expired(vault: VaultServer, token: str) -> bool:
    try:
        vault.token_ttl(token)
    except KeyError:
        return True
    return False


@pytest.mark.slow
def test_renewal_failures_back_off(pki: VaultServer, tmp_path: Path):
    """While Vault answers 503, the keeper retries with growing pauses, not in a tight loop; then recovers."""
    options, _ = approle(pki, tmp_path, token_ttl=3, token_max_ttl=600)
    provider = provider_for(tmp_path, options)
    try:
        sign(provider)
        pki.reset_requests()
        pki.fail_next(1000, 503, ["Vault is sealed"])
        time.sleep(6)
        attempts = len(pki.requests)
        pki.clear_faults()
        assert 2 <= attempts <= 8, attempts  # tries at about 2s, 2.5s, 3.5s, 5.5s: backoff, not a loop
        wait_until(lambda: provider.keeper.last_error is None, "recovery", timeout=20)
        assert sign(provider).certificate
    finally:
        provider.close()


def test_many_threads_denied_at_once_log_in_only_once(pki: VaultServer, tmp_path: Path):
    options, _ = approle(pki, tmp_path)
    provider = provider_for(tmp_path, options)
    try:
        sign(provider)
        assert provider.keeper.lease is not None
        pki.set_token_ttl(provider.keeper.lease.token, 0)
        with ThreadPoolExecutor(8) as pool:
            results = list(pool.map(lambda _: sign(provider), range(8)))
        assert all(r.certificate for r in results)
        assert provider.keeper.logins == 2
    finally:
        provider.close()
