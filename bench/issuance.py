"""Issuance throughput: the public Authority API against the raw `cryptography` loop doing the same work.

Run:  .venv/bin/python bench/issuance.py [--n 3000] [--rounds 3]

Both sides run in this one process, on one core, interleaved round by round; the figure is the ratio of the
best round of each (goal: Authority >= 0.85 x raw), for two paths:
  generated key:  P-256 keygen + build leaf + sign + PEM-encode leaf and key
  CSR:            load PEM CSR + check its signature + build leaf + sign + PEM-encode leaf
"""

from __future__ import annotations

import argparse
import tempfile
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from mesh_identity.authority import Authority, AuthoritySettings, workload_csr
from mesh_identity.clock import utcnow
from mesh_identity.keys import KeyType, generate_key
from mesh_identity.provider import Mode, ProviderContext
from mesh_identity.spiffe import SpiffeId, TrustDomain
from providers.builtin.provider import SPEC

TD = TrustDomain("example.org")
ID = SpiffeId.for_kubernetes(TD, "default", "bench")
PEM = serialization.Encoding.PEM


def raw_leaf(
    ca_cert: x509.Certificate, ca_key: ec.EllipticCurvePrivateKey, public_key: ec.EllipticCurvePublicKey, uri: str
) -> x509.Certificate:
    """What any careful issuer does for one SVID, with nothing precomputed."""
    now = datetime.now(UTC)
    return (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "bench")]))
        .issuer_name(ca_cert.subject)
        .public_key(public_key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - timedelta(minutes=1))
        .not_valid_after(now + timedelta(hours=1))
        .add_extension(x509.SubjectAlternativeName([x509.UniformResourceIdentifier(uri)]), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.KeyUsage(True, False, False, False, False, False, False, False, False), critical=True)
        .add_extension(
            x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public_key), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False)
        .sign(ca_key, hashes.SHA256())
    )


def raw_generated(ca_cert: x509.Certificate, ca_key: ec.EllipticCurvePrivateKey) -> Callable[[], object]:
    uri = str(ID)

    def once() -> object:
        key = ec.generate_private_key(ec.SECP256R1())
        cert = raw_leaf(ca_cert, ca_key, key.public_key(), uri)
        return cert.public_bytes(PEM) + key.private_bytes(
            PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )

    return once


def raw_csr(ca_cert: x509.Certificate, ca_key: ec.EllipticCurvePrivateKey, csrs: list[bytes]) -> Callable[[], object]:
    uri = str(ID)
    it = iter(csrs * 1000)

    def once() -> object:
        csr = x509.load_pem_x509_csr(next(it))
        assert csr.is_signature_valid
        key = csr.public_key()
        assert isinstance(key, ec.EllipticCurvePublicKey)
        return raw_leaf(ca_cert, ca_key, key, uri).public_bytes(PEM)

    return once


def rate(fn: Callable[[], object], n: int) -> float:
    start = time.perf_counter()
    for _ in range(n):
        fn()
    return n / (time.perf_counter() - start)


def make_authority(state: Path) -> Authority:
    context = ProviderContext(TD, state, KeyType.ECDSA_P256, Mode.INTERMEDIATE, utcnow)
    authority = Authority(SPEC.factory(context, SPEC.validate_options({})), AuthoritySettings(TD))
    authority.start()
    return authority


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=3000, help="issuances per round and side")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        authority = make_authority(Path(tmp) / "state")
        signing = authority.signing_ca
        assert signing is not None
        ca_cert, ca_key = signing.certificate, signing.signer.issuer_key
        assert isinstance(ca_key, ec.EllipticCurvePrivateKey)
        csrs = [workload_csr(generate_key(KeyType.ECDSA_P256), ID).public_bytes(PEM) for _ in range(200)]

        def ours_generated() -> object:
            svid = authority.issue(ID)
            return svid.cert_chain_pem() + svid.key_pem()

        csr_iter = iter(csrs * 1000)

        def ours_csr() -> object:
            return authority.issue(ID, csr=next(csr_iter)).cert_chain_pem()

        paths = {
            "generated key": (raw_generated(ca_cert, ca_key), ours_generated),
            "CSR": (raw_csr(ca_cert, ca_key, csrs), ours_csr),
        }
        print(f"{'path':<14} {'raw /s':>9} {'Authority /s':>13} {'ratio':>6}   (best of {args.rounds} x {args.n})")
        for name, (raw, ours) in paths.items():
            best_raw = best_ours = 0.0
            for _ in range(args.rounds):
                best_raw = max(best_raw, rate(raw, args.n))
                best_ours = max(best_ours, rate(ours, args.n))
            print(f"{name:<14} {best_raw:9.0f} {best_ours:13.0f} {best_ours / best_raw:6.2f}")


if __name__ == "__main__":
    main()
