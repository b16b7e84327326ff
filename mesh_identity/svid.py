"""X.509-SVIDs and trust bundles: what the authority hands out.

Expiry and serials are always read from the certificates themselves.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import datetime
from typing import NewType

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization

from mesh_identity.errors import InvalidSpiffeIdError
from mesh_identity.keys import PrivateKey, private_key_pem
from mesh_identity.spiffe import SpiffeId, TrustDomain

Serial = NewType("Serial", str)
Fingerprint = NewType("Fingerprint", str)


def serial_of(cert: x509.Certificate) -> Serial:
    """The serial number as lowercase hex, the way openssl prints it (without colons)."""
    return Serial(format(cert.serial_number, "x"))


def fingerprint_of(cert: x509.Certificate) -> Fingerprint:
    """SHA-256 fingerprint of the DER certificate, lowercase hex."""
    return Fingerprint(cert.fingerprint(hashes.SHA256()).hex())


def cert_pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def certs_pem(certs: Iterable[x509.Certificate]) -> bytes:
    return b"".join(cert_pem(c) for c in certs)


def load_certs_pem(data: bytes, what: str = "certificate file") -> tuple[x509.Certificate, ...]:
    """Load one or more PEM certificates; ValueError naming ``what`` when there are none or one is bad."""
    try:
        certs = tuple(x509.load_pem_x509_certificates(data))
    except ValueError as err:
        raise ValueError(f"{what} does not hold valid PEM certificates ({err})") from None
    return certs


def spiffe_ids_of(cert: x509.Certificate) -> tuple[SpiffeId, ...]:
    """All URI SANs of a certificate that are valid SPIFFE IDs."""
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return ()
    found: list[SpiffeId] = []
    for uri in san.get_values_for_type(x509.UniformResourceIdentifier):
        try:
            found.append(SpiffeId.parse(uri))
        except InvalidSpiffeIdError:
            continue
    return tuple(found)


def spiffe_id_of(cert: x509.Certificate) -> SpiffeId:
    """The single SPIFFE ID of an X.509-SVID; ValueError when there is not exactly one URI SAN."""
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        raise ValueError("certificate has no subjectAltName, so no SPIFFE ID") from None
    uris = san.get_values_for_type(x509.UniformResourceIdentifier)
    if len(uris) != 1:
        raise ValueError(f"an X.509-SVID has exactly one URI SAN, this certificate has {len(uris)}")
    return SpiffeId.parse(uris[0])


@dataclass(frozen=True, slots=True)
class TrustBundle:
    """The X.509 authorities of one trust domain: the roots a peer's chain must end at."""

    trust_domain: TrustDomain
    authorities: tuple[x509.Certificate, ...]

    def __post_init__(self) -> None:
        if not self.authorities:
            raise ValueError(f"trust bundle for {self.trust_domain} has no authorities")

    def pem(self) -> bytes:
        return certs_pem(self.authorities)

    @property
    def fingerprints(self) -> frozenset[Fingerprint]:
        return frozenset(fingerprint_of(c) for c in self.authorities)

    def with_authorities(self, extra: Iterable[x509.Certificate]) -> TrustBundle:
        """A bundle with ``extra`` added (duplicates by fingerprint are dropped, order kept)."""
        seen = {fingerprint_of(c) for c in self.authorities}
        merged = list(self.authorities)
        for cert in extra:
            if fingerprint_of(cert) not in seen:
                seen.add(fingerprint_of(cert))
                merged.append(cert)
        return TrustBundle(self.trust_domain, tuple(merged))

    def without(self, fingerprints: Iterable[str]) -> TrustBundle:
        drop = set(fingerprints)
        return TrustBundle(self.trust_domain, tuple(c for c in self.authorities if fingerprint_of(c) not in drop))


@dataclass(frozen=True, slots=True)
class X509Svid:
    """An issued X.509-SVID.

    ``leaf`` is the workload certificate, ``chain`` the intermediates from the leaf's issuer up to (not
    including) the root, ``private_key`` the key when the authority generated it (None when a CSR was signed),
    ``bundle`` the trust bundle a peer verifies it against.
    """

    spiffe_id: SpiffeId
    leaf: x509.Certificate
    chain: tuple[x509.Certificate, ...]
    private_key: PrivateKey | None
    bundle: TrustBundle
    provider: str = "builtin"
    _pem: dict[str, bytes] = field(default_factory=dict, repr=False, compare=False)

    @property
    def not_before(self) -> datetime:
        return self.leaf.not_valid_before_utc

    @property
    def not_after(self) -> datetime:
        return self.leaf.not_valid_after_utc

    @property
    def serial(self) -> Serial:
        return serial_of(self.leaf)

    @property
    def fingerprint(self) -> Fingerprint:
        return fingerprint_of(self.leaf)

    def cert_chain_pem(self) -> bytes:
        """Leaf followed by the intermediates, PEM: what a TLS server or client presents."""
        cached = self._pem.get("chain")
        if cached is None:
            above = self._pem.get("above")  # the issuer's chain, PEM-encoded once by whoever issued
            cached = cert_pem(self.leaf) + (above if above is not None else certs_pem(self.chain))
            self._pem["chain"] = cached
        return cached

    def key_pem(self) -> bytes:
        """The private key, PKCS#8 PEM. Raises when the SVID was issued from a CSR (we never saw the key)."""
        if self.private_key is None:
            raise ValueError(f"SVID {self.spiffe_id} was issued from a CSR; its private key is the caller's")
        cached = self._pem.get("key")
        if cached is None:
            cached = self._pem["key"] = private_key_pem(self.private_key)
        return cached

    def __repr__(self) -> str:  # never print key material
        return f"X509Svid({self.spiffe_id}, serial={self.serial}, not_after={self.not_after.isoformat()})"
