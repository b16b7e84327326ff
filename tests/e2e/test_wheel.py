"""The main job as users install it: the wheel, built from this tree and installed into a fresh virtualenv
outside it, runs ``mesh-identity demo`` on the mesh file it ships as package data.

No network: the fresh virtualenv reaches the project's dependencies through a path file naming this test
environment's site-packages (a path file adds a directory, it does not run that directory's own path files, so
the editable install of the source tree stays out of it). The project itself comes from the wheel only; the
test checks that it is imported from there.
"""

from __future__ import annotations

import os
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest

pytestmark = pytest.mark.e2e

ROOT = Path(__file__).resolve().parents[2]
ENVOY = Path(sys.executable).parent / "envoy"


def run(*command: str | Path, cwd: Path, timeout: float = 240) -> str:
    done = subprocess.run(
        [str(c) for c in command], cwd=cwd, capture_output=True, text=True, timeout=timeout,
        env={k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "MESH_IDENTITY_CONFIG")},
    )  # fmt: skip
    assert done.returncode == 0, f"{command} exited {done.returncode}:\n{done.stdout}\n{done.stderr}"
    return done.stdout


def test_the_installed_wheel_runs_the_demo_on_its_shipped_mesh(tmp_path: Path) -> None:
    wheels = tmp_path / "wheels"
    run(sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--quiet", "-w", wheels, ROOT,
        cwd=tmp_path)  # fmt: skip
    (wheel,) = wheels.glob("mesh_identity-*.whl")
    with zipfile.ZipFile(wheel) as archive:
        names = set(archive.namelist())
    assert "mesh_identity/demo/demo-mesh.yaml" in names
    assert not any(name.startswith("tests/") for name in names)

    venv = tmp_path / "venv"
    run(sys.executable, "-m", "venv", venv, cwd=tmp_path)
    python = venv / "bin" / "python"
    site = Path(run(python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])", cwd=tmp_path).strip())
    (site / "dependencies.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    run(python, "-m", "pip", "install", "--no-deps", "--no-index", "--quiet", wheel, cwd=tmp_path)

    where = run(python, "-c", "import mesh_identity.demo; print(mesh_identity.demo.__file__)", cwd=tmp_path).strip()
    assert Path(where).is_relative_to(site), where

    out = run(venv / "bin" / "mesh-identity", "demo", "--duration", "20", "--envoy", ENVOY, cwd=tmp_path)
    assert "result: ok" in out, out
    assert "mesh ready" in out
