"""Building the core's parts from a config: the provider (from its spec), the Authority, the server.

These are the steps the composition root (:mod:`mesh_identity.compose`) takes, in this order, once per
command; they are here, in the core, so that code holding a provider already (tests, benchmarks, a provider's
own test suite) builds the same parts in the same way without the plugin manager.
"""

from __future__ import annotations

import random
from collections.abc import Iterable, Mapping
from typing import Any

from mesh_identity.authority import Authority, AuthoritySettings
from mesh_identity.clock import Clock, utcnow
from mesh_identity.config import Config
from mesh_identity.errors import ConfigError
from mesh_identity.events import EventSink, NullSink
from mesh_identity.provider import CAProvider, ProviderContext, ProviderSpec
from mesh_identity.registry.base import WorkloadRegistry
from mesh_identity.rotation.engine import RotationEngine, RotationSettings
from mesh_identity.rotation.schedule import RetryPolicy
from mesh_identity.server.metrics import Metrics
from mesh_identity.server.service import Fanout, Service
from mesh_identity.spiffe import SpiffeId


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


def build_service(
    config: Config,
    provider: CAProvider,
    *,
    events: EventSink | None = None,
    identities: Iterable[SpiffeId] | None = None,
    registry: WorkloadRegistry | None = None,
    clock: Clock = utcnow,
    rng: random.Random | None = None,
    retry: RetryPolicy | None = None,
) -> Service:
    """The server over ``provider``: metrics, the Authority and the rotation engine reporting to ``events`` and
    the metrics, root rotation, and (with a ``registry``) its membership. ``identities`` are kept issued
    whatever the registry says (default: the config's ``identities``)."""
    metrics = Metrics()
    sink = Fanout(events or NullSink(), metrics)
    authority = build_authority(config, provider, events=sink, clock=clock)
    settings = RotationSettings(config.ca.rotate_after, config.ca.jitter, retry=retry)
    engine = RotationEngine(authority, settings, events=sink, observer=metrics, clock=clock, rng=rng)
    keep = tuple(config.identities if identities is None else identities)
    return Service(config, engine, metrics=metrics, events=sink, keep=keep, registry=registry, clock=clock)
