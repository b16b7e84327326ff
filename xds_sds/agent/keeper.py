"""The key keeper: every private key the agent serves is made here, and its SVID obtained and kept fresh.

* **The agent's own SVID.** At start the agent reads it from ``state_dir``
  (:class:`~xds_sds.agent.store.AgentStore`); with none that is still valid it attests once, with the join token
  or the Kubernetes token file of its config (``Attest`` over server-authenticated TLS). From then on it renews
  that SVID over mTLS (``SignX509`` of its own ID), persisting each one, so that a restart renews instead of
  attesting again.
* **Workload SVIDs.** For every SPIFFE ID of the config's entries: a new ECDSA P-256 key, a CSR for it, and
  ``SignX509`` over mTLS, then again at ``rotate_after`` of each SVID's lifetime (minus up to ``jitter`` of it,
  :func:`~mesh_identity.rotation.schedule.due_time`). A failed renewal is retried with exponential backoff, capped,
  and never later than halfway to expiry (:func:`~mesh_identity.rotation.schedule.next_attempt`); meanwhile the
  SVID still valid is served. Keys and workload SVIDs live in memory only.
* **Bundles.** Every answer carries the trust bundle; ``FetchBundle`` also brings the JWT signing keys, and is
  called again at the server's refresh hint (within :data:`MIN_REFRESH` and :data:`MAX_REFRESH`).
* **JWT-SVIDs.** ``SignJwt`` on demand, cached per identity and audience until half their life has passed; a
  cached token still valid is served while the control plane cannot be reached.

Everything runs on the agent's event loop. Whoever serves the SVIDs subscribes (:meth:`Keeper.subscribe`) and
is called on every change: a new SVID, a new bundle, and an SVID reaching its NotAfter without renewal.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.x509.oid import NameOID

from mesh_identity.authority import workload_csr
from mesh_identity.clock import Clock, utcnow
from mesh_identity.jwtsvid import JwtBundle, JwtSvid, JwtSvidError, validate_jwt_svid
from mesh_identity.keys import KeyType, PrivateKey, generate_key
from mesh_identity.profile import ORGANIZATION, hash_for, same_key
from mesh_identity.registry.base import RESERVED_PREFIX
from mesh_identity.rotation.schedule import RetryPolicy, Validity, due_time, next_attempt
from mesh_identity.spiffe import SpiffeId
from mesh_identity.svid import TrustBundle, X509Svid, spiffe_id_of
from xds_sds.agent.client import ControlPlaneClient, ControlPlaneError
from xds_sds.agent.config import AgentConfig
from xds_sds.agent.issued import IssuedError, bundle_of, jwt_bundle_of, svid_of
from xds_sds.agent.store import AgentStore
from xds_sds.proto import signing_pb2

log = logging.getLogger(__name__)

FIRST_RETRY = RetryPolicy(timedelta(milliseconds=250), timedelta(seconds=30))  # before any SVID is known
MIN_REFRESH = timedelta(seconds=1)
MAX_REFRESH = timedelta(hours=1)
DEFAULT_REFRESH = timedelta(minutes=5)
MAX_SLEEP = 60.0  # seconds: a wait is cut into pieces this long and the clock read again (clock changes)
MAX_TOKEN_FILE = 64 * 1024
MAX_JWT_CACHE = 1024
MAX_AUDIENCES = 16
MAX_AUDIENCE = 256


class KeeperError(Exception):
    """What the keeper cannot give right now (no SVID yet, a JWT-SVID the control plane would not sign)."""


@dataclass
class _Track:
    """The renewal state of one identity (the agent's own, or a workload's)."""

    spiffe_id: SpiffeId | None  # None for the agent's own before it is known (Kubernetes: the server decides)
    svid: X509Svid | None = None
    received_at: datetime | None = None
    next_attempt: datetime | None = None
    last_success: datetime | None = None
    failures: int = 0  # consecutive
    failures_total: int = 0
    last_error: str | None = None
    wake: asyncio.Event = field(default_factory=asyncio.Event)
    expiry_timer: asyncio.TimerHandle | None = None


@dataclass(frozen=True, slots=True)
class IdentityStatus:
    """One identity, as metrics and health see it."""

    spiffe_id: str
    own: bool
    not_after: datetime | None
    last_success: datetime | None
    next_attempt: datetime | None
    failures: int
    failures_total: int
    last_error: str | None


@dataclass(frozen=True, slots=True)
class KeeperStatus:
    identities: tuple[IdentityStatus, ...]
    bundle_sequence: int
    bundle_refreshed: datetime | None
    jwt_keys: int


@dataclass(frozen=True, slots=True)
class _Jwt:
    token: str
    issued_at: datetime
    expiry: datetime


def _der(csr: x509.CertificateSigningRequest) -> bytes:
    return csr.public_bytes(serialization.Encoding.DER)


def bare_csr(key: PrivateKey) -> x509.CertificateSigningRequest:
    """A CSR with no name at all: for attestation with a Kubernetes token, where the server decides the ID."""
    subject = x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, ORGANIZATION)])
    return x509.CertificateSigningRequestBuilder().subject_name(subject).sign(key, hash_for(key))


def read_token(path: Path) -> str:
    """The credential in ``path`` (whitespace around it removed); KeeperError naming the file, never the token."""
    try:
        with open(path, "rb") as handle:
            data = handle.read(MAX_TOKEN_FILE + 1)
    except OSError as err:
        raise KeeperError(f"cannot read the credential file {path}: {err.strerror}") from None
    if len(data) > MAX_TOKEN_FILE:
        raise KeeperError(f"the credential file {path} is larger than {MAX_TOKEN_FILE} bytes")
    try:
        token = data.decode("ascii").strip()
    except UnicodeDecodeError:
        raise KeeperError(f"the credential file {path} is not ASCII text") from None
    if not token or any(c.isspace() for c in token):
        raise KeeperError(f"the credential file {path} does not hold one token")
    return token


def check_audience(audience: Sequence[str]) -> tuple[str, ...]:
    """The audiences of a JWT-SVID request: one to :data:`MAX_AUDIENCES`, each non-empty and short."""
    if not audience:
        raise ValueError("audience is required")
    if len(audience) > MAX_AUDIENCES:
        raise ValueError(f"at most {MAX_AUDIENCES} audiences")
    for value in audience:
        if not value or len(value) > MAX_AUDIENCE or not value.isprintable():
            raise ValueError(f"an audience must be 1 to {MAX_AUDIENCE} printable characters")
    return tuple(dict.fromkeys(audience))


class Keeper:
    """See the module docstring.

    :param config_roots: the roots of ``control_plane.bundle``: they verify the control plane (with every bundle
        it has sent since).
    :param draw: random numbers in [0, 1) for jitter (tests pass a fixed one).
    """

    def __init__(
        self,
        config: AgentConfig,
        client: ControlPlaneClient,
        store: AgentStore,
        config_roots: TrustBundle,
        *,
        clock: Clock = utcnow,
        draw: Callable[[], float] = random.random,
    ) -> None:
        self.config = config
        self.trust_domain = config.trust_domain
        self._client = client
        self._store = store
        self._config_roots = config_roots
        self._clock = clock
        self._draw = draw
        self._own = _Track(None)
        self._tracks = {spiffe_id: _Track(spiffe_id) for spiffe_id in config.identities}
        self._own_ready = asyncio.Event()
        self._bundle: TrustBundle | None = store.load_bundle(config.trust_domain)
        self._bundle_sequence = 0
        self._bundle_refreshed: datetime | None = None
        self._jwt_bundle: JwtBundle | None = None
        self._jwks: bytes | None = None
        self._jwts: OrderedDict[tuple[SpiffeId, tuple[str, ...]], _Jwt] = OrderedDict()
        self._jwt_flights: dict[tuple[SpiffeId, tuple[str, ...]], asyncio.Task[_Jwt]] = {}
        self._bundle_wake = asyncio.Event()
        self._subscribers: dict[int, Callable[[], None]] = {}
        self._next_subscriber = 0
        self._tasks: list[asyncio.Task[None]] = []
        self.version = 0

    # -- read side ------------------------------------------------------------------------------------------

    def now(self) -> datetime:
        return self._clock()

    @property
    def own(self) -> X509Svid | None:
        return self._own.svid

    def current(self, spiffe_id: SpiffeId) -> X509Svid | None:
        """The latest SVID of ``spiffe_id`` (even when it has expired: SDS keeps it), None before the first."""
        track = self._tracks.get(spiffe_id)
        return track.svid if track is not None else None

    def valid(self, spiffe_ids: Sequence[SpiffeId], now: datetime | None = None) -> list[X509Svid]:
        """The SVIDs of ``spiffe_ids`` that are valid now, in that order."""
        at = now or self._clock()
        found = (self.current(spiffe_id) for spiffe_id in spiffe_ids)
        return [svid for svid in found if svid is not None and svid.not_before <= at < svid.not_after]

    @property
    def bundle(self) -> TrustBundle | None:
        """The trust domain's X.509 roots as last received from the control plane."""
        return self._bundle

    @property
    def jwt_bundle(self) -> JwtBundle | None:
        return self._jwt_bundle

    @property
    def jwks(self) -> bytes | None:
        """The JWT bundle as a JWK Set with the ``jwt-svid`` keys only (what the Workload API serves)."""
        return self._jwks

    def control_plane_roots_pem(self) -> bytes:
        """The roots that verify the control plane: the config's bundle file and the last bundle received."""
        roots = self._config_roots
        if self._bundle is not None:
            roots = roots.with_authorities(self._bundle.authorities)
        return roots.pem()

    def subscribe(self, callback: Callable[[], None]) -> Callable[[], None]:
        """Call ``callback`` (on the loop, with no argument) after every change; returns an unsubscribe."""
        key = self._next_subscriber
        self._next_subscriber += 1
        self._subscribers[key] = callback

        def cancel() -> None:
            self._subscribers.pop(key, None)

        return cancel

    def status(self) -> KeeperStatus:
        tracks = [(True, self._own), *((False, track) for track in self._tracks.values())]
        identities = tuple(
            IdentityStatus(
                str(track.spiffe_id or self.config.agent_id),
                own,
                track.svid.not_after if track.svid is not None else None,
                track.last_success,
                track.next_attempt,
                track.failures,
                track.failures_total,
                track.last_error,
            )
            for own, track in tracks
        )
        keys = len(self._jwt_bundle.keys) if self._jwt_bundle is not None else 0
        return KeeperStatus(identities, self._bundle_sequence, self._bundle_refreshed, keys)

    def _changed(self) -> None:
        self.version += 1
        for callback in list(self._subscribers.values()):
            try:
                callback()
            except Exception:
                log.exception("a subscriber of the key keeper failed")

    # -- lifecycle ------------------------------------------------------------------------------------------

    def start(self) -> None:
        """Load the stored SVID and start keeping every identity (tasks on the running loop)."""
        stored = self._load_own()
        if stored is not None:
            self._set(self._own, stored, persist=False)
            self._own_ready.set()
        loop = asyncio.get_running_loop()
        self._tasks.append(loop.create_task(self._keep_own(), name="agent-own-svid"))
        self._tasks.append(loop.create_task(self._keep_bundle(), name="agent-bundle"))
        for track in self._tracks.values():
            self._tasks.append(loop.create_task(self._keep(track), name=f"agent-svid {track.spiffe_id}"))

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._tasks.clear()
        for track in (self._own, *self._tracks.values()):
            if track.expiry_timer is not None:
                track.expiry_timer.cancel()

    async def wait_own(self) -> X509Svid:
        """The agent's own SVID, once it has one."""
        await self._own_ready.wait()
        assert self._own.svid is not None
        return self._own.svid

    def _load_own(self) -> X509Svid | None:
        stored = self._store.load_svid()
        if stored is None:
            return None
        leaf = stored.chain[0]
        try:
            spiffe_id = spiffe_id_of(leaf)
        except ValueError as err:
            log.warning("ignoring the stored SVID: %s", err)
            return None
        problem = self._own_problem(spiffe_id)
        if problem is None and not same_key(leaf, stored.key.public_key()):
            problem = "its key is not the certificate's"
        if problem is None and self._clock() >= leaf.not_valid_after_utc:
            problem = f"it expired at {leaf.not_valid_after_utc:%Y-%m-%dT%H:%M:%SZ}"
        if problem is not None:
            log.warning("ignoring the stored SVID of %s: %s", spiffe_id, problem)
            return None
        bundle = self._bundle or self._config_roots
        return X509Svid(spiffe_id, leaf, stored.chain[1:], stored.key, bundle, "control-plane")

    def _own_problem(self, spiffe_id: SpiffeId) -> str | None:
        """Why ``spiffe_id`` cannot be the agent's own identity (None when it can): the agent identity of its
        host, or (attested with a Kubernetes token) a service account's identity in the trust domain."""
        if spiffe_id == self.config.agent_id:
            return None
        if (
            spiffe_id.trust_domain == self.trust_domain
            and spiffe_id.kubernetes is not None
            and not spiffe_id.path.startswith(RESERVED_PREFIX)
            and (self.config.credential is None or self.config.credential.kubernetes_token_file is not None)
        ):
            return None
        return f"it is not {self.config.agent_id}"

    # -- the agent's own SVID -----------------------------------------------------------------------------

    async def _keep_own(self) -> None:
        track = self._own
        while True:
            now = self._clock()
            svid = track.svid
            if svid is not None and now < svid.not_after:
                if track.next_attempt is None:
                    track.next_attempt = self._due(track)
                await self._sleep_until(track, track.next_attempt)
                now = self._clock()
                renew = track.svid is not None and now < track.svid.not_after
            else:
                if track.next_attempt is not None and now < track.next_attempt:
                    await self._sleep_until(track, track.next_attempt)
                renew = False
            try:
                fresh = await (self._renew_own() if renew else self._attest())
            except (ControlPlaneError, IssuedError, KeeperError) as err:
                self._failed(track, err, "renewing the agent's SVID" if renew else "attesting")
                continue
            self._set(track, fresh, persist=True)
            await self._client.reconnect()
            self._own_ready.set()

    async def _attest(self) -> X509Svid:
        credential = self.config.credential
        if credential is None:
            raise KeeperError(
                f"no SVID of its own in {self._store.state_dir} that is still valid, and no credential in the "
                "config (credential.join_token_file or credential.kubernetes_token_file)"
            )
        token = read_token(credential.path)
        key = generate_key(KeyType.ECDSA_P256)
        if credential.join_token_file is not None:
            request = signing_pb2.AttestRequest(join_token=token, csr=_der(workload_csr(key, self.config.agent_id)))
        else:
            request = signing_pb2.AttestRequest(kubernetes_token=token, csr=_der(bare_csr(key)))
        response = await self._client.attest(request)
        bundle = self._take_bundle(response.bundle)
        svid = svid_of(response, key, bundle, self._clock())
        problem = self._own_problem(svid.spiffe_id)
        if problem is not None:
            raise IssuedError(f"attestation gave {svid.spiffe_id}: {problem}")
        log.info("attested as %s", svid.spiffe_id)
        return svid

    async def _renew_own(self) -> X509Svid:
        current = self._own.svid
        assert current is not None
        return await self._sign(current.spiffe_id)

    # -- workload SVIDs -----------------------------------------------------------------------------------

    async def _keep(self, track: _Track) -> None:
        await self._own_ready.wait()
        assert track.spiffe_id is not None
        while True:
            if track.next_attempt is not None:
                await self._sleep_until(track, track.next_attempt)
            try:
                fresh = await self._sign(track.spiffe_id)
            except (ControlPlaneError, IssuedError) as err:
                self._failed(track, err, f"renewing {track.spiffe_id}" if track.svid else f"issuing {track.spiffe_id}")
                continue
            self._set(track, fresh, persist=False)

    async def _sign(self, spiffe_id: SpiffeId) -> X509Svid:
        key = generate_key(KeyType.ECDSA_P256)
        response = await self._client.sign_x509(spiffe_id, _der(workload_csr(key, spiffe_id)))
        bundle = self._take_bundle(response.bundle) if response.HasField("bundle") else self._bundle
        if bundle is None:
            raise IssuedError(f"the answer for {spiffe_id} carries no bundle, and none is known yet")
        return svid_of(response, key, bundle, self._clock(), spiffe_id)

    # -- bookkeeping ----------------------------------------------------------------------------------------

    def _set(self, track: _Track, svid: X509Svid, *, persist: bool) -> None:
        now = self._clock()
        if persist:
            try:
                self._store.save_svid(svid)
            except OSError as err:  # serve it anyway; a restart will attest (or renew the older one)
                log.error("cannot store the agent's SVID in %s: %s", self._store.state_dir, err)
        track.spiffe_id = svid.spiffe_id
        track.svid = svid
        track.received_at = now
        track.last_success = now
        track.failures = 0
        track.last_error = None
        track.next_attempt = self._due(track)
        if track.expiry_timer is not None:
            track.expiry_timer.cancel()
        delay = max(0.0, (svid.not_after - now).total_seconds()) + 0.01
        track.expiry_timer = asyncio.get_running_loop().call_later(delay, self._expired, track)
        log.info(
            "%s: serial %s valid until %s, renewal at %s",
            svid.spiffe_id,
            svid.serial,
            f"{svid.not_after:%H:%M:%S}",
            f"{track.next_attempt:%H:%M:%S}",
        )
        self._changed()

    def _expired(self, track: _Track) -> None:
        track.expiry_timer = None
        if track.svid is not None:
            log.error(
                "%s: the SVID expired at %s without a renewal", track.spiffe_id, f"{track.svid.not_after:%H:%M:%S}"
            )
        self._changed()

    def _due(self, track: _Track) -> datetime:
        svid = track.svid
        assert svid is not None
        validity = Validity.of(svid.leaf, track.received_at)
        return due_time(validity, self.config.rotate_after, self.config.jitter, self._draw())

    def _failed(self, track: _Track, err: Exception, doing: str) -> None:
        now = self._clock()
        track.failures += 1
        track.failures_total += 1
        track.last_error = str(err)
        svid = track.svid
        expires = svid.not_after if svid is not None and now < svid.not_after else None
        policy = FIRST_RETRY if svid is None else RetryPolicy.for_lifetime(svid.not_after - svid.not_before)
        track.next_attempt = next_attempt(now, track.failures, policy, self._draw(), expires)
        left = f"; the current SVID is valid until {expires:%H:%M:%S}" if expires is not None else ""
        log.log(
            logging.WARNING if expires is not None and track.failures < 3 else logging.ERROR,
            "%s failed (%d in a row): %s; next attempt at %s%s",
            doing,
            track.failures,
            err,
            f"{track.next_attempt:%H:%M:%S.%f}"[:-3],
            left,
        )
        self._changed()

    async def _sleep_until(self, track: _Track, when: datetime) -> None:
        while True:
            delay = (when - self._clock()).total_seconds()
            if delay <= 0:
                return
            track.wake.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(track.wake.wait(), min(delay, MAX_SLEEP))
                return

    # -- bundles --------------------------------------------------------------------------------------------

    def _take_bundle(self, message: signing_pb2.Bundle) -> TrustBundle:
        """Use the bundle of an answer unless it is older (by sequence) than the one held; returns the X.509
        roots that verify that answer."""
        bundle = bundle_of(message, self.trust_domain)
        jwt_bundle = jwt_bundle_of(message, self.trust_domain)
        sequence = int(message.sequence)
        if self._bundle is not None and sequence < self._bundle_sequence:
            return bundle
        changed = self._bundle is None or bundle.authorities != self._bundle.authorities
        self._bundle_sequence = sequence
        if changed:
            self._bundle = bundle
            try:
                self._store.save_bundle(bundle)
            except OSError as err:
                log.warning("cannot store the trust bundle in %s: %s", self._store.state_dir, err)
        if jwt_bundle is not None:
            jwks = jwt_bundle.to_jwks()
            if jwks != self._jwks:
                self._jwt_bundle, self._jwks = jwt_bundle, jwks
                changed = True
        if changed:
            self._changed()
        return bundle

    async def _keep_bundle(self) -> None:
        await self._own_ready.wait()
        failures = 0
        while True:
            try:
                message = await self._client.fetch_bundle()
                self._take_bundle(message)
            except (ControlPlaneError, IssuedError) as err:
                failures += 1
                delay = next_attempt(self._clock(), failures, FIRST_RETRY, self._draw(), None) - self._clock()
                log.log(logging.WARNING if failures < 3 else logging.ERROR, "fetching the bundle failed: %s", err)
            else:
                failures = 0
                self._bundle_refreshed = self._clock()
                hint = timedelta(seconds=message.refresh_hint_seconds) if message.refresh_hint_seconds else None
                delay = min(max(hint or DEFAULT_REFRESH, MIN_REFRESH), MAX_REFRESH)
            self._bundle_wake.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._bundle_wake.wait(), max(delay.total_seconds(), 0.05))

    async def refresh_bundle(self, not_within: timedelta = timedelta(0)) -> bool:
        """Fetch the bundle now (a JWT-SVID named a key not yet known), unless it was fetched within
        ``not_within``; True when it was fetched. ControlPlaneError or IssuedError when that fails."""
        refreshed = self._bundle_refreshed
        if refreshed is not None and self._clock() - refreshed < not_within:
            return False
        message = await self._client.fetch_bundle()
        self._take_bundle(message)
        self._bundle_refreshed = self._clock()
        return True

    # -- JWT-SVIDs ------------------------------------------------------------------------------------------

    async def jwt_svid(self, spiffe_id: SpiffeId, audience: Sequence[str]) -> str:
        """A JWT-SVID of ``spiffe_id`` for ``audience`` (see the module docstring); KeeperError when there is
        none to give."""
        audiences = check_audience(audience)
        key = (spiffe_id, tuple(sorted(audiences)))
        now = self._clock()
        cached = self._jwts.get(key)
        if cached is not None and now < cached.issued_at + (cached.expiry - cached.issued_at) / 2:
            return cached.token
        flight = self._jwt_flights.get(key)
        if flight is None:  # one SignJwt per identity and audience at a time, whoever is waiting for it
            flight = asyncio.get_running_loop().create_task(self._sign_jwt(spiffe_id, audiences))
            self._jwt_flights[key] = flight
            flight.add_done_callback(lambda done: self._landed(key, done))
        try:
            return (await asyncio.shield(flight)).token
        except (ControlPlaneError, IssuedError) as err:
            if cached is not None and self._clock() < cached.expiry:
                return cached.token  # the control plane is away; the cached token is still valid
            raise KeeperError(f"no JWT-SVID for {spiffe_id}: {err}") from None

    def _landed(self, key: tuple[SpiffeId, tuple[str, ...]], flight: asyncio.Task[_Jwt]) -> None:
        self._jwt_flights.pop(key, None)
        if not flight.cancelled() and flight.exception() is None:
            self._remember(key, flight.result())

    async def _sign_jwt(self, spiffe_id: SpiffeId, audience: tuple[str, ...]) -> _Jwt:
        response = await self._client.sign_jwt(spiffe_id, audience)
        checked = await self._check_jwt(response.token, spiffe_id, audience)
        return _Jwt(response.token, checked.issued_at, checked.expiry)

    async def _check_jwt(self, token: str, spiffe_id: SpiffeId, audience: tuple[str, ...]) -> JwtSvid:
        """The token validated against the JWT bundle (fetched again once when it does not know the key)."""
        for attempt in range(2):
            bundle = self._jwt_bundle
            if bundle is None or attempt:
                await self.refresh_bundle()
                bundle = self._jwt_bundle
            if bundle is None:
                raise IssuedError("the control plane publishes no JWT signing keys")
            try:
                checked = validate_jwt_svid(token, audience[0], {self.trust_domain: bundle}, self._clock())
            except JwtSvidError as err:
                if attempt:
                    raise IssuedError(f"the JWT-SVID for {spiffe_id} does not validate: {err}") from None
                continue
            if checked.spiffe_id != spiffe_id or not set(audience) <= set(checked.audience):
                raise IssuedError(
                    f"asked for a JWT-SVID of {spiffe_id} for {list(audience)}, got one of {checked.spiffe_id} "
                    f"for {list(checked.audience)}"
                )
            return checked
        raise AssertionError("unreachable")  # pragma: no cover

    def _remember(self, key: tuple[SpiffeId, tuple[str, ...]], jwt: _Jwt) -> None:
        self._jwts[key] = jwt
        self._jwts.move_to_end(key)
        now = self._clock()
        for stale in [k for k, v in self._jwts.items() if v.expiry <= now]:
            del self._jwts[stale]
        while len(self._jwts) > MAX_JWT_CACHE:
            self._jwts.popitem(last=False)
