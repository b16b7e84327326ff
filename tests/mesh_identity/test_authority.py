from __future__ import annotations

from collections.abc import Callable
from datetime import UTC, datetime, timedelta

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.hazmat.primitives.serialization import Encoding
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from mesh_identity.authority import Authority, workload_csr
from mesh_identity.errors import CsrError, IssuanceError
from mesh_identity.events import CertificateIssued, CertKind, ListSink
from mesh_identity.keys import KeyType, generate_key
from mesh_identity.profile import MAX_CSR_BYTES
from mesh_identity.provider import Mode
from mesh_identity.spiffe import SpiffeId, TrustDomain
from mesh_identity.svid import spiffe_id_of
from mesh_identity.verify import chain_problem


def test_leaf_profile(authority: Authority, web_id: SpiffeId) -> None:
    before = datetime.now(UTC)
    svid = authority.issue(web_id)
    leaf = svid.leaf
    ext = leaf.extensions
    san = ext.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.UniformResourceIdentifier) == [str(web_id)]
    assert len(list(san)) == 1
    bc = ext.get_extension_for_class(x509.BasicConstraints)
    assert bc.critical and bc.value.ca is False
    ku = ext.get_extension_for_class(x509.KeyUsage)
    assert ku.critical and ku.value.digital_signature and not ku.value.key_encipherment and not ku.value.key_cert_sign
    eku = ext.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert list(eku) == [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]
    ski = ext.get_extension_for_class(x509.SubjectKeyIdentifier).value
    assert ski == x509.SubjectKeyIdentifier.from_public_key(leaf.public_key())  # type: ignore[arg-type]
    aki = ext.get_extension_for_class(x509.AuthorityKeyIdentifier).value
    issuer_ski = svid.chain[0].extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    assert aki.key_identifier == issuer_ski.digest
    assert 2**64 < leaf.serial_number < 2**128
    assert leaf.not_valid_before_utc < before - timedelta(seconds=30)  # backdated for clock skew
    assert svid.not_after <= svid.chain[0].not_valid_after_utc
    assert svid.not_after == leaf.not_valid_after_utc
    assert timedelta(minutes=59) < svid.not_after - before <= timedelta(hours=1, seconds=1)
    assert spiffe_id_of(leaf) == web_id
    assert svid.bundle.authorities[0] not in svid.chain  # chain stops below the root
    assert chain_problem(leaf, svid.chain, svid.bundle, datetime.now(UTC)) is None


@pytest.mark.parametrize("key_type", list(KeyType))
def test_key_types(make_authority: Callable[..., Authority], web_id: SpiffeId, key_type: KeyType) -> None:
    authority = make_authority(key_type=KeyType.ECDSA_P256)
    svid = authority.issue(web_id, key_type=key_type)
    key = svid.leaf.public_key()
    if key_type.is_rsa:
        assert isinstance(key, rsa.RSAPublicKey)
        assert key.key_size == int(key_type.value.split("-")[1])
        assert svid.leaf.extensions.get_extension_for_class(x509.KeyUsage).value.key_encipherment
    else:
        assert isinstance(key, ec.EllipticCurvePublicKey)
    assert b"PRIVATE KEY" in svid.key_pem()


def test_ecdsa_p384_ca_signs_with_sha384(make_authority: Callable[..., Authority], web_id: SpiffeId) -> None:
    svid = make_authority(key_type=KeyType.ECDSA_P384).issue(web_id)
    assert isinstance(svid.leaf.signature_hash_algorithm, hashes.SHA384)


def test_issue_from_csr_keeps_the_key_with_the_caller(authority: Authority, web_id: SpiffeId) -> None:
    key = generate_key(KeyType.ECDSA_P256)
    svid = authority.issue(web_id, csr=workload_csr(key, web_id))
    assert svid.private_key is None
    assert svid.leaf.public_key() == key.public_key()
    with pytest.raises(ValueError, match="issued from a CSR"):
        svid.key_pem()


def test_csr_without_san_gets_the_requested_id(authority: Authority, web_id: SpiffeId) -> None:
    key = generate_key(KeyType.ECDSA_P256)
    csr = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "anything")]))
        .sign(key, hashes.SHA256())
    )
    assert spiffe_id_of(authority.issue(web_id, csr=csr.public_bytes(Encoding.PEM)).leaf) == web_id


def _csr_with(names: list[x509.GeneralName], key: object | None = None) -> bytes:
    signer = key or generate_key(KeyType.ECDSA_P256)
    builder = x509.CertificateSigningRequestBuilder().subject_name(x509.Name([]))
    builder = builder.add_extension(x509.SubjectAlternativeName(names), critical=False)
    return builder.sign(signer, hashes.SHA256()).public_bytes(Encoding.PEM)


def _bad_signature_csr(web_id: SpiffeId) -> bytes:
    der = bytearray(workload_csr(generate_key(KeyType.ECDSA_P256), web_id).public_bytes(Encoding.DER))
    der[-5] ^= 0x01  # flip a bit in the signature
    return bytes(der)


def _csr_of_another_key(web_id: SpiffeId) -> bytes:
    """A CSR whose signature was made by a different key than the one it carries."""
    real = workload_csr(generate_key(KeyType.ECDSA_P256), web_id).public_bytes(Encoding.DER)
    other = workload_csr(generate_key(KeyType.ECDSA_P256), web_id).public_bytes(Encoding.DER)
    # Splice: the request info of `real` with the signature of `other`.
    real_csr = x509.load_der_x509_csr(real)
    other_csr = x509.load_der_x509_csr(other)
    return _der_sequence(real_csr.tbs_certrequest_bytes + _alg_ecdsa_sha256() + _bitstring(other_csr.signature))


def _der_len(n: int) -> bytes:
    if n < 128:
        return bytes([n])
    body = n.to_bytes((n.bit_length() + 7) // 8, "big")
    return bytes([0x80 | len(body)]) + body


def _der_sequence(body: bytes) -> bytes:
    return b"\x30" + _der_len(len(body)) + body


def _bitstring(data: bytes) -> bytes:
    return b"\x03" + _der_len(len(data) + 1) + b"\x00" + data


def _alg_ecdsa_sha256() -> bytes:
    return bytes.fromhex("300a06082a8648ce3d040302")


WEB = SpiffeId.parse("spiffe://example.org/ns/default/sa/web")


@pytest.mark.parametrize(
    ("make_csr", "message"),
    [
        (lambda: b"not a csr", "CSR is malformed: not a PEM or DER PKCS#10 request"),
        (
            lambda: b"-----BEGIN CERTIFICATE REQUEST-----\nAAAA\n-----END CERTIFICATE REQUEST-----\n",
            "CSR is malformed: not a PEM or DER PKCS#10 request",
        ),
        (
            lambda: b"x" * (MAX_CSR_BYTES + 1),
            f"CSR is {MAX_CSR_BYTES + 1} bytes, more than the {MAX_CSR_BYTES} allowed",
        ),
        (lambda: _bad_signature_csr(WEB), "CSR signature is invalid: it was not signed by the key it carries"),
        (lambda: _csr_of_another_key(WEB), "CSR signature is invalid: it was not signed by the key it carries"),
        (
            lambda: _csr_with([x509.UniformResourceIdentifier("spiffe://example.org/ns/default/sa/admin")]),
            "CSR asks for URI SANs ['spiffe://example.org/ns/default/sa/admin']; only "
            "spiffe://example.org/ns/default/sa/web is allowed",
        ),
        (
            lambda: _csr_with(
                [x509.UniformResourceIdentifier(str(WEB)), x509.UniformResourceIdentifier("spiffe://example.org/extra")]
            ),
            "CSR asks for URI SANs ['spiffe://example.org/ns/default/sa/web', 'spiffe://example.org/extra']; only "
            "spiffe://example.org/ns/default/sa/web is allowed",
        ),
        (
            lambda: _csr_with([x509.UniformResourceIdentifier(str(WEB)), x509.DNSName("web.example.org")]),
            "CSR asks for SANs other than the SPIFFE ID (DNSName); only spiffe://example.org/ns/default/sa/web is allowed",
        ),
        (
            lambda: _csr_with([x509.IPAddress(__import__("ipaddress").ip_address("10.0.0.1"))]),
            "CSR asks for SANs other than the SPIFFE ID (IPAddress); only spiffe://example.org/ns/default/sa/web is allowed",
        ),
        (
            lambda: _csr_with([x509.UniformResourceIdentifier(str(WEB))], key=ec.generate_private_key(ec.SECP521R1())),
            "CSR key type is not allowed (use ECDSA P-256/P-384 or RSA 2048/3072)",
        ),
    ],
    ids=[
        "garbage",
        "bad-pem",
        "oversized",
        "bad-signature",
        "signed-by-other-key",
        "other-identity",
        "extra-uri",
        "dns-san",
        "ip-san",
        "p521-key",
    ],
)
def test_bad_csrs_are_refused(make_csr: Callable[[], bytes], message: str) -> None:
    events = ListSink()
    authority = _fresh_authority(events)
    with pytest.raises(CsrError) as err:
        authority.issue(WEB, csr=make_csr())
    assert str(err.value) == message
    assert [e for e in events.events if isinstance(e, CertificateIssued) and e.kind is CertKind.WORKLOAD] == []


def _fresh_authority(events: ListSink) -> Authority:
    import tempfile
    from pathlib import Path

    from mesh_identity.authority import AuthoritySettings
    from mesh_identity.clock import utcnow
    from mesh_identity.provider import ProviderContext
    from providers.builtin.provider import SPEC

    state = Path(tempfile.mkdtemp()) / "state"
    provider = SPEC.factory(
        ProviderContext(TrustDomain("example.org"), state, KeyType.ECDSA_P256, Mode.INTERMEDIATE, utcnow),
        SPEC.validate_options({}),
    )
    authority = Authority(provider, AuthoritySettings(TrustDomain("example.org")), events=events)
    authority.start()
    return authority


@pytest.mark.parametrize(
    ("spiffe_id", "ttl", "message"),
    [
        (
            SpiffeId.parse("spiffe://other.org/ns/a/sa/b"),
            None,
            "SPIFFE ID spiffe://other.org/ns/a/sa/b is not in trust domain example.org",
        ),
        (
            SpiffeId.parse("spiffe://example.org"),
            None,
            "SPIFFE ID spiffe://example.org has no path: a workload ID needs one",
        ),
        (WEB, timedelta(0), "TTL 0:00:00 is not positive"),
    ],
)
def test_refused_requests(authority: Authority, spiffe_id: SpiffeId, ttl: timedelta | None, message: str) -> None:
    with pytest.raises(IssuanceError) as err:
        authority.issue(spiffe_id, ttl=ttl)
    assert str(err.value) == message


def test_ttl_past_the_ca_lifetime_is_refused(authority: Authority, web_id: SpiffeId) -> None:
    with pytest.raises(
        IssuanceError,
        match=r"TTL 3650 days, 0:00:00 for spiffe://example.org/ns/default/sa/web "
        r"would end at .*, past the issuing CA's NotAfter",
    ):
        authority.issue(web_id, ttl=timedelta(days=3650))


def test_per_workload_mode(make_authority: Callable[..., Authority], web_id: SpiffeId) -> None:
    authority = make_authority(mode=Mode.PER_WORKLOAD)
    assert authority.signing_ca is None
    svid = authority.issue(web_id)
    assert svid.chain == ()  # the built-in root signs directly in per-workload mode
    assert chain_problem(svid.leaf, svid.chain, authority.bundle(), datetime.now(UTC)) is None


def test_events_carry_no_key_material(make_authority: Callable[..., Authority], web_id: SpiffeId) -> None:
    sink = ListSink()
    authority = make_authority(sink=sink)
    svid = authority.issue(web_id, requested_by="test")
    issued = [e for e in sink.events if isinstance(e, CertificateIssued)]
    assert [e.kind for e in issued] == [CertKind.INTERMEDIATE, CertKind.WORKLOAD]
    assert issued[1].serial == svid.serial and issued[1].requested_by == "test"
    assert "PRIVATE" not in repr(sink.events) and "PRIVATE" not in repr(svid)


def test_intermediate_rotation_keeps_old_leaves_valid(authority: Authority, web_id: SpiffeId) -> None:
    old = authority.issue(web_id)
    first = authority.signing_ca
    authority.rotate_intermediate()
    new = authority.issue(web_id)
    assert authority.signing_ca is not None and first is not None
    assert authority.signing_ca.serial != first.serial
    assert new.chain[0] != old.chain[0]
    bundle = authority.bundle()
    for svid in (old, new):
        assert chain_problem(svid.leaf, svid.chain, bundle, datetime.now(UTC)) is None
