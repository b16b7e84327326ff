"""Fuzz target: workload CSRs, ``Authority.issue(spiffe_id, csr=bytes)``, in both modes of the built-in CA.

Inputs: random bytes; real CSRs (DER and PEM) built here from drawn keys, SANs, extensions and hashes; the
same truncated, bit-flipped, re-labelled. The rule: ``CsrError`` (or another error of ours), or an SVID for
exactly the requested ID, for the CSR's key, that verifies; and an oracle: a CSR that is well formed, well
signed, for an allowed key and asks for nothing but the requested ID must be honoured.
"""

from __future__ import annotations

import functools
import ipaddress
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import dsa, ec, ed448, ed25519, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, ExtensionOID, NameOID
from hypothesis import given
from hypothesis import strategies as st

from mesh_identity.assembly import build_authority
from mesh_identity.authority import Authority
from mesh_identity.errors import MeshIdentityError
from mesh_identity.keys import private_key_pem
from mesh_identity.spiffe import SpiffeId, TrustDomain
from mesh_identity.svid import X509Svid
from mesh_identity.verify import chain_problem
from tests.fuzz.harness import (
    Rule,
    Watch,
    corpus_cases,
    count,
    fuzz_settings,
    mutated_bytes,
    outcome,
    secret_markers,
)
from tests.rotation.helpers import make_config, provider_for

TARGET = "csr"
TD = TrustDomain("example.org")
WEB = SpiffeId.parse("spiffe://example.org/ns/default/sa/web")  # what every corpus file is issued for
IDS = (WEB, SpiffeId.parse("spiffe://example.org/ns/shop/sa/api"), SpiffeId.parse("spiffe://example.org/batch"))
MAX_CSR_BYTES = 16 * 1024


@pytest.fixture(scope="module")
def authorities(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Authority]:
    made = {}
    for mode in ("intermediate", "per-workload"):
        config = make_config(tmp_path_factory.mktemp(f"csr-{mode}"), mode=mode)
        authority = build_authority(config, provider_for(config))
        authority.start()
        made[mode] = authority
    return made


@pytest.fixture(scope="module")
def rule(authorities: dict[str, Authority]) -> Iterator[Rule]:
    signing = authorities["intermediate"].signing_ca
    assert signing is not None
    secrets = secret_markers(private_key_pem(signing.signer.issuer_key))
    with Watch() as watch:
        yield Rule(TARGET, allowed=(MeshIdentityError,), secrets=secrets, timeout=10.0, watch=watch)


# -- the oracle ----------------------------------------------------------------------------------------------


def _parse(data: bytes) -> x509.CertificateSigningRequest | None:
    try:
        if data.lstrip().startswith(b"-----BEGIN"):
            return x509.load_pem_x509_csr(data)
        return x509.load_der_x509_csr(data)
    except ValueError:
        return None


def _allowed_key(key: Any) -> bool:
    if isinstance(key, ec.EllipticCurvePublicKey):
        return key.curve.name in ("secp256r1", "secp384r1")
    return isinstance(key, rsa.RSAPublicKey) and key.key_size in (2048, 3072)


def _sans(csr: x509.CertificateSigningRequest) -> list[x509.GeneralName] | None:
    """The CSR's SANs (None: no SAN extension); ValueError when the extensions do not parse."""
    try:
        return list(csr.extensions.get_extension_for_class(x509.SubjectAlternativeName).value)
    except x509.ExtensionNotFound:
        return None


def acceptable(data: bytes, spiffe_id: SpiffeId) -> bool:
    """Whether the CSR must be honoured: it parses, its signature holds, its key is allowed, and it asks for no
    name or only ``spiffe_id``."""
    if len(data) > MAX_CSR_BYTES:
        return False
    csr = _parse(data)
    if csr is None:
        return False
    try:
        if not csr.is_signature_valid or not _allowed_key(csr.public_key()):
            return False
        sans = _sans(csr)
    except Exception:
        return False
    return sans is None or sans == [x509.UniformResourceIdentifier(str(spiffe_id))]


def check_svid(svid: X509Svid, data: bytes, spiffe_id: SpiffeId) -> None:
    csr = _parse(data)
    assert csr is not None, "an SVID was issued for a CSR that does not parse"
    assert acceptable(data, spiffe_id), f"an SVID was issued for a CSR that must be refused: {data[:200]!r}"
    assert svid.spiffe_id == spiffe_id
    uris = svid.leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert list(uris) == [x509.UniformResourceIdentifier(str(spiffe_id))], list(uris)
    fmt = (serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    assert svid.leaf.public_key().public_bytes(*fmt) == csr.public_key().public_bytes(*fmt)
    assert svid.leaf.extensions.get_extension_for_class(x509.BasicConstraints).value.ca is False
    assert chain_problem(svid.leaf, svid.chain, svid.bundle, datetime.now(UTC)) is None
    assert svid.private_key is None  # the key stays with the workload


def check(authority: Authority, rule: Rule, data: bytes, spiffe_id: SpiffeId) -> None:
    ok, result = rule.call(lambda: authority.issue(spiffe_id, csr=data, requested_by="fuzz"), "Authority.issue")
    if ok:
        check_svid(result, data, spiffe_id)
        outcome("issued")
    else:
        assert not acceptable(data, spiffe_id), f"a good CSR was refused: {result!r}"
        outcome(f"refused: {str(result).split(':')[0]}")
    rule.settle("a CSR")


# -- the seed corpus -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["intermediate", "per-workload"])
@pytest.mark.parametrize("path", corpus_cases(TARGET))
def test_corpus(authorities: dict[str, Authority], rule: Rule, path: Path, mode: str) -> None:
    count(TARGET, corpus=True)
    check(authorities[mode], rule, path.read_bytes(), WEB)


# -- generated CSRs ------------------------------------------------------------------------------------------


@functools.cache
def keys() -> dict[str, Any]:
    """One key of each kind, made once (RSA keys are slow to make)."""
    return {
        "p256": ec.generate_private_key(ec.SECP256R1()),
        "p384": ec.generate_private_key(ec.SECP384R1()),
        "p521": ec.generate_private_key(ec.SECP521R1()),
        "k256": ec.generate_private_key(ec.SECP256K1()),
        "rsa1024": rsa.generate_private_key(65537, 1024),
        "rsa2048": rsa.generate_private_key(65537, 2048),
        "rsa3072": rsa.generate_private_key(65537, 3072),
        "rsa-e3": rsa.generate_private_key(3, 2048),
        "ed25519": ed25519.Ed25519PrivateKey.generate(),
        "ed448": ed448.Ed448PrivateKey.generate(),
        "dsa": dsa.generate_private_key(1024),  # DSA signatures are random: mutations index modulo the length
    }


ascii_text = st.text(alphabet=st.characters(min_codepoint=0x20, max_codepoint=0x7E), max_size=30)
names = st.one_of(
    st.sampled_from(IDS).map(lambda i: x509.UniformResourceIdentifier(str(i))),
    st.sampled_from(
        ["spiffe://example.org", "spiffe://evil.org/ns/default/sa/web", "SPIFFE://example.org/ns/default/sa/web"]
    ).map(x509.UniformResourceIdentifier),
    ascii_text.map(x509.UniformResourceIdentifier),
    st.sampled_from(["localhost", "example.org", "*.example.org"]).map(x509.DNSName),
    st.sampled_from(["127.0.0.1", "::1"]).map(lambda a: x509.IPAddress(ipaddress.ip_address(a))),
    st.just(x509.RFC822Name("root@example.org")),
    st.just(x509.RegisteredID(x509.ObjectIdentifier("1.2.3.4"))),
    st.just(x509.DirectoryName(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "web")]))),
    st.just(x509.OtherName(x509.ObjectIdentifier("1.3.6.1.4.1.311.20.2.3"), b"\x0c\x03web")),
)
extensions = st.sampled_from(
    [
        (x509.BasicConstraints(ca=True, path_length=None), True),
        (x509.BasicConstraints(ca=False, path_length=None), True),
        (x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CODE_SIGNING]), False),
        (x509.KeyUsage(True, False, False, False, False, True, True, False, False), True),
        (x509.UnrecognizedExtension(x509.ObjectIdentifier("1.2.3.4.5"), b"\x05\x00"), True),
    ]
)
garbage_san = st.binary(max_size=24).map(
    lambda der: (x509.UnrecognizedExtension(ExtensionOID.SUBJECT_ALTERNATIVE_NAME, der), False)
)


@st.composite
def built_csr(draw: st.DrawFn) -> bytes:
    """A real CSR: drawn key, subject, SANs, other extensions, hash; DER or one of several PEM spellings."""
    key_name = draw(st.sampled_from(sorted(keys())))
    key = keys()[key_name]
    attributes = []
    if draw(st.booleans()):
        attributes.append(x509.NameAttribute(NameOID.ORGANIZATION_NAME, "mesh-identity"))
    if draw(st.booleans()):
        attributes.append(x509.NameAttribute(NameOID.COMMON_NAME, draw(ascii_text.filter(bool))))
    builder = x509.CertificateSigningRequestBuilder().subject_name(x509.Name(attributes))
    san_kind = draw(st.integers(0, 3))
    if san_kind == 1:
        builder = builder.add_extension(
            x509.SubjectAlternativeName(draw(st.lists(names, max_size=3))), critical=draw(st.booleans())
        )
    elif san_kind == 2:
        ext, critical = draw(garbage_san)
        builder = builder.add_extension(ext, critical=critical)
    for ext, critical in draw(st.lists(extensions, max_size=2, unique_by=lambda e: e[0].oid)):
        builder = builder.add_extension(ext, critical=critical)
    if isinstance(key, ed25519.Ed25519PrivateKey | ed448.Ed448PrivateKey):
        algorithm = None
    else:
        algorithm = draw(st.sampled_from([hashes.SHA256(), hashes.SHA384(), hashes.SHA512(), hashes.SHA224()]))
    try:  # deterministic ECDSA: the same draws make the same bytes (hypothesis replays them)
        deterministic = True if isinstance(key, ec.EllipticCurvePrivateKey) else None
        csr = builder.sign(key, algorithm, ecdsa_deterministic=deterministic)
    except ValueError:  # a combination cryptography itself refuses to build
        csr = x509.CertificateSigningRequestBuilder().subject_name(x509.Name([])).sign(keys()["p256"], hashes.SHA256())
    der = csr.public_bytes(serialization.Encoding.DER)
    pem = csr.public_bytes(serialization.Encoding.PEM)
    encoding = draw(st.integers(0, 5))
    if encoding == 0:
        return der
    if encoding == 1:
        return pem
    if encoding == 2:
        return b" \t\r\n" + pem.replace(b"\n", b"\r\n")
    if encoding == 3:
        return pem.replace(b"CERTIFICATE REQUEST", draw(st.sampled_from([b"NEW CERTIFICATE REQUEST", b"CERTIFICATE"])))
    if encoding == 4:
        return pem + draw(st.binary(max_size=40))
    return der + draw(st.binary(min_size=1, max_size=8))


csrs = st.one_of(
    built_csr(),
    built_csr().flatmap(lambda data: mutated_bytes(data, max_mutations=3)),
    st.binary(max_size=600),
    st.builds(lambda head, n: head * n, st.sampled_from([b"\x30", b"\x30\x82\xff\xff", b"A"]), st.integers(0, 9000)),
)


@fuzz_settings(300)
@given(csr=csrs, spiffe_id=st.sampled_from(IDS), mode=st.sampled_from(["intermediate", "per-workload"]))
def test_generated_csrs(
    authorities: dict[str, Authority], rule: Rule, csr: bytes, spiffe_id: SpiffeId, mode: str
) -> None:
    count(TARGET)
    check(authorities[mode], rule, csr, spiffe_id)
