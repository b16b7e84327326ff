"""The Kubernetes registry benchmark (``bench/kube_registry.py``) runs at a small size, every object it writes
checked against the official schemas, and reports every figure: so that it does not rot. No figure is
asserted, only what the benchmark itself relies on (every sidecar's snapshot became ready, each created pod's
too, the mesh had no refusal)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
BENCH = ROOT / "bench" / "kube_registry.py"


def test_the_kubernetes_benchmark_runs_at_a_small_size() -> None:
    done = subprocess.run(
        [sys.executable, str(BENCH), "--pods", "12", "--namespaces", "2", "--services", "6", "--created", "2",
         "--window", "1", "--gap", "0.1", "--validate", "--json"],
        capture_output=True, text=True, timeout=240, check=False, cwd=ROOT,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr
    lines = done.stdout.strip().splitlines()
    figures = json.loads(lines[-1])
    assert "all 12 sidecars' snapshots ready" in done.stdout
    assert "refusals none" in done.stdout, done.stdout
    assert len(figures["create_all_s"]) == 2
    for key in ("initial_sync_s", "translate_s", "views_s", "kib_per_pod", "create_p50_s", "create_p99_s"):
        assert isinstance(figures[key], float), key
    assert figures["open_watches"] >= 9  # one per watched kind
    assert isinstance(figures["steady_by_resource"], dict)
