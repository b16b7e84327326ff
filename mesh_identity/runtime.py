"""Assembling an :class:`~mesh_identity.authority.Authority` from a config and a provider spec."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from mesh_identity.authority import Authority, AuthoritySettings
from mesh_identity.clock import Clock, utcnow
from mesh_identity.config import Config
from mesh_identity.errors import ConfigError
from mesh_identity.events import EventSink
from mesh_identity.provider import CAProvider, ProviderContext, ProviderSpec


def check_capabilities(config: Config, spec: ProviderSpec) -> None:
    caps = spec.capabilities
    if config.ca.mode not in caps.modes:
        modes = ", ".join(sorted(caps.modes))
        raise ConfigError(f"ca.mode: {config.ca.mode.value!r} is not supported by provider {spec.name!r} ({modes})")
    if config.ca.key_type not in caps.key_types:
        types = ", ".join(sorted(caps.key_types))
        raise ConfigError(f"ca.key_type: {config.ca.key_type.value!r} is not supported by {spec.name!r} ({types})")


def build_provider(
    config: Config, spec: ProviderSpec, options: Mapping[str, Any], *, create: bool = True, clock: Clock = utcnow
) -> CAProvider:
    check_capabilities(config, spec)
    context = ProviderContext(
        trust_domain=config.trust_domain,
        state_dir=config.state_dir,
        key_type=config.ca.key_type,
        mode=config.ca.mode,
        clock=clock,
        create=create,
    )
    provider = spec.factory(context, options)
    provider.name = provider.name or spec.name
    return provider


def build_authority(
    config: Config, provider: CAProvider, events: EventSink | None = None, clock: Clock = utcnow
) -> Authority:
    settings = AuthoritySettings(
        trust_domain=config.trust_domain,
        mode=config.ca.mode,
        key_type=config.ca.key_type,
        workload_ttl=config.ca.workload_ttl,
        intermediate_ttl=config.ca.intermediate_ttl,
    )
    return Authority(provider, settings, events=events, clock=clock)
