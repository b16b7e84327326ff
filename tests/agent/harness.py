"""The agent's test kit: a real control plane (the server of ``mesh_identity.compose.build`` with a ``signing``
section, in this process), a real agent process (``python -m xds_sds.agent``), and workloads that use the real
py-spiffe client (``spiffe_client.py``) as any uid.

The control plane listens on fixed free ports so that it can be stopped and started again where the agent
expects it (the outage test). The agent's sockets are in a directory under ``/tmp`` that every uid can reach
(pytest's ``tmp_path`` is inside a 0700 directory, and can be longer than a socket path allows).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import urllib.error
import urllib.request
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any

import yaml
from prometheus_client.parser import text_string_to_metric_families

from mesh_identity.compose import Stage, System, build
from mesh_identity.config import load_config
from mesh_identity.jointokens import JoinTokens
from mesh_identity.ports import free_port
from tests.waiting import wait_until

TD = "example.org"
HOST = "node1"
FRONTEND = f"spiffe://{TD}/ns/shop/sa/frontend"
BACKEND = f"spiffe://{TD}/ns/shop/sa/backend"
ADMIN = f"spiffe://{TD}/ns/ops/sa/admin"
ELSEWHERE = f"spiffe://{TD}/ns/shop/sa/elsewhere"  # on node2: the control plane refuses it to node1's agent
AGENT_ID = f"spiffe://{TD}/mesh-identity/agent/{HOST}"
CLIENT = Path(__file__).with_name("spiffe_client.py")
REPO = Path(__file__).resolve().parents[2]


def service(namespace: str, account: str, node: str, host: str, port: int) -> dict[str, Any]:
    return {
        "identity": {"namespace": namespace, "service_account": account},
        "instances": [{"node": node, "app": f"127.0.0.1:{port}", "inbound": f"127.0.0.1:{port + 1}", "host": host}],
    }


MESH: dict[str, Any] = {
    "services": {
        "frontend": service("shop", "frontend", "frontend-1", HOST, 18080),
        "backend": service("shop", "backend", "backend-1", HOST, 18180),
        "admin": service("ops", "admin", "admin-1", HOST, 18280),
        "elsewhere": service("shop", "elsewhere", "elsewhere-1", "node2", 18380),
    }
}


class ControlPlane:
    """``mesh-identity serve`` with a signing API, in this process; :meth:`stop` and :meth:`start` again keep
    its ports and its CA."""

    def __init__(
        self,
        root: Path,
        *,
        workload_ttl: str = "1h",
        mesh: dict[str, Any] | None = None,
        kubeconfig: Path | None = None,
    ) -> None:
        self.root = root
        self.state_dir = root / "cp-state"
        self.signing = f"127.0.0.1:{free_port()}"
        self.attest = f"127.0.0.1:{free_port()}"
        self.system: System | None = None
        root.mkdir(parents=True, exist_ok=True)
        (root / "mesh.yaml").write_text(yaml.safe_dump(mesh or MESH))
        document = {
            "trust_domain": TD,
            "state_dir": str(self.state_dir),
            "mesh_file": "mesh.yaml",
            "ca": {"workload_ttl": workload_ttl},
            "xds": {"listen": "127.0.0.1:0", "secrets": "agent"},
            "signing": {"listen": self.signing, "attest_listen": self.attest},
            "metrics": {"listen": "127.0.0.1:0"},
        }
        if kubeconfig is not None:  # Attest with service-account tokens, checked by TokenReview there
            document["signing"]["kubernetes"] = {"kubeconfig": str(kubeconfig)}
        (root / "config.yaml").write_text(yaml.safe_dump(document))

    def start(self) -> ControlPlane:
        system = build(load_config(self.root / "config.yaml"), Stage.SERVER, create=True)
        assert system.service is not None
        system.service.start()
        self.system = system
        return self

    def stop(self) -> None:
        system, self.system = self.system, None
        if system is not None and system.service is not None:
            system.service.stop()

    @property
    def running(self) -> bool:
        return self.system is not None

    def bundle_pem(self) -> bytes:
        assert self.system is not None and self.system.authority is not None
        return self.system.authority.bundle().pem()

    def token(self, host: str = HOST) -> str:
        return JoinTokens(self.state_dir).create(host, timedelta(minutes=15))


def public_dir(prefix: str = "mi-agent-") -> Path:
    """A short directory under /tmp that every uid can enter (the agent's sockets, the client's script)."""
    path = Path(tempfile.mkdtemp(prefix=prefix, dir="/tmp"))
    path.chmod(0o755)
    return path


@dataclass
class AgentRun:
    """One agent process and its files: config, state, sockets, log."""

    root: Path  # public (0755): sockets live in root/run
    control_plane: ControlPlane
    entries: Sequence[tuple[str, Sequence[str]]]
    rotate_after: float = 0.5
    jitter: float = 0.1
    process: subprocess.Popen[bytes] | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        (self.root / "run").mkdir(exist_ok=True)
        (self.root / "run").chmod(0o755)
        self.private = self.root / "private"
        self.private.mkdir(mode=0o700, exist_ok=True)

    @property
    def state_dir(self) -> Path:
        return self.private / "state"

    @property
    def workload_socket(self) -> Path:
        return self.root / "run" / "workload.sock"

    @property
    def sds_socket(self) -> Path:
        return self.root / "run" / "sds.sock"

    @property
    def log_path(self) -> Path:
        return self.private / "agent.log"

    def write_config(self, *, token: str | None, kubernetes_token: str | None = None) -> Path:
        (self.private / "bundle.pem").write_bytes(self.control_plane.bundle_pem())
        document: dict[str, Any] = {
            "trust_domain": TD,
            "host": HOST,
            "state_dir": str(self.state_dir),
            "control_plane": {
                "signing": self.control_plane.signing,
                "attest": self.control_plane.attest,
                "bundle": str(self.private / "bundle.pem"),
            },
            "sockets": {"sds": str(self.sds_socket), "workload_api": str(self.workload_socket)},
            "metrics": {"listen": "127.0.0.1:0"},
            "rotate_after": self.rotate_after,
            "jitter": self.jitter,
            "entries": [{"spiffe_id": i, "selectors": list(s)} for i, s in self.entries],
            **self.extra,
        }
        if token is not None:
            (self.private / "join-token").write_text(token + "\n")
            document["credential"] = {"join_token_file": str(self.private / "join-token")}
        if kubernetes_token is not None:
            (self.private / "sa-token").write_text(kubernetes_token)
            document["credential"] = {"kubernetes_token_file": str(self.private / "sa-token")}
        path = self.private / "agent.yaml"
        path.write_text(yaml.safe_dump(document))
        return path

    def start(self, *, token: str | None = None, kubernetes_token: str | None = None, wait: bool = True) -> AgentRun:
        config = self.write_config(token=token, kubernetes_token=kubernetes_token)
        with self.log_path.open("ab") as log:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "xds_sds.agent", "--config", str(config)],
                cwd=REPO, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
            )  # fmt: skip
        if wait:
            wait_until(self.serving, "the agent's sockets", 60)
        return self

    def serving(self) -> bool:
        self.check_running()
        for path in (self.workload_socket, self.sds_socket):
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
                try:
                    probe.connect(str(path))
                except OSError:
                    return False
        return (self.state_dir / "metrics.addr").exists()

    def check_running(self) -> None:
        if self.process is not None and self.process.poll() is not None:
            raise AssertionError(f"the agent exited with {self.process.returncode}:\n{self.log()}")

    def stop(self) -> int | None:
        process, self.process = self.process, None
        if process is None:
            return None
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(30)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
                raise AssertionError(f"the agent did not stop on SIGTERM:\n{self.log()}") from None
        return process.returncode

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    # -- the agent's endpoint

    @property
    def metrics_url(self) -> str:
        return "http://" + (self.state_dir / "metrics.addr").read_text().strip()

    def get(self, path: str) -> tuple[int, str]:
        try:
            with urllib.request.urlopen(self.metrics_url + path, timeout=10) as reply:
                return reply.status, reply.read().decode()
        except urllib.error.HTTPError as err:
            return err.code, err.read().decode()

    def metrics(self) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
        status, text = self.get("/metrics")
        assert status == 200, text
        return {
            (sample.name, tuple(sorted(sample.labels.items()))): sample.value
            for family in text_string_to_metric_families(text)
            for sample in family.samples
        }

    def sample(self, name: str, **labels: str) -> float | None:
        return self.metrics().get((name, tuple(sorted(labels.items()))))

    # -- workloads

    def client(self, *args: str, uid: int | None = None, timeout: float = 60) -> tuple[int, list[Any]]:
        """Run ``spiffe_client.py`` (as ``uid``); its exit code and the JSON lines it printed."""
        return run_client(self.workload_socket, args, uid=uid, timeout=timeout)


def as_uid(uid: int | None) -> list[str]:
    return [] if uid is None else ["setpriv", "--reuid", str(uid), "--regid", str(uid), "--clear-groups"]


def client_script() -> Path:
    """The client script where every uid can read it."""
    target = Path("/tmp/mi-agent-spiffe-client.py")
    data = CLIENT.read_bytes()
    if not target.exists() or target.read_bytes() != data:
        tmp = target.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_bytes(data)
        tmp.chmod(0o644)
        tmp.replace(target)
    return target


def run_client(
    socket_path: Path, args: Sequence[str], *, uid: int | None = None, timeout: float = 60
) -> tuple[int, list[Any]]:
    env = {**os.environ, "SPIFFE_ENDPOINT_SOCKET": f"unix://{socket_path}", "PYTHONDONTWRITEBYTECODE": "1"}
    done = subprocess.run(
        [*as_uid(uid), sys.executable, str(client_script()), *args],
        env=env, capture_output=True, timeout=timeout, cwd="/",
    )  # fmt: skip
    lines = [json.loads(line) for line in done.stdout.decode().splitlines() if line.startswith(("{", "["))]
    if not lines:
        raise AssertionError(f"the client printed nothing (exit {done.returncode}): {done.stderr.decode()[-2000:]}")
    return done.returncode, lines


@dataclass
class Running:
    control_plane: ControlPlane
    agent: AgentRun


def cleanup(paths: Iterator[Path] | Sequence[Path]) -> None:
    for path in paths:
        shutil.rmtree(path, ignore_errors=True)
