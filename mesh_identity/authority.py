"""The Authority: issues X.509-SVIDs for SPIFFE IDs through a CA provider.

In ``intermediate`` mode it holds an intermediate CA that the provider signed and signs workloads locally;
in ``per-workload`` mode every SVID is signed by the provider from a CSR. Either way, whatever the provider
returns is checked (CA flags, key, SAN: a leaf carries exactly its SPIFFE ID and no other name, chain to the
bundle) and expiry is read from the certificate.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta

from cryptography import x509
from cryptography.x509.oid import NameOID

from mesh_identity.clock import Clock, utcnow
from mesh_identity.errors import IssuanceError, ProviderRejectedError
from mesh_identity.events import CaRotated, CertificateIssued, CertKind, EventSink, NullSink
from mesh_identity.keys import KeyType, PrivateKey, PublicKey, generate_key
from mesh_identity.profile import (
    ORGANIZATION,
    LeafSigner,
    ca_csr,
    check_workload_csr,
    checked_public_key,
    hash_for,
    is_ca,
    load_csr,
    same_key,
    svid_san_problem,
)
from mesh_identity.provider import CAProvider, Mode, SignedCertificate
from mesh_identity.spiffe import SpiffeId, TrustDomain
from mesh_identity.svid import TrustBundle, X509Svid, certs_pem, fingerprint_of, serial_of
from mesh_identity.verify import chain_problem

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class ServingCertificate:
    """A TLS serving certificate (:meth:`Authority.issue_serving`): the leaf, the intermediates above it, its key
    and the bundle that verifies it."""

    leaf: x509.Certificate
    chain: tuple[x509.Certificate, ...]
    private_key: PrivateKey
    bundle: TrustBundle

    @property
    def chain_pem(self) -> bytes:
        return certs_pem((self.leaf, *self.chain))


@dataclass(frozen=True, slots=True)
class SigningCa:
    """The intermediate CA the authority signs workloads with, and the chain above it."""

    certificate: x509.Certificate
    chain: tuple[x509.Certificate, ...]
    bundle: TrustBundle
    signer: LeafSigner
    path: tuple[x509.Certificate, ...] = ()
    path_pem: bytes = b""

    @classmethod
    def create(
        cls, certificate: x509.Certificate, chain: tuple[x509.Certificate, ...], bundle: TrustBundle, key: PrivateKey
    ) -> SigningCa:
        path = (certificate, *chain)
        return cls(certificate, chain, bundle, LeafSigner(certificate, key), path, certs_pem(path))

    @property
    def serial(self) -> str:
        return serial_of(self.certificate)


@dataclass(frozen=True, slots=True)
class AuthoritySettings:
    trust_domain: TrustDomain
    mode: Mode = Mode.INTERMEDIATE
    key_type: KeyType = KeyType.ECDSA_P256
    workload_ttl: timedelta = timedelta(hours=1)
    intermediate_ttl: timedelta = timedelta(days=1)


class Authority:
    """Issues X.509-SVIDs. Thread-safe: issuance may run in many threads while the intermediate rotates."""

    def __init__(
        self,
        provider: CAProvider,
        settings: AuthoritySettings,
        *,
        events: EventSink | None = None,
        clock: Clock = utcnow,
    ) -> None:
        self.provider = provider
        self.settings = settings
        self.trust_domain = settings.trust_domain
        self.events: EventSink = events or NullSink()
        self.clock = clock
        self._lock = threading.Lock()
        self._signing: SigningCa | None = None
        self._bundle: TrustBundle | None = None

    # -- CA side -------------------------------------------------------------------------------------------

    def start(self) -> None:
        """Read the bundle and, in intermediate mode, obtain the first intermediate."""
        self._bundle = self._checked_bundle(self.provider.trust_bundle())
        if self.settings.mode is Mode.INTERMEDIATE and self._signing is None:
            self.rotate_intermediate()

    @property
    def signing_ca(self) -> SigningCa | None:
        return self._signing

    def bundle(self) -> TrustBundle:
        bundle = self._bundle
        if bundle is None:
            bundle = self._bundle = self._checked_bundle(self.provider.trust_bundle())
        return bundle

    def refresh_bundle(self) -> TrustBundle:
        """Re-read the provider's bundle (after a root rotation phase)."""
        with self._lock:
            self._bundle = self._checked_bundle(self.provider.trust_bundle())
            return self._bundle

    def _checked_bundle(self, bundle: TrustBundle) -> TrustBundle:
        if bundle.trust_domain != self.trust_domain:
            raise ProviderRejectedError(
                self.provider.name,
                f"trust bundle is for trust domain {bundle.trust_domain}, not {self.trust_domain}",
            )
        for cert in bundle.authorities:
            if not is_ca(cert):
                raise ProviderRejectedError(
                    self.provider.name, f"trust bundle entry {cert.subject.rfc4514_string()!r} is not a CA"
                )
        return bundle

    def rotate_intermediate(self, requested_by: str = "authority") -> SigningCa:
        """Obtain a new intermediate CA from the provider (fresh key) and make it the signing CA."""
        if self.settings.mode is not Mode.INTERMEDIATE:
            raise IssuanceError(f"provider {self.provider.name!r} runs in {self.settings.mode} mode: no intermediate")
        key = generate_key(self.settings.key_type)
        csr = ca_csr(key, self.trust_domain, f"{self.trust_domain.name} mesh-identity intermediate")
        signed = self.provider.sign_intermediate(csr, self.settings.intermediate_ttl)
        cert = self._check_intermediate(signed, key)
        signing = SigningCa.create(cert, signed.chain, self._checked_bundle(signed.bundle), key)
        with self._lock:
            old = self._signing
            self._signing = signing
            self._bundle = (
                signing.bundle if self._bundle is None else self._bundle.with_authorities(signing.bundle.authorities)
            )
        now = self.clock()
        self.events.emit(
            CertificateIssued(
                subject=str(self.trust_domain.id),
                kind=CertKind.INTERMEDIATE,
                serial=signing.serial,
                fingerprint=fingerprint_of(cert),
                not_after=cert.not_valid_after_utc,
                provider=self.provider.name,
                requested_by=requested_by,
                at=now,
            )
        )
        self.events.emit(
            CaRotated(
                kind=CertKind.INTERMEDIATE,
                phase="activated",
                old_fingerprint=fingerprint_of(old.certificate) if old else None,
                new_fingerprint=fingerprint_of(cert),
                provider=self.provider.name,
                at=now,
            )
        )
        for warning in signed.warnings:
            log.warning("%s: intermediate %s: %s", self.provider.name, signing.serial, warning)
        return signing

    def _check_intermediate(self, signed: SignedCertificate, key: PrivateKey) -> x509.Certificate:
        cert = signed.certificate
        name = self.provider.name
        if not is_ca(cert):
            raise ProviderRejectedError(name, "returned an intermediate without BasicConstraints CA:true")
        if not same_key(cert, key.public_key()):
            raise ProviderRejectedError(name, "returned an intermediate for another key than the one we sent")
        problem = chain_problem(cert, signed.chain, signed.bundle, self.clock())
        if problem is not None:
            raise ProviderRejectedError(name, f"returned an intermediate that does not verify: {problem}")
        return cert

    # -- workload side -------------------------------------------------------------------------------------

    def issue(
        self,
        spiffe_id: SpiffeId,
        *,
        csr: bytes | x509.CertificateSigningRequest | None = None,
        ttl: timedelta | None = None,
        key_type: KeyType | None = None,
        requested_by: str = "api",
    ) -> X509Svid:
        """Issue an X.509-SVID for ``spiffe_id``, from ``csr`` or with a key generated here."""
        if not isinstance(spiffe_id, SpiffeId):
            raise IssuanceError(f"{spiffe_id!r} is not a SpiffeId")
        if spiffe_id.trust_domain != self.trust_domain:
            raise IssuanceError(f"SPIFFE ID {spiffe_id} is not in trust domain {self.trust_domain}")
        if not spiffe_id.path:
            raise IssuanceError(f"SPIFFE ID {spiffe_id} has no path: a workload ID needs one")
        ttl = self.settings.workload_ttl if ttl is None else ttl
        if ttl <= timedelta(0):
            raise IssuanceError(f"TTL {ttl} is not positive")
        key: PrivateKey | None = None
        request: x509.CertificateSigningRequest | None = None
        if csr is not None:
            if key_type is not None:
                raise IssuanceError("key_type applies to generated keys only, not to a CSR")
            request = load_csr(csr)
            check_workload_csr(request, spiffe_id)
            public_key: PublicKey = checked_public_key(request)
        else:
            key = generate_key(key_type or self.settings.key_type)
            public_key = key.public_key()
        if self.settings.mode is Mode.INTERMEDIATE:
            signing = self._signing
            if signing is None:
                raise IssuanceError("the authority has not started: no signing intermediate yet")
            now = self.clock()
            leaf = signing.signer.sign(public_key, spiffe_id, ttl, now)
            chain = signing.path
            bundle = self._bundle or signing.bundle
            pem = {"above": signing.path_pem}
        else:
            if request is None:
                assert key is not None
                request = workload_csr(key, spiffe_id)
            signed = self.provider.sign_workload(request, spiffe_id, ttl)
            leaf, chain, bundle = self._check_workload(signed, public_key, spiffe_id)
            now = self.clock()
            pem = {}
        svid = X509Svid(spiffe_id, leaf, chain, key, bundle, self.provider.name, pem)
        self._issued(leaf, str(spiffe_id), CertKind.WORKLOAD, requested_by, now)
        return svid

    def issue_serving(
        self, names: Sequence[str], ttl: timedelta, *, requested_by: str = "injector"
    ) -> ServingCertificate:
        """A TLS serving certificate for ``names`` (DNS names, IP addresses), with a key generated here, signed by
        this authority's intermediate (``intermediate`` mode only: an upstream CA in per-workload mode signs
        SVIDs alone), never past the intermediate's NotAfter. For the control plane's own HTTPS servers, such as the
        injector's admission webhook."""
        if self.settings.mode is not Mode.INTERMEDIATE:
            raise IssuanceError(
                f"a serving certificate is signed by the authority's own intermediate: ca.mode {self.settings.mode} "
                "has none (use ca.mode intermediate)"
            )
        if ttl <= timedelta(0):
            raise IssuanceError(f"TTL {ttl} is not positive")
        signing = self._signing
        if signing is None:
            raise IssuanceError("the authority has not started: no signing intermediate yet")
        key = generate_key(self.settings.key_type)
        now = self.clock()
        ttl = min(ttl, signing.signer.not_after - now)  # it ends with its issuer at the latest
        leaf = signing.signer.sign_server(key.public_key(), names, ttl, now)
        self._issued(leaf, ", ".join(names), CertKind.SERVING, requested_by, now)
        return ServingCertificate(leaf, signing.path, key, self._bundle or signing.bundle)

    def _issued(self, leaf: x509.Certificate, subject: str, kind: CertKind, requested_by: str, now: datetime) -> None:
        self.events.emit(
            CertificateIssued(
                subject=subject,
                kind=kind,
                serial=serial_of(leaf),
                fingerprint=fingerprint_of(leaf),
                not_after=leaf.not_valid_after_utc,
                provider=self.provider.name,
                requested_by=requested_by,
                at=now,
            )
        )

    def _check_workload(
        self, signed: SignedCertificate, public_key: PublicKey, spiffe_id: SpiffeId
    ) -> tuple[x509.Certificate, tuple[x509.Certificate, ...], TrustBundle]:
        name = self.provider.name
        leaf = signed.certificate
        if is_ca(leaf):
            raise ProviderRejectedError(name, f"returned a CA certificate for workload {spiffe_id}")
        if not same_key(leaf, public_key):
            raise ProviderRejectedError(name, f"returned a certificate for another key than {spiffe_id}'s")
        san_problem = svid_san_problem(leaf, spiffe_id)
        if san_problem is not None:
            raise ProviderRejectedError(
                name,
                f"returned a certificate for {spiffe_id} with {san_problem}; an X.509-SVID has exactly one SAN, "
                f"the URI {spiffe_id}",
            )
        bundle = self._checked_bundle(signed.bundle)
        problem = chain_problem(leaf, signed.chain, bundle, self.clock())
        if problem is not None:
            raise ProviderRejectedError(name, f"returned a certificate for {spiffe_id} that does not verify: {problem}")
        for warning in signed.warnings:
            log.warning("%s: %s serial %s: %s", name, spiffe_id, serial_of(leaf), warning)
        return leaf, signed.chain, bundle


def workload_csr(key: PrivateKey, spiffe_id: SpiffeId) -> x509.CertificateSigningRequest:
    """A CSR for ``spiffe_id`` with it as the only URI SAN."""
    return (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, ORGANIZATION)]))
        .add_extension(x509.SubjectAlternativeName([x509.UniformResourceIdentifier(str(spiffe_id))]), critical=False)
        .sign(key, hash_for(key))
    )
