"""The gRPC side: the aggregated discovery service (SotW and delta), the standalone SDS service, over mTLS.

:class:`DiscoveryServer` runs a ``grpc.aio`` server on its own event loop in a background thread, so that
callers (the CLI, the rotation engine's threads, tests) use plain ``start()`` / ``stop()`` and update the
:class:`~xds_sds.protocol.cache.SnapshotCache` from any thread. The port only speaks TLS with a required client
certificate (:class:`~xds_sds.protocol.credentials.ServerTls`); there is no plaintext option.

Each stream runs one loop: a reader task queues requests, cache changes for the stream's node wake it, and
after each wake the protocol state machine says what to send. A request the server refuses ends the stream
with a gRPC status (``INVALID_ARGUMENT`` for malformed requests, ``UNAUTHENTICATED`` for a peer without a
SPIFFE ID, ``PERMISSION_DENIED`` for a node the peer may not speak for); other streams are unaffected.
``FetchSecrets`` refuses the same way with its call's status. Its request arrives as bytes (the SDS service is
registered here, not by ``sds_pb2_grpc``, with no request deserializer for that method) and the server parses
it, so bytes that are not a ``DiscoveryRequest`` are ``INVALID_ARGUMENT`` there too, not gRPC's ``UNKNOWN``.

A handshake is not trusted forever. Every new stream (and every ``FetchSecrets``) reads the peer certificate
from the auth context and checks it again: the X.509-SVID leaf profile, its NotAfter, and its chain to the
*current* roots (:func:`~xds_sds.protocol.auth.trust_of`), so a resumed TLS session, or an old connection, of a
certificate that expired or whose root was retired opens nothing (``UNAUTHENTICATED``). An open stream ends
(``UNAUTHENTICATED``) when its chain's earliest NotAfter passes, and when the roots change
(:meth:`~xds_sds.protocol.credentials.ServerTls.update_roots`) so that it no longer chains to them. Connections
are recycled after :data:`DEFAULT_MAX_CONNECTION_AGE` (gRPC's ``max_connection_age``: a GOAWAY, then the
grace period, then the connection is closed and the client reconnects with a new handshake), and closed after
:data:`DEFAULT_MAX_CONNECTION_IDLE` without RPCs, so that a client whose streams were refused for a stale
handshake connects again instead of retrying on the same connection forever.

Taps (:meth:`DiscoveryServer.add_tap`) see every response the server sends, as it is sent: the tests that
check what crosses the wire (no private key in agent mode) and the demo's count of it use them.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
from collections import deque
from collections.abc import AsyncIterator, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, Protocol, TypeVar

import grpc
from cryptography import x509
from envoy.service.discovery.v3 import ads_pb2_grpc, discovery_pb2
from envoy.service.secret.v3 import sds_pb2
from google.protobuf.message import DecodeError, Message

from mesh_identity.clock import Clock, utcnow
from mesh_identity.events import AccessDenied, EventSink, NullSink
from mesh_identity.svid import fingerprint_of, serial_of
from xds_sds.protocol.acks import AckTracker
from xds_sds.protocol.auth import (
    Authorizer,
    PeerCredential,
    PeerError,
    Trust,
    identity_of,
    peer_certificate,
    peer_credential,
    trust_of,
)
from xds_sds.protocol.cache import SnapshotCache
from xds_sds.protocol.credentials import ServerTls
from xds_sds.protocol.delta import DeltaStream
from xds_sds.protocol.metrics import XdsMetrics
from xds_sds.protocol.session import MAX_RESOURCE_NAMES, Env, RequestError, Session
from xds_sds.protocol.sotw import SotwStream
from xds_sds.protocol.text import escaped
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
# Connections are not kept forever: after this long (gRPC adds +-10% jitter) the server sends GOAWAY, and after
# the grace period it closes the connection; the client reconnects, with a full or resumed handshake that the
# next stream's certificate check sees. Streams also end at their certificate's NotAfter, whatever the age.
DEFAULT_MAX_CONNECTION_AGE = timedelta(minutes=30)
DEFAULT_MAX_CONNECTION_AGE_GRACE = timedelta(minutes=1)
# A connection without RPCs is closed after this long. A proxy always has its stream open, so this only closes
# connections whose streams were refused for their certificate: the handshake is stale (expired, or its root
# retired), and a client such as Envoy retries on the same connection (it keeps connections when it loads a new
# certificate). Closed, it reconnects with a new handshake and its current certificate. A trade-off: a retrying
# client keeps the connection busy until its backoff grows past this (Envoy's doubles from 0.5 s), and a client
# that has just connected must open its first stream within it (at 1 s, fresh connections of the SDS fan-out
# benchmark's 10,000 streams were closed under a busy server; 10 s let a stale connection live as long as
# Envoy kept retrying).
DEFAULT_MAX_CONNECTION_IDLE = timedelta(seconds=3)
_RECHECK_AFTER = 1.0  # seconds: when a stream's timer fired before its NotAfter by the clock, look again then
MALFORMED = "malformed request: it is not a valid discovery request message"
Tap = Callable[[str, Message], None]  # (the service: ads, ads-delta, sds, sds-delta or FetchSecrets; the response)
SDS_SERVICE: str = sds_pb2.DESCRIPTOR.services_by_name["SecretDiscoveryService"].full_name


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


@dataclass(frozen=True, slots=True)
class _Ending:
    """Why an open stream must end, told to it through its wake event."""

    code: grpc.StatusCode
    message: str
    reason: str
    node: bool  # True: the authorizer's refusal of the node; False: the peer certificate is no longer valid


@dataclass(slots=True)
class _Open:
    """An open stream, from its first moment (before it names its node), for the certificate checks."""

    session: Session
    wake: asyncio.Event
    credential: PeerCredential
    service: str
    trust: Trust | None = None  # set once the chain was checked against the current roots
    timer: asyncio.TimerHandle | None = None

    def info(self) -> StreamInfo:
        s = self.session
        return StreamInfo(s.node_id or "", str(s.identity), s.peer, self.service, s.serial)


class DiscoveryServer:
    """ADS (SotW + delta) and SDS over mTLS, serving a :class:`SnapshotCache`.

    :param cache: the per-proxy snapshots to serve.
    :param tls: the server's certificate and the roots client certificates must chain to.
    :param authorizer: which node ids and resources each peer identity may have.
    :param acks: where ACKs are recorded (a new tracker by default).
    :param audit: receives an :class:`~mesh_identity.events.AccessDenied` for every refusal (one per request).
    :param metrics: Prometheus collectors (a private registry by default).
    :param address: ``host:port`` to listen on; port 0 picks a free one (see :attr:`port`).
    :param clock: the time certificates are checked at (and audit events carry).
    :param max_resource_names: how many resource names one request may carry.
    :param max_connection_age: recycle connections this old (None: never), closing them
        ``max_connection_age_grace`` after the GOAWAY; ``max_connection_idle``: close connections without RPCs
        for this long (None: never). They replace the corresponding entries of ``options``.
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
        clock: Clock = utcnow,
        max_resource_names: int = MAX_RESOURCE_NAMES,
        max_connection_age: timedelta | None = DEFAULT_MAX_CONNECTION_AGE,
        max_connection_age_grace: timedelta = DEFAULT_MAX_CONNECTION_AGE_GRACE,
        max_connection_idle: timedelta | None = DEFAULT_MAX_CONNECTION_IDLE,
    ) -> None:
        self.cache = cache
        self.tls = tls
        self.acks = acks if acks is not None else AckTracker()
        self.metrics = metrics if metrics is not None else XdsMetrics()
        self.env = Env(
            cache,
            self.acks,
            authorizer,
            audit if audit is not None else NullSink(),
            self.metrics,
            served_types,
            clock,
            max_resource_names,
        )
        self._address = address
        self._options = _connection_options(options, max_connection_age, max_connection_age_grace, max_connection_idle)
        self._port = 0
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop_event: asyncio.Event | None = None
        self._wakes: set[asyncio.Event] = set()  # one per open stream (touched on the server's loop only)
        self._closing = False
        self._grace: float | None = None
        self._streams: dict[int, StreamInfo] = {}
        self._live: dict[int, tuple[Session, asyncio.Event]] = {}  # streams with a node, to re-authorise
        self._open: dict[int, _Open] = {}  # every open stream, to check its certificate again
        self._revoked: dict[int, _Ending] = {}  # streams that must end, and why
        self._streams_lock = threading.Lock()
        self._cancel_roots: Callable[[], None] | None = None
        self._taps: tuple[Tap, ...] = ()

    def add_tap(self, tap: Tap) -> Callable[[], None]:
        """Call ``tap(service, response)`` with every response sent from now on (stream responses just before
        they are written, ``FetchSecrets`` answers before they are returned), on the server's event loop: it
        must return quickly and not block. An exception it raises is logged and the response is sent all the
        same. Returns a function that removes the tap."""
        with self._streams_lock:
            self._taps = (*self._taps, tap)

        def remove() -> None:
            with self._streams_lock:
                self._taps = tuple(t for t in self._taps if t is not tap)

        return remove

    def _tapped(self, service: str, response: Message) -> None:
        for tap in self._taps:
            try:
                tap(service, response)
            except Exception:
                log.exception("an xDS response tap failed (the response is sent all the same)")

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
        self._cancel_roots = self.tls.on_roots_changed(self._roots_changed)
        return self._port

    def stop(self, grace: float | None = 1.0) -> None:
        """Stop serving: open streams are cancelled after ``grace`` seconds (at once when None)."""
        thread, loop, stop_event = self._thread, self._loop, self._stop_event
        if thread is None or loop is None or stop_event is None:
            return
        if self._cancel_roots is not None:
            self._cancel_roots()
            self._cancel_roots = None
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
    def options(self) -> tuple[tuple[str, int], ...]:
        """The gRPC server options in use (the maximum connection age among them)."""
        return self._options

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
                    self._revoked[key] = _Ending(
                        grpc.StatusCode.PERMISSION_DENIED, f"{reason} (the workloads changed)", reason, node=True
                    )
                    ending.append((self._streams[key], wake, reason))
        for info, wake, reason in ending:
            self._closing_log(info, reason)
            self._wake(wake)
        return tuple(info for info, _, _ in ending)

    def _roots_changed(self, roots: tuple[x509.Certificate, ...]) -> None:
        self.revalidate()

    def revalidate(self) -> tuple[StreamInfo, ...]:
        """Check every open stream's peer certificate again, at the clock's time and against the current roots
        (done whenever the roots change, and by each stream's timer at its chain's NotAfter): the streams whose
        certificate expired, or no longer chains to the roots, end with ``UNAUTHENTICATED``. Returns them."""
        roots = self.tls.client_roots
        fingerprints = frozenset(fingerprint_of(root) for root in roots)
        with self._streams_lock:
            candidates = [(key, opened) for key, opened in self._open.items() if key not in self._revoked]
        ended = (self._recheck(key, opened, roots, fingerprints) for key, opened in candidates)
        return tuple(info for info in ended if info is not None)

    def _recheck(
        self, key: int, opened: _Open, roots: tuple[x509.Certificate, ...], fingerprints: frozenset[str]
    ) -> StreamInfo | None:
        """End the stream when its certificate is no longer valid; its StreamInfo then, else None. A stream whose
        root is still there and whose chain has not expired costs no signature check."""
        now = self.env.clock()
        trust = opened.trust
        if trust is not None and now <= trust.not_after and trust.root in fingerprints:
            return None
        try:
            opened.trust = trust_of(opened.credential, roots, now)
        except PeerError as err:
            with self._streams_lock:
                if key not in self._open or key in self._revoked:
                    return None
                self._revoked[key] = _Ending(grpc.StatusCode.UNAUTHENTICATED, str(err), str(err), node=False)
            info = opened.info()
            self._closing_log(info, str(err))
            self._wake(opened.wake)
            return info
        return None

    def _wake(self, wake: asyncio.Event) -> None:
        loop = self._loop
        if loop is not None:
            with contextlib.suppress(RuntimeError):  # a closed loop: the server is stopping anyway
                loop.call_soon_threadsafe(wake.set)

    @staticmethod
    def _closing_log(info: StreamInfo, reason: str) -> None:
        """INFO: ending a stream at its certificate's NotAfter, or after the workloads or the bundle changed, is
        the server doing its job (a sidecar reconnects with its renewed certificate; one that may no longer
        connect is refused, and that refusal is logged as a warning and audited)."""
        log.info(
            "closing the %s stream of node %s (%s, %s): %s",
            info.service,
            escaped(info.node_id or "(none yet)"),
            info.identity,
            info.peer,
            escaped(reason),
        )

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
        _add_sds(_Sds(self), server)
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
        """Serve one stream until the client closes it, disconnects, a request is refused, or its certificate
        stops being valid."""
        what = f"{service} stream"
        session, credential = await self._open_session(context, what, fixed_type)
        protocol = make(session)
        loop = asyncio.get_running_loop()
        wake = asyncio.Event()
        pending: deque[Req] = deque()
        ended: list[str | None] = []  # set when the reader is done: None, or why the input broke
        key = id(protocol)
        opened = _Open(session, wake, credential, service)
        with self._streams_lock:  # before the certificate check: a change of roots from now on sees the stream
            self._open[key] = opened

        def changed(node_id: str, type_urls: frozenset[str]) -> None:
            try:
                loop.call_soon_threadsafe(wake.set)
            except RuntimeError:  # the loop is closed: the server is stopping
                return

        def expire() -> None:  # on the loop, at the chain's NotAfter
            roots = self.tls.client_roots
            if self._recheck(key, opened, roots, frozenset(map(fingerprint_of, roots))) is None:
                with self._streams_lock:
                    if key in self._revoked:
                        return
                opened.timer = loop.call_later(self._seconds_left(opened, _RECHECK_AFTER), expire)

        async def read() -> None:
            why: str | None = None
            try:
                async for request in requests:
                    pending.append(request)
                    wake.set()
            except DecodeError:
                why = MALFORMED
            finally:
                ended.append(why)
                wake.set()

        reader: asyncio.Task[None] | None = None
        cancel_watch: Callable[[], None] | None = None
        self.metrics.streams.labels(service).inc()
        self._wakes.add(wake)
        try:
            opened.trust = self._admit(session, credential, what)
            opened.timer = loop.call_later(self._seconds_left(opened, 0.0), expire)
            reader = asyncio.create_task(read())
            while not self._closing:
                await wake.wait()
                wake.clear()
                if self._closing:
                    return
                with self._streams_lock:
                    revoked = self._revoked.get(key)
                if revoked is not None:
                    if revoked.node:
                        session.deny(f"node {session.node_id}", "node", revoked.reason)
                    else:
                        self._audit_peer(str(session.identity), what, revoked.reason)
                    raise RequestError(revoked.code, revoked.message, routine=True)
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
                    self._tapped(service, response)
                    await context.write(response)
                if ended:
                    if ended[0] is not None:
                        raise RequestError(grpc.StatusCode.INVALID_ARGUMENT, ended[0])
                    return
        except RequestError as err:
            self.metrics.refused.labels(err.code.name).inc()
            log.log(
                logging.INFO if err.routine else logging.WARNING,
                "refused %s stream from %s (%s): %s",
                service,
                session.identity,
                session.peer,
                escaped(err.message),
            )
            await context.abort(err.code, err.message)
        finally:
            self._wakes.discard(wake)
            if reader is not None:
                reader.cancel()
            if opened.timer is not None:
                opened.timer.cancel()
            if cancel_watch is not None:
                cancel_watch()
            self.metrics.streams.labels(service).dec()
            with self._streams_lock:
                self._streams.pop(key, None)
                self._live.pop(key, None)
                self._open.pop(key, None)
                self._revoked.pop(key, None)

    async def fetch(
        self, data: bytes, context: grpc.aio.ServicerContext[bytes, discovery_pb2.DiscoveryResponse]
    ) -> discovery_pb2.DiscoveryResponse:
        """The unary ``FetchSecrets``, its request still serialized (``data``): the current secrets named in the
        request that the peer may have (the others are audited, in one event). The peer is checked before its
        bytes are parsed; bytes that are not a ``DiscoveryRequest`` are ``INVALID_ARGUMENT``."""
        session, credential = await self._open_session(context, "FetchSecrets", SECRET)
        try:
            self._admit(session, credential, "FetchSecrets")
            request = _discovery_request(data)
            session.bind_node(request.node.id)
            type_url = session.check_type(request.type_url)
            session.check_names(type_url, request.resource_names)
        except RequestError as err:
            self.metrics.refused.labels(err.code.name).inc()
            log.log(
                logging.INFO if err.routine else logging.WARNING,
                "refused FetchSecrets from %s (%s): %s",
                session.identity,
                session.peer,
                escaped(err.message),
            )
            await context.abort(err.code, err.message)
            raise  # abort() raises; this line is never reached
        session.audit_requested(type_url, request.resource_names)
        snap = session.snapshot(type_url)
        selected = session.select(type_url, snap, frozenset(request.resource_names))
        session.sent(type_url)
        response = discovery_pb2.DiscoveryResponse(
            version_info=snap.version, resources=[r.body for r in selected.values()], type_url=type_url
        )
        self._tapped("FetchSecrets", response)
        return response

    async def _open_session(
        self, context: grpc.aio.ServicerContext[Any, Any], what: str, fixed_type: str | None
    ) -> tuple[Session, PeerCredential]:
        """The peer's session, from the auth context: ``UNAUTHENTICATED`` unless it is an X.509-SVID leaf.
        ``what`` names the call for logs and audit (``ads stream``, ``FetchSecrets``)."""
        auth = context.auth_context()
        try:
            credential = peer_credential(auth)
        except PeerError as err:
            self.metrics.refused.labels(grpc.StatusCode.UNAUTHENTICATED.name).inc()
            log.warning("refused %s from %s: %s", what, context.peer(), escaped(err))
            self._audit_peer(_who(auth, context.peer()), what, str(err))
            await context.abort(grpc.StatusCode.UNAUTHENTICATED, str(err))
            raise  # abort() raises; this line is never reached
        session = Session(self.env, credential.identity, context.peer(), fixed_type, serial_of(credential.leaf))
        return session, credential

    def _admit(self, session: Session, credential: PeerCredential, what: str) -> Trust:
        """The peer certificate is valid now and chains to the current roots (whatever the handshake was: a
        resumed session, or a connection older than a change of roots); else ``UNAUTHENTICATED``."""
        try:
            return trust_of(credential, self.tls.client_roots, self.env.clock())
        except PeerError as err:
            self._audit_peer(str(session.identity), what, str(err))
            raise RequestError(grpc.StatusCode.UNAUTHENTICATED, str(err), routine=True) from None

    def _audit_peer(self, peer: str, what: str, reason: str) -> None:
        self.env.audit.emit(AccessDenied(peer, what, reason, self.env.clock()))

    def _seconds_left(self, opened: _Open, at_least: float) -> float:
        """Until just after the stream's chain expires, by the clock (and at least ``at_least``)."""
        if opened.trust is None:
            return _RECHECK_AFTER
        return max(at_least, (opened.trust.not_after - self.env.clock()).total_seconds() + 0.05)


def _discovery_request(data: bytes) -> discovery_pb2.DiscoveryRequest:
    """``data`` parsed; ``INVALID_ARGUMENT`` when it is not a serialized ``DiscoveryRequest``."""
    try:
        return discovery_pb2.DiscoveryRequest.FromString(data)
    except DecodeError:
        raise RequestError(grpc.StatusCode.INVALID_ARGUMENT, MALFORMED) from None


def _who(auth: Mapping[str, Iterable[bytes]], address: str) -> str:
    """The SPIFFE ID of a refused peer when its certificate has one, else its address (for the audit)."""
    try:
        return str(identity_of(peer_certificate(auth)))
    except PeerError:
        return address


def _connection_options(
    options: tuple[tuple[str, int], ...], age: timedelta | None, grace: timedelta, idle: timedelta | None
) -> tuple[tuple[str, int], ...]:
    ours: list[tuple[str, int]] = []
    if age is not None:
        ours += [("grpc.max_connection_age_ms", _ms(age)), ("grpc.max_connection_age_grace_ms", _ms(grace))]
    if idle is not None:
        ours.append(("grpc.max_connection_idle_ms", _ms(idle)))
    keys = {key for key, _ in ours}
    return (*(option for option in options if option[0] not in keys), *ours)


def _ms(duration: timedelta) -> int:
    return max(1, int(duration.total_seconds() * 1000))


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


class _Sds:
    """The SDS service's methods, registered by :func:`_add_sds`."""

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
        self, data: bytes, context: grpc.aio.ServicerContext[bytes, discovery_pb2.DiscoveryResponse]
    ) -> discovery_pb2.DiscoveryResponse:
        return await self._server.fetch(data, context)


def _add_sds(servicer: _Sds, server: grpc.aio.Server) -> None:
    """Register the SDS service as ``sds_pb2_grpc.add_SecretDiscoveryServiceServicer_to_server`` does (a generic
    handler, and the same handlers as registered methods, which take precedence), except that ``FetchSecrets``
    has no request deserializer: gRPC would answer ``UNKNOWN`` for bytes it cannot parse, before the servicer
    runs; :meth:`DiscoveryServer.fetch` parses them and refuses them with ``INVALID_ARGUMENT``. The streams keep
    gRPC's parsing, whose ``DecodeError`` reaches :meth:`DiscoveryServer.run_stream` through the request
    iterator."""
    request, response = discovery_pb2.DiscoveryRequest, discovery_pb2.DiscoveryResponse
    delta_request, delta_response = discovery_pb2.DeltaDiscoveryRequest, discovery_pb2.DeltaDiscoveryResponse
    handlers: dict[str, grpc.RpcMethodHandler[Any, Any]] = {
        "StreamSecrets": grpc.stream_stream_rpc_method_handler(
            servicer.StreamSecrets,
            request_deserializer=request.FromString,
            response_serializer=response.SerializeToString,
        ),
        "DeltaSecrets": grpc.stream_stream_rpc_method_handler(
            servicer.DeltaSecrets,
            request_deserializer=delta_request.FromString,
            response_serializer=delta_response.SerializeToString,
        ),
        "FetchSecrets": grpc.unary_unary_rpc_method_handler(
            servicer.FetchSecrets, request_deserializer=None, response_serializer=response.SerializeToString
        ),
    }
    methods = set(sds_pb2.DESCRIPTOR.services_by_name["SecretDiscoveryService"].methods_by_name)
    if methods != set(handlers):  # a new envoy release changed the service: serve all of it, or say so
        raise RuntimeError(f"{SDS_SERVICE} has the methods {sorted(methods)}, this server serves {sorted(handlers)}")
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SDS_SERVICE, handlers),))
    server.add_registered_method_handlers(SDS_SERVICE, handlers)
