from __future__ import annotations

import inspect
import os
import subprocess
import sys
from datetime import UTC, datetime
from pathlib import Path

import pytest
import yaml

from mesh_identity.events import CertificateIssued, CertKind
from plugins import hookimpl, hookspecs
from plugins.manager import Plugins, get_plugin_manager

ACME = Path(__file__).parents[1] / "data" / "acme_ca_provider"


@pytest.fixture(scope="module")
def acme_site(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Install the third-party provider package for real (pip, no network) into its own site directory."""
    site = tmp_path_factory.mktemp("site")
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "install",
            "--quiet",
            "--no-deps",
            "--no-build-isolation",
            "--no-index",
            "--target",
            str(site),
            str(ACME),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    assert list(site.glob("acme_ca_provider-*.dist-info/entry_points.txt"))
    return site


def _cli(args: list[str], cwd: Path, site: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(site)}
    return subprocess.run(
        [sys.executable, "-m", "mesh_identity", *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=60
    )


def test_third_party_provider_is_found_through_its_entry_point(acme_site: Path, tmp_path: Path) -> None:
    out = _cli(["providers"], tmp_path, acme_site)
    assert out.returncode == 0, out.stderr
    assert "acme_ca: third-party test CA (per-workload, in memory)" in out.stdout
    (tmp_path / "c.yaml").write_text(
        yaml.safe_dump({"trust_domain": "example.org", "ca": {"provider": "acme_ca", "mode": "per-workload"}})
    )
    proc = _cli(["-c", "c.yaml", "issue", "spiffe://example.org/billing", "--out", "o"], tmp_path, acme_site)
    assert proc.returncode == 0, proc.stderr
    assert "verify:      OK" in _cli(["inspect", "o/svid.pem"], tmp_path, acme_site).stdout
    assert "acme root" in _cli(["inspect", "o/svid.pem"], tmp_path, acme_site).stdout


def test_third_party_validation_hook_and_mode_check(acme_site: Path, tmp_path: Path) -> None:
    (tmp_path / "c.yaml").write_text(
        yaml.safe_dump(
            {
                "trust_domain": "example.org",
                "ca": {"provider": "acme_ca", "mode": "per-workload", "provider_options": {"root_ttl": "90d"}},
            }
        )
    )
    proc = _cli(["-c", "c.yaml", "init"], tmp_path, acme_site)
    assert proc.returncode == 2
    assert "ca.provider_options.root_ttl: acme_ca roots live at most 30d" in proc.stderr
    (tmp_path / "c.yaml").write_text(yaml.safe_dump({"trust_domain": "example.org", "ca": {"provider": "acme_ca"}}))
    proc = _cli(["-c", "c.yaml", "init"], tmp_path, acme_site)
    assert proc.returncode == 2
    assert "ca.mode: 'intermediate' is not supported by provider 'acme_ca' (per-workload)" in proc.stderr


def test_disabled_plugins_are_not_loaded(acme_site: Path, tmp_path: Path) -> None:
    env_site = {"PYTHONPATH": str(acme_site), "MESH_IDENTITY_DISABLED_PLUGINS": "acme_ca"}
    proc = subprocess.run(
        [sys.executable, "-m", "mesh_identity", "providers"],
        cwd=tmp_path,
        env={**os.environ, **env_site},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0
    assert "acme_ca" not in proc.stdout
    assert "builtin" in proc.stdout


def test_our_providers_register_through_the_entry_point_group() -> None:
    plugins = Plugins(get_plugin_manager())
    assert "builtin" in plugins.providers()
    assert "builtin" in plugins.names()
    assert "builtin" not in Plugins(get_plugin_manager(disabled=["builtin"])).providers()


def test_a_failing_plugin_cannot_stop_events(caplog: pytest.LogCaptureFixture) -> None:
    seen: list[str] = []

    class Broken:
        @hookimpl
        def mesh_identity_certificate_issued(self, event: CertificateIssued) -> None:
            raise RuntimeError("boom")

    class Recorder:
        @hookimpl
        def mesh_identity_certificate_issued(self, event: CertificateIssued) -> None:
            seen.append(event.serial)

    plugins = Plugins(get_plugin_manager(entry_points=False, extra=[Broken(), Recorder()]))
    plugins.emit(
        CertificateIssued(
            "spiffe://example.org/a",
            CertKind.WORKLOAD,
            "ab",
            "cd",
            datetime.now(UTC),
            "builtin",
            "test",
            datetime.now(UTC),
        )
    )
    assert seen == ["ab"]
    assert "failed in mesh_identity_certificate_issued" in caplog.text


def test_every_hookspec_is_documented_with_its_signature() -> None:
    specs = [f for name, f in vars(hookspecs).items() if name.startswith("mesh_identity_")]
    assert len(specs) == 9
    for spec in specs:
        doc = inspect.getdoc(spec) or ""
        assert len(doc) > 40, spec.__name__
        assert "Called" in doc, spec.__name__
        signature = inspect.signature(spec)
        assert signature.return_annotation != inspect.Signature.empty, spec.__name__
        for name in signature.parameters:
            assert name in doc, f"{spec.__name__}: parameter {name} is not documented"
