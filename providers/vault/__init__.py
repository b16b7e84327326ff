"""The HashiCorp Vault CA provider: Vault's PKI secrets engine through hvac.

Modules: :mod:`~providers.vault.options` (the options and their checks), :mod:`~providers.vault.connection` (the
hvac client, TLS, error translation), :mod:`~providers.vault.auth` (token, AppRole and Kubernetes login, token
renewal), :mod:`~providers.vault.pki` (the PKI calls), :mod:`~providers.vault.provider` (the provider),
:mod:`~providers.vault.doctor` (checks against a live Vault) and :mod:`~providers.vault.plugin` (the entry point).
"""

from __future__ import annotations

from providers.vault.provider import SPEC, VaultProvider

__all__ = ["SPEC", "VaultProvider"]
