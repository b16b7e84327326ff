"""The pod-start benchmark (``bench/inject_pod_start.py``) runs with one pod of each kind, so that it does not rot:
no figure is asserted, only that every pod reached its destination and the report's shape (needs root, as the
injection e2e, and kubectl, which .ci/setup installs)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
BENCH = ROOT / "bench" / "inject_pod_start.py"


@pytest.mark.e2e
def test_the_pod_start_benchmark_runs_with_one_pod(tmp_path: Path) -> None:
    done = subprocess.run(
        [sys.executable, str(BENCH), "--pods", "1", "--json"],
        capture_output=True, text=True, timeout=600, check=False, cwd=ROOT,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr
    figures = json.loads(done.stdout.strip().splitlines()[-1])
    assert figures["pods"] == 1
    for kind in ("injected", "plain"):
        assert 0 < figures[kind]["min"] <= figures[kind]["p50"] <= figures[kind]["p99"] <= figures[kind]["max"]
    assert figures["ratio_p50"] > 0 and figures["tries_median"] >= 1
    assert "injected / plain:" in done.stdout
