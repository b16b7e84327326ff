"""The test CA: one small CA (EC P-256, made with ``cryptography``) that signs every test certificate.

A :class:`TestCa` is a self-signed root or an intermediate under another :class:`TestCa`. It signs leaves with
any SANs and extended key usages (:meth:`TestCa.leaf`: the TLS listeners of the fakes, certificates with
defects such as no URI SAN or two), and, when it belongs to a trust domain, SPIFFE SVIDs (:meth:`TestCa.svid`)
and the trust bundle that holds its root (:attr:`TestCa.bundle`).

The xDS server's own certificate (:meth:`TestCa.server_svid`) carries a DNS SAN ``localhost`` besides its
SPIFFE ID, because gRPC's Python client checks the server's host name and has no hook to check a SPIFFE ID
instead (Envoy checks the URI SAN).

Only ``cryptography`` is imported at module level: the fakes, which stand for third-party systems, use this CA
for their TLS listeners without importing the project. The SPIFFE helpers import ``mesh_identity`` when called.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from functools import cached_property
from typing import TYPE_CHECKING

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

if TYPE_CHECKING:
    from mesh_identity.spiffe import SpiffeId, TrustDomain
    from mesh_identity.svid import TrustBundle, X509Svid

SERVER_NAME = "localhost"
TLS_USAGES: tuple[x509.ObjectIdentifier, ...] = (ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH)


def key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    """A private key as unencrypted PKCS#8 PEM."""
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


@dataclass(frozen=True)
class TestCa:
    """A CA key pair; ``parent`` None means self-signed (a root). ``domain`` names the trust domain whose SVIDs
    it signs (None: a CA outside SPIFFE, such as a listener's or a cert-manager issuer's)."""

    __test__ = False  # not a test class for pytest

    certificate: x509.Certificate
    key: ec.EllipticCurvePrivateKey
    parent: TestCa | None = None
    domain: str | None = None

    @classmethod
    def create(
        cls,
        common_name: str,
        parent: TestCa | None = None,
        lifetime: timedelta = timedelta(days=30),
        *,
        trust_domain: str | None = None,
    ) -> TestCa:
        """A root (or, with ``parent``, an intermediate) named ``common_name``, valid from five minutes ago for
        ``lifetime``. With a ``trust_domain`` (an intermediate inherits its parent's) the CA carries the trust
        domain's SPIFFE ID as a URI SAN."""
        domain = trust_domain or (parent.domain if parent else None)
        now = datetime.now(UTC)
        key = ec.generate_private_key(ec.SECP256R1())
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
        builder = (
            x509.CertificateBuilder()
            .subject_name(name)
            .issuer_name(parent.certificate.subject if parent else name)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - timedelta(minutes=5))
            .not_valid_after(now + lifetime)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .add_extension(x509.KeyUsage(False, False, False, False, False, True, True, False, False), critical=True)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        )
        if parent:
            builder = builder.add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(parent.key.public_key()), critical=False
            )
        if domain:
            from mesh_identity.spiffe import TrustDomain

            uri = x509.UniformResourceIdentifier(str(TrustDomain(domain).id))
            builder = builder.add_extension(x509.SubjectAlternativeName([uri]), critical=False)
        return cls(builder.sign(parent.key if parent else key, hashes.SHA256()), key, parent, domain)

    @classmethod
    def for_trust_domain(cls, trust_domain: str = "example.org", name: str = "test root") -> TestCa:
        """A root for ``trust_domain`` named ``"<name> <trust_domain>"``, valid for a day: the CA of the xDS and
        policy tests."""
        return cls.create(f"{name} {trust_domain}", lifetime=timedelta(days=1), trust_domain=trust_domain)

    # -- the CA itself

    @property
    def root(self) -> TestCa:
        return self.parent.root if self.parent else self

    @property
    def chain(self) -> list[x509.Certificate]:
        """This CA and its parents below the root (what a leaf's chain carries)."""
        if self.parent is None:
            return []
        return [self.certificate, *self.parent.chain]

    def pem(self) -> bytes:
        return self.certificate.public_bytes(serialization.Encoding.PEM)

    def key_pem(self) -> bytes:
        return key_pem(self.key)

    # -- leaves

    def leaf(
        self,
        uris: Sequence[str] = (),
        dns: Sequence[str] | None = None,
        ttl: timedelta = timedelta(hours=1),
        *,
        ips: Sequence[str] = (),
        usages: Sequence[x509.ObjectIdentifier] = TLS_USAGES,
        common_name: str = "",
    ) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
        """A new key and an end-entity certificate for it with exactly these SANs (none at all when none are
        given) and extended key usages, valid from a minute ago for ``ttl``."""
        key = ec.generate_private_key(ec.SECP256R1())
        now = datetime.now(UTC)
        subject = [x509.NameAttribute(NameOID.ORGANIZATION_NAME, "mesh-identity tests")]
        if common_name:
            subject.append(x509.NameAttribute(NameOID.COMMON_NAME, common_name))
        builder = (
            x509.CertificateBuilder()
            .subject_name(x509.Name(subject))
            .issuer_name(self.certificate.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - timedelta(minutes=1))
            .not_valid_after(now + ttl)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.KeyUsage(True, False, True, False, False, False, False, False, False), critical=True)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(self.key.public_key()), critical=False)
        )
        if usages:
            builder = builder.add_extension(x509.ExtendedKeyUsage(list(usages)), critical=False)
        names: list[x509.GeneralName] = [x509.UniformResourceIdentifier(u) for u in uris]
        names += [x509.DNSName(d) for d in dns or []]
        names += [x509.IPAddress(ipaddress.ip_address(i)) for i in ips]
        if names:
            builder = builder.add_extension(x509.SubjectAlternativeName(names), critical=False)
        return builder.sign(self.key, hashes.SHA256()), key

    # -- SPIFFE (for a CA of a trust domain)

    @cached_property
    def trust_domain(self) -> TrustDomain:
        from mesh_identity.spiffe import TrustDomain

        if self.domain is None:
            raise ValueError(f"{self.certificate.subject.rfc4514_string()} belongs to no trust domain")
        return TrustDomain(self.domain)

    @cached_property
    def bundle(self) -> TrustBundle:
        """The trust domain's bundle: this CA's root."""
        from mesh_identity.svid import TrustBundle

        return TrustBundle(self.trust_domain, (self.root.certificate,))

    def id(self, path: str) -> SpiffeId:
        from mesh_identity.spiffe import SpiffeId

        return SpiffeId(self.trust_domain, path)

    def svid(self, path: str, *, dns: list[str] | None = None, ttl: timedelta = timedelta(hours=1)) -> X509Svid:
        from mesh_identity.svid import X509Svid

        spiffe_id = self.id(path)
        cert, key = self.leaf([str(spiffe_id)], dns, ttl)
        return X509Svid(spiffe_id, cert, tuple(self.chain), key, self.bundle, "test")

    def server_svid(self, path: str = "/mesh-identity/xds") -> X509Svid:
        return self.svid(path, dns=[SERVER_NAME])
