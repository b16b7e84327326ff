"""The audit plugin creates the directories it needs (0700) and the log (0600), and leaves the modes of
directories it did not create alone (``path: /var/log/x.jsonl`` must not lock ``/var/log``)."""

from __future__ import annotations

import json
import os
import stat
from datetime import UTC, datetime
from pathlib import Path

import pytest

from mesh_identity.events import CertificateIssued, CertKind
from plugins.audit import AuditLog

EVENT = CertificateIssued(
    subject="spiffe://example.org/web",
    kind=CertKind.WORKLOAD,
    serial="01",
    fingerprint="ab" * 32,
    not_after=datetime(2030, 1, 1, tzinfo=UTC),
    provider="builtin",
    requested_by="test",
    at=datetime(2029, 1, 1, tzinfo=UTC),
)


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def audit_to(path: Path, state_dir: Path) -> AuditLog:
    log = AuditLog()
    log.configure({"state_dir": str(state_dir), "plugins": {"audit": {"path": str(path)}}})
    return log


@pytest.fixture(autouse=True)
def _umask() -> object:
    old = os.umask(0o022)  # the usual umask: what a directory made without an explicit mode would get
    yield
    os.umask(old)


def test_an_existing_parent_keeps_its_mode(tmp_path: Path) -> None:
    shared = tmp_path / "var-log"
    shared.mkdir()
    shared.chmod(0o755)
    audit_to(shared / "mesh-identity.jsonl", tmp_path).write(EVENT)
    assert mode(shared) == 0o755
    assert mode(shared / "mesh-identity.jsonl") == 0o600
    (line,) = (shared / "mesh-identity.jsonl").read_text().splitlines()
    assert json.loads(line)["event"] == "CertificateIssued"


def test_missing_directories_are_created_private_and_existing_ones_left_alone(tmp_path: Path) -> None:
    base = tmp_path / "srv"
    base.mkdir()
    base.chmod(0o751)
    path = base / "mesh" / "audit" / "log.jsonl"
    audit_to(path, tmp_path).write(EVENT)
    assert (mode(base), mode(base / "mesh"), mode(base / "mesh" / "audit"), mode(path)) == (0o751, 0o700, 0o700, 0o600)


def test_an_existing_log_is_tightened_to_0600(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    path.write_text('{"event": "earlier"}\n')
    path.chmod(0o644)
    audit_to(path, tmp_path).write(EVENT)
    assert mode(path) == 0o600
    assert len(path.read_text().splitlines()) == 2


def test_the_default_path_in_the_state_directory(tmp_path: Path) -> None:
    state = tmp_path / "state"
    log = AuditLog()
    log.configure({"state_dir": str(state), "plugins": {}})
    log.write(EVENT)
    assert (mode(state), mode(state / "audit.jsonl")) == (0o700, 0o600)
