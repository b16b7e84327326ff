"""Who is on the other end of a stream, and what it may receive.

The xDS port requires a client certificate that chains to the mesh's trust bundle (the TLS handshake checks
that). The stream's identity is the SPIFFE ID in that certificate's URI SAN, read from the gRPC auth context
(:func:`peer_credential`), and the certificate must have the X.509-SVID leaf profile: not a CA, key usage
digitalSignature and neither keyCertSign nor cRLSign. An :class:`Authorizer` then decides which node ids the
identity may speak for and which resources it may get.

The handshake is not trusted forever: a resumed TLS session skips the certificate checks, and a connection
outlives both the certificate and the roots it was checked against. So :func:`trust_of` checks the peer's
chain against the *current* roots at a given time, on every new stream and again whenever the roots change;
it says when the chain stops being valid (its earliest NotAfter), when the server ends the stream.

Secret names follow SPIRE's SDS convention: a workload's ``TlsCertificate`` secret is named by its SPIFFE ID,
a trust bundle (validation context) by its trust domain's ID (``spiffe://example.org``).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Protocol

from cryptography import x509
from cryptography.exceptions import InvalidSignature

from mesh_identity.errors import InvalidSpiffeIdError
from mesh_identity.profile import is_ca
from mesh_identity.spiffe import SpiffeId, TrustDomain
from mesh_identity.svid import Fingerprint, fingerprint_of, spiffe_id_of
from xds_sds.protocol.typeurls import SECRET


class PeerError(Exception):
    """The peer of a stream cannot be identified (no certificate, no single SPIFFE ID, not an X.509-SVID leaf),
    or its certificate is no longer valid (expired, or its root left the trust bundle)."""


@dataclass(frozen=True, slots=True)
class PeerCredential:
    """What the TLS handshake verified: the peer's leaf, the intermediates it presented, its SPIFFE ID."""

    leaf: x509.Certificate
    intermediates: tuple[x509.Certificate, ...]
    identity: SpiffeId


@dataclass(frozen=True, slots=True)
class Trust:
    """A peer chain that is valid now: the root it ends at, and until when the whole path is valid."""

    root: Fingerprint
    not_after: datetime


def peer_credential(auth_context: Mapping[str, Iterable[bytes]]) -> PeerCredential:
    """The peer's certificate, chain and identity, from the auth context; PeerError unless it is an X.509-SVID
    leaf (a SPIFFE ID, not a CA, digitalSignature)."""
    leaf = peer_certificate(auth_context)
    identity = identity_of(leaf)
    check_leaf_profile(leaf)
    chain: list[x509.Certificate] = []
    for pem in auth_context.get("x509_pem_cert_chain") or []:
        try:
            chain.extend(x509.load_pem_x509_certificates(pem))
        except ValueError as err:
            raise PeerError(f"the peer certificate chain cannot be read ({err})") from None
    return PeerCredential(leaf, tuple(c for c in chain if c != leaf), identity)


def peer_certificate(auth_context: Mapping[str, Iterable[bytes]]) -> x509.Certificate:
    """The client certificate that the TLS handshake verified."""
    pems = list(auth_context.get("x509_pem_cert") or [])
    if not pems:
        raise PeerError("the peer presented no client certificate")
    try:
        return x509.load_pem_x509_certificate(pems[0])
    except ValueError as err:
        raise PeerError(f"the peer certificate cannot be read ({err})") from None


def peer_identity(auth_context: Mapping[str, Iterable[bytes]]) -> SpiffeId:
    """The SPIFFE ID of the peer certificate that the TLS handshake verified."""
    return identity_of(peer_certificate(auth_context))


def identity_of(cert: x509.Certificate) -> SpiffeId:
    try:
        return spiffe_id_of(cert)
    except (ValueError, InvalidSpiffeIdError) as err:
        raise PeerError(f"the peer certificate is not an X.509-SVID: {err}") from None


def check_leaf_profile(cert: x509.Certificate) -> None:
    """PeerError unless ``cert`` has the X.509-SVID leaf profile: CA false, key usage with digitalSignature and
    without keyCertSign or cRLSign (a CA certificate is never a workload's identity)."""
    problem = "the peer certificate is not an X.509-SVID leaf: "
    if is_ca(cert):
        raise PeerError(problem + "it is a CA certificate")
    try:
        usage = cert.extensions.get_extension_for_class(x509.KeyUsage).value
    except x509.ExtensionNotFound:
        raise PeerError(problem + "its key usage lacks digitalSignature") from None
    if usage.key_cert_sign:
        raise PeerError(problem + "its key usage allows keyCertSign")
    if usage.crl_sign:
        raise PeerError(problem + "its key usage allows cRLSign")
    if not usage.digital_signature:
        raise PeerError(problem + "its key usage lacks digitalSignature")


def trust_of(credential: PeerCredential, roots: Sequence[x509.Certificate], now: datetime) -> Trust:
    """Check the peer's chain against ``roots`` at ``now``: it must lead from the leaf, through the presented
    intermediates (CAs, each signing the one below), to one of ``roots``, every certificate on the way (the root
    too) valid at ``now``. PeerError says why not."""
    path = _path(credential, roots)
    if path is None:
        raise PeerError("the peer certificate does not chain to any root of the current trust bundle")
    for cert in path:
        if now > cert.not_valid_after_utc:
            at = f"{cert.not_valid_after_utc:%Y-%m-%dT%H:%M:%SZ}"
            if cert is credential.leaf:
                raise PeerError(f"the peer certificate expired at {at}")
            raise PeerError(
                f"the peer's certificate chain expired at {at} "
                f"({cert.subject.rfc4514_string()!r} is not valid after then)"
            )
        if now < cert.not_valid_before_utc:
            raise PeerError(
                f"{'the peer certificate' if cert is credential.leaf else repr(cert.subject.rfc4514_string())} "
                f"is not valid before {cert.not_valid_before_utc:%Y-%m-%dT%H:%M:%SZ}"
            )
    return Trust(fingerprint_of(path[-1]), min(cert.not_valid_after_utc for cert in path))


def _path(credential: PeerCredential, roots: Sequence[x509.Certificate]) -> list[x509.Certificate] | None:
    """Leaf, intermediates and root, each signed by the next; None when no root of ``roots`` is reached."""
    path = [credential.leaf]
    pool = list(credential.intermediates)
    while True:
        current = path[-1]
        for root in roots:
            if _issued_by(current, root):
                return [*path, root]
        issuer = next((c for c in pool if is_ca(c) and _issued_by(current, c)), None)
        if issuer is None:
            return None
        pool.remove(issuer)
        path.append(issuer)


def _issued_by(cert: x509.Certificate, issuer: x509.Certificate) -> bool:
    try:
        cert.verify_directly_issued_by(issuer)
    except (ValueError, TypeError, InvalidSignature):
        return False
    return True


def tls_secret_name(identity: SpiffeId) -> str:
    """Name of the SDS secret holding the certificate and key of ``identity``."""
    return str(identity)


def bundle_secret_name(trust_domain: TrustDomain) -> str:
    """Name of the SDS secret holding the trust bundle (validation context) of ``trust_domain``."""
    return str(trust_domain.id)


def is_bundle_secret_name(name: str) -> bool:
    try:
        spiffe_id = SpiffeId.parse(name)
    except InvalidSpiffeIdError:
        return False
    return spiffe_id.path == ""


class Authorizer(Protocol):
    """Decides what an authenticated identity may receive. Both methods return None to allow, else why not."""

    def node_denied(self, identity: SpiffeId, node_id: str) -> str | None:
        """May ``identity`` open streams as proxy ``node_id``?"""
        ...

    def resource_denied(self, identity: SpiffeId, node_id: str, type_url: str, name: str) -> str | None:
        """May ``identity``, speaking as ``node_id``, receive resource ``name`` of ``type_url``?"""
        ...


class BindingAuthorizer:
    """Each node id is bound to one identity; a proxy gets its own certificate secret and any trust bundle.

    ``binding`` maps a node id to the identity it belongs to (a mapping, or a function returning None for
    an unknown node). Non-secret resources are allowed: they come from the node's own snapshot.
    """

    def __init__(self, binding: Mapping[str, SpiffeId] | Callable[[str], SpiffeId | None]) -> None:
        self._lookup: Callable[[str], SpiffeId | None] = binding.get if isinstance(binding, Mapping) else binding

    def node_denied(self, identity: SpiffeId, node_id: str) -> str | None:
        owner = self._lookup(node_id)
        if owner is None:
            return f"node {node_id!r} is not a proxy of this mesh"
        if owner != identity:
            return f"node {node_id!r} belongs to {owner}, not to {identity}"
        return None

    def resource_denied(self, identity: SpiffeId, node_id: str, type_url: str, name: str) -> str | None:
        if type_url != SECRET or name == tls_secret_name(identity) or is_bundle_secret_name(name):
            return None
        return f"secret {name!r} is not the certificate of {identity}"
