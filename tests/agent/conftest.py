"""Fixtures: one control plane and one agent per module (see ``harness.py``); tests that stop or restart either
make their own."""

from __future__ import annotations

import os
import shutil
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.agent.harness import ADMIN, BACKEND, FRONTEND, AgentRun, ControlPlane, public_dir
from tests.waiting import wait_until

PYTHON = os.path.realpath(sys.executable)  # what /proc/<pid>/exe says of a Python client

# uid 1001 is frontend, uid 1002 backend; root's Python is admin and (by its executable too) backend.
ENTRIES: list[tuple[str, list[str]]] = [
    (ADMIN, ["unix:uid:0"]),
    (FRONTEND, ["unix:uid:1001"]),
    (BACKEND, ["unix:uid:1002"]),
    (BACKEND, ["unix:uid:0", f"unix:path:{PYTHON}"]),
]


@pytest.fixture(autouse=True)
def _needs_root() -> None:
    if os.getuid() != 0:
        pytest.fail("the agent tests start workloads as other uids: run the suite as root (tests/run.sh, as CI does)")


@pytest.fixture(scope="module")
def control_plane(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ControlPlane]:
    plane = ControlPlane(tmp_path_factory.mktemp("control-plane")).start()
    yield plane
    plane.stop()


@pytest.fixture(scope="module")
def agent(control_plane: ControlPlane) -> Iterator[AgentRun]:
    root = public_dir()
    run = AgentRun(root, control_plane, ENTRIES).start(token=control_plane.token())
    wait_until(lambda: run.get("/healthz")[0] == 200, "every SVID of the agent", 60)
    yield run
    run.stop()
    shutil.rmtree(root, ignore_errors=True)


@pytest.fixture
def fresh_root() -> Iterator[Path]:
    root = public_dir()
    yield root
    shutil.rmtree(root, ignore_errors=True)
