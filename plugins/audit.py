"""Bundled audit plugin: every lifecycle event as one JSON line.

Settings (``plugins.audit`` in the config)::

    plugins:
      audit:
        path: /var/log/mesh-identity/audit.jsonl   # default: <state_dir>/audit.jsonl
        enabled: true

Lines hold who, what, which identity, serial and fingerprint; never key material or tokens (events carry none).

The log is 0600 (tightened if it exists with looser bits). Directories of its path that do not exist are
created 0700; directories that exist are left as they are (``path: /var/log/mesh-identity.jsonl`` does not
touch ``/var/log``).
"""

from __future__ import annotations

import dataclasses
import json
import os
import threading
from collections.abc import Mapping
from datetime import datetime
from enum import Enum
from pathlib import Path
from typing import Any

from mesh_identity.events import (
    AccessDenied,
    CaRotated,
    CertificateIssued,
    CertificateRotated,
    Event,
    RotationFailed,
    SigningDecision,
)
from plugins import hookimpl


class AuditLog:
    def __init__(self) -> None:
        self.path: Path | None = None
        self._lock = threading.Lock()

    def configure(self, settings: Mapping[str, Any]) -> None:
        own = settings.get("plugins", {}).get("audit") or {}
        if not own.get("enabled", True):
            self.path = None
            return
        default = Path(settings["state_dir"]) / "audit.jsonl"
        self.path = Path(own["path"]) if own.get("path") else default

    def write(self, event: Event) -> None:
        if self.path is None:
            return
        # events are flat (strings, enums, times, tuples of strings): their fields as they are, no deep copy
        record = {"event": type(event).__name__, **{name: getattr(event, name) for name in _fields(event)}}
        line = (json.dumps(record, default=_plain, sort_keys=True) + "\n").encode()
        with self._lock:
            _make_missing_dirs(self.path.parent)
            fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o600)
            try:
                if os.fstat(fd).st_mode & 0o077:
                    os.fchmod(fd, 0o600)
                os.write(fd, line)  # one write of the whole line (O_APPEND: lines of two writers never interleave)
            finally:
                os.close(fd)


_FIELDS: dict[type, tuple[str, ...]] = {}


def _fields(event: Event) -> tuple[str, ...]:
    names = _FIELDS.get(type(event))
    if names is None:
        names = _FIELDS[type(event)] = tuple(f.name for f in dataclasses.fields(event))
    return names


def _make_missing_dirs(directory: Path) -> None:
    """Create the directories of ``directory`` that do not exist, each 0700; leave the existing ones alone."""
    missing: list[Path] = []
    while not directory.is_dir():
        missing.append(directory)
        if directory.parent == directory:
            break
        directory = directory.parent
    for path in reversed(missing):
        try:
            path.mkdir(mode=0o700)
        except FileExistsError:  # made meanwhile by someone else: theirs, not ours to tighten
            continue
        path.chmod(0o700)  # whatever the umask


def _plain(value: object) -> str:
    if isinstance(value, datetime):
        return value.isoformat()
    if isinstance(value, Enum):
        return str(value.value)
    return str(value)


AUDIT = AuditLog()


@hookimpl
def mesh_identity_configure(settings: Mapping[str, Any]) -> None:
    AUDIT.configure(settings)


@hookimpl
def mesh_identity_certificate_issued(event: CertificateIssued) -> None:
    AUDIT.write(event)


@hookimpl
def mesh_identity_certificate_rotated(event: CertificateRotated) -> None:
    AUDIT.write(event)


@hookimpl
def mesh_identity_rotation_failed(event: RotationFailed) -> None:
    AUDIT.write(event)


@hookimpl
def mesh_identity_ca_rotated(event: CaRotated) -> None:
    AUDIT.write(event)


@hookimpl
def mesh_identity_access_denied(event: AccessDenied) -> None:
    AUDIT.write(event)


@hookimpl
def mesh_identity_signing_decision(event: SigningDecision) -> None:
    AUDIT.write(event)
