"""Certificate profiles: roots, intermediates and X.509-SVID leaves, and the CSR checks.

Leaf profile (SPIFFE X509-SVID spec, section 4): exactly one SAN, the URI of the SPIFFE ID, BasicConstraints
CA:false (critical), KeyUsage digitalSignature (+keyEncipherment for RSA) (critical), EKU serverAuth+clientAuth,
SKI/AKI, a 128-bit random serial, NotBefore backdated for clock skew, NotAfter never past the issuer's NotAfter.
"""

from __future__ import annotations

import ipaddress
import re
import secrets
from collections.abc import Sequence
from datetime import datetime, timedelta

from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from mesh_identity.errors import CsrError, IssuanceError
from mesh_identity.keys import KeyType, PrivateKey, PublicKey, key_type_of
from mesh_identity.spiffe import SpiffeId, TrustDomain

CLOCK_SKEW = timedelta(seconds=60)
MAX_CSR_BYTES = 16 * 1024
ORGANIZATION = "mesh-identity"


def random_serial() -> int:
    """A positive 128-bit serial (the top bit cleared so DER needs no sign byte beyond 16 octets)."""
    return secrets.randbits(127) | 1


def hash_for(key: PrivateKey) -> hashes.SHA256 | hashes.SHA384:
    if isinstance(key, ec.EllipticCurvePrivateKey) and key.curve.key_size >= 384:
        return hashes.SHA384()
    return hashes.SHA256()


def ca_name(trust_domain: TrustDomain, common_name: str) -> x509.Name:
    return x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, ORGANIZATION),
            x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, trust_domain.name[:64]),
            x509.NameAttribute(NameOID.COMMON_NAME, common_name[:64]),
        ]
    )


def _ca_extensions(
    builder: x509.CertificateBuilder, public_key: PublicKey, trust_domain: TrustDomain, path_length: int | None
) -> x509.CertificateBuilder:
    return (
        builder.add_extension(x509.BasicConstraints(ca=True, path_length=path_length), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public_key), critical=False)
        .add_extension(
            x509.SubjectAlternativeName([x509.UniformResourceIdentifier(str(trust_domain.id))]), critical=False
        )
    )


def build_root(
    key: PrivateKey, trust_domain: TrustDomain, ttl: timedelta, now: datetime, common_name: str = "root CA"
) -> x509.Certificate:
    """A self-signed root CA for ``trust_domain``."""
    name = ca_name(trust_domain, f"{trust_domain.name} {common_name}")
    builder = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(random_serial())
        .not_valid_before(now - CLOCK_SKEW)
        .not_valid_after(now + ttl)
    )
    builder = _ca_extensions(builder, key.public_key(), trust_domain, path_length=None)
    return builder.sign(key, hash_for(key))


def ca_csr(key: PrivateKey, trust_domain: TrustDomain, common_name: str) -> x509.CertificateSigningRequest:
    """The CSR for an intermediate CA of ours: CA:true requested, the trust domain's SPIFFE ID as URI SAN."""
    return (
        x509.CertificateSigningRequestBuilder()
        .subject_name(ca_name(trust_domain, common_name))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.SubjectAlternativeName([x509.UniformResourceIdentifier(str(trust_domain.id))]), critical=False
        )
        .sign(key, hash_for(key))
    )


def sign_ca(
    csr: x509.CertificateSigningRequest,
    issuer: x509.Certificate,
    issuer_key: PrivateKey,
    *,
    trust_domain: TrustDomain,
    ttl: timedelta,
    now: datetime,
    path_length: int | None = 0,
) -> x509.Certificate:
    """Sign an intermediate CA from its CSR. NotAfter is capped at the issuer's NotAfter."""
    public_key = checked_public_key(csr)
    not_after = min(now + ttl, issuer.not_valid_after_utc)
    builder = (
        x509.CertificateBuilder()
        .subject_name(csr.subject)
        .issuer_name(issuer.subject)
        .public_key(public_key)
        .serial_number(random_serial())
        .not_valid_before(max(now - CLOCK_SKEW, issuer.not_valid_before_utc))
        .not_valid_after(not_after)
        .add_extension(_aki(issuer), critical=False)
    )
    builder = _ca_extensions(builder, public_key, trust_domain, path_length)
    return builder.sign(issuer_key, hash_for(issuer_key))


def _aki(issuer: x509.Certificate) -> x509.AuthorityKeyIdentifier:
    try:
        ski = issuer.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
        return x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski)
    except x509.ExtensionNotFound:
        return x509.AuthorityKeyIdentifier.from_issuer_public_key(issuer.public_key())  # type: ignore[arg-type]


def checked_public_key(csr: x509.CertificateSigningRequest) -> PublicKey:
    key = csr.public_key()
    if not isinstance(key, ec.EllipticCurvePublicKey | rsa.RSAPublicKey) or key_type_of(key) is None:
        raise CsrError("CSR key type is not allowed (use ECDSA P-256/P-384 or RSA 2048/3072)")
    return key


def load_csr(data: bytes | x509.CertificateSigningRequest) -> x509.CertificateSigningRequest:
    """Parse a PEM or DER CSR, refusing oversized input and bad signatures."""
    if isinstance(data, x509.CertificateSigningRequest):
        csr = data
    else:
        if len(data) > MAX_CSR_BYTES:
            raise CsrError(f"CSR is {len(data)} bytes, more than the {MAX_CSR_BYTES} allowed")
        try:
            csr = (
                x509.load_pem_x509_csr(data)
                if data.lstrip().startswith(b"-----BEGIN")
                else x509.load_der_x509_csr(data)
            )
        except ValueError:
            raise CsrError("CSR is malformed: not a PEM or DER PKCS#10 request") from None
    try:
        valid = csr.is_signature_valid
    except Exception:
        valid = False
    if not valid:
        raise CsrError("CSR signature is invalid: it was not signed by the key it carries")
    return csr


def check_workload_csr(csr: x509.CertificateSigningRequest, spiffe_id: SpiffeId) -> None:
    """A workload CSR may carry no SAN, or exactly ``spiffe_id`` as its only SAN; nothing else."""
    try:
        san = csr.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return
    except ValueError:
        raise CsrError("CSR extensions are malformed") from None
    names = list(san)
    uris = san.get_values_for_type(x509.UniformResourceIdentifier)
    if len(names) != len(uris):
        kinds = sorted({type(n).__name__ for n in names if not isinstance(n, x509.UniformResourceIdentifier)})
        raise CsrError(f"CSR asks for SANs other than the SPIFFE ID ({', '.join(kinds)}); only {spiffe_id} is allowed")
    if uris != [str(spiffe_id)]:
        raise CsrError(f"CSR asks for URI SANs {uris}; only {spiffe_id} is allowed")


def _general_name(name: x509.GeneralName) -> str:
    """A SAN as an operator reads it: ``DNS SAN web.default.svc``, ``IP SAN 10.0.0.7``."""
    match name:
        case x509.DNSName():
            return f"DNS SAN {name.value}"
        case x509.IPAddress():
            return f"IP SAN {name.value}"
        case x509.RFC822Name():
            return f"email SAN {name.value}"
        case x509.DirectoryName():
            return f"directory name SAN {name.value.rfc4514_string()}"
        case x509.RegisteredID():
            return f"registered ID SAN {name.value.dotted_string}"
        case x509.OtherName():
            return f"other-name SAN {name.type_id.dotted_string}"
    return f"{type(name).__name__} SAN"


def svid_san_problem(cert: x509.Certificate, spiffe_id: SpiffeId) -> str | None:
    """What is wrong with the SANs of a leaf meant to be the X.509-SVID of ``spiffe_id`` (None when nothing).

    An X.509-SVID has exactly one SAN: the URI ``spiffe_id``. Anything else an upstream CA put there (an https
    URI beside the SPIFFE ID, DNS names, wildcards, IP addresses, e-mail addresses) would let the key holder
    be taken for more than one identity by a peer that checks those, so the leaf is refused, not trimmed.
    The text completes "a certificate for <id> with ...".
    """
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return "no subjectAltName"
    except ValueError:
        return "a malformed subjectAltName"
    names = list(san)
    if names == [x509.UniformResourceIdentifier(str(spiffe_id))]:
        return None
    uris = san.get_values_for_type(x509.UniformResourceIdentifier)
    parts = [
        "no URI SAN" if not uris else f"URI SAN {uris[0]}" if len(uris) == 1 else f"URI SANs [{', '.join(uris)}]",
        *(_general_name(n) for n in names if not isinstance(n, x509.UniformResourceIdentifier)),
    ]
    return "; ".join(parts)


class LeafSigner:
    """Signs X.509-SVID leaves with one CA key; the parts common to every leaf are computed once."""

    def __init__(self, issuer: x509.Certificate, issuer_key: PrivateKey) -> None:
        self.issuer = issuer
        self.issuer_key = issuer_key
        self._issuer_name = issuer.subject
        self._aki = _aki(issuer)
        self._hash = hash_for(issuer_key)
        self._not_after_limit = issuer.not_valid_after_utc
        self._not_before_limit = issuer.not_valid_before_utc
        self._subject = x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, ORGANIZATION)])
        self._eku = x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH])
        self._bc = x509.BasicConstraints(ca=False, path_length=None)
        self._ku = {False: _leaf_key_usage(False), True: _leaf_key_usage(True)}

    @property
    def not_after(self) -> datetime:
        return self._not_after_limit

    def sign(self, public_key: PublicKey, spiffe_id: SpiffeId, ttl: timedelta, now: datetime) -> x509.Certificate:
        san = [x509.UniformResourceIdentifier(str(spiffe_id))]
        return self._leaf(public_key, san, self._eku, ttl, now, str(spiffe_id))

    def sign_server(
        self, public_key: PublicKey, names: Sequence[str], ttl: timedelta, now: datetime
    ) -> x509.Certificate:
        """A TLS server certificate (not an X.509-SVID) for ``names``: DNS names and IP addresses, each a SAN of its
        kind, EKU serverAuth only, so its key cannot pass for a mesh client. IssuanceError naming a bad name."""
        sans = server_names(names)
        eku = x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH])
        return self._leaf(public_key, sans, eku, ttl, now, f"the serving certificate of {names[0]}")

    def _leaf(
        self,
        public_key: PublicKey,
        sans: Sequence[x509.GeneralName],
        eku: x509.ExtendedKeyUsage,
        ttl: timedelta,
        now: datetime,
        what: str,
    ) -> x509.Certificate:
        not_after = now + ttl
        if not_after > self._not_after_limit:
            raise IssuanceError(
                f"TTL {ttl} for {what} would end at {not_after:%Y-%m-%dT%H:%M:%SZ}, past the issuing CA's "
                f"NotAfter {self._not_after_limit:%Y-%m-%dT%H:%M:%SZ}"
            )
        is_rsa = isinstance(public_key, rsa.RSAPublicKey)
        builder = (
            x509.CertificateBuilder()
            .subject_name(self._subject)
            .issuer_name(self._issuer_name)
            .public_key(public_key)
            .serial_number(random_serial())
            .not_valid_before(max(now - CLOCK_SKEW, self._not_before_limit))
            .not_valid_after(not_after)
            .add_extension(x509.SubjectAlternativeName(sans), False)
            .add_extension(self._bc, critical=True)
            .add_extension(self._ku[is_rsa], critical=True)
            .add_extension(eku, critical=False)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(public_key), critical=False)
            .add_extension(self._aki, critical=False)
        )
        return builder.sign(self.issuer_key, self._hash)


_DNS_LABEL = re.compile(r"^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$")
MAX_SERVER_NAMES = 16


def server_names(names: Sequence[str]) -> list[x509.GeneralName]:
    """The SANs of a serving certificate for ``names`` (DNS names, lowercase, no wildcard; or IP addresses);
    IssuanceError naming the first bad one."""
    if isinstance(names, str) or not names:
        raise IssuanceError("a serving certificate needs at least one DNS name or IP address")
    if len(names) > MAX_SERVER_NAMES:
        raise IssuanceError(f"a serving certificate holds at most {MAX_SERVER_NAMES} names, not {len(names)}")
    sans: list[x509.GeneralName] = []
    for name in names:
        if not isinstance(name, str):
            raise IssuanceError(f"server name {name!r} is not a string")
        try:
            sans.append(x509.IPAddress(ipaddress.ip_address(name)))
            continue
        except ValueError:
            pass
        labels = name.split(".")
        if len(name) > 253 or not all(_DNS_LABEL.match(label) for label in labels):
            raise IssuanceError(
                f"server name {name!r} is not a DNS name (lowercase letters, digits and '-' in dot-separated labels, "
                "no wildcard) or an IP address"
            )
        sans.append(x509.DNSName(name))
    if len(set(sans)) != len(sans):
        raise IssuanceError(f"server names {list(names)} list a name twice")
    return sans


def _leaf_key_usage(is_rsa: bool) -> x509.KeyUsage:
    return x509.KeyUsage(
        digital_signature=True,
        content_commitment=False,
        key_encipherment=is_rsa,
        data_encipherment=False,
        key_agreement=False,
        key_cert_sign=False,
        crl_sign=False,
        encipher_only=False,
        decipher_only=False,
    )


def is_ca(cert: x509.Certificate) -> bool:
    try:
        return bool(cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca)
    except x509.ExtensionNotFound:
        return False


def same_key(a: PublicKey | x509.Certificate, b: PublicKey) -> bool:
    from cryptography.hazmat.primitives import serialization  # noqa: PLC0415

    key = a.public_key() if isinstance(a, x509.Certificate) else a
    fmt = (serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    return key.public_bytes(*fmt) == b.public_bytes(*fmt)


def key_type_for(key: PublicKey) -> KeyType:
    kt = key_type_of(key)
    if kt is None:
        raise CsrError("key type is not allowed (use ECDSA P-256/P-384 or RSA 2048/3072)")
    return kt
