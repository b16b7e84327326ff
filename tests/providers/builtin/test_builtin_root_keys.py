"""The built-in CA's root keys at rest: encrypted with PBKDF2-HMAC-SHA256 at 600,000 iterations, state written
by earlier versions (2,048 iterations, retired keys kept in ``retired/``) migrated on load, and a retired root's
key deleted when its rotation retires it."""

from __future__ import annotations

import base64
import shutil
import subprocess
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from mesh_identity.keys import KeyType, generate_key
from mesh_identity.profile import ca_csr
from mesh_identity.provider import CAProvider, ProviderContext
from mesh_identity.spiffe import TrustDomain
from providers.builtin.provider import SPEC

TD = TrustDomain("example.org")
# written by the store of commit 04fa69b: a full rotation (root-1 retired, root-2 active), passphrase below
OLD_STATE = Path(__file__).parent / "data" / "old-kdf"
OLD_PASSPHRASE = "old-passphrase"  # the fixture's
PBKDF2 = "1.2.840.113549.1.5.12"
HMAC_SHA256 = "1.2.840.113549.2.9"
AES_256_CBC = "2.16.840.1.101.3.4.1.42"


# -- reading PKCS#8 EncryptedPrivateKeyInfo, independently of the product ---------------------------------


def _tlv(data: bytes, at: int) -> tuple[int, int, int]:
    """(tag, start of content, end of content) of the DER element at ``at``."""
    tag, length = data[at], data[at + 1]
    start = at + 2
    if length & 0x80:
        count = length & 0x7F
        length = int.from_bytes(data[start : start + count], "big")
        start += count
    return tag, start, start + length


def _children(data: bytes, start: int, end: int) -> list[tuple[int, int, int]]:
    out = []
    while start < end:
        element = _tlv(data, start)
        out.append(element)
        start = element[2]
    return out


def _oid(content: bytes) -> str:
    parts = [content[0] // 40, content[0] % 40]
    value = 0
    for byte in content[1:]:
        value = (value << 7) | (byte & 0x7F)
        if not byte & 0x80:
            parts.append(value)
            value = 0
    return ".".join(map(str, parts))


def kdf_of(path: Path) -> tuple[str, int, str, str]:
    """(kdf oid, iterations, prf oid, cipher oid) of an encrypted PKCS#8 PEM key."""
    lines = path.read_text().strip().splitlines()
    assert lines[0] == "-----BEGIN ENCRYPTED PRIVATE KEY-----"
    der = base64.b64decode("".join(lines[1:-1]))
    (algorithm, _) = _children(der, *_tlv(der, 0)[1:])
    _, pbes2_params = _children(der, algorithm[1], algorithm[2])
    kdf, cipher = _children(der, pbes2_params[1], pbes2_params[2])
    kdf_oid, kdf_params = _children(der, kdf[1], kdf[2])
    fields = _children(der, kdf_params[1], kdf_params[2])
    iterations = int.from_bytes(der[fields[1][1] : fields[1][2]], "big")
    prf = [f for f in fields[2:] if f[0] == 0x30]
    if prf:
        _, start, end = _tlv(der, prf[0][1])
        prf_oid = _oid(der[start:end])
    else:
        prf_oid = "hmacWithSHA1"
    cipher_oid = _children(der, cipher[1], cipher[2])[0]
    return (
        _oid(der[kdf_oid[1] : kdf_oid[2]]),
        iterations,
        prf_oid,
        _oid(der[cipher_oid[1] : cipher_oid[2]]),
    )


STRONG = (PBKDF2, 600_000, HMAC_SHA256, AES_256_CBC)


def _provider(context: ProviderContext, **options: object) -> CAProvider:
    return SPEC.factory(context, SPEC.validate_options(options))


@pytest.fixture
def passphrase_file(tmp_path: Path) -> Path:
    path = tmp_path / "passphrase"
    path.write_text(OLD_PASSPHRASE + "\n")
    return path


@pytest.fixture
def old_state(tmp_path: Path) -> Path:
    """The fixture copied to ``<tmp>/state/builtin`` with the modes the old store gave it."""
    target = tmp_path / "state" / "builtin"
    shutil.copytree(OLD_STATE, target)
    for path in [target, *target.rglob("*")]:
        path.chmod(0o700 if path.is_dir() else 0o600)
    (tmp_path / "state").chmod(0o700)
    return target


def files(directory: Path) -> list[str]:
    return sorted(str(p.relative_to(directory)) for p in directory.rglob("*"))


def test_new_root_keys_use_pbkdf2_sha256_at_600000_iterations(
    make_context: Callable[..., ProviderContext], tmp_path: Path, passphrase_file: Path
) -> None:
    provider = _provider(make_context(), passphrase_file=str(passphrase_file))
    state = tmp_path / "state" / "builtin"
    assert kdf_of(state / "root-1.key") == STRONG
    provider.prepare_root()
    assert kdf_of(state / "root-2.key") == STRONG


def test_state_of_the_old_kdf_is_migrated_on_load(
    make_context: Callable[..., ProviderContext], old_state: Path, passphrase_file: Path
) -> None:
    assert kdf_of(old_state / "root-2.key") == (PBKDF2, 2048, HMAC_SHA256, AES_256_CBC)
    root = x509.load_pem_x509_certificate((old_state / "root-2.pem").read_bytes())
    provider = _provider(make_context(create=False), passphrase_file=str(passphrase_file))
    assert provider.trust_bundle().authorities == (root,)
    assert kdf_of(old_state / "root-2.key") == STRONG
    assert (old_state / "root-2.key").stat().st_mode & 0o777 == 0o600
    # the retired root's key, which the old store kept, is gone; its certificate stays for the record
    assert files(old_state) == ["ca.json", "retired", "retired/root-1.pem", "root-2.key", "root-2.pem"]
    # the migrated key signs, and a second load finds nothing to migrate
    signed = provider.sign_intermediate(ca_csr(generate_key(KeyType.ECDSA_P256), TD, "i"), timedelta(hours=1))
    assert signed.certificate.issuer == root.subject
    migrated = (old_state / "root-2.key").read_bytes()
    _provider(make_context(create=False), passphrase_file=str(passphrase_file))
    assert (old_state / "root-2.key").read_bytes() == migrated


def test_retire_deletes_the_retired_root_key(make_context: Callable[..., ProviderContext], tmp_path: Path) -> None:
    provider = _provider(make_context())
    state = tmp_path / "state" / "builtin"
    provider.prepare_root()
    provider.activate_root()
    provider.retire_root()
    assert files(state) == ["ca.json", "retired", "retired/root-1.pem", "root-2.key", "root-2.pem"]
    checks = {check.name: (check.ok, check.detail) for check in provider.doctor()}
    assert checks["retired root keys"] == (True, "none on disk (a root's key is deleted when it is retired)")


def test_a_retire_interrupted_before_its_clean_up_is_finished_on_load(
    make_context: Callable[..., ProviderContext], tmp_path: Path
) -> None:
    provider = _provider(make_context())
    state = tmp_path / "state" / "builtin"
    provider.prepare_root()
    provider.activate_root()
    # as if the process died right after the manifest (the commit point) dropped root-1
    manifest = (state / "ca.json").read_text()
    (state / "ca.json").write_text(manifest.replace('"root-1",\n    ', "").replace('"activated"', '"steady"'))
    # and another process is preparing root-3 (its files come before its manifest): not ours to touch
    shutil.copy(state / "root-2.key", state / "root-3.key")
    _provider(make_context())
    assert files(state) == ["ca.json", "retired", "retired/root-1.pem", "root-2.key", "root-2.pem", "root-3.key"]


def test_doctor_names_retired_keys_left_on_disk(
    make_context: Callable[..., ProviderContext], old_state: Path, passphrase_file: Path
) -> None:
    provider = _provider(make_context(create=False), passphrase_file=str(passphrase_file))
    shutil.copy(old_state / "root-2.key", old_state / "retired" / "root-1.key")  # put back after the load
    checks = {check.name: (check.ok, check.detail) for check in provider.doctor()}
    assert checks["retired root keys"] == (
        False,
        f"1 still on disk: {old_state / 'retired' / 'root-1.key'} (delete it: its root is retired)",
    )
    assert checks["root key encryption"] == (True, "PBKDF2-HMAC-SHA256, 600,000 iterations, AES-256-CBC")


def test_unencrypted_keys_are_left_as_they_are(make_context: Callable[..., ProviderContext], tmp_path: Path) -> None:
    provider = _provider(make_context())
    key = tmp_path / "state" / "builtin" / "root-1.key"
    before = key.read_bytes()
    assert before.startswith(b"-----BEGIN PRIVATE KEY-----")
    _provider(make_context())
    assert key.read_bytes() == before
    checks = {check.name: (check.ok, check.detail) for check in provider.doctor()}
    assert checks["root key encryption"] == (
        True,
        "not encrypted (set MESH_IDENTITY_CA_PASSPHRASE or ca.provider_options.passphrase_file to encrypt it)",
    )


@pytest.mark.skipif(shutil.which("openssl") is None, reason="needs the openssl command")
def test_openssl_reads_the_migrated_key(
    make_context: Callable[..., ProviderContext], old_state: Path, passphrase_file: Path
) -> None:
    _provider(make_context(create=False), passphrase_file=str(passphrase_file))
    key = old_state / "root-2.key"
    parsed = subprocess.run(["openssl", "asn1parse", "-in", str(key)], capture_output=True, text=True, check=True)
    assert ":PBKDF2" in parsed.stdout and ":hmacWithSHA256" in parsed.stdout and ":aes-256-cbc" in parsed.stdout
    assert "INTEGER           :0927C0" in parsed.stdout  # 600,000
    public = subprocess.run(
        ["openssl", "pkey", "-in", str(key), "-passin", f"file:{passphrase_file}", "-pubout"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    certificate = x509.load_pem_x509_certificate((old_state / "root-2.pem").read_bytes())
    expected = (
        certificate.public_key()
        .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
        .decode()
    )
    assert public == expected
