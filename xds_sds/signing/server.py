"""The signing API's gRPC server: two listeners on one event loop in a background thread.

* The **signing listener** (``signing.listen``) speaks mutual TLS: a client certificate chaining to the trust
  bundle is required by the handshake (:class:`~xds_sds.protocol.credentials.ServerTls`), and every call checks
  the peer's certificate again, as the xDS server does: the X.509-SVID leaf profile, its validity now and its
  chain to the *current* roots (:func:`~xds_sds.protocol.auth.trust_of`), so a resumed session or an old
  connection of an expired certificate, or one whose root was retired, gets ``UNAUTHENTICATED``. It serves
  SignX509, SignJwt and FetchBundle; Attest there is refused (``FAILED_PRECONDITION``: attest on the attestation
  listener, or renew with SignX509).
* The **attestation listener** (``signing.attest_listen``) speaks server-authenticated TLS
  (:class:`~xds_sds.signing.tls.AttestTls`, whose docstring says why it takes no client certificate) and serves
  Attest only; every other RPC is refused there (``UNAUTHENTICATED``: it needs an SVID over mutual TLS).

Both present the control plane's own SVID and take a rotated one on the next handshake. Requests are bounded:
gRPC refuses messages larger than ``max_message`` bytes (``RESOURCE_EXHAUSTED``) before any handler runs; at
most ``max_concurrent_rpcs`` calls run per listener (gRPC answers ``RESOURCE_EXHAUSTED`` beyond). Work that
blocks (the join-token store, TokenReview, an upstream CA in per-workload mode) runs on a pool of ``workers``
threads, Attest at most ``max_attestations`` at a time; CPU work (checking a CSR and signing it locally, a
JWT-SVID, the bundle) runs on the event loop, one call after another: on threads it would run no faster (the
GIL) and each call would queue for the GIL behind the loop (measured: half the throughput). A call's deadline is
respected: one that has passed when its work would start is refused with ``DEADLINE_EXCEEDED`` (nothing is
issued), and a TokenReview gets the time left as its timeout.
Every refusal here is audited through the :class:`~xds_sds.signing.signer.Signer`, like its own decisions; each
call is counted and timed (:class:`~xds_sds.signing.metrics.SigningMetrics`).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import threading
import time
from collections.abc import Callable
from datetime import timedelta
from typing import Any, TypeVar

import grpc

from mesh_identity.spiffe import SpiffeId
from xds_sds.proto import signing_pb2, signing_pb2_grpc
from xds_sds.protocol.auth import PeerError, identity_of, peer_certificate
from xds_sds.protocol.credentials import ServerTls
from xds_sds.signing.metrics import SigningMetrics
from xds_sds.signing.peers import PeerCheck
from xds_sds.signing.signer import BundleView, Caller, Issued, Refusal, Signer, expiry_seconds
from xds_sds.signing.tls import AttestTls
from xds_sds.signing.tokenreview import MAX_TOKEN_CHARS

log = logging.getLogger(__name__)

T = TypeVar("T")
Context = grpc.aio.ServicerContext[Any, Any]

DEFAULT_MAX_CONCURRENT_RPCS = 1024
DEFAULT_WORKERS = 8
DEFAULT_MAX_ATTESTATIONS = 16
DEFAULT_MAX_CONNECTION_AGE = timedelta(minutes=30)
BASE_OPTIONS: tuple[tuple[str, int], ...] = (
    ("grpc.keepalive_time_ms", 30_000),
    ("grpc.keepalive_timeout_ms", 10_000),
    ("grpc.http2.min_ping_interval_without_data_ms", 10_000),
    ("grpc.max_connection_age_grace_ms", 60_000),
    ("grpc.so_reuseport", 0),
)


def max_message_for(max_csr_bytes: int) -> int:
    """The largest request message taken: a CSR of ``max_csr_bytes`` with the largest Kubernetes token, and room
    for the other fields."""
    return max_csr_bytes + MAX_TOKEN_CHARS + 4096


class SigningServer:
    """See the module docstring.

    :param signer: decides, issues and audits. :param tls: the signing listener's mutual TLS (the server's SVID
        and the roots client certificates must chain to). :param attest_tls: the attestation listener's TLS.
    :param listen: ``host:port`` of the signing listener; ``attest_listen`` of the attestation listener (port 0:
        a free one, see :attr:`port` and :attr:`attest_port`).
    :param max_connection_age: connections are recycled after this long (a GOAWAY; the client reconnects with a
        new handshake and meets the server's current certificate).
    :param local_signing: the Authority signs in this process (intermediate mode), so SignX509 runs on the event
        loop; False (per-workload mode: every SVID is signed upstream, over the network): on a worker thread.
    """

    def __init__(
        self,
        signer: Signer,
        tls: ServerTls,
        attest_tls: AttestTls,
        *,
        listen: str = "127.0.0.1:0",
        attest_listen: str = "127.0.0.1:0",
        metrics: SigningMetrics | None = None,
        max_message: int | None = None,
        max_concurrent_rpcs: int = DEFAULT_MAX_CONCURRENT_RPCS,
        workers: int = DEFAULT_WORKERS,
        max_attestations: int = DEFAULT_MAX_ATTESTATIONS,
        max_connection_age: timedelta = DEFAULT_MAX_CONNECTION_AGE,
        local_signing: bool = True,
    ) -> None:
        self.signer = signer
        self.blocking_issue = not local_signing
        self.tls = tls
        self.attest_tls = attest_tls
        self.metrics = metrics if metrics is not None else SigningMetrics()
        self._listen = listen
        self._attest_listen = attest_listen
        self.max_message = max_message if max_message is not None else max_message_for(signer.max_csr_bytes)
        self.max_concurrent_rpcs = max_concurrent_rpcs
        self._workers = workers
        self._max_attestations = max_attestations
        age_ms = max(1, int(max_connection_age.total_seconds() * 1000))
        self.options: tuple[tuple[str, int], ...] = (
            *BASE_OPTIONS,
            ("grpc.max_receive_message_length", self.max_message),
            ("grpc.max_connection_age_ms", age_ms),
        )
        self.port = 0
        self.attest_port = 0
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop_event: asyncio.Event | None = None
        self._grace: float | None = None
        self._pool: concurrent.futures.ThreadPoolExecutor | None = None
        self._attesting: asyncio.Semaphore | None = None
        self._peers = PeerCheck()

    # -- lifecycle -------------------------------------------------------------------------------------------

    def start(self, timeout: float = 30.0) -> tuple[int, int]:
        """Listen on both addresses; returns the bound ports (signing, attestation). Raises when one cannot be
        bound (neither is then left listening)."""
        if self._thread is not None:
            raise RuntimeError("the signing server is already running")
        ready = threading.Event()
        failure: list[BaseException] = []
        self._pool = concurrent.futures.ThreadPoolExecutor(self._workers, thread_name_prefix="signing")
        self._thread = threading.Thread(target=self._main, args=(ready, failure), name="signing-server", daemon=True)
        self._thread.start()
        if not ready.wait(timeout):
            raise RuntimeError("the signing server did not start")
        if failure:
            self._thread.join()
            self._thread = None
            self._pool.shutdown(wait=True)
            self._pool = None
            raise failure[0]
        return self.port, self.attest_port

    def stop(self, grace: float | None = 1.0) -> None:
        """Stop both listeners; calls still running are cancelled after ``grace`` seconds (at once when None)."""
        thread, loop, stop_event = self._thread, self._loop, self._stop_event
        if thread is None or loop is None or stop_event is None:
            return
        self._grace = grace
        loop.call_soon_threadsafe(stop_event.set)
        thread.join()
        self._thread = None
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None

    def __enter__(self) -> SigningServer:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop(None)

    @property
    def target(self) -> str:
        """``host:port`` of the signing listener (mutual TLS)."""
        return f"{self._listen.rsplit(':', 1)[0]}:{self.port}"

    @property
    def attest_target(self) -> str:
        """``host:port`` of the attestation listener (server-authenticated TLS)."""
        return f"{self._attest_listen.rsplit(':', 1)[0]}:{self.attest_port}"

    def _main(self, ready: threading.Event, failure: list[BaseException]) -> None:
        try:
            asyncio.run(self._serve(ready))
        except BaseException as err:  # reported to start() when it happens before ready
            if not ready.is_set():
                failure.append(err)
                ready.set()
            else:
                log.exception("the signing server stopped with an error")

    async def _serve(self, ready: threading.Event) -> None:
        options = list(self.options)
        signing = grpc.aio.server(options=options, maximum_concurrent_rpcs=self.max_concurrent_rpcs)
        attest = grpc.aio.server(options=options, maximum_concurrent_rpcs=self.max_concurrent_rpcs)
        signing_pb2_grpc.add_SigningServicer_to_server(_SigningListener(self), signing)
        signing_pb2_grpc.add_SigningServicer_to_server(_AttestListener(self), attest)
        port = signing.add_secure_port(self._listen, self.tls.credentials())
        if port == 0:
            raise OSError(f"cannot listen on {self._listen} (signing.listen)")
        attest_port = attest.add_secure_port(self._attest_listen, self.attest_tls.credentials())
        if attest_port == 0:
            raise OSError(f"cannot listen on {self._attest_listen} (signing.attest_listen)")
        await signing.start()
        try:
            await attest.start()
        except BaseException:
            await signing.stop(None)
            raise
        self.port, self.attest_port = port, attest_port
        self._loop = asyncio.get_running_loop()
        self._stop_event = asyncio.Event()
        self._attesting = asyncio.Semaphore(self._max_attestations)
        log.info("signing API listening on %s (mutual TLS) and %s (attestation, TLS)", self.target, self.attest_target)
        ready.set()
        await self._stop_event.wait()
        await asyncio.gather(attest.stop(self._grace), signing.stop(self._grace))
        self._loop = None

    # -- calls -----------------------------------------------------------------------------------------------

    async def call(
        self,
        rpc: str,
        context: Context,
        work: Callable[[SpiffeId | None, float | None], T],
        *,
        mtls: bool,
        blocking: bool = True,
    ) -> T:
        """Run ``work``, counted and timed; a :class:`Refusal` aborts the call with its status. ``work`` is given
        the caller's SPIFFE ID (``mtls``: from its certificate, checked now; else None) and the seconds left
        before the call's deadline (None without one). ``blocking`` work (files, the network) runs on a worker
        thread; other work runs here, on the event loop: it is CPU work (checking a CSR and signing), which a
        thread would only do while holding the GIL, after queueing for it behind the loop."""
        started = time.monotonic()
        code = grpc.StatusCode.OK
        self.metrics.in_flight.inc()
        try:
            remaining = context.time_remaining()
            deadline = None if remaining is None else started + remaining
            caller = self.peer_of(rpc, context) if mtls else None
            if blocking:
                result = await self._run(caller, work, deadline)
            else:
                result = _LATE if remaining is not None and remaining <= 0 else work(caller, remaining)
            if isinstance(result, _Late):
                who = str(caller) if caller is not None else "anonymous"
                raise self.signer.refuse(
                    rpc,
                    Caller(who, "svid" if mtls else "none", context.peer()),
                    "",
                    grpc.StatusCode.DEADLINE_EXCEEDED,
                    "the call's deadline passed before its turn; nothing was issued",
                )
            return result
        except Refusal as refusal:
            code = refusal.code
            await context.abort(refusal.code, refusal.message)
            raise  # abort() raises; never reached
        except asyncio.CancelledError:
            code = grpc.StatusCode.CANCELLED
            raise
        except Exception:
            code = grpc.StatusCode.INTERNAL
            log.exception("the signing API failed on %s", rpc)
            failed = Caller(_who(context), "none", context.peer())
            self.signer.refuse(rpc, failed, "", code, "internal error")
            await context.abort(code, "internal error in the signing API (see the server's log)")
            raise
        finally:
            self.metrics.in_flight.dec()
            self.metrics.observe(rpc, code.name, time.monotonic() - started)

    async def _run(
        self, caller: SpiffeId | None, work: Callable[[SpiffeId | None, float | None], T], deadline: float | None
    ) -> T | _Late:
        loop = asyncio.get_running_loop()
        pool = self._pool
        if pool is None:
            raise Refusal(grpc.StatusCode.UNAVAILABLE, "the signing API is stopping")

        def run() -> T | _Late:
            left = None if deadline is None else deadline - time.monotonic()
            if left is not None and left <= 0:
                return _LATE
            return work(caller, left)

        return await loop.run_in_executor(pool, run)

    async def attestation(self, context: Context, work: Callable[[SpiffeId | None, float | None], T]) -> T:
        """:meth:`call` for Attest: at most ``max_attestations`` at a time (the others wait, within their
        deadline)."""
        semaphore = self._attesting
        assert semaphore is not None
        async with semaphore:
            return await self.call("Attest", context, work, mtls=False)

    def peer_of(self, rpc: str, context: Context) -> SpiffeId:
        """The SPIFFE ID of the peer's SVID, checked now against the current roots; Refusal (audited) else."""
        try:
            return self._peers.identity(context.auth_context(), self.tls.client_roots, self.signer.clock())
        except PeerError as err:
            caller = Caller(_who(context), "svid", context.peer())
            raise self.signer.refuse(rpc, caller, "", grpc.StatusCode.UNAUTHENTICATED, str(err)) from None

    async def refuse(self, rpc: str, context: Context, credential: str, code: grpc.StatusCode, message: str) -> None:
        """Refuse a call outright (counted, timed, audited)."""
        self.metrics.observe(rpc, code.name, 0.0)
        self.signer.refuse(rpc, Caller(_who(context), credential, context.peer()), "", code, message)
        await context.abort(code, message)


class _Late:
    """A call whose deadline passed while it waited for a worker."""


_LATE = _Late()


def _who(context: Context) -> str:
    """The SPIFFE ID of a refused peer's certificate when it showed one, else ``anonymous``."""
    try:
        return str(identity_of(peer_certificate(context.auth_context())))
    except PeerError:
        return "anonymous"


def x509_response(issued: Issued) -> signing_pb2.X509Response:
    return signing_pb2.X509Response(
        spiffe_id=str(issued.spiffe_id), cert_chain=list(issued.cert_chain), bundle=bundle_message(issued.bundle)
    )


def bundle_message(view: BundleView) -> signing_pb2.Bundle:
    return signing_pb2.Bundle(
        trust_domain=view.trust_domain,
        x509_authorities=list(view.x509_authorities),
        jwks=view.jwks,
        sequence=view.sequence,
        refresh_hint_seconds=int(view.refresh_hint.total_seconds()),
    )


class _SigningListener(signing_pb2_grpc.SigningServicer):
    """The signing listener (mutual TLS): SignX509, SignJwt, FetchBundle for the caller's SVID."""

    def __init__(self, server: SigningServer) -> None:
        self._server = server

    async def Attest(self, request: signing_pb2.AttestRequest, context: Context) -> signing_pb2.X509Response:
        await self._server.refuse(
            "Attest",
            context,
            "svid",
            grpc.StatusCode.FAILED_PRECONDITION,
            "Attest is served on the attestation listener only; a caller with an SVID renews with SignX509",
        )
        raise AssertionError("abort() raises")

    async def SignX509(self, request: signing_pb2.SignX509Request, context: Context) -> signing_pb2.X509Response:
        server = self._server
        peer = context.peer()

        def work(caller: SpiffeId | None, left: float | None) -> Issued:
            assert caller is not None
            return server.signer.sign_x509(caller, request.spiffe_id, request.csr, peer)

        return x509_response(await server.call("SignX509", context, work, mtls=True, blocking=server.blocking_issue))

    async def SignJwt(self, request: signing_pb2.SignJwtRequest, context: Context) -> signing_pb2.JwtResponse:
        server = self._server
        peer = context.peer()

        def work(caller: SpiffeId | None, left: float | None) -> signing_pb2.JwtResponse:
            assert caller is not None
            svid = server.signer.sign_jwt(caller, request.spiffe_id, list(request.audience), request.ttl_seconds, peer)
            return signing_pb2.JwtResponse(
                spiffe_id=str(svid.spiffe_id), token=svid.token, expires_at=expiry_seconds(svid.expiry)
            )

        return await server.call("SignJwt", context, work, mtls=True, blocking=False)

    async def FetchBundle(self, request: signing_pb2.BundleRequest, context: Context) -> signing_pb2.Bundle:
        server = self._server
        peer = context.peer()

        def work(caller: SpiffeId | None, left: float | None) -> signing_pb2.Bundle:
            assert caller is not None
            return bundle_message(server.signer.fetch_bundle(caller, peer))

        return await server.call("FetchBundle", context, work, mtls=True, blocking=False)


class _AttestListener(signing_pb2_grpc.SigningServicer):
    """The attestation listener (server-authenticated TLS): Attest only."""

    def __init__(self, server: SigningServer) -> None:
        self._server = server

    async def Attest(self, request: signing_pb2.AttestRequest, context: Context) -> signing_pb2.X509Response:
        server = self._server
        peer = context.peer()
        kind = request.WhichOneof("credential")
        if kind == "join_token":
            token = request.join_token

            def work(caller: SpiffeId | None, left: float | None) -> Issued:
                return server.signer.attest_join(token, request.csr, peer)
        elif kind == "kubernetes_token":
            token = request.kubernetes_token

            def work(caller: SpiffeId | None, left: float | None) -> Issued:
                return server.signer.attest_kubernetes(token, request.csr, peer, left)
        else:
            await server.refuse(
                "Attest",
                context,
                "none",
                grpc.StatusCode.UNAUTHENTICATED,
                "the request carries no credential (join_token or kubernetes_token)",
            )
            raise AssertionError("abort() raises")
        return x509_response(await server.attestation(context, work))

    async def SignX509(self, request: signing_pb2.SignX509Request, context: Context) -> signing_pb2.X509Response:
        await self._refuse("SignX509", context)
        raise AssertionError("abort() raises")

    async def SignJwt(self, request: signing_pb2.SignJwtRequest, context: Context) -> signing_pb2.JwtResponse:
        await self._refuse("SignJwt", context)
        raise AssertionError("abort() raises")

    async def FetchBundle(self, request: signing_pb2.BundleRequest, context: Context) -> signing_pb2.Bundle:
        await self._refuse("FetchBundle", context)
        raise AssertionError("abort() raises")

    async def _refuse(self, rpc: str, context: Context) -> None:
        await self._server.refuse(
            rpc,
            context,
            "none",
            grpc.StatusCode.UNAUTHENTICATED,
            f"{rpc} needs the caller's SVID over mutual TLS on the signing listener; the attestation listener "
            "serves Attest only",
        )
