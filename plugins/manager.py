"""The plugin manager and the typed facade the rest of the code calls (never ``pm.hook`` directly).

``get_plugin_manager()`` is a factory: nothing is loaded at import time.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable, Mapping
from typing import Any

import pluggy

from mesh_identity.errors import ConfigError, PluginError
from mesh_identity.events import (
    AccessDenied,
    CaRotated,
    CertificateIssued,
    CertificateRotated,
    Event,
    RotationFailed,
    SigningDecision,
)
from mesh_identity.provider import ProviderSpec
from plugins import NAME, hookspecs

log = logging.getLogger(__name__)
DISABLED_ENV = "MESH_IDENTITY_DISABLED_PLUGINS"

_EVENT_HOOKS: dict[type, str] = {
    CertificateIssued: "mesh_identity_certificate_issued",
    CertificateRotated: "mesh_identity_certificate_rotated",
    RotationFailed: "mesh_identity_rotation_failed",
    CaRotated: "mesh_identity_ca_rotated",
    AccessDenied: "mesh_identity_access_denied",
    SigningDecision: "mesh_identity_signing_decision",
}


def get_plugin_manager(
    *,
    entry_points: bool = True,
    extra: Iterable[object] = (),
    disabled: Iterable[str] | None = None,
    trace: bool = False,
) -> pluggy.PluginManager:
    """Build a plugin manager: hookspecs, the ``mesh_identity`` entry points (minus those named in
    ``disabled`` or in ``MESH_IDENTITY_DISABLED_PLUGINS``, comma-separated), and ``extra`` plugin objects."""
    pm = pluggy.PluginManager(NAME)
    pm.add_hookspecs(hookspecs)
    blocked = set(disabled if disabled is not None else _env_list(os.environ.get(DISABLED_ENV, "")))
    for name in blocked:
        pm.set_blocked(name)
    if entry_points:
        try:
            pm.load_setuptools_entrypoints(NAME)
        except Exception as err:  # an installed plugin that fails to import
            raise PluginError(f"a plugin of the {NAME!r} entry-point group failed to load: {err}") from err
    for plugin in extra:
        pm.register(plugin)
    pm.check_pending()
    if trace:
        pm.trace.root.setwriter(lambda message: log.debug("%s", message.rstrip()))
        pm.enable_tracing()
    return pm


def _env_list(value: str) -> list[str]:
    return [part.strip() for part in value.split(",") if part.strip()]


class Plugins:
    """Typed facade over the plugin manager. Implements :class:`~mesh_identity.events.EventSink`."""

    def __init__(self, pm: pluggy.PluginManager) -> None:
        self.pm = pm
        self._providers: dict[str, ProviderSpec] | None = None

    @classmethod
    def load(cls, **kwargs: Any) -> Plugins:
        return cls(get_plugin_manager(**kwargs))

    def names(self) -> list[str]:
        return sorted(name for name, _ in self.pm.list_name_plugin() if name)

    def providers(self) -> dict[str, ProviderSpec]:
        if self._providers is None:
            found: dict[str, ProviderSpec] = {}
            for specs in self.pm.hook.mesh_identity_providers():
                for spec in specs:
                    if not isinstance(spec, ProviderSpec):
                        raise PluginError(f"a plugin registered {spec!r}, which is not a ProviderSpec")
                    if spec.name in found:
                        raise PluginError(f"two plugins register a provider named {spec.name!r}")
                    found[spec.name] = spec
            self._providers = dict(sorted(found.items()))
        return self._providers

    def provider(self, name: str) -> ProviderSpec:
        providers = self.providers()
        if name not in providers:
            installed = ", ".join(providers) or "none"
            raise ConfigError(f"ca.provider: {name!r} is not an installed provider (installed: {installed})")
        return providers[name]

    def validate_provider_options(self, name: str, raw: Mapping[str, Any]) -> dict[str, Any]:
        """Schema check, then every plugin's ``mesh_identity_validate_provider_options``; ConfigError on the
        first problems (all of them, one per line)."""
        options = self.provider(name).validate_options(raw)
        problems = [
            p
            for result in self.pm.hook.mesh_identity_validate_provider_options(provider=name, options=options)
            for p in result
        ]
        if problems:
            raise ConfigError("\n".join(problems))
        return options

    def configure(self, settings: Mapping[str, Any]) -> None:
        self.pm.hook.mesh_identity_configure(settings=settings)

    def emit(self, event: Event) -> None:
        """Call every plugin's hook for ``event``; a plugin that raises is logged and skipped."""
        hook = getattr(self.pm.hook, _EVENT_HOOKS[type(event)])
        for impl in reversed(hook.get_hookimpls()):
            try:
                impl.function(event=event)
            except Exception:
                log.exception("plugin %r failed in %s", impl.plugin_name, hook.name)
