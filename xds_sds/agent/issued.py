"""What the control plane answers, checked before the agent serves any of it.

An X.509-SVID must be for the identity asked for (or, at attestation, one the agent may hold), carry exactly
that SPIFFE ID as its only URI SAN, have the X.509-SVID leaf profile, be for the key the agent made, and chain
to the trust bundle; expiry is read from the certificate. A bundle must be of the agent's trust domain and hold
CA certificates. Anything else is an :class:`IssuedError`, and nothing of that answer is used.
"""

from __future__ import annotations

from datetime import datetime

from cryptography import x509

from mesh_identity.errors import InvalidSpiffeIdError
from mesh_identity.jwtsvid import JwtBundle, JwtSvidError
from mesh_identity.keys import PrivateKey
from mesh_identity.profile import is_ca, same_key, svid_san_problem
from mesh_identity.spiffe import SpiffeId, TrustDomain
from mesh_identity.svid import TrustBundle, X509Svid
from mesh_identity.verify import chain_problem
from xds_sds.proto import signing_pb2
from xds_sds.protocol.auth import PeerError, check_leaf_profile

PROVIDER = "control-plane"
MAX_CHAIN = 10


class IssuedError(Exception):
    """The control plane answered something the agent refuses to use; the message says what."""


def bundle_of(message: signing_pb2.Bundle, trust_domain: TrustDomain) -> TrustBundle:
    """The X.509 roots of a ``Bundle`` message."""
    try:
        named = TrustDomain.parse(message.trust_domain)  # "example.org" or "spiffe://example.org"
    except InvalidSpiffeIdError:
        named = None
    if named != trust_domain:
        raise IssuedError(f"the bundle is for trust domain {message.trust_domain[:255]!r}, not {trust_domain}")
    if not message.x509_authorities:
        raise IssuedError("the bundle holds no X.509 authorities")
    roots: list[x509.Certificate] = []
    for index, der in enumerate(message.x509_authorities):
        try:
            cert = x509.load_der_x509_certificate(der)
        except ValueError:
            raise IssuedError(f"x509_authorities[{index}] of the bundle is not a DER certificate") from None
        if not is_ca(cert):
            raise IssuedError(f"x509_authorities[{index}] of the bundle is not a CA certificate")
        roots.append(cert)
    return TrustBundle(trust_domain, tuple(roots))


def jwt_bundle_of(message: signing_pb2.Bundle, trust_domain: TrustDomain) -> JwtBundle | None:
    """The JWT-SVID signing keys of a ``Bundle`` message (None when it carries no JWKS)."""
    if not message.jwks:
        return None
    try:
        return JwtBundle.from_jwks(trust_domain, bytes(message.jwks))
    except JwtSvidError as err:
        raise IssuedError(f"the bundle's JWKS cannot be read: {err}") from None


def svid_of(
    response: signing_pb2.X509Response,
    key: PrivateKey,
    bundle: TrustBundle,
    now: datetime,
    expected: SpiffeId | None = None,
) -> X509Svid:
    """The X.509-SVID in ``response`` for the agent's ``key``, checked (see the module docstring). ``expected``:
    the identity asked for (None at attestation: the caller checks the identity the server chose)."""
    try:
        spiffe_id = SpiffeId.parse(response.spiffe_id)
    except InvalidSpiffeIdError as err:
        raise IssuedError(f"the answer names no valid SPIFFE ID: {err}") from None
    if expected is not None and spiffe_id != expected:
        raise IssuedError(f"asked for {expected}, the answer is for {spiffe_id}")
    if spiffe_id.trust_domain != bundle.trust_domain:
        raise IssuedError(f"the answer is for {spiffe_id}, outside trust domain {bundle.trust_domain}")
    if not response.cert_chain:
        raise IssuedError(f"the answer for {spiffe_id} holds no certificate")
    if len(response.cert_chain) > MAX_CHAIN:
        raise IssuedError(f"the answer for {spiffe_id} holds {len(response.cert_chain)} certificates")
    chain: list[x509.Certificate] = []
    for index, der in enumerate(response.cert_chain):
        try:
            chain.append(x509.load_der_x509_certificate(der))
        except ValueError:
            raise IssuedError(f"cert_chain[{index}] for {spiffe_id} is not a DER certificate") from None
    leaf, above = chain[0], tuple(chain[1:])
    problem = svid_san_problem(leaf, spiffe_id)
    if problem is not None:
        raise IssuedError(f"the certificate for {spiffe_id} has {problem}")
    try:
        check_leaf_profile(leaf)
    except PeerError as err:
        raise IssuedError(f"the certificate for {spiffe_id}: {err}") from None
    if not same_key(leaf, key.public_key()):
        raise IssuedError(f"the certificate for {spiffe_id} is for another key than the agent's")
    problem = chain_problem(leaf, above, bundle, now)
    if problem is not None:
        raise IssuedError(f"the certificate for {spiffe_id} does not verify: {problem}")
    return X509Svid(spiffe_id, leaf, above, key, bundle, PROVIDER)
