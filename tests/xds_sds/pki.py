"""Test certificates made with ``cryptography``: a root CA per trust domain and SVIDs it signs.

The xDS server's own certificate carries a DNS SAN ``localhost`` besides its SPIFFE ID, because gRPC's
Python client checks the server's host name and has no hook to check a SPIFFE ID instead (Envoy checks the
URI SAN). Certificates with defects (no URI SAN, two URI SANs) are made by :meth:`TestCa.leaf`.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from mesh_identity.keys import private_key_pem
from mesh_identity.spiffe import SpiffeId, TrustDomain
from mesh_identity.svid import TrustBundle, X509Svid, cert_pem

SERVER_NAME = "localhost"


class TestCa:
    """A self-signed root that signs leaves directly."""

    __test__ = False  # not a test class for pytest

    def __init__(self, trust_domain: str = "example.org", name: str = "test root") -> None:
        self.trust_domain = TrustDomain(trust_domain)
        self.key = ec.generate_private_key(ec.SECP256R1())
        subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, f"{name} {trust_domain}")])
        now = datetime.now(UTC)
        self.cert = (
            x509.CertificateBuilder()
            .subject_name(subject)
            .issuer_name(subject)
            .public_key(self.key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - timedelta(minutes=5))
            .not_valid_after(now + timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .add_extension(x509.KeyUsage(False, False, False, False, False, True, True, False, False), critical=True)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(self.key.public_key()), critical=False)
            .add_extension(
                x509.SubjectAlternativeName([x509.UniformResourceIdentifier(str(self.trust_domain.id))]),
                critical=False,
            )
            .sign(self.key, hashes.SHA256())
        )
        self.bundle = TrustBundle(self.trust_domain, (self.cert,))

    @property
    def pem(self) -> bytes:
        return cert_pem(self.cert)

    def id(self, path: str) -> SpiffeId:
        return SpiffeId(self.trust_domain, path)

    def leaf(
        self, uris: list[str], dns: list[str] | None = None, ttl: timedelta = timedelta(hours=1)
    ) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
        key = ec.generate_private_key(ec.SECP256R1())
        now = datetime.now(UTC)
        builder = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "mesh-identity tests")]))
            .issuer_name(self.cert.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - timedelta(minutes=1))
            .not_valid_after(now + ttl)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.KeyUsage(True, False, True, False, False, False, False, False, False), critical=True)
            .add_extension(
                x509.ExtendedKeyUsage([x509.ExtendedKeyUsageOID.SERVER_AUTH, x509.ExtendedKeyUsageOID.CLIENT_AUTH]),
                critical=False,
            )
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(self.key.public_key()), critical=False)
        )
        names: list[x509.GeneralName] = [x509.UniformResourceIdentifier(u) for u in uris]
        names += [x509.DNSName(d) for d in dns or []]
        if names:
            builder = builder.add_extension(x509.SubjectAlternativeName(names), critical=False)
        return builder.sign(self.key, hashes.SHA256()), key

    def svid(self, path: str, *, dns: list[str] | None = None, ttl: timedelta = timedelta(hours=1)) -> X509Svid:
        spiffe_id = self.id(path)
        cert, key = self.leaf([str(spiffe_id)], dns, ttl)
        return X509Svid(spiffe_id, cert, (), key, self.bundle, "test")

    def server_svid(self, path: str = "/mesh-identity/xds") -> X509Svid:
        return self.svid(path, dns=[SERVER_NAME])


def key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return private_key_pem(key)
