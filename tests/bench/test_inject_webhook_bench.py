"""The admission webhook benchmark (``bench/inject_webhook.py``) runs at a small size, with its profile, and
reports every figure: so that it does not rot. No figure is asserted, only what the benchmark itself checks
(every answer is the injection of its own review) and the shape of its report."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
BENCH = ROOT / "bench" / "inject_webhook.py"


def test_the_webhook_benchmark_runs_at_a_small_size(tmp_path: Path) -> None:
    profile = tmp_path / "inject.prof"
    done = subprocess.run(
        [sys.executable, str(BENCH), "--n", "20", "--warmup", "3", "--new-connections", "5",
         "--profile", str(profile), "--json"],
        capture_output=True, text=True, timeout=240, check=False, cwd=ROOT,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr
    figures = json.loads(done.stdout.strip().splitlines()[-1])
    assert figures["n"] == 20 and figures["patch_ops"] > 0 and figures["review_bytes"] > 4000
    for kind in ("keep_alive", "new_connection"):
        for request in ("mutate", "healthz"):
            found = figures[kind][request]
            assert 0 < found["p50"] <= found["p90"] <= found["p99"] <= found["max"], (kind, request, found)
        assert figures[kind]["ratio_p50"] > 0 and figures[kind]["ratio_p99"] > 0
    assert figures["in_process"]["p50"] > 0 and figures["server_cpu_ms_per_pair"] >= 0
    assert figures["profile_do_post_ms"] > 0 and profile.stat().st_size > 0
    assert "goal p99 <= 20 ms, keep-alive:" in done.stdout
    assert "the documents callable" in done.stdout
