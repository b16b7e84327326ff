"""The Vault provider's options: schema, checks across options (through the plugin hook), and registration."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

import providers.vault.plugin
from mesh_identity.errors import ConfigError
from mesh_identity.keys import KeyType
from mesh_identity.provider import Mode, ProviderContext
from mesh_identity.spiffe import TrustDomain
from plugins.manager import Plugins, get_plugin_manager
from providers.vault.provider import SPEC, VaultProvider

P = "ca.provider_options"
OK = {"address": "https://vault.example.org:8200"}


@pytest.fixture
def plugins() -> Plugins:
    return Plugins(get_plugin_manager(entry_points=False, extra=[providers.vault.plugin]))


def test_the_plugin_registers_the_vault_provider(plugins: Plugins):
    spec = plugins.provider("vault")
    assert spec is SPEC
    assert spec.capabilities.modes == frozenset(Mode)


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        ({}, f"{P}.address: required by provider 'vault' (Vault's address, e.g. https://vault.example.org:8200)"),
        ({"address": "vault:8200"}, f"{P}.address: 'vault:8200' is not an http(s)://host[:port] URL"),
        (
            {"address": "https://vault:8200/v1"},
            f"{P}.address: 'https://vault:8200/v1' has a path; give only scheme, host and port",
        ),
        (
            {"address": "http://vault.example.org:8200"},
            f"{P}.address: 'http://vault.example.org:8200' is plaintext HTTP to another host, which would send the "
            "Vault token in clear; use https:// (plain http is accepted on loopback only)",
        ),
        (
            {**OK, "tls_skip_verify": True},
            f"{P}.tls_skip_verify: not supported: Vault's TLS certificate is always verified; set ca_cert to the CA "
            "that signed it (and tls_server_name if its name differs from the address)",
        ),
        (
            {"address": "http://127.0.0.1:8200", "ca_cert": "/ca.pem"},
            f"{P}.ca_cert: set, but address 'http://127.0.0.1:8200' is not https://",
        ),
        (
            {**OK, "client_cert": "/c.pem"},
            f"{P}.client_cert: client_cert and client_key go together; give both or neither",
        ),
        (
            {**OK, "auth_method": "approle"},
            f"{P}.approle_role_id: required with auth_method approle\n"
            f"{P}.approle_secret_id_file: required with auth_method approle",
        ),
        (
            {**OK, "auth_method": "kubernetes"},
            f"{P}.kubernetes_role: required with auth_method kubernetes",
        ),
        ({**OK, "approle_role_id": "x"}, f"{P}.approle_role_id: only used with auth_method approle"),
        ({**OK, "auth_method": "ldap"}, f"{P}.auth_method: 'ldap' is not one of token, approle, kubernetes"),
        ({**OK, "tls_insecure": True}, f"{P}.tls_insecure: unknown option for provider 'vault'"),
        ({**OK, "pki_mont": "pki"}, f"{P}.pki_mont: unknown option for provider 'vault' (did you mean 'pki_mount'?)"),
        ({**OK, "request_timeout": "soon"}, f"{P}.request_timeout: 'soon' is not a duration (use 30m, 24h, 7d)"),
    ],
    ids=[
        "no-address",
        "no-scheme",
        "path",
        "plaintext-remote",
        "skip-verify",
        "tls-on-http",
        "half-client-cert",
        "approle-credentials",
        "kubernetes-role",
        "approle-option-with-token",
        "unknown-method",
        "unknown-option",
        "typo",
        "bad-duration",
    ],
)
def test_bad_options_are_config_errors_naming_the_key(plugins: Plugins, raw: dict[str, Any], message: str):
    with pytest.raises(ConfigError) as caught:
        plugins.validate_provider_options("vault", raw)
    assert str(caught.value) == message


def test_good_options_get_their_defaults(plugins: Plugins):
    options = plugins.validate_provider_options("vault", {"address": "http://localhost:8200"})
    assert (options["auth_method"], options["pki_mount"], options["token_env"], options["approle_mount"]) == (
        "token",
        "pki",
        "VAULT_TOKEN",
        "approle",
    )


def context(tmp_path: Path, mode: Mode) -> ProviderContext:
    return ProviderContext(TrustDomain("example.org"), tmp_path, KeyType.ECDSA_P256, mode, lambda: datetime.now(UTC))


@pytest.mark.parametrize(
    ("raw", "mode", "message"),
    [
        (
            {"address": "http://127.0.0.1:8200"},
            Mode.PER_WORKLOAD,
            f"{P}.pki_role: required in per-workload mode (Vault signs at <pki_mount>/sign/<role>)",
        ),
        (
            {"address": "http://127.0.0.1:8200", "trust_bundle_file": "/nonexistent/roots.pem"},
            Mode.INTERMEDIATE,
            f"{P}.trust_bundle_file: cannot read /nonexistent/roots.pem: No such file or directory",
        ),
    ],
)
def test_the_factory_refuses_what_the_mode_needs(tmp_path: Path, raw, mode, message):
    with pytest.raises(ConfigError) as caught:
        VaultProvider(context(tmp_path, mode), SPEC.validate_options(raw))
    assert str(caught.value) == message


def test_the_factory_makes_no_request(tmp_path: Path):
    """Building the provider contacts nobody: a restart during a Vault outage must not fail to start."""
    provider = VaultProvider(
        context(tmp_path, Mode.INTERMEDIATE), SPEC.validate_options({"address": "http://127.0.0.1:9"})
    )
    try:
        assert provider.keeper.lease is None
        assert provider.keeper.logins == 0
    finally:
        provider.close()
