"""``serve``, ``status``, ``doctor``, ``ca status`` and ``ca rotate-root`` as users run them: ``serve`` in a real
subprocess, the other commands against it over real HTTP."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from mesh_identity.cli.main import main
from mesh_identity.server.service import ADMIN_ADDR, ADMIN_TOKEN
from tests.rotation.helpers import ids
from tests.waiting import wait_until

TEAM = ids("web", "api")


def write_config(directory: Path, **extra: object) -> Path:
    document = {
        "trust_domain": "example.org",
        "state_dir": "state",
        "metrics": {"listen": "127.0.0.1:0"},
        "identities": [str(i) for i in TEAM],
        **extra,
    }
    path = directory / "config.yaml"
    path.write_text(yaml.safe_dump(document))
    return path


def cli(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    code = main(list(args))
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture
def server(tmp_path: Path) -> Iterator[tuple[Path, subprocess.Popen[str]]]:
    config = write_config(tmp_path)
    proc = subprocess.Popen(
        [sys.executable, "-m", "mesh_identity", "serve", "--config", str(config)],
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "MESH_IDENTITY_CONFIG": ""},
    )
    try:
        wait_until(lambda: (tmp_path / "state" / ADMIN_ADDR).exists() or proc.poll() is not None, "serve", timeout=60)
        assert proc.poll() is None, proc.communicate()
        yield config, proc
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            proc.communicate(timeout=60)


def stop(proc: subprocess.Popen[str]) -> tuple[int, str, str]:
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=60)
    return proc.returncode, out, err


def test_serve_status_and_a_whole_root_rotation_from_the_command_line(server, capsys):
    config, proc = server
    state = config.parent / "state"

    code, out, _ = cli(capsys, "status", "--config", str(config), "--json")
    assert code == 0
    data = json.loads(out)
    assert [i["subject"] for i in data["identities"]] == sorted(map(str, TEAM))
    assert data["ready"] is True and data["ca"]["phase"] == "steady"

    code, out, _ = cli(capsys, "status", "--config", str(config))
    assert code == 0
    lines = out.splitlines()
    assert lines[0].startswith("trust domain example.org; provider builtin (intermediate mode) healthy; ready; ")
    assert lines[1] == (
        "root rotation: steady (no root rotation in progress; start one with: mesh-identity ca rotate-root prepare)"
    )
    header = next(line for line in lines if line.startswith("IDENTITY"))
    assert header.split() == [
        "IDENTITY",
        "SERIAL",
        "NOT",
        "AFTER",
        "LEFT",
        "NEXT",
        "ROTATION",
        "PROVIDER",
        "LAST",
        "ERROR",
    ]
    rows = {line.split()[0]: line.split() for line in lines[lines.index(header) + 1 :]}
    for identity in data["identities"]:
        assert rows[identity["subject"]][1:3] == [identity["serial"], identity["not_after"]]
        assert rows[identity["subject"]][-2:] == ["builtin", "-"]

    code, out, _ = cli(capsys, "ca", "rotate-root", "prepare", "--config", str(config))
    assert (code, out.startswith("prepared root ")) == (0, True)
    code, out, _ = cli(capsys, "ca", "status", "--config", str(config))
    assert code == 0
    assert out.splitlines()[0] == "root rotation: prepared (ready: mesh-identity ca rotate-root activate)"
    assert [line.split()[-3:] for line in out.splitlines()[1:3]] == [
        ["signing,", "2", "leaves"],
        ["new,", "0", "leaves"],
    ]
    code, out, err = cli(capsys, "ca", "rotate-root", "activate", "--exclude", "web-9", "--config", str(config))
    assert (code, out) == (1, "")
    assert err == (
        "mesh-identity: error: cannot activate: --exclude names web-9, which is not holding this step up "
        "(waiting for: none)\n"
    )
    code, out, err = cli(capsys, "ca", "rotate-root", "activate", "--force", " ", "--config", str(config))
    assert (code, err) == (
        2,
        "mesh-identity: error: --force: give the reason for going ahead without the proxies' evidence\n",
    )
    code, out, _ = cli(capsys, "ca", "rotate-root", "activate", "--config", str(config))
    assert (code, "2 identities renewed from it" in out) == (0, True)
    code, out, _ = cli(capsys, "ca", "rotate-root", "retire", "--config", str(config))
    assert (code, out.startswith("retired root ")) == (0, True)
    code, out, err = cli(capsys, "ca", "rotate-root", "retire", "--config", str(config))
    assert (code, out) == (1, "")
    assert err == (
        "mesh-identity: error: cannot retire: the root rotation is in phase 'steady', not 'activated'; "
        "next step: mesh-identity ca rotate-root prepare\n"
    )

    token = state / ADMIN_TOKEN
    real = token.read_text()
    token.write_text("forged\n")
    code, _, err = cli(capsys, "ca", "rotate-root", "prepare", "--config", str(config))
    assert (code, err) == (1, f"mesh-identity: error: the server refused the admin token from {token} (401)\n")
    token.write_text(real)

    code, out, err = stop(proc)
    assert code == 0, err
    assert out.splitlines()[:2] == [
        f"created CA state in {state}",
        "serving 2 identities of example.org (provider builtin, intermediate mode)",
    ]
    assert out.splitlines()[-1] == "stopped"
    assert not (state / ADMIN_ADDR).exists() and not token.exists()
    audit = [json.loads(line) for line in (state / "audit.jsonl").read_text().splitlines()]
    assert {"CertificateIssued", "CertificateRotated", "CaRotated"} <= {record["event"] for record in audit}
    assert "PRIVATE KEY" not in (state / "audit.jsonl").read_text()


def test_commands_that_need_the_server_say_so_when_it_is_not_running(tmp_path, capsys):
    config = write_config(tmp_path)
    code, _, err = cli(capsys, "status", "--config", str(config))
    assert code == 1
    assert err.startswith("mesh-identity: error: cannot reach the server at http://127.0.0.1:0/status: ")
    assert err.endswith("(is 'mesh-identity serve' running?)\n")
    code, _, err = cli(capsys, "ca", "rotate-root", "prepare", "--config", str(config))
    token = tmp_path / "state" / ADMIN_TOKEN
    assert (code, err) == (
        1,
        f"mesh-identity: error: cannot read the admin token {token}: No such file or directory (it is written by "
        "a running 'mesh-identity serve')\n",
    )


def test_ca_status_without_a_server_shows_the_state_on_disk(tmp_path, capsys):
    config = write_config(tmp_path)
    assert cli(capsys, "init", "--config", str(config))[0] == 0
    code, out, _ = cli(capsys, "ca", "status", "--config", str(config))
    assert code == 0
    lines = out.splitlines()
    assert lines[0].endswith("; showing the CA state on disk (leaves and proxies are known to the running server only)")
    assert lines[1] == "root rotation: steady"
    assert lines[2].startswith("  root  ") and " sha256 " in lines[2]
    assert "  ok     retired root keys: none on disk (a root's key is deleted when it is retired)" in lines


def test_doctor(tmp_path, capsys):
    config = write_config(tmp_path)
    code, out, _ = cli(capsys, "doctor", "--config", str(config))
    assert code == 1
    assert f"provider builtin: FAILED: no CA state in {tmp_path / 'state'}: run 'mesh-identity init' first" in out
    assert "  note: outage budget: the upstream CA may be unreachable for 12h before anything expires" in out
    assert out.splitlines()[-1] == "doctor: problems found"

    assert cli(capsys, "init", "--config", str(config))[0] == 0
    code, out, _ = cli(capsys, "doctor", "--config", str(config))
    assert code == 0, out
    lines = out.splitlines()
    assert lines[0] == f"config: ok ({config})"
    assert lines[1] == "provider builtin: loaded"
    assert lines[2].startswith("  ok     health: signing CA valid until ")
    assert (
        "  note: workload certificates live 1h and are renewed 27m to 30m after issue (rotate_after 0.5, "
        "jitter 0.1); a failing renewal is retried for 30m before the certificate expires" in lines
    )
    assert lines[-1] == "doctor: all good"


def test_doctor_and_serve_refuse_an_unsound_chain(tmp_path, capsys):
    config = write_config(tmp_path, ca={"provider_options": {"root_ttl": "30m"}})
    assert cli(capsys, "init", "--config", str(config))[0] == 0
    code, out, _ = cli(capsys, "doctor", "--config", str(config))
    assert code == 1
    assert "  error: ca.workload_ttl: 1h is not shorter than the 29m" in out
    proc = subprocess.run(
        [sys.executable, "-m", "mesh_identity", "serve", "--config", str(config)],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert proc.returncode == 2
    assert proc.stderr.startswith("mesh-identity: error: the TTL chain is unsound: ca.workload_ttl: 1h is not shorter")
    assert proc.stderr.endswith("an intermediate can live (the root's remaining lifetime)\n")


def test_a_bad_rotation_fraction_is_a_usage_error(tmp_path, capsys):
    config = write_config(tmp_path, ca={"rotate_after": 1.5})
    code, _, err = cli(capsys, "doctor", "--config", str(config))
    assert (code, err) == (2, "mesh-identity: error: ca.rotate_after: 1.5 is not a fraction strictly between 0 and 1\n")
