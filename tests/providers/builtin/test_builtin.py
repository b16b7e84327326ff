from __future__ import annotations

from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from mesh_identity.authority import Authority, AuthoritySettings
from mesh_identity.errors import ConfigError, RotationError, StateError
from mesh_identity.keys import KeyType, generate_key, private_key_pem
from mesh_identity.profile import build_root, ca_csr, sign_ca
from mesh_identity.provider import CAProvider, Mode, ProviderContext
from mesh_identity.spiffe import SpiffeId, TrustDomain
from mesh_identity.svid import cert_pem
from mesh_identity.verify import chain_problem
from plugins.testing import ProviderContract
from providers.builtin.provider import SPEC

TD = TrustDomain("example.org")
WEB = SpiffeId.parse("spiffe://example.org/web")


def _provider(context: ProviderContext, **options: object) -> CAProvider:
    return SPEC.factory(context, SPEC.validate_options(options))


class TestBuiltinContract(ProviderContract):
    @pytest.fixture
    def provider(self, make_context: Callable[..., ProviderContext]) -> CAProvider:
        return _provider(make_context())


def test_restart_reloads_the_same_root(make_context: Callable[..., ProviderContext]) -> None:
    first = _provider(make_context())
    second = _provider(make_context())
    assert first.trust_bundle().authorities == second.trust_bundle().authorities
    # a leaf issued before the restart verifies against the bundle after it
    before = Authority(first, AuthoritySettings(TD))
    before.start()
    svid = before.issue(WEB)
    assert chain_problem(svid.leaf, svid.chain, second.trust_bundle(), datetime.now(UTC)) is None


def test_passphrase_from_file_encrypts_the_root_key(
    make_context: Callable[..., ProviderContext], tmp_path: Path
) -> None:
    secret = tmp_path / "pass"
    secret.write_text("s3cret\n")
    _provider(make_context(), passphrase_file=str(secret))
    key = (tmp_path / "state" / "builtin" / "root-1.key").read_text()
    assert "BEGIN ENCRYPTED PRIVATE KEY" in key
    with pytest.raises(StateError, match="the private key is encrypted and no passphrase was given"):
        _provider(make_context())
    secret.write_text("wrong\n")
    with pytest.raises(StateError, match="cannot decrypt the private key: wrong passphrase or corrupt key"):
        _provider(make_context(), passphrase_file=str(secret))


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        (lambda d: (d / "ca.json").unlink(), "is not a CA state directory: ca.json is missing"),
        (lambda d: (d / "ca.json").write_text("[]"), "ca.json is corrupt: not a version 1 manifest"),
        (lambda d: (d / "root-1.pem").write_text("junk"), "root-1.pem is corrupt: not a PEM certificate"),
        (lambda d: (d / "root-1.key").unlink(), "root-1.key is missing"),
        (
            lambda d: (d / "root-1.key").write_bytes(private_key_pem(generate_key(KeyType.ECDSA_P256))),
            "root-1.key does not match the certificate",
        ),
        (
            lambda d: (d / "ca.json").write_text((d / "ca.json").read_text().replace("example.org", "other.org")),
            "belongs to trust domain 'other.org', not example.org",
        ),
        (
            lambda d: (d / "ca.json").write_text((d / "ca.json").read_text().replace("root-1", "../x")),
            "'roots' must list root names like 'root-1'",
        ),
    ],
    ids=["no-manifest", "bad-manifest", "bad-cert", "no-key", "key-mismatch", "other-trust-domain", "path-in-name"],
)
def test_corrupt_state_is_refused(
    make_context: Callable[..., ProviderContext], tmp_path: Path, damage: Callable[[Path], None], message: str
) -> None:
    _provider(make_context())
    damage(tmp_path / "state" / "builtin")
    with pytest.raises(StateError, match=message.replace("(", r"\(").replace(")", r"\)")):
        _provider(make_context())


def test_bring_your_own_root(make_context: Callable[..., ProviderContext], tmp_path: Path) -> None:
    key = generate_key(KeyType.ECDSA_P256)
    root = build_root(key, TD, timedelta(days=30), datetime.now(UTC))
    (tmp_path / "root.pem").write_bytes(cert_pem(root))
    (tmp_path / "root.key").write_bytes(private_key_pem(key))
    provider = _provider(
        make_context(), root_cert_file=str(tmp_path / "root.pem"), root_key_file=str(tmp_path / "root.key")
    )
    assert provider.trust_bundle().authorities == (root,)
    assert not (tmp_path / "state" / "builtin").exists()  # your own CA is not copied into the state directory
    with pytest.raises(RotationError, match="rotates only a root it generated"):
        provider.prepare_root()
    other = generate_key(KeyType.ECDSA_P256)
    (tmp_path / "other.key").write_bytes(private_key_pem(other))
    with pytest.raises(ConfigError, match="root_key_file: the key does not match root_cert_file"):
        _provider(make_context(), root_cert_file=str(tmp_path / "root.pem"), root_key_file=str(tmp_path / "other.key"))
    with pytest.raises(ConfigError, match="root_key_file: required with the other bring-your-own-CA options"):
        _provider(make_context(), root_cert_file=str(tmp_path / "root.pem"))


def test_bring_your_own_intermediate(make_context: Callable[..., ProviderContext], tmp_path: Path) -> None:
    now = datetime.now(UTC)
    root_key, ca_key = generate_key(KeyType.ECDSA_P256), generate_key(KeyType.ECDSA_P256)
    root = build_root(root_key, TD, timedelta(days=30), now)
    ca = sign_ca(
        ca_csr(ca_key, TD, "corp issuing CA"),
        root,
        root_key,
        trust_domain=TD,
        ttl=timedelta(days=10),
        now=now,
        path_length=1,
    )
    (tmp_path / "ca.pem").write_bytes(cert_pem(ca))
    (tmp_path / "ca.key").write_bytes(private_key_pem(ca_key))
    (tmp_path / "bundle.pem").write_bytes(cert_pem(root))
    options = {
        "ca_cert_file": str(tmp_path / "ca.pem"),
        "ca_key_file": str(tmp_path / "ca.key"),
        "bundle_file": str(tmp_path / "bundle.pem"),
    }
    for mode in Mode:
        provider = _provider(make_context(mode=mode), **options)
        authority = Authority(provider, AuthoritySettings(TD, mode=mode))
        authority.start()
        svid = authority.issue(WEB)
        assert svid.chain[-1] == ca  # the chain runs up to (not including) the root
        assert chain_problem(svid.leaf, svid.chain, authority.bundle(), datetime.now(UTC)) is None
    # an intermediate with pathlen 0 cannot sign ours
    ca0 = sign_ca(ca_csr(ca_key, TD, "pathlen0"), root, root_key, trust_domain=TD, ttl=timedelta(days=1), now=now)
    (tmp_path / "ca.pem").write_bytes(cert_pem(ca0))
    with pytest.raises(ConfigError, match="its pathLenConstraint is 0"):
        _provider(make_context(), **options)


def test_root_rotation_phases_persist(make_context: Callable[..., ProviderContext]) -> None:
    provider = _provider(make_context())
    old = provider.trust_bundle().authorities[0]
    with pytest.raises(RotationError, match="cannot activate: the root rotation is in phase 'steady'"):
        provider.activate_root()
    new = provider.prepare_root()
    assert provider.trust_bundle().authorities == (old, new)
    assert _provider(make_context()).root_phase() == "prepared"  # a restart resumes
    provider.activate_root()
    signed = provider.sign_intermediate(ca_csr(generate_key(KeyType.ECDSA_P256), TD, "i"), timedelta(hours=1))
    assert signed.certificate.issuer == new.subject
    assert [r.issuer for r in provider.retire_root()] == [old.subject]
    assert provider.trust_bundle().authorities == (new,)
    restarted = _provider(make_context())
    assert restarted.root_phase() == "steady"
    assert restarted.trust_bundle().authorities == (new,)


def test_unknown_option_and_bad_value() -> None:
    with pytest.raises(ConfigError, match=r"ca.provider_options.root_ttl: '1y' is not a duration \(use 30m, 24h, 7d\)"):
        SPEC.validate_options({"root_ttl": "1y"})
    with pytest.raises(ConfigError, match=r"ca\.provider_options\.passphrase: unknown option for provider 'builtin'"):
        SPEC.validate_options({"passphrase": "x"})
    assert isinstance(SPEC.validate_options({})["root_ttl"], timedelta)
