"""What the signing API decides and issues, apart from gRPC: :class:`Signer`.

Every method takes an authenticated caller (or the credential that is to authenticate it), decides, issues, and
audits the decision (one :class:`~mesh_identity.events.SigningDecision` per request, grant or refusal); a
refusal is a :class:`Refusal` with the gRPC status and a message that names what was wrong. The server decides
the SPIFFE ID from the caller, never from the CSR: the CSR's key is all it takes from it, through
:meth:`~mesh_identity.authority.Authority.issue` (which refuses a CSR for another identity, with other names,
badly signed or oversized). The statuses:

* ``UNAUTHENTICATED``: a join token that is unknown, expired, already used or malformed; a Kubernetes token the
  API server does not vouch for (for our audience, as a service account's); no usable SVID;
* ``PERMISSION_DENIED``: an identity the caller may not hold (:mod:`~xds_sds.signing.policy`), a CSR that names
  another identity than the one the caller is issued, a service account that is not a workload of the registry;
* ``INVALID_ARGUMENT``: a CSR with other names, a bad signature, oversized or unparsable; a malformed SPIFFE
  ID, audience or TTL;
* ``UNAVAILABLE``: the CA or the Kubernetes API cannot answer now (retrying may help); ``INTERNAL``: they cannot
  answer until the control plane's configuration changes (a TokenReview the control plane may not make).

Nothing is issued on a refusal: every check runs before the Authority signs (a join token is looked at, the CSR
checked against the identity it buys, and only then is the token used up and the certificate issued).
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Protocol

import grpc
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from mesh_identity.authority import Authority
from mesh_identity.clock import Clock, utcnow
from mesh_identity.errors import CsrError, InvalidSpiffeIdError, IssuanceError, ProviderError
from mesh_identity.events import EventSink, SigningDecision
from mesh_identity.jointokens import PREFIX, JoinTokenError, JoinTokens, token_digest
from mesh_identity.jwtsvid import JwtBundle, JwtSvid, JwtSvidError
from mesh_identity.profile import check_workload_csr, load_csr
from mesh_identity.registry.base import WorkloadRegistry, agent_identity
from mesh_identity.spiffe import SpiffeId
from mesh_identity.svid import TrustBundle, X509Svid, fingerprint_of
from xds_sds.protocol.text import escaped
from xds_sds.signing.policy import denied
from xds_sds.signing.tokenreview import TokenRejected, TokenReviewer, TokenReviewError

MAX_SPIFFE_ID = 2048  # bytes (the SPIFFE ID spec's limit)
MAX_AUDIENCES = 16
MAX_AUDIENCE = 256
MAX_JOIN_TOKEN = 256
DER = serialization.Encoding.DER


class JwtIssuer(Protocol):
    """What the signing API needs of the control plane's JWT keys (:class:`mesh_identity.jwtkeys.JwtAuthority`)."""

    def issue(self, spiffe_id: SpiffeId, audience: Sequence[str], ttl: timedelta | None = None) -> JwtSvid: ...

    def bundle(self) -> JwtBundle: ...


class Refusal(Exception):
    """A request the signing API refuses, with the gRPC status to answer and a message naming what was wrong."""

    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


@dataclass(frozen=True, slots=True)
class Caller:
    """Who is asking, as the audit names it: ``name`` (a SPIFFE ID, ``node <host>``, ``serviceaccount ns/sa``,
    or what was seen of an unauthenticated caller), ``credential`` (``svid``, ``join-token``, ``kubernetes-token``,
    ``none``), ``peer`` (the network address)."""

    name: str
    credential: str
    peer: str


@dataclass(frozen=True, slots=True)
class BundleView:
    """The trust domain's bundle as the API serves it: DER roots, the JWKS document, its sequence number."""

    trust_domain: str
    x509_authorities: tuple[bytes, ...]
    jwks: bytes
    sequence: int
    refresh_hint: timedelta


@dataclass(frozen=True, slots=True)
class Issued:
    """An X.509-SVID issued from a caller's CSR: DER chain (leaf first, no root) and the bundle."""

    spiffe_id: SpiffeId
    cert_chain: tuple[bytes, ...]
    bundle: BundleView
    svid: X509Svid


class Signer:
    """See the module docstring.

    :param authority: issues the X.509-SVIDs (``ttl``: the leaves' lifetime, ``ca.workload_ttl``).
    :param registry: which workloads exist and on which host (read at each request).
    :param tokens: the join tokens. :param reviewer: checks Kubernetes tokens (None: not accepted).
    :param jwt: signs JWT-SVIDs and publishes their keys. :param bundle: the current X.509 trust bundle.
    :param max_csr_bytes: the largest CSR taken (``signing.max_csr_bytes``).
    :param refresh_hint: how often a caller should fetch the bundle again.
    """

    def __init__(
        self,
        authority: Authority,
        registry: WorkloadRegistry,
        *,
        tokens: JoinTokens,
        reviewer: TokenReviewer | None,
        jwt: JwtIssuer,
        bundle: Callable[[], TrustBundle],
        ttl: timedelta,
        max_csr_bytes: int,
        refresh_hint: timedelta = timedelta(minutes=5),
        events: EventSink,
        clock: Clock = utcnow,
    ) -> None:
        self.authority = authority
        self.registry = registry
        self.trust_domain = registry.trust_domain
        self.tokens = tokens
        self.reviewer = reviewer
        self.jwt = jwt
        self._bundle = bundle
        self.ttl = ttl
        self.max_csr_bytes = max_csr_bytes
        self.refresh_hint = refresh_hint
        self.events = events
        self.clock = clock
        self._lock = threading.Lock()
        self._view: tuple[tuple[object, ...], BundleView] | None = None

    # -- Attest ----------------------------------------------------------------------------------------------

    def attest_join(self, token: str, csr: bytes, peer: str) -> Issued:
        """A join token and a CSR for the agent identity of the token's host; the token is used up."""
        caller = Caller(_token_name(token), "join-token", peer)
        self._check_csr_size("Attest", caller, "", csr)
        now = self.clock()
        try:
            host = self.tokens.peek(token, now)
        except JoinTokenError as err:
            raise self.refuse(
                "Attest", caller, "", grpc.StatusCode.UNAUTHENTICATED, f"join token refused: {err}"
            ) from None
        caller = Caller(f"node {host}", "join-token", peer)
        identity = agent_identity(self.trust_domain, host)
        request = self._checked_csr("Attest", caller, identity, csr)
        try:
            self.tokens.redeem(token, now)
        except JoinTokenError as err:  # used by another request since the look
            raise self.refuse(
                "Attest", caller, str(identity), grpc.StatusCode.UNAUTHENTICATED, f"join token refused: {err}"
            ) from None
        return self._issue("Attest", caller, identity, request)

    def attest_kubernetes(self, token: str, csr: bytes, peer: str, timeout: float | None = None) -> Issued:
        """A Kubernetes service-account token and a CSR for that service account's identity, which must be a
        workload of the registry. ``timeout``: seconds the TokenReview may take (the call's deadline)."""
        caller = Caller("kubernetes token", "kubernetes-token", peer)
        self._check_csr_size("Attest", caller, "", csr)
        if self.reviewer is None:
            raise self.refuse(
                "Attest",
                caller,
                "",
                grpc.StatusCode.UNAUTHENTICATED,
                "this control plane takes no Kubernetes tokens (signing.kubernetes is not configured)",
            )
        try:
            account = self.reviewer.review(token, timeout)
        except TokenRejected as err:
            raise self.refuse(
                "Attest", caller, "", grpc.StatusCode.UNAUTHENTICATED, f"Kubernetes token refused: {err}"
            ) from None
        except TokenReviewError as err:
            code = grpc.StatusCode.UNAVAILABLE if err.retryable else grpc.StatusCode.INTERNAL
            raise self.refuse("Attest", caller, "", code, f"the Kubernetes token could not be checked: {err}") from None
        caller = Caller(f"serviceaccount {account}", "kubernetes-token", peer)
        identity = account.spiffe_id
        if identity not in self.registry.current().mesh.identities:
            raise self.refuse(
                "Attest",
                caller,
                str(identity),
                grpc.StatusCode.PERMISSION_DENIED,
                f"{identity} (service account {account}) is not a workload of the registry",
            )
        request = self._checked_csr("Attest", caller, identity, csr)
        return self._issue("Attest", caller, identity, request)

    # -- over mutual TLS -------------------------------------------------------------------------------------

    def sign_x509(self, caller_id: SpiffeId, spiffe_id: str, csr: bytes, peer: str) -> Issued:
        """An X.509-SVID for ``spiffe_id`` from ``csr``, for a caller authenticated by its SVID ``caller_id``."""
        caller = Caller(str(caller_id), "svid", peer)
        identity = self._authorized("SignX509", caller, caller_id, spiffe_id)
        self._check_csr_size("SignX509", caller, str(identity), csr)
        return self._issue("SignX509", caller, identity, csr)

    def sign_jwt(
        self, caller_id: SpiffeId, spiffe_id: str, audience: Sequence[str], ttl_seconds: int, peer: str
    ) -> JwtSvid:
        """A JWT-SVID for ``spiffe_id`` and ``audience`` (``ttl_seconds`` 0: the default lifetime)."""
        caller = Caller(str(caller_id), "svid", peer)
        identity = self._authorized("SignJwt", caller, caller_id, spiffe_id)
        problem = _audience_problem(audience)
        if problem is not None:
            raise self.refuse("SignJwt", caller, str(identity), grpc.StatusCode.INVALID_ARGUMENT, problem)
        ttl = timedelta(seconds=ttl_seconds) if ttl_seconds else None
        try:
            svid = self.jwt.issue(identity, list(audience), ttl)
        except JwtSvidError as err:
            raise self.refuse("SignJwt", caller, str(identity), grpc.StatusCode.INVALID_ARGUMENT, str(err)) from None
        self._audit("SignJwt", caller, str(identity), grpc.StatusCode.OK, "", f"kid {svid.key_id}")
        return svid

    def fetch_bundle(self, caller_id: SpiffeId, peer: str) -> BundleView:
        """The bundle, for any caller with a valid SVID of the trust domain."""
        caller = Caller(str(caller_id), "svid", peer)
        if caller_id.trust_domain != self.trust_domain:
            raise self.refuse(
                "FetchBundle",
                caller,
                "",
                grpc.StatusCode.PERMISSION_DENIED,
                f"{caller_id} is not in trust domain {self.trust_domain}",
            )
        view = self.bundle_view()
        self._audit(
            "FetchBundle", caller, str(self.trust_domain.id), grpc.StatusCode.OK, "", f"sequence {view.sequence}"
        )
        return view

    # -- the bundle ------------------------------------------------------------------------------------------

    def bundle_view(self) -> BundleView:
        """The current bundle; its sequence number grows whenever the roots or the JWT keys change (it starts at
        the clock's seconds, so it keeps growing across restarts)."""
        roots = self._bundle()
        jwt = self.jwt.bundle()
        key = (tuple(fingerprint_of(c) for c in roots.authorities), tuple(sorted(jwt.keys)))
        with self._lock:
            if self._view is not None and self._view[0] == key:
                return self._view[1]
            now = int(self.clock().timestamp())
            sequence = now if self._view is None else max(self._view[1].sequence + 1, now)
            view = BundleView(
                str(self.trust_domain.id),
                tuple(c.public_bytes(DER) for c in roots.authorities),
                jwt.to_jwks(roots.authorities, sequence=sequence, refresh_hint=self.refresh_hint),
                sequence,
                self.refresh_hint,
            )
            self._view = (key, view)
            return view

    # -- audit -----------------------------------------------------------------------------------------------

    def refuse(self, rpc: str, caller: Caller, spiffe_id: str, code: grpc.StatusCode, message: str) -> Refusal:
        """Audit a refusal and return it (to raise)."""
        self._audit(rpc, caller, spiffe_id, code, message)
        return Refusal(code, message)

    def _audit(
        self, rpc: str, caller: Caller, spiffe_id: str, code: grpc.StatusCode, reason: str, serial: str = ""
    ) -> None:
        self.events.emit(
            SigningDecision(
                rpc=rpc,
                caller=caller.name,
                credential=caller.credential,
                spiffe_id=spiffe_id,
                granted=code is grpc.StatusCode.OK,
                code=code.name,
                reason=reason,
                peer=caller.peer,
                at=self.clock(),
                serial=serial,
            )
        )

    # -- checks ----------------------------------------------------------------------------------------------

    def _authorized(self, rpc: str, caller: Caller, caller_id: SpiffeId, spiffe_id: str) -> SpiffeId:
        shown = escaped(spiffe_id, 200)
        if len(spiffe_id.encode()) > MAX_SPIFFE_ID:
            raise self.refuse(
                rpc, caller, shown, grpc.StatusCode.INVALID_ARGUMENT, f"spiffe_id is longer than {MAX_SPIFFE_ID} bytes"
            )
        try:
            identity = SpiffeId.parse(spiffe_id)
        except InvalidSpiffeIdError as err:
            raise self.refuse(rpc, caller, shown, grpc.StatusCode.INVALID_ARGUMENT, f"spiffe_id: {err}") from None
        reason = denied(caller_id, identity, self.registry.current().mesh)
        if reason is not None:
            raise self.refuse(rpc, caller, str(identity), grpc.StatusCode.PERMISSION_DENIED, reason)
        return identity

    def _check_csr_size(self, rpc: str, caller: Caller, spiffe_id: str, csr: bytes) -> None:
        if not csr:
            raise self.refuse(rpc, caller, spiffe_id, grpc.StatusCode.INVALID_ARGUMENT, "csr is empty")
        if len(csr) > self.max_csr_bytes:
            raise self.refuse(
                rpc,
                caller,
                spiffe_id,
                grpc.StatusCode.INVALID_ARGUMENT,
                f"CSR is {len(csr)} bytes, more than the {self.max_csr_bytes} allowed (signing.max_csr_bytes)",
            )

    def _checked_csr(self, rpc: str, caller: Caller, identity: SpiffeId, csr: bytes) -> x509.CertificateSigningRequest:
        """The parsed CSR, when it may be signed for ``identity`` (the checks :meth:`Authority.issue` makes)."""
        try:
            request = load_csr(csr)
            check_workload_csr(request, identity)
        except CsrError as err:
            raise self._csr_refusal(rpc, caller, identity, csr, err) from None
        return request

    def _csr_refusal(self, rpc: str, caller: Caller, identity: SpiffeId, csr: bytes, err: CsrError) -> Refusal:
        other = _other_identity(csr, identity)
        if other is not None:
            return self.refuse(
                rpc,
                caller,
                str(identity),
                grpc.StatusCode.PERMISSION_DENIED,
                f"the CSR names {other}, but the caller may only be issued {identity} (the server decides the "
                "identity, not the CSR)",
            )
        return self.refuse(rpc, caller, str(identity), grpc.StatusCode.INVALID_ARGUMENT, str(err))

    def _issue(
        self, rpc: str, caller: Caller, identity: SpiffeId, csr: bytes | x509.CertificateSigningRequest
    ) -> Issued:
        try:
            svid = self.authority.issue(
                identity, csr=csr, ttl=self.ttl, requested_by=f"signing-api {rpc} {caller.name}"
            )
        except CsrError as err:
            data = csr if isinstance(csr, bytes) else csr.public_bytes(DER)
            raise self._csr_refusal(rpc, caller, identity, data, err) from None
        except ProviderError as err:
            code = grpc.StatusCode.UNAVAILABLE if err.retryable else grpc.StatusCode.INTERNAL
            raise self.refuse(rpc, caller, str(identity), code, f"the CA cannot issue {identity} now: {err}") from None
        except IssuanceError as err:
            raise self.refuse(
                rpc, caller, str(identity), grpc.StatusCode.UNAVAILABLE, f"the CA cannot issue {identity} now: {err}"
            ) from None
        chain = (svid.leaf.public_bytes(DER), *(c.public_bytes(DER) for c in svid.chain))
        view = self.bundle_view()
        self._audit(rpc, caller, str(identity), grpc.StatusCode.OK, "", svid.serial)
        return Issued(identity, chain, view, svid)


def _token_name(token: str) -> str:
    """How the audit names a join token it has not accepted: a prefix of its SHA-256 (never the token)."""
    if not token.startswith(PREFIX) or len(token) > MAX_JOIN_TOKEN:
        return "join token (malformed)"
    return f"join token {token_digest(token)[:12]}"


def _other_identity(csr: bytes, identity: SpiffeId) -> SpiffeId | None:
    """A SPIFFE ID other than ``identity`` that the CSR's SANs name, if any."""
    try:
        request = (
            x509.load_der_x509_csr(csr) if not csr.lstrip().startswith(b"-----BEGIN") else x509.load_pem_x509_csr(csr)
        )
        san = request.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except (ValueError, x509.ExtensionNotFound):
        return None
    for uri in san.get_values_for_type(x509.UniformResourceIdentifier):
        try:
            named = SpiffeId.parse(uri)
        except InvalidSpiffeIdError:
            continue
        if named != identity:
            return named
    return None


def _audience_problem(audience: Sequence[str]) -> str | None:
    if not audience:
        return "audience: at least one is needed"
    if len(audience) > MAX_AUDIENCES:
        return f"audience: {len(audience)} given, at most {MAX_AUDIENCES} are allowed"
    for index, value in enumerate(audience):
        if not value or len(value) > MAX_AUDIENCE or not value.isprintable():
            return f"audience[{index}]: {escaped(value, 64)!r} is not 1 to {MAX_AUDIENCE} printable characters"
    return None


def expiry_seconds(moment: datetime) -> int:
    """Seconds since the epoch (a JWT-SVID's expiry on the wire)."""
    return int(moment.timestamp())
