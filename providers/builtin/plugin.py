"""Entry point of the built-in provider (``[project.entry-points.mesh_identity] builtin``)."""

from __future__ import annotations

from collections.abc import Sequence

from mesh_identity.provider import ProviderSpec
from plugins import hookimpl
from providers.builtin.provider import SPEC


@hookimpl
def mesh_identity_providers() -> Sequence[ProviderSpec]:
    return [SPEC]
