"""Entry point of the cert-manager provider (``[project.entry-points.mesh_identity] cert_manager``)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from mesh_identity.provider import ProviderSpec
from plugins import hookimpl
from providers.cert_manager.errors import NAME
from providers.cert_manager.options import check
from providers.cert_manager.provider import SPEC


@hookimpl
def mesh_identity_providers() -> Sequence[ProviderSpec]:
    return [SPEC]


@hookimpl
def mesh_identity_validate_provider_options(provider: str, options: Mapping[str, Any]) -> Sequence[str]:
    return check(options) if provider == NAME else []
