"""The CLI as users run it (a real subprocess), checked independently with the openssl CLI."""

from __future__ import annotations

import os
import re
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

OPENSSL = "openssl"


def run(*args: str, cwd: Path, env: dict[str, str] | None = None, ok: bool = True) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(
        [sys.executable, "-m", "mesh_identity", *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, **(env or {})},
    )
    if ok:
        assert proc.returncode == 0, proc.stderr
    return proc


def openssl(*args: str, cwd: Path) -> str:
    proc = subprocess.run([OPENSSL, *args], cwd=cwd, capture_output=True, text=True, timeout=30)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout + proc.stderr


@pytest.fixture
def workdir(tmp_path: Path) -> Path:
    (tmp_path / "c.yaml").write_text(yaml.safe_dump({"trust_domain": "example.org", "state_dir": "state"}))
    return tmp_path


def _split_chain(svid: Path) -> tuple[Path, Path]:
    blocks = re.findall(rb"-----BEGIN CERTIFICATE-----.*?-----END CERTIFICATE-----\n", svid.read_bytes(), re.S)
    leaf, chain = svid.with_name("leaf.pem"), svid.with_name("chain.pem")
    leaf.write_bytes(blocks[0])
    chain.write_bytes(b"".join(blocks[1:]))
    return leaf, chain


def test_init_issue_and_openssl_verifies(workdir: Path) -> None:
    out = run("-c", "c.yaml", "init", cwd=workdir).stdout
    assert out.startswith("created CA state in")
    assert "using existing" in run("-c", "c.yaml", "init", cwd=workdir).stdout
    run("-c", "c.yaml", "issue", "spiffe://example.org/ns/default/sa/web", "--out", "web", cwd=workdir)
    web = workdir / "web"
    assert stat.S_IMODE((web / "key.pem").stat().st_mode) == 0o600
    assert stat.S_IMODE((workdir / "state").stat().st_mode) == 0o700
    assert stat.S_IMODE((workdir / "state" / "builtin" / "root-1.key").stat().st_mode) == 0o600
    leaf, chain = _split_chain(web / "svid.pem")
    assert "leaf.pem: OK" in openssl(
        "verify", "-CAfile", "web/bundle.pem", "-untrusted", "web/chain.pem", "web/leaf.pem", cwd=workdir
    )
    text = openssl("x509", "-in", str(leaf), "-noout", "-text", cwd=workdir)
    assert "URI:spiffe://example.org/ns/default/sa/web" in text
    assert re.search(r"X509v3 Basic Constraints: critical\s+CA:FALSE", text)
    assert re.search(r"X509v3 Key Usage: critical\s+Digital Signature\n", text)
    assert re.search(r"X509v3 Extended Key Usage:\s+TLS Web Server Authentication, TLS Web Client Authentication", text)
    assert "X509v3 Subject Key Identifier" in text
    assert "X509v3 Authority Key Identifier" in text
    assert "ASN1 OID: prime256v1" in text
    # the chain is the intermediate only: the root is in the bundle, not in svid.pem
    assert openssl("x509", "-in", str(chain), "-noout", "-subject", cwd=workdir).count("intermediate") == 1
    inspect = run("inspect", "web/svid.pem", cwd=workdir).stdout
    assert "SPIFFE ID:   spiffe://example.org/ns/default/sa/web" in inspect
    assert "verify:      OK against web/bundle.pem" in inspect


def test_issue_from_an_openssl_csr(workdir: Path) -> None:
    run("-c", "c.yaml", "init", cwd=workdir)
    openssl(
        "req",
        "-new",
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:P-384",
        "-nodes",
        "-keyout",
        "w.key",
        "-subj",
        "/CN=ignored",
        "-out",
        "w.csr",
        cwd=workdir,
    )
    run("-c", "c.yaml", "issue", "spiffe://example.org/w", "--csr", "w.csr", "--out", "w", "--ttl", "10m", cwd=workdir)
    assert not (workdir / "w" / "key.pem").exists()
    leaf, _ = _split_chain(workdir / "w" / "svid.pem")
    assert "ASN1 OID: secp384r1" in openssl("x509", "-in", str(leaf), "-noout", "-text", cwd=workdir)
    # the certificate belongs to the key openssl made
    cert_pub = openssl("x509", "-in", str(leaf), "-noout", "-pubkey", cwd=workdir)
    key_pub = openssl("pkey", "-in", "w.key", "-pubout", cwd=workdir)
    assert cert_pub == key_pub


@pytest.mark.parametrize(
    ("args", "code", "message"),
    [
        (
            ["issue", "spiffe://example.org/a/../b", "--out", "o"],
            2,
            "Invalid SPIFFE ID 'spiffe://example.org/a/../b': path segment '..' is not allowed",
        ),
        (
            ["issue", "spiffe://other.org/a", "--out", "o"],
            1,
            "SPIFFE ID spiffe://other.org/a is not in trust domain example.org",
        ),
        (
            ["issue", "spiffe://example.org/a", "--out", "o", "--ttl", "5x"],
            2,
            "--ttl: '5x' is not a duration (use 30m, 24h, 7d)",
        ),
        (["issue", "spiffe://example.org/a", "--out", "o", "--ttl", "3650d"], 1, "past the issuing CA's NotAfter"),
        (
            ["issue", "spiffe://example.org/a", "--out", "o", "--csr", "bad.csr"],
            1,
            "CSR is malformed: not a PEM or DER PKCS#10 request",
        ),
        (
            ["issue", "spiffe://example.org/a", "--out", "o", "--key-type", "dsa"],
            2,
            "--key-type: 'dsa' is not a key type (one of ecdsa-p256, ecdsa-p384, rsa-2048, rsa-3072)",
        ),
    ],
)
def test_issue_errors_write_nothing(workdir: Path, args: list[str], code: int, message: str) -> None:
    run("-c", "c.yaml", "init", cwd=workdir)
    (workdir / "bad.csr").write_text("garbage")
    proc = run("-c", "c.yaml", *args, cwd=workdir, ok=False)
    assert proc.returncode == code
    assert message in proc.stderr
    assert proc.stderr.count("\n") == 1  # one line, no traceback
    assert not (workdir / "o").exists()


def test_issue_before_init_is_refused(workdir: Path) -> None:
    proc = run("-c", "c.yaml", "issue", "spiffe://example.org/a", "--out", "o", cwd=workdir, ok=False)
    assert proc.returncode == 1
    assert "no CA state in" in proc.stderr and "run 'mesh-identity init' first" in proc.stderr
    assert not (workdir / "state" / "builtin").exists()


@pytest.mark.parametrize(
    ("config", "message"),
    [
        (
            {"trust_domain": "example.org", "ca": {"provider": "nope"}},
            "ca.provider: 'nope' is not an installed provider (installed: builtin",
        ),
        (
            {"trust_domain": "example.org", "ca": {"workload_tll": "1h"}},
            "ca.workload_tll: unknown key (did you mean 'workload_ttl'?)",
        ),
        (
            {"trust_domain": "example.org", "ca": {"provider_options": {"root_tl": "1d"}}},
            "ca.provider_options.root_tl: unknown option for provider 'builtin' (did you mean 'root_ttl'?)",
        ),
    ],
)
def test_config_errors_exit_2(tmp_path: Path, config: dict[str, object], message: str) -> None:
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(config))
    proc = run("-c", "c.yaml", "init", cwd=tmp_path, ok=False)
    assert proc.returncode == 2
    assert message in proc.stderr
    assert not (tmp_path / "mesh-identity-state").exists()


def test_debug_shows_the_traceback(workdir: Path) -> None:
    proc = run("--debug", "-c", "c.yaml", "issue", "spiffe://example.org/a", "--out", "o", cwd=workdir, ok=False)
    assert "Traceback" in proc.stderr


def test_corrupt_state_and_wrong_passphrase(workdir: Path) -> None:
    env = {"MESH_IDENTITY_CA_PASSPHRASE": "correct horse"}
    run("-c", "c.yaml", "init", cwd=workdir, env=env)
    key = (workdir / "state" / "builtin" / "root-1.key").read_text()
    assert "ENCRYPTED PRIVATE KEY" in key
    proc = run(
        "-c",
        "c.yaml",
        "issue",
        "spiffe://example.org/a",
        "--out",
        "o",
        cwd=workdir,
        ok=False,
        env={"MESH_IDENTITY_CA_PASSPHRASE": "wrong"},
    )
    assert proc.returncode == 1
    assert "root-1.key: cannot decrypt the private key: wrong passphrase or corrupt key" in proc.stderr
    assert "correct horse" not in proc.stderr + proc.stdout
    (workdir / "state" / "builtin" / "ca.json").write_text("{not json")
    proc = run("-c", "c.yaml", "issue", "spiffe://example.org/a", "--out", "o", cwd=workdir, ok=False, env=env)
    assert proc.returncode == 1
    assert "ca.json is corrupt" in proc.stderr
    assert not (workdir / "o").exists()


def test_providers_lists_builtin_and_its_options(workdir: Path) -> None:
    out = run("providers", cwd=workdir).stdout
    assert out.startswith("builtin: ")
    assert "modes: intermediate, per-workload" in out
    assert "passphrase_file (path)" in out


@pytest.mark.parametrize(
    "command",
    [[], ["init"], ["issue"], ["inspect"], ["providers"], ["serve"], ["status"], ["doctor"], ["bootstrap"],
     ["token"], ["token", "create"], ["token", "list"], ["agent"], ["top"], ["demo"], ["ca"]],
)  # fmt: skip
def test_every_help_text_renders(command: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    from mesh_identity.cli.main import main

    with pytest.raises(SystemExit) as done:
        main([*command, "--help"])
    assert done.value.code == 0
    assert capsys.readouterr().out.startswith("usage: mesh-identity")
