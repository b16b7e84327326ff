"""`mesh-identity doctor` and `issue` on a Vault config, as users run them (a real subprocess, over HTTP)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import yaml

from tests.fakes.vault import VaultServer


def _config(tmp_path: Path, server: VaultServer, role: str) -> Path:
    config = tmp_path / "c.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "trust_domain": "example.org",
                "state_dir": "state",
                "ca": {
                    "provider": "vault",
                    "mode": "per-workload",
                    "workload_ttl": "1h",
                    "provider_options": {"address": server.url, "pki_mount": "pki", "pki_role": role},
                },
            }
        )
    )
    return config


def _cli(tmp_path: Path, server: VaultServer, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "VAULT_TOKEN": server.root_token}
    return subprocess.run(
        [sys.executable, "-m", "mesh_identity", *args],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_doctor_checks_the_configured_ttl_against_the_role(tmp_path: Path) -> None:
    with VaultServer() as server:
        server.add_pki_mount("pki")
        server.add_pki_role(
            "pki", "short", allowed_uri_sans="spiffe://example.org/*", key_type="any", require_cn=False, max_ttl="10m"
        )
        server.add_pki_role(
            "pki", "good", allowed_uri_sans="spiffe://example.org/*", key_type="any", require_cn=False, max_ttl="24h"
        )
        _config(tmp_path, server, "short")
        bad = _cli(tmp_path, server, "-c", "c.yaml", "doctor")
        assert bad.returncode == 1
        assert "max_ttl 10m is shorter than the 1h wanted" in bad.stdout
        _config(tmp_path, server, "good")
        good = _cli(tmp_path, server, "-c", "c.yaml", "doctor")
        assert good.returncode == 0, good.stdout
        assert "shorter than" not in good.stdout
        issued = _cli(tmp_path, server, "-c", "c.yaml", "issue", "spiffe://example.org/ns/a/sa/b", "--out", "o")
        assert issued.returncode == 0, issued.stderr
        assert "verify:      OK" in _cli(tmp_path, server, "inspect", "o/svid.pem").stdout
