"""The node agent of the demo's host (``mesh-identity agent``): its config, its join token, the process.

With ``mesh-identity demo --agent`` the control plane makes no workload key. One agent runs on the demo's host
(``host: demo`` in the mesh file): :func:`agent_document` is its config. It proves itself once with a join
token for that host, then renews with its own SVID; it makes every private key itself and serves the
certificates to the local Envoys over SDS on a Unix socket. Its entries give each identity the signing API
lets the host have (:meth:`~mesh_identity.mesh.model.Mesh.identities_on_host`) to callers running the Envoy
binary as this uid (selectors ``unix:uid`` and ``unix:path``). On one machine with one uid those selectors
cannot tell one sidecar from another: each Envoy asks for its own identity by name, but could ask for another's.
Where that matters, each sidecar runs as a uid of its own (or in its own pod: ``k8s:pod-uid``) and its entry
names that.

:class:`AgentProcess` runs ``python -m mesh_identity agent --config FILE`` in a session of its own (so that a
Ctrl-C reaches the demo, which stops it in order), logs to a file, waits until the SDS socket accepts
connections, and stops it by its pid: SIGTERM, then SIGKILL after a grace period.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from mesh_identity.demo.envoy import executable_of
from mesh_identity.demo.processes import log_tail, stop_process
from mesh_identity.errors import MeshIdentityError
from mesh_identity.mesh.model import Address
from mesh_identity.spiffe import SpiffeId, TrustDomain


class AgentError(MeshIdentityError):
    """The agent did not start, or exited."""


def envoy_selectors(binary: Path, uid: int | None = None) -> list[str]:
    """The selectors of an Envoy process started from ``binary`` as ``uid`` (default: this process's): the
    executable is the file the process runs as (:func:`~mesh_identity.demo.envoy.executable_of`)."""
    return [f"unix:uid:{os.getuid() if uid is None else uid}", f"unix:path:{executable_of(binary)}"]


def agent_document(
    *,
    trust_domain: TrustDomain,
    host: str,
    state_dir: Path,
    signing: Address,
    attest: Address,
    bundle: Path,
    join_token_file: Path,
    sds_socket: Path,
    workload_socket: Path | None = None,
    metrics: Address | None = None,
    identities: Iterable[SpiffeId],
    selectors: list[str],
    rotate_after: float = 0.5,
    jitter: float = 0.1,
) -> dict[str, Any]:
    """The agent's config (see :mod:`xds_sds.agent.config`): one entry per identity, each with ``selectors``."""
    document: dict[str, Any] = {
        "trust_domain": trust_domain.name,
        "host": host,
        "state_dir": str(state_dir),
        "control_plane": {"signing": str(signing), "attest": str(attest), "bundle": str(bundle)},
        "credential": {"join_token_file": str(join_token_file)},
        "sockets": {"sds": str(sds_socket)},
        "rotate_after": rotate_after,
        "jitter": jitter,
        "entries": [{"spiffe_id": str(i), "selectors": list(selectors)} for i in sorted(identities, key=str)],
    }
    if workload_socket is not None:
        document["sockets"]["workload_api"] = str(workload_socket)
    if metrics is not None:
        document["metrics"] = {"listen": str(metrics)}
    return document


def read_address(path: Path) -> Address:
    """``host:port`` as a server wrote it (``<state_dir>/signing.addr``, ``attest.addr``)."""
    text = path.read_text().strip()
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit():
        raise AgentError(f"{path}: {text[:80]!r} is not host:port")
    return Address(host.strip("[]"), int(port))


class AgentProcess:
    """One ``mesh-identity agent`` process on ``config`` (see the module docstring)."""

    def __init__(self, config: Path, sds_socket: Path, log_path: Path) -> None:
        self.config = config
        self.sds_socket = sds_socket
        self.log_path = log_path
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> AgentProcess:
        with self.log_path.open("ab") as log:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "mesh_identity", "agent", "--config", str(self.config)],
                stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
            )  # fmt: skip
        return self

    @property
    def pid(self) -> int | None:
        return None if self.process is None else self.process.pid

    def exit_code(self) -> int | None:
        return None if self.process is None else self.process.poll()

    def check_running(self) -> None:
        code = self.exit_code()
        if code is not None:
            raise AgentError(f"the node agent exited with code {code}; its log: {self.log_path}\n{self.log_tail()}")

    def serving(self) -> bool:
        """Whether the SDS socket accepts a connection now; raises if the agent exited."""
        self.check_running()
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
            try:
                probe.connect(str(self.sds_socket))
            except OSError:
                return False
        return True

    def wait_serving(self, timeout: float, interrupted: Callable[[], bool] | None = None) -> None:
        """Until the SDS socket accepts connections; AgentError after ``timeout`` seconds or if the agent exits."""
        deadline = time.monotonic() + timeout
        while not self.serving():
            if interrupted is not None and interrupted():
                return
            if time.monotonic() > deadline:
                raise AgentError(
                    f"the node agent did not serve {self.sds_socket} within {timeout:.0f}s: {self.log_path}"
                )
            time.sleep(0.1)

    def log_tail(self, lines: int = 30) -> str:
        """The last ``lines`` of its log."""
        return log_tail(self.log_path, lines)

    def stop(self, grace: float = 10.0) -> int | None:
        """SIGTERM, then SIGKILL after ``grace`` seconds; the exit code."""
        return stop_process(self.process, grace)
