"""Shared plumbing of CLI commands: loading config, plugins, the provider and the authority."""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path

from mesh_identity.authority import Authority
from mesh_identity.config import Config, load_config
from mesh_identity.provider import CAProvider
from mesh_identity.runtime import build_authority, build_provider
from plugins.manager import Plugins


@dataclass
class Runtime:
    config: Config
    plugins: Plugins
    provider: CAProvider
    authority: Authority


def load_plugins(args: argparse.Namespace) -> Plugins:
    return Plugins.load(trace=bool(getattr(args, "debug", False)))


def config_of(args: argparse.Namespace) -> Config:
    path = getattr(args, "config", None)
    return load_config(Path(path) if path else None)


def runtime(args: argparse.Namespace, *, create: bool, start: bool = True) -> Runtime:
    config = config_of(args)
    plugins = load_plugins(args)
    spec = plugins.provider(config.ca.provider)
    options = plugins.validate_provider_options(spec.name, config.ca.provider_options)
    plugins.configure(
        {"trust_domain": config.trust_domain.name, "state_dir": config.state_dir, "plugins": config.plugins}
    )
    provider = build_provider(config, spec, options, create=create)
    authority = build_authority(config, provider, events=plugins)
    if start:
        authority.start()
    return Runtime(config, plugins, provider, authority)
