"""The SPIFFE Workload API (the SPIFFE Workload API and Workload Endpoint specifications), served by hand as the
service ``SpiffeWorkloadAPI`` with our own messages (:mod:`xds_sds.proto.workload_pb2`).

Every call must carry the metadata ``workload.spiffe.io: true``, else ``INVALID_ARGUMENT`` (a hardening against
server-side request forgery). The caller is the process the relay attested at accept
(:class:`~xds_sds.agent.relay.Callers`); the entries it matches grant it its identities, the first being its
default one. A caller that matches no entry gets ``PERMISSION_DENIED`` on every call.

* ``FetchX509SVID`` streams the complete current set of the caller's valid X.509-SVIDs: each SVID's chain (DER,
  leaf first, concatenated), its key (PKCS#8 DER) and the trust domain's roots (DER, concatenated); a new
  message whenever that set changes (a rotation, a new bundle, an expiry). The first message comes as soon as
  one SVID is there. When every SVID of a caller that had some has expired (the control plane has been away
  too long) the stream ends ``UNAVAILABLE``: the client retries, and stops using what it had.
* ``FetchX509Bundles`` and ``FetchJWTBundles`` stream the bundles (X.509 roots; JWKS with the ``jwt-svid`` keys
  only), keyed by the trust domain's ID (``spiffe://example.org``), again on every change.
* ``FetchJWTSVID`` gives a JWT-SVID for each of the caller's identities (or the one it names, which it must
  hold), for the audience asked for (required: ``INVALID_ARGUMENT`` without).
* ``ValidateJWTSVID`` validates a token per the JWT-SVID spec against the trust domain's JWT bundle
  (:func:`mesh_identity.jwtsvid.validate_jwt_svid`): ``INVALID_ARGUMENT`` naming what is wrong, else its
  SPIFFE ID and claims.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Callable, Sequence
from datetime import timedelta
from typing import Any, NoReturn, TypeVar

import grpc
from cryptography.hazmat.primitives import serialization
from google.protobuf import struct_pb2
from google.protobuf.message import Message

from mesh_identity.errors import InvalidSpiffeIdError
from mesh_identity.jwtsvid import JwtSvid, JwtSvidError, validate_jwt_svid
from mesh_identity.spiffe import SpiffeId
from mesh_identity.svid import TrustBundle, X509Svid
from xds_sds.agent.client import ControlPlaneError
from xds_sds.agent.issued import IssuedError
from xds_sds.agent.keeper import Keeper, KeeperError, check_audience
from xds_sds.agent.metrics import AgentMetrics
from xds_sds.agent.relay import Callers
from xds_sds.agent.selectors import Entry, granted
from xds_sds.proto import workload_pb2

log = logging.getLogger(__name__)

SERVICE = "SpiffeWorkloadAPI"
HEADER = "workload.spiffe.io"
HEADER_VALUE = "true"
REFRESH_NOT_WITHIN = timedelta(seconds=5)  # a token with an unknown key fetches the bundle at most this often

Resp = TypeVar("Resp", bound=Message)
Context = grpc.aio.ServicerContext[Any, Any]


class _Refused(Exception):
    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


def _chain_der(svid: X509Svid) -> bytes:
    return b"".join(cert.public_bytes(serialization.Encoding.DER) for cert in (svid.leaf, *svid.chain))


def _key_der(svid: X509Svid) -> bytes:
    key = svid.private_key
    assert key is not None  # the agent made every key it serves
    return key.private_bytes(
        serialization.Encoding.DER, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def _roots_der(bundle: TrustBundle) -> bytes:
    return b"".join(cert.public_bytes(serialization.Encoding.DER) for cert in bundle.authorities)


class WorkloadApi:
    """The service's methods over a :class:`~xds_sds.agent.keeper.Keeper`, for the callers of ``callers``."""

    def __init__(self, keeper: Keeper, callers: Callers, entries: Sequence[Entry], metrics: AgentMetrics) -> None:
        self.keeper = keeper
        self.callers = callers
        self.entries = tuple(entries)
        self.metrics = metrics
        self._encoded: dict[str, workload_pb2.X509SVID] = {}  # by fingerprint: DER encodings made once

    def handler(self) -> grpc.GenericRpcHandler:
        """The generic handler to add to a ``grpc.aio`` server (paths ``/SpiffeWorkloadAPI/<Method>``)."""
        w = workload_pb2
        handlers: dict[str, grpc.RpcMethodHandler[Any, Any]] = {
            "FetchX509SVID": grpc.unary_stream_rpc_method_handler(
                self.fetch_x509_svid, w.X509SVIDRequest.FromString, w.X509SVIDResponse.SerializeToString
            ),
            "FetchX509Bundles": grpc.unary_stream_rpc_method_handler(
                self.fetch_x509_bundles, w.X509BundlesRequest.FromString, w.X509BundlesResponse.SerializeToString
            ),
            "FetchJWTSVID": grpc.unary_unary_rpc_method_handler(
                self.fetch_jwt_svid, w.JWTSVIDRequest.FromString, w.JWTSVIDResponse.SerializeToString
            ),
            "FetchJWTBundles": grpc.unary_stream_rpc_method_handler(
                self.fetch_jwt_bundles, w.JWTBundlesRequest.FromString, w.JWTBundlesResponse.SerializeToString
            ),
            "ValidateJWTSVID": grpc.unary_unary_rpc_method_handler(
                self.validate_jwt_svid,
                w.ValidateJWTSVIDRequest.FromString,
                w.ValidateJWTSVIDResponse.SerializeToString,
            ),
        }
        return grpc.method_handlers_generic_handler(SERVICE, handlers)

    # -- admission ----------------------------------------------------------------------------------------

    def _admit(self, context: Context) -> tuple[SpiffeId, ...]:
        """The caller's identities; _Refused for a call without the header, an unknown caller, or no entry."""
        metadata = context.invocation_metadata() or ()
        if not any(key == HEADER and value == HEADER_VALUE for key, value in metadata):
            raise _Refused(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"the security header is missing: every Workload API call must carry the metadata {HEADER}: "
                f"{HEADER_VALUE}",
            )
        caller = self.callers.lookup(context.peer())
        if caller is None:
            raise _Refused(grpc.StatusCode.PERMISSION_DENIED, "the caller was not attested")
        grants = granted(self.entries, caller.selectors)
        if not grants:
            log.info("Workload API: no entry matches %s", caller.describe())
            raise _Refused(
                grpc.StatusCode.PERMISSION_DENIED,
                f"no registration entry matches this caller ({caller.describe()})",
            )
        return grants

    async def _refuse(self, method: str, context: Context, refused: _Refused) -> NoReturn:
        self.metrics.calls.labels(method, refused.code.name).inc()
        await context.abort(refused.code, refused.message)
        raise AssertionError("abort() raises")  # pragma: no cover

    # -- streams --------------------------------------------------------------------------------------------

    async def _stream(
        self, method: str, context: Context, build: Callable[[tuple[SpiffeId, ...]], Resp | None]
    ) -> AsyncIterator[Resp]:
        """Send ``build(grants)`` whenever it differs from what was sent last; None means "nothing to send
        yet". ``build`` raises _Refused to end the stream."""
        try:
            grants = self._admit(context)
        except _Refused as refused:
            await self._refuse(method, context, refused)
        wake = asyncio.Event()
        unsubscribe = self.keeper.subscribe(wake.set)
        gauge = self.metrics.streams.labels(method)
        gauge.inc()
        last: bytes | None = None
        try:
            while True:
                wake.clear()
                try:
                    message = build(grants)
                except _Refused as refused:
                    unsubscribe()
                    await self._refuse(method, context, refused)
                if message is not None:
                    data = message.SerializeToString(deterministic=True)
                    if data != last:
                        last = data
                        yield message
                await wake.wait()
        finally:
            unsubscribe()
            gauge.dec()

    async def fetch_x509_svid(
        self, request: workload_pb2.X509SVIDRequest, context: Context
    ) -> AsyncIterator[workload_pb2.X509SVIDResponse]:
        sent = [False]

        def build(grants: tuple[SpiffeId, ...]) -> workload_pb2.X509SVIDResponse | None:
            svids = self.keeper.valid(grants)
            if not svids:
                if sent[0]:
                    raise _Refused(
                        grpc.StatusCode.UNAVAILABLE,
                        "no valid X.509-SVID for this caller now: every one expired while renewals failed",
                    )
                return None
            sent[0] = True
            return workload_pb2.X509SVIDResponse(svids=[self._encode(svid) for svid in svids])

        async for message in self._stream("FetchX509SVID", context, build):
            yield message

    def _encode(self, svid: X509Svid) -> workload_pb2.X509SVID:
        bundle = self.keeper.bundle or svid.bundle
        encoded = self._encoded.get(svid.fingerprint)
        if encoded is None:
            if len(self._encoded) >= 4 * (len(self.keeper.config.identities) + 1):
                self._encoded.clear()
            encoded = self._encoded[svid.fingerprint] = workload_pb2.X509SVID(
                spiffe_id=str(svid.spiffe_id), x509_svid=_chain_der(svid), x509_svid_key=_key_der(svid)
            )
        message = workload_pb2.X509SVID()
        message.CopyFrom(encoded)
        message.bundle = _roots_der(bundle)
        return message

    async def fetch_x509_bundles(
        self, request: workload_pb2.X509BundlesRequest, context: Context
    ) -> AsyncIterator[workload_pb2.X509BundlesResponse]:
        def build(grants: tuple[SpiffeId, ...]) -> workload_pb2.X509BundlesResponse | None:
            bundle = self.keeper.bundle
            if bundle is None:
                return None
            return workload_pb2.X509BundlesResponse(bundles={str(bundle.trust_domain.id): _roots_der(bundle)})

        async for message in self._stream("FetchX509Bundles", context, build):
            yield message

    async def fetch_jwt_bundles(
        self, request: workload_pb2.JWTBundlesRequest, context: Context
    ) -> AsyncIterator[workload_pb2.JWTBundlesResponse]:
        def build(grants: tuple[SpiffeId, ...]) -> workload_pb2.JWTBundlesResponse | None:
            jwks = self.keeper.jwks
            if jwks is None:
                return None
            return workload_pb2.JWTBundlesResponse(bundles={str(self.keeper.trust_domain.id): jwks})

        async for message in self._stream("FetchJWTBundles", context, build):
            yield message

    # -- unary calls ----------------------------------------------------------------------------------------

    async def fetch_jwt_svid(
        self, request: workload_pb2.JWTSVIDRequest, context: Context
    ) -> workload_pb2.JWTSVIDResponse:
        method = "FetchJWTSVID"
        try:
            grants = self._admit(context)
            try:
                audience = check_audience(list(request.audience))
            except ValueError as err:
                raise _Refused(grpc.StatusCode.INVALID_ARGUMENT, str(err)) from None
            wanted = grants
            if request.spiffe_id:
                try:
                    asked = SpiffeId.parse(request.spiffe_id)
                except InvalidSpiffeIdError as err:
                    raise _Refused(grpc.StatusCode.INVALID_ARGUMENT, str(err)) from None
                if asked not in grants:
                    raise _Refused(grpc.StatusCode.PERMISSION_DENIED, f"this caller does not hold {asked}")
                wanted = (asked,)
            try:
                tokens = await asyncio.gather(*(self.keeper.jwt_svid(spiffe_id, audience) for spiffe_id in wanted))
            except KeeperError as err:
                raise _Refused(grpc.StatusCode.UNAVAILABLE, str(err)) from None
        except _Refused as refused:
            await self._refuse(method, context, refused)
        self.metrics.calls.labels(method, "OK").inc()
        return workload_pb2.JWTSVIDResponse(
            svids=[workload_pb2.JWTSVID(spiffe_id=str(i), svid=t) for i, t in zip(wanted, tokens, strict=True)]
        )

    async def validate_jwt_svid(
        self, request: workload_pb2.ValidateJWTSVIDRequest, context: Context
    ) -> workload_pb2.ValidateJWTSVIDResponse:
        method = "ValidateJWTSVID"
        try:
            self._admit(context)
            if not request.audience:
                raise _Refused(grpc.StatusCode.INVALID_ARGUMENT, "audience is required")
            if not request.svid:
                raise _Refused(grpc.StatusCode.INVALID_ARGUMENT, "svid (the token to validate) is required")
            checked = await self._validate(request.svid, request.audience)
        except _Refused as refused:
            await self._refuse(method, context, refused)
        claims = struct_pb2.Struct()
        claims.update(dict(checked.claims))
        self.metrics.calls.labels(method, "OK").inc()
        return workload_pb2.ValidateJWTSVIDResponse(spiffe_id=str(checked.spiffe_id), claims=claims)

    async def _validate(self, token: str, audience: str) -> JwtSvid:
        for attempt in range(2):
            bundle = self.keeper.jwt_bundle
            if bundle is None and not attempt:
                await self._refresh()
                continue
            if bundle is None:
                raise _Refused(grpc.StatusCode.UNAVAILABLE, "no JWT bundle yet: the control plane has not sent it")
            try:
                return validate_jwt_svid(token, audience, {self.keeper.trust_domain: bundle}, self.keeper.now())
            except JwtSvidError as err:
                if attempt or not await self._refresh():  # a key published since the last refresh?
                    raise _Refused(grpc.StatusCode.INVALID_ARGUMENT, str(err)) from None
        raise AssertionError("unreachable")  # pragma: no cover

    async def _refresh(self) -> bool:
        try:
            return await self.keeper.refresh_bundle(REFRESH_NOT_WITHIN)
        except (ControlPlaneError, IssuedError) as err:
            log.info("fetching the bundle for a JWT-SVID validation failed: %s", err)
            return False
