"""What the demo's child processes (Envoy sidecars, the node agent) share: stopping one, reading its log."""

from __future__ import annotations

import signal
import subprocess
from pathlib import Path


def stop_process(process: subprocess.Popen[bytes] | None, grace: float) -> int | None:
    """SIGTERM, then SIGKILL after ``grace`` seconds; the exit code (None if it never started)."""
    if process is None:
        return None
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(grace)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
    return process.returncode


def log_tail(path: Path, lines: int) -> str:
    """The last ``lines`` of the log at ``path``, or ``(no log)``."""
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except FileNotFoundError:
        return "(no log)"
