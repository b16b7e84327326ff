"""``mesh-identity ca trust FILE``: the operator's explicit step that adds roots to a provider's own trust store
(the cert-manager provider's, against the test Kubernetes API server), with good and bad files."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
import yaml
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from mesh_identity.cli.main import main
from mesh_identity.svid import cert_pem, fingerprint_of
from tests.fakes.kube import KubeServer
from tests.pki import TestCa

NS = "mesh-identity"


def cli(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    code = main(list(args))
    out, err = capsys.readouterr()
    return code, out, err


def write_config(directory: Path, provider: str = "cert-manager", **options: str) -> Path:
    document = {
        "trust_domain": "example.org",
        "state_dir": "state",
        "ca": {"provider": provider, "mode": "per-workload" if provider == "cert-manager" else "intermediate"},
    }
    if provider == "cert-manager":
        document["ca"]["provider_options"] = {  # type: ignore[index]
            "kubeconfig": str(directory / "kubeconfig"),
            "issuer_name": "mesh-ca",
            "namespace": NS,
            **options,
        }
    path = directory / "config.yaml"
    path.write_text(yaml.safe_dump(document))
    return path


@pytest.fixture
def config(kube_server: KubeServer, tmp_path: Path) -> Path:
    kube_server.write_kubeconfig(tmp_path / "kubeconfig", namespace=NS)
    return write_config(tmp_path)


def stored(config: Path) -> Path:
    return config.parent / "state" / "cert-manager" / "ca.pem"


def test_ca_trust_adds_roots_and_audits_them(config: Path, capsys: pytest.CaptureFixture[str]) -> None:
    first, second = TestCa.create("operator root one"), TestCa.create("operator root two")
    (config.parent / "roots.pem").write_bytes(first.pem() + second.pem())
    code, out, _ = cli(capsys, "ca", "trust", str(config.parent / "roots.pem"), "--config", str(config))
    assert code == 0
    fp1, fp2 = fingerprint_of(first.certificate), fingerprint_of(second.certificate)
    expires = f"{first.certificate.not_valid_after_utc:%Y-%m-%dT%H:%M:%SZ}"
    assert out.splitlines() == [
        "trusted 2 new root(s) (provider cert-manager):",
        f"  root 'CN=operator root one'  sha256 {fp1}  expires {expires}",
        f"  root 'CN=operator root two'  sha256 {fp2}  expires {expires}",
        "a running server trusts them from its next certificate request",
    ]
    assert stored(config).read_bytes() == first.pem() + second.pem()
    assert stored(config).stat().st_mode & 0o777 == 0o600
    audit = [json.loads(line) for line in (config.parent / "state" / "audit.jsonl").read_text().splitlines()]
    assert [(a["event"], a["kind"], a["phase"], a["new_fingerprint"], a["provider"]) for a in audit] == [
        ("CaRotated", "root", "trusted", fp1, "cert-manager"),
        ("CaRotated", "root", "trusted", fp2, "cert-manager"),
    ]
    # again: nothing new
    code, out, _ = cli(capsys, "ca", "trust", str(config.parent / "roots.pem"), "--config", str(config))
    assert code == 0
    assert out.splitlines() == [
        f"nothing to do: every root in {config.parent / 'roots.pem'} is already trusted (provider cert-manager)",
        f"  root 'CN=operator root one'  sha256 {fp1}  expires {expires}",
        f"  root 'CN=operator root two'  sha256 {fp2}  expires {expires}",
    ]
    assert len((config.parent / "state" / "audit.jsonl").read_text().splitlines()) == 2


def _expired() -> x509.Certificate:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "old root")])
    now = datetime.now(UTC)
    return (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - timedelta(days=30))
        .not_valid_after(now - timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )


ROOT = TestCa.create("bad-file root")
INTERMEDIATE = TestCa.create("bad-file intermediate", parent=ROOT)
LEAF, _ = ROOT.leaf(dns=["web.example.org"])
EXPIRED = _expired()


def _detail(number: int, total: int, cert: x509.Certificate) -> str:
    return f"certificate {number} of {total}, {cert.subject.rfc4514_string()!r} (sha256 {fingerprint_of(cert)})"


BAD_FILES: list[tuple[str, bytes | None, str]] = [
    ("missing", None, "FILE: cannot read {file}: No such file or directory"),
    ("not pem", b"not a certificate\n", "FILE: {file} does not hold valid PEM certificates ("),
    ("empty", b"", "FILE: {file} holds no certificates"),
    (
        "not a ca",
        ROOT.pem() + cert_pem(LEAF),
        "FILE: {file}: " + _detail(2, 2, LEAF) + ", is not a CA (no basicConstraints CA:TRUE); nothing was trusted",
    ),
    (
        "not self-signed",
        INTERMEDIATE.pem(),
        "FILE: {file}: "
        + _detail(1, 1, INTERMEDIATE.certificate)
        + ", is not self-signed (issued by 'CN=bad-file root'): give the root itself; nothing was trusted",
    ),
    (
        "expired",
        cert_pem(EXPIRED),
        "FILE: {file}: "
        + _detail(1, 1, EXPIRED)
        + f", is expired (not after {EXPIRED.not_valid_after_utc:%Y-%m-%dT%H:%M:%SZ}); nothing was trusted",
    ),
]


@pytest.mark.parametrize(("content", "message"), [b[1:] for b in BAD_FILES], ids=[b[0] for b in BAD_FILES])
def test_ca_trust_refuses_bad_files(
    config: Path, kube_server: KubeServer, capsys: pytest.CaptureFixture[str], content: bytes | None, message: str
) -> None:
    file = config.parent / "roots.pem"
    if content is not None:
        file.write_bytes(content)
    kube_server.requests.clear()
    code, out, err = cli(capsys, "ca", "trust", str(file), "--config", str(config))
    assert (code, out) == (2, "")
    assert err.startswith("mesh-identity: error: " + message.format(file=file)), err
    assert not stored(config).exists()
    assert list(kube_server.requests) == []  # the file is checked before anything is built


def test_ca_trust_with_a_pinned_bundle_says_where_to_add_the_root(
    kube_server: KubeServer, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    kube_server.write_kubeconfig(tmp_path / "kubeconfig", namespace=NS)
    (tmp_path / "bundle.pem").write_bytes(ROOT.pem())
    config = write_config(tmp_path, trust_bundle_file=str(tmp_path / "bundle.pem"))
    (tmp_path / "new.pem").write_bytes(TestCa.create("new root").pem())
    code, out, err = cli(capsys, "ca", "trust", str(tmp_path / "new.pem"), "--config", str(config))
    assert (code, out) == (1, "")
    assert err == (
        f"mesh-identity: error: cert-manager: the trust bundle is pinned (file {tmp_path / 'bundle.pem'}): add the "
        "root there; `mesh-identity ca trust` only adds to the roots the provider keeps without a pinned bundle\n"
    )
    assert not stored(config).exists()


def test_ca_trust_on_a_provider_without_a_trust_store(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = write_config(tmp_path, provider="builtin")
    assert cli(capsys, "init", "--config", str(config))[0] == 0
    (tmp_path / "new.pem").write_bytes(TestCa.create("new root").pem())
    code, out, err = cli(capsys, "ca", "trust", str(tmp_path / "new.pem"), "--config", str(config))
    assert (code, out) == (1, "")
    assert err == (
        "mesh-identity: error: builtin: this provider keeps no local trust store of upstream roots (its roots come "
        "from its own CA state or from its upstream): `mesh-identity ca trust` does not apply\n"
    )
