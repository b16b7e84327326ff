"""The main job: ``mesh-identity demo`` as the README runs it (a real subprocess with real Envoys)."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from tests.waiting import wait_until

pytestmark = pytest.mark.e2e

SUMMARY = re.compile(
    r"^summary: (\d+) requests ok, (\d+) failed; (\d+) workload certificate rotations loaded by the sidecars "
    r"without a restart \((\d+) issued; (\d+) server and CA rotations\)$"
)
ENVOY_PID = re.compile(r"^sidecar (\S+): envoy pid (\d+), admin http://127\.0\.0\.1:\d+, log (\S+)$")


def demo(directory: Path, *args: str) -> subprocess.Popen[bytes]:
    with (directory / "demo.out").open("wb") as out:
        return subprocess.Popen(
            [sys.executable, "-m", "mesh_identity", "demo", "--state-dir", str(directory / "demo"), *args],
            stdout=out,
            stderr=subprocess.STDOUT,
            env={**os.environ, "MESH_IDENTITY_CONFIG": ""},
        )


def output(directory: Path) -> list[str]:
    return (directory / "demo.out").read_text().splitlines()


def envoy_pids(lines: list[str]) -> dict[str, int]:
    return {m.group(1): int(m.group(2)) for line in lines if (m := ENVOY_PID.match(line))}


def gone(pid: int) -> bool:
    """The process has exited and been reaped by its parent (no orphan left behind)."""
    return not Path(f"/proc/{pid}").exists()


def test_demo_runs_a_minute_without_a_failed_request_and_with_rotations(tmp_path: Path) -> None:
    proc = demo(tmp_path, "--duration", "60")
    try:
        code = proc.wait(240)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    lines = output(tmp_path)
    assert code == 0, "\n".join(lines[-40:])
    pids = envoy_pids(lines)
    assert set(pids) == {"frontend-1", "backend-1", "ratings-1", "ratings-v2-1", "batch-1"}
    assert all(gone(pid) for pid in pids.values())
    [summary] = [m for line in lines if (m := SUMMARY.match(line))]
    ok, failed, loaded, issued, _ = map(int, summary.groups())
    assert failed == 0
    assert ok > 100
    assert 1 <= loaded <= issued
    assert lines[-3:] == ["result: ok", "stopping: client, sidecars, apps, control plane", "stopped"]
    # the last frame: each server side saw its caller's SPIFFE ID, at every hop
    last = max(i for i, line in enumerate(lines) if line.startswith("frontend -> backend -> ratings "))
    assert re.match(
        r"^frontend -> backend -> ratings +\d+ +0 +backend: spiffe://demo\.mesh/ns/shop/sa/frontend$", lines[last]
    )
    assert re.match(r"^ +ratings(-v2)?: spiffe://demo\.mesh/ns/shop/sa/backend$", lines[last + 1])
    # the policies: batch is refused by backend's sidecar every time; ratings' traffic is split 80/20
    refused = max(
        i for i, line in enumerate(lines) if re.match(r"batch -> backend +\d+ +\d+ ", line)
    )  # not the traffic table
    assert re.match(
        r"^batch -> backend +[1-9]\d* +0 +backend: refused batch \(403 RBAC: access denied\)$", lines[refused]
    )
    split = max(i for i, line in enumerate(lines) if line.startswith("  frontend -> backend -> ratings answered by: "))
    assert re.match(
        r"^  frontend -> backend -> ratings answered by: backend -> ratings \d+, backend -> ratings-v2 [1-9]\d*$",
        lines[split],
    )
    # the traffic table, from the sidecars' own stats: every answer batch got was a 4xx (the 403 above)
    traffic = [line.split() for line in lines if re.match(r"batch -> backend +http ", line)]
    refusals = [row[6] for row in traffic if row[6] != "-"]
    assert refusals and set(refusals) == {"100.0%"}, traffic
    assert traffic[-1][-3:] == ["spiffe://demo.mesh/ns/shop/sa/batch", "->", "spiffe://demo.mesh/ns/shop/sa/backend"]


def test_ctrl_c_stops_every_process(tmp_path: Path) -> None:
    proc = demo(tmp_path)
    try:
        wait_until(
            lambda: any(line.startswith("ROUTE ") for line in output(tmp_path)) or proc.poll() is not None,
            "the first frame",
            timeout=120,
        )
        assert proc.poll() is None, "\n".join(output(tmp_path))
        pids = envoy_pids(output(tmp_path))
        assert len(pids) == 5 and not any(gone(pid) for pid in pids.values())
        proc.send_signal(signal.SIGINT)
        code = proc.wait(120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    lines = output(tmp_path)
    assert code == 0, "\n".join(lines[-40:])
    assert all(gone(pid) for pid in pids.values())
    [summary] = [m for line in lines if (m := SUMMARY.match(line))]
    assert summary.group(2) == "0"
    assert lines[-1] == "stopped"
