"""The gRPC side: the aggregated discovery service (SotW and delta), the standalone SDS service, over mTLS.

:class:`DiscoveryServer` runs a ``grpc.aio`` server on its own event loop in a background thread, so that
callers (the CLI, the rotation engine's threads, tests) use plain ``start()`` / ``stop()`` and update the
:class:`~xds_sds.protocol.cache.SnapshotCache` from any thread. The port only speaks TLS with a required client
certificate (:class:`~xds_sds.protocol.credentials.ServerTls`); there is no plaintext option.

Each stream runs one loop: a reader task queues requests, cache changes for the stream's node wake it, and
after each wake the protocol state machine says what to send. A request the server refuses ends the stream
with a gRPC status (``INVALID_ARGUMENT`` for malformed requests, ``UNAUTHENTICATED`` for a peer without a
SPIFFE ID, ``PERMISSION_DENIED`` for a node the peer may not speak for); other streams are unaffected.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
from collections import deque
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass
from typing import Protocol, TypeVar

import grpc
from envoy.service.discovery.v3 import ads_pb2_grpc, discovery_pb2
from envoy.service.secret.v3 import sds_pb2_grpc
from google.protobuf.message import DecodeError, Message

from mesh_identity.events import EventSink, NullSink
from mesh_identity.svid import serial_of
from xds_sds.protocol.acks import AckTracker
from xds_sds.protocol.auth import Authorizer, PeerError, identity_of, peer_certificate
from xds_sds.protocol.cache import SnapshotCache
from xds_sds.protocol.credentials import ServerTls
from xds_sds.protocol.delta import DeltaStream
from xds_sds.protocol.metrics import XdsMetrics
from xds_sds.protocol.session import Env, RequestError, Session
from xds_sds.protocol.sotw import SotwStream
from xds_sds.protocol.typeurls import KNOWN, SECRET

log = logging.getLogger("xds_sds")

Req = TypeVar("Req", bound=Message)
Resp = TypeVar("Resp", bound=Message)
Req_contra = TypeVar("Req_contra", bound=Message, contravariant=True)
Resp_co = TypeVar("Resp_co", bound=Message, covariant=True)

DEFAULT_OPTIONS: tuple[tuple[str, int], ...] = (
    # Thousands of proxies reconnect at once after a restart; gRPC core refuses calls beyond 1,000 waiting
    # for the (single) aio dispatch loop by default, and the clients see INTERNAL errors.
    ("grpc.server.max_pending_requests", 50_000),
    ("grpc.server.max_pending_requests_hard_limit", 50_000),
    ("grpc.keepalive_time_ms", 30_000),
    ("grpc.keepalive_timeout_ms", 10_000),
    ("grpc.http2.min_ping_interval_without_data_ms", 10_000),
    ("grpc.so_reuseport", 0),
)


class _Protocol(Protocol[Req_contra, Resp_co]):
    def on_request(self, request: Req_contra) -> None: ...

    def responses(self) -> Sequence[Resp_co]: ...


@dataclass(frozen=True, slots=True)
class StreamInfo:
    """A connected stream, as :meth:`DiscoveryServer.streams` reports it."""

    node_id: str
    identity: str
    peer: str
    service: str
    serial: str


class DiscoveryServer:
    """ADS (SotW + delta) and SDS over mTLS, serving a :class:`SnapshotCache`.

    :param cache: the per-proxy snapshots to serve.
    :param tls: the server's certificate and the roots client certificates must chain to.
    :param authorizer: which node ids and resources each peer identity may have.
    :param acks: where ACKs are recorded (a new tracker by default).
    :param audit: receives an :class:`~mesh_identity.events.AccessDenied` for every refusal.
    :param metrics: Prometheus collectors (a private registry by default).
    :param address: ``host:port`` to listen on; port 0 picks a free one (see :attr:`port`).
    """

    def __init__(
        self,
        cache: SnapshotCache,
        tls: ServerTls,
        authorizer: Authorizer,
        *,
        acks: AckTracker | None = None,
        audit: EventSink | None = None,
        metrics: XdsMetrics | None = None,
        address: str = "127.0.0.1:0",
        served_types: frozenset[str] = KNOWN,
        options: tuple[tuple[str, int], ...] = DEFAULT_OPTIONS,
    ) -> None:
        self.cache = cache
        self.tls = tls
        self.acks = acks if acks is not None else AckTracker()
        self.metrics = metrics if metrics is not None else XdsMetrics()
        self.env = Env(
            cache, self.acks, authorizer, audit if audit is not None else NullSink(), self.metrics, served_types
        )
        self._address = address
        self._options = options
        self._port = 0
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop_event: asyncio.Event | None = None
        self._wakes: set[asyncio.Event] = set()  # one per open stream (touched on the server's loop only)
        self._closing = False
        self._grace: float | None = None
        self._streams: dict[int, StreamInfo] = {}
        self._live: dict[int, tuple[Session, asyncio.Event]] = {}  # streams with a node, to re-authorise
        self._revoked: dict[int, str] = {}  # streams the authorizer no longer allows, and why
        self._streams_lock = threading.Lock()

    # -- lifecycle -------------------------------------------------------------------------------------

    def start(self, timeout: float = 30.0) -> int:
        """Start serving in a background thread; returns the bound port. Raises when the port cannot be bound."""
        if self._thread is not None:
            raise RuntimeError("the discovery server is already running")
        ready = threading.Event()
        failure: list[BaseException] = []
        self._thread = threading.Thread(target=self._thread_main, args=(ready, failure), name="xds-server", daemon=True)
        self._thread.start()
        if not ready.wait(timeout):
            raise RuntimeError("the discovery server did not start")
        if failure:
            self._thread.join()
            self._thread = None
            raise failure[0]
        return self._port

    def stop(self, grace: float | None = 1.0) -> None:
        """Stop serving: open streams are cancelled after ``grace`` seconds (at once when None)."""
        thread, loop, stop_event = self._thread, self._loop, self._stop_event
        if thread is None or loop is None or stop_event is None:
            return
        self._grace = grace
        loop.call_soon_threadsafe(stop_event.set)
        thread.join()
        self._thread = None

    def __enter__(self) -> DiscoveryServer:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop(None)

    @property
    def port(self) -> int:
        return self._port

    @property
    def target(self) -> str:
        """``host:port`` for clients."""
        host = self._address.rsplit(":", 1)[0]
        return f"{host}:{self._port}"

    def streams(self) -> list[StreamInfo]:
        """The streams open now."""
        with self._streams_lock:
            return list(self._streams.values())

    def connected_nodes(self) -> frozenset[str]:
        with self._streams_lock:
            return frozenset(s.node_id for s in self._streams.values())

    def reauthorize(self) -> tuple[StreamInfo, ...]:
        """Ask the authorizer again about every open stream's node (after the workloads changed): the streams
        it no longer allows (a node that left, or that now belongs to another identity than the stream's
        certificate) end with ``PERMISSION_DENIED``. Returns those streams."""
        ending: list[tuple[StreamInfo, asyncio.Event, str]] = []
        with self._streams_lock:
            for key, (session, wake) in self._live.items():
                if key in self._revoked or session.node_id is None:
                    continue
                reason = self.env.authorizer.node_denied(session.identity, session.node_id)
                if reason is not None:
                    self._revoked[key] = reason
                    ending.append((self._streams[key], wake, reason))
        loop = self._loop
        for info, wake, reason in ending:
            log.warning("closing the %s stream of node %s (%s): %s", info.service, info.node_id, info.peer, reason)
            if loop is not None:
                with contextlib.suppress(RuntimeError):  # a closed loop: the server is stopping anyway
                    loop.call_soon_threadsafe(wake.set)
        return tuple(info for info, _, _ in ending)

    def _thread_main(self, ready: threading.Event, failure: list[BaseException]) -> None:
        try:
            asyncio.run(self._serve(ready))
        except BaseException as err:  # reported to start() when it happens before ready
            if not ready.is_set():
                failure.append(err)
                ready.set()
            else:
                log.exception("the discovery server stopped with an error")

    async def _serve(self, ready: threading.Event) -> None:
        server = grpc.aio.server(options=list(self._options))
        ads_pb2_grpc.add_AggregatedDiscoveryServiceServicer_to_server(_Ads(self), server)
        sds_pb2_grpc.add_SecretDiscoveryServiceServicer_to_server(_Sds(self), server)
        port = server.add_secure_port(self._address, self.tls.credentials())
        if port == 0:
            raise OSError(f"cannot listen on {self._address}")
        await server.start()
        self._port = port
        self._loop = asyncio.get_running_loop()
        self._stop_event = asyncio.Event()
        self._closing = False
        log.info("xDS server listening on %s (mTLS)", self.target)
        ready.set()
        await self._stop_event.wait()
        self._closing = True  # open streams end themselves (status OK); gRPC would cancel them mid-await
        for wake in self._wakes:
            wake.set()
        await server.stop(self._grace)
        self._loop = None

    # -- streams ---------------------------------------------------------------------------------------

    async def run_stream(
        self,
        service: str,
        make: Callable[[Session], _Protocol[Req, Resp]],
        requests: AsyncIterator[Req],
        context: grpc.aio.ServicerContext[Req, Resp],
        fixed_type: str | None = None,
    ) -> None:
        """Serve one stream until the client closes it, disconnects, or a request is refused."""
        session = await self._open_session(context, fixed_type)
        protocol = make(session)
        loop = asyncio.get_running_loop()
        wake = asyncio.Event()
        pending: deque[Req] = deque()
        ended: list[str | None] = []  # set when the reader is done: None, or why the input broke

        def changed(node_id: str, type_urls: frozenset[str]) -> None:
            try:
                loop.call_soon_threadsafe(wake.set)
            except RuntimeError:  # the loop is closed: the server is stopping
                return

        async def read() -> None:
            why: str | None = None
            try:
                async for request in requests:
                    pending.append(request)
                    wake.set()
            except DecodeError:
                why = "malformed request: it is not a valid discovery request message"
            finally:
                ended.append(why)
                wake.set()

        reader = asyncio.create_task(read())
        cancel_watch: Callable[[], None] | None = None
        key = id(protocol)
        self.metrics.streams.labels(service).inc()
        self._wakes.add(wake)
        try:
            while not self._closing:
                await wake.wait()
                wake.clear()
                if self._closing:
                    return
                with self._streams_lock:
                    revoked = self._revoked.get(key)
                if revoked is not None:
                    session.deny(f"node {session.node_id}", "node", revoked)
                    raise RequestError(grpc.StatusCode.PERMISSION_DENIED, f"{revoked} (the workloads changed)")
                while pending:
                    protocol.on_request(pending.popleft())
                    if cancel_watch is None and session.node_id is not None:
                        cancel_watch = self.cache.watch(session.node_id, changed)
                        with self._streams_lock:
                            self._streams[key] = StreamInfo(
                                session.node_id, str(session.identity), session.peer, service, session.serial
                            )
                            self._live[key] = (session, wake)
                for response in protocol.responses():
                    await context.write(response)
                if ended:
                    if ended[0] is not None:
                        raise RequestError(grpc.StatusCode.INVALID_ARGUMENT, ended[0])
                    return
        except RequestError as err:
            self.metrics.refused.labels(err.code.name).inc()
            log.warning("refused %s stream from %s (%s): %s", service, session.identity, session.peer, err)
            await context.abort(err.code, err.message)
        finally:
            self._wakes.discard(wake)
            reader.cancel()
            if cancel_watch is not None:
                cancel_watch()
            self.metrics.streams.labels(service).dec()
            with self._streams_lock:
                self._streams.pop(key, None)
                self._live.pop(key, None)
                self._revoked.pop(key, None)

    async def fetch(
        self, request: discovery_pb2.DiscoveryRequest, context: grpc.aio.ServicerContext[Req, Resp]
    ) -> discovery_pb2.DiscoveryResponse:
        """The unary ``FetchSecrets``: the current secrets named in the request that the peer may have."""
        session = await self._open_session(context, SECRET)
        try:
            session.bind_node(request.node.id)
            type_url = session.check_type(request.type_url)
            session.check_names(type_url, request.resource_names)
        except RequestError as err:
            self.metrics.refused.labels(err.code.name).inc()
            await context.abort(err.code, err.message)
            raise  # abort() raises; this line is never reached
        snap = session.snapshot(type_url)
        selected = session.select(type_url, snap, frozenset(request.resource_names))
        session.sent(type_url)
        return discovery_pb2.DiscoveryResponse(
            version_info=snap.version, resources=[r.body for r in selected.values()], type_url=type_url
        )

    async def _open_session(self, context: grpc.aio.ServicerContext[Req, Resp], fixed_type: str | None) -> Session:
        try:
            cert = peer_certificate(context.auth_context())
            identity = identity_of(cert)
        except PeerError as err:
            self.metrics.refused.labels(grpc.StatusCode.UNAUTHENTICATED.name).inc()
            log.warning("refused stream from %s: %s", context.peer(), err)
            await context.abort(grpc.StatusCode.UNAUTHENTICATED, str(err))
            raise  # abort() raises; this line is never reached
        return Session(self.env, identity, context.peer(), fixed_type, serial_of(cert))


class _Ads(ads_pb2_grpc.AggregatedDiscoveryServiceServicer):  # type: ignore[misc]
    def __init__(self, server: DiscoveryServer) -> None:
        self._server = server

    async def StreamAggregatedResources(
        self,
        requests: AsyncIterator[discovery_pb2.DiscoveryRequest],
        context: grpc.aio.ServicerContext[discovery_pb2.DiscoveryRequest, discovery_pb2.DiscoveryResponse],
    ) -> None:
        await self._server.run_stream("ads", SotwStream, requests, context)

    async def DeltaAggregatedResources(
        self,
        requests: AsyncIterator[discovery_pb2.DeltaDiscoveryRequest],
        context: grpc.aio.ServicerContext[discovery_pb2.DeltaDiscoveryRequest, discovery_pb2.DeltaDiscoveryResponse],
    ) -> None:
        await self._server.run_stream("ads-delta", DeltaStream, requests, context)


class _Sds(sds_pb2_grpc.SecretDiscoveryServiceServicer):  # type: ignore[misc]
    def __init__(self, server: DiscoveryServer) -> None:
        self._server = server

    async def StreamSecrets(
        self,
        requests: AsyncIterator[discovery_pb2.DiscoveryRequest],
        context: grpc.aio.ServicerContext[discovery_pb2.DiscoveryRequest, discovery_pb2.DiscoveryResponse],
    ) -> None:
        await self._server.run_stream("sds", SotwStream, requests, context, SECRET)

    async def DeltaSecrets(
        self,
        requests: AsyncIterator[discovery_pb2.DeltaDiscoveryRequest],
        context: grpc.aio.ServicerContext[discovery_pb2.DeltaDiscoveryRequest, discovery_pb2.DeltaDiscoveryResponse],
    ) -> None:
        await self._server.run_stream("sds-delta", DeltaStream, requests, context, SECRET)

    async def FetchSecrets(
        self,
        request: discovery_pb2.DiscoveryRequest,
        context: grpc.aio.ServicerContext[discovery_pb2.DiscoveryRequest, discovery_pb2.DiscoveryResponse],
    ) -> discovery_pb2.DiscoveryResponse:
        return await self._server.fetch(request, context)
