"""Entry point of the Vault provider (``[project.entry-points.mesh_identity] vault = "providers.vault.plugin"``)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from mesh_identity.provider import ProviderSpec
from plugins import hookimpl
from providers.vault.options import problems
from providers.vault.provider import SPEC


@hookimpl
def mesh_identity_providers() -> Sequence[ProviderSpec]:
    return [SPEC]


@hookimpl
def mesh_identity_validate_provider_options(provider: str, options: Mapping[str, Any]) -> Sequence[str]:
    """Checks across the Vault options (auth method and its credentials, TLS, plaintext address)."""
    return problems(options) if provider == SPEC.name else []
