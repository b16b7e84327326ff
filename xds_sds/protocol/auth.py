"""Who is on the other end of a stream, and what it may receive.

The xDS port requires a client certificate that chains to the mesh's trust bundle (the TLS handshake checks
that). The stream's identity is the SPIFFE ID in that certificate's URI SAN, read from the gRPC auth context.
An :class:`Authorizer` then decides which node ids the identity may speak for and which resources it may get.

Secret names follow SPIRE's SDS convention: a workload's ``TlsCertificate`` secret is named by its SPIFFE ID,
a trust bundle (validation context) by its trust domain's ID (``spiffe://example.org``).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Protocol

from cryptography import x509

from mesh_identity.errors import InvalidSpiffeIdError
from mesh_identity.spiffe import SpiffeId, TrustDomain
from mesh_identity.svid import spiffe_id_of
from xds_sds.protocol.typeurls import SECRET


class PeerError(Exception):
    """The peer of a stream cannot be identified (no certificate, no single SPIFFE ID)."""


def peer_certificate(auth_context: Mapping[str, list[bytes]]) -> x509.Certificate:
    """The client certificate that the TLS handshake verified."""
    pems = auth_context.get("x509_pem_cert") or []
    if not pems:
        raise PeerError("the peer presented no client certificate")
    try:
        return x509.load_pem_x509_certificate(pems[0])
    except ValueError as err:
        raise PeerError(f"the peer certificate cannot be read ({err})") from None


def peer_identity(auth_context: Mapping[str, list[bytes]]) -> SpiffeId:
    """The SPIFFE ID of the peer certificate that the TLS handshake verified."""
    return identity_of(peer_certificate(auth_context))


def identity_of(cert: x509.Certificate) -> SpiffeId:
    try:
        return spiffe_id_of(cert)
    except (ValueError, InvalidSpiffeIdError) as err:
        raise PeerError(f"the peer certificate is not an X.509-SVID: {err}") from None


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
