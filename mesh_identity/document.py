"""Checks for parsed YAML documents (the mesh file, its SMI policies) whose errors name the key path."""

from __future__ import annotations

import reprlib
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml

from mesh_identity.errors import ConfigError
from mesh_identity.spiffe import SpiffeId, TrustDomain


def read_yaml(path: Path, label: str, max_bytes: int) -> Any:
    """Read and parse a YAML file of at most ``max_bytes``; ConfigError prefixed with ``label`` otherwise."""
    try:
        raw = path.read_bytes()
    except OSError as err:
        raise ConfigError(f"{label}: cannot read {path}: {err.strerror}") from None
    if len(raw) > max_bytes:
        raise ConfigError(f"{label}: {path} is larger than {max_bytes} bytes")
    try:
        return yaml.safe_load(raw)
    except yaml.YAMLError as err:
        raise ConfigError(f"{label}: {path} is not valid YAML: {err}") from None
    except RecursionError:
        raise ConfigError(f"{label}: {path} nests its lists or mappings too deeply") from None


_SHOWN = reprlib.Repr()  # Python 3.11's Repr takes no keyword arguments
_SHOWN.maxlevel, _SHOWN.maxdict, _SHOWN.maxlist, _SHOWN.maxtuple, _SHOWN.maxset = 3, 6, 6, 6, 6
_SHOWN.maxstring, _SHOWN.maxother, _SHOWN.maxlong = 80, 80, 40


def shown(value: Any) -> str:
    """``value`` for an error message, as ``repr`` shows it but bounded (a YAML document of nested aliases
    expands to gigabytes in full): long strings, deep nesting and long collections are cut with ``...``."""
    return _SHOWN.repr(value)


def mapping(value: Any, path: str) -> Mapping[str, Any]:
    if not isinstance(value, dict) or not all(isinstance(k, str) for k in value):
        raise ConfigError(f"{path}: {shown(value)} is not a mapping")
    return value


def sequence(value: Any, path: str) -> list[Any]:
    if not isinstance(value, list):
        raise ConfigError(f"{path}: {shown(value)} is not a list")
    return value


def string(value: Any, path: str) -> str:
    if not isinstance(value, str) or not value:
        raise ConfigError(f"{path}: {shown(value)} is not a non-empty string")
    return value


def integer(value: Any, path: str, low: int, high: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ConfigError(f"{path}: {shown(value)} is not an integer")
    if not low <= value <= high:
        raise ConfigError(f"{path}: {value} is out of range ({low}-{high})")
    return value


def keys(section: Mapping[str, Any], known: tuple[str, ...], required: tuple[str, ...], path: str) -> None:
    for key in section:
        if key not in known:
            raise ConfigError(f"{path}.{key}: unknown key (known: {', '.join(known)})")
    for key in required:
        if key not in section:
            raise ConfigError(f"{path}.{key}: required")


def workload_id(identity: SpiffeId, trust_domain: TrustDomain, path: str) -> SpiffeId:
    """``identity``, checked to be a workload identity (one with a path) in ``trust_domain``."""
    if identity.trust_domain != trust_domain:
        raise ConfigError(f"{path}: {identity} is not in trust domain {trust_domain}")
    if not identity.path:
        raise ConfigError(f"{path}: {identity} has no path: a workload identity needs one")
    return identity
