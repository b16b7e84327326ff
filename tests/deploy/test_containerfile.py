"""The ``Containerfile`` (no container runtime and no network here, so the image is not built): its stages and
instructions parse, the base image's Python is one the project supports, the image that runs is non-root and
starts the project's console script, the ignore files keep the build context small, and the build stage's
wheel builds (offline, from exactly the files the stage copies) with that script in it."""

from __future__ import annotations

import json
import re
import shlex
import shutil
import subprocess
import sys
import tomllib
import zipfile
from pathlib import Path

from tests.deploy.conftest import CONTAINERFILE, ROOT, base_documents, only

PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())


def instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) of the Containerfile, continuation lines joined, comments left out."""
    found: list[tuple[str, str]] = []
    pending = ""
    for line in CONTAINERFILE.read_text().splitlines():
        if not pending and (not line.strip() or line.lstrip().startswith("#")):
            continue
        pending += line.rstrip()
        if pending.endswith("\\"):
            pending = pending[:-1] + " "
            continue
        word, _, rest = pending.strip().partition(" ")
        found.append((word.upper(), rest.strip()))
        pending = ""
    assert not pending, "the Containerfile ends inside a continued line"
    return found


def stages() -> list[list[tuple[str, str]]]:
    out: list[list[tuple[str, str]]] = []
    for word, rest in instructions():
        if word == "FROM":
            out.append([])
        if out:
            out[-1].append((word, rest))
    return out


def test_it_is_a_multi_stage_build_on_a_supported_python() -> None:
    args = {rest.split("=")[0]: rest.split("=", 1)[1] for word, rest in instructions() if word == "ARG"}
    builds = stages()
    assert len(builds) == 2
    assert builds[0][0] == ("FROM", "${PYTHON_IMAGE} AS build")
    assert builds[1][0] == ("FROM", "${PYTHON_IMAGE}")
    match = re.search(r"python:(\d+)\.(\d+)-slim", args["PYTHON_IMAGE"])
    assert match is not None
    floor = re.fullmatch(r">=(\d+)\.(\d+)", PYPROJECT["project"]["requires-python"])
    assert floor is not None
    assert (int(match[1]), int(match[2])) >= (int(floor[1]), int(floor[2]))
    known = {"FROM", "ARG", "ENV", "WORKDIR", "COPY", "RUN", "LABEL", "USER", "EXPOSE", "ENTRYPOINT", "CMD"}
    assert {word for word, _ in instructions()} <= known


def test_the_image_runs_the_console_script_as_a_non_root_user() -> None:
    final = stages()[-1]
    users = [rest for word, rest in final if word == "USER"]
    assert users == ["65532:65532"]
    pod = only(base_documents(), "Deployment")["spec"]["template"]["spec"]
    assert pod["securityContext"]["runAsUser"] == 65532 and pod["securityContext"]["runAsGroup"] == 65532
    (entrypoint,) = [json.loads(rest) for word, rest in final if word == "ENTRYPOINT"]
    assert entrypoint == ["mesh-identity"]
    assert "mesh-identity" in PYPROJECT["project"]["scripts"]
    copies = [rest for word, rest in final if word == "COPY"]
    assert copies == ["--from=build /opt/mesh-identity /opt/mesh-identity"]
    (env,) = [rest for word, rest in final if word == "ENV"]
    assert "PATH=/opt/mesh-identity/bin:" in env


def test_the_exposed_ports_are_the_deployments() -> None:
    (exposed,) = [rest for word, rest in stages()[-1] if word == "EXPOSE"]
    (container,) = only(base_documents(), "Deployment")["spec"]["template"]["spec"]["containers"]
    assert sorted(map(int, exposed.split())) == sorted(p["containerPort"] for p in container["ports"])


def copied_sources() -> list[str]:
    sources: list[str] = []
    for word, rest in stages()[0]:
        if word == "COPY":
            *found, _target = shlex.split(rest)
            sources += found
    return sources


def test_the_ignore_files_are_one_and_keep_out_what_the_build_does_not_copy() -> None:
    ignore = (ROOT / ".containerignore").read_text()
    assert ignore.splitlines()[2:] == (ROOT / ".dockerignore").read_text().splitlines()[2:]
    patterns = {line for line in ignore.splitlines() if line and not line.startswith("#")}
    assert {".git", ".venv", "tests", "**/__pycache__"} <= patterns
    for source in copied_sources():
        assert source not in patterns, f"{source} is copied but ignored"
        assert (ROOT / source).exists(), source


def test_the_build_stage_builds_the_wheel_from_what_it_copies(tmp_path: Path) -> None:
    context = tmp_path / "src"
    context.mkdir()
    for source in copied_sources():
        path = ROOT / source
        if path.is_dir():
            shutil.copytree(path, context / source, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        else:
            shutil.copy2(path, context / source)
    wheels = tmp_path / "wheels"
    # offline: the build backend of the venv (setuptools, a dev dependency) instead of an isolated download
    done = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index",
         "--wheel-dir", str(wheels), str(context)],
        capture_output=True, text=True, timeout=300, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    (wheel,) = wheels.glob("mesh_identity-*.whl")
    assert wheel.name.startswith(f"mesh_identity-{PYPROJECT['project']['version']}-")
    with zipfile.ZipFile(wheel) as archive:
        names = archive.namelist()
        (entry_points,) = [n for n in names if n.endswith(".dist-info/entry_points.txt")]
        scripts = archive.read(entry_points).decode()
    assert "mesh-identity = mesh_identity.cli:main" in scripts
    for package in ("mesh_identity/cli/__init__.py", "providers/builtin/provider.py", "xds_sds/__init__.py"):
        assert package in names
    assert "mesh_identity/demo/demo-mesh.yaml" in names
