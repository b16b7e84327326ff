"""What every command module shares: the config from the arguments, and the composition root's build."""

from __future__ import annotations

import argparse
from pathlib import Path

from mesh_identity.compose import Stage, System, build
from mesh_identity.config import Config, load_config


def config_of(args: argparse.Namespace) -> Config:
    """The config named by ``--config`` (or ``$MESH_IDENTITY_CONFIG``, or the defaults)."""
    path = getattr(args, "config", None)
    return load_config(Path(path) if path else None)


def build_for(
    args: argparse.Namespace,
    until: Stage,
    *,
    create: bool,
    config: Config | None = None,
    with_registry: bool | None = None,
) -> System:
    """:func:`mesh_identity.compose.build` for a command's arguments (``--config``, ``--debug``)."""
    return build(
        config if config is not None else config_of(args),
        until,
        create=create,
        debug=bool(getattr(args, "debug", False)),
        with_registry=with_registry,
    )
