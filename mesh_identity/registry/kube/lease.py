"""Leader election over a ``coordination.k8s.io/v1`` Lease, with client-go's semantics, and the replicas' own Leases.

:class:`LeaderElector` follows client-go's ``leaderelection`` package:

* Timing (:class:`LeaseTiming`): lease duration 15 s, renew deadline 10 s, retry period 2 s.
* Each attempt reads the Lease. Absent: create it holding it (``leaseTransitions`` 0). Present: when its record
  (holder, times, duration, transitions) differs from the one seen last, the elector notes the local monotonic
  time; the Lease is taken as held by its holder until ``leaseDurationSeconds`` have passed on the local clock
  since then. Remote clocks are never compared with ours (``renewTime`` is written, never trusted).
* Free (no holder, or expired) or held by us: replace it with the resourceVersion just read, holding it:
  ``renewTime`` now, ``acquireTime`` now and ``leaseTransitions`` + 1 on a change of holder. Two contenders
  that read the same version cannot both win: the second replace gets 409 and the attempt fails.
* The leader renews every retry period. When it has not renewed within the renew deadline it steps down
  (``on_stopped_leading``), before anyone else can take the Lease (renew deadline < lease duration); and
  :attr:`LeaderElector.is_leader` turns False at the deadline even while a renewal is still waiting for the
  API, so singleton work asks it before each step and never acts as leader past the deadline.
* A contender waits a retry period between attempts (a little less, jittered, so replicas do not try in step),
  and never longer than until the Lease it saw expires.
* :meth:`LeaderElector.stop` releases the Lease (client-go's ``ReleaseOnCancel``): ``holderIdentity`` cleared,
  ``leaseDurationSeconds`` 1, so another replica takes over at its next attempt.

A Lease that cannot be read as one (a field of the wrong type, an unparseable time) is logged once and taken as
held by an unknown holder until it expires (a lease duration after it was seen; it is then overwritten).

:class:`ReplicaLease` is the Lease a replica keeps of its own (``mesh-identity-replica-<identity>``): renewed every
retry period with an annotation the caller provides (the root-rotation evidence, see
:mod:`mesh_identity.server.cluster`); :class:`ReplicaLeases` lists the live ones, with the same local-clock rule.
"""

from __future__ import annotations

import logging
import random
import re
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from mesh_identity.clock import Clock, utcnow
from mesh_identity.document import shown
from mesh_identity.registry.kube.client import KubeClient
from mesh_identity.registry.kube.errors import KubeApiError, KubeConflictError
from mesh_identity.registry.kube.objects import JsonObj, field, text
from mesh_identity.registry.kube.resources import LEASES

log = logging.getLogger(__name__)

MANAGED_BY = "app.kubernetes.io/managed-by"
"""The label of every object the control plane writes for itself (Leases, the trust-bundle ConfigMaps)."""
MANAGER = "mesh-identity"
ROLE = "mesh-identity.io/lease"
"""The label of a Lease: ``leader`` or ``replica``."""
REPLICA_PREFIX = "mesh-identity-replica-"
_NAME = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*")
_MICRO = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d{1,9})?(Z|[+-]\d\d:\d\d)")


@dataclass(frozen=True, slots=True)
class LeaseTiming:
    """client-go's defaults, in seconds. ``renew_deadline`` must be shorter than ``duration`` (the leader steps
    down before anyone else may take the Lease) and longer than ``retry_period`` (it gets several tries)."""

    duration: float = 15.0
    renew_deadline: float = 10.0
    retry_period: float = 2.0

    def __post_init__(self) -> None:
        if not 0 < self.retry_period < self.renew_deadline < self.duration:
            raise ValueError(
                f"lease timing: need 0 < retry period ({self.retry_period}s) < renew deadline "
                f"({self.renew_deadline}s) < lease duration ({self.duration}s)"
            )

    @property
    def duration_seconds(self) -> int:
        """``leaseDurationSeconds`` as written (whole seconds, at least 1)."""
        return max(1, round(self.duration))


@dataclass(frozen=True, slots=True)
class LeaseRecord:
    """What a Lease's spec says (client-go's ``LeaderElectionRecord``)."""

    holder: str
    duration_seconds: int
    acquire_time: datetime | None
    renew_time: datetime | None
    transitions: int


class MalformedLeaseError(ValueError):
    """A Lease whose spec cannot be read as a leader-election record."""


def micro_time(moment: datetime) -> str:
    """``moment`` as a Kubernetes MicroTime: RFC 3339 in UTC with microseconds (``2026-01-02T03:04:05.000006Z``).

    The ``kubernetes`` client reads a body into its models and writes the times back with ``isoformat()``
    (``+00:00``), which drops a zero fraction, and the API server's MicroTime needs its six digits: a moment
    on a whole second is moved on by a microsecond."""
    moment = moment.astimezone(UTC)
    if moment.microsecond == 0:
        moment += timedelta(microseconds=1)
    return moment.strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def _time(value: object, field: str) -> datetime | None:
    if value is None:
        return None
    if not isinstance(value, str) or not _MICRO.fullmatch(value):
        raise MalformedLeaseError(f"spec.{field}: {shown(value)} is not an RFC 3339 time")
    text = value.replace("Z", "+00:00")
    whole, _, rest = text.partition(".")
    if rest:  # Python reads at most microseconds: cut nanoseconds, keep the offset
        digits = re.match(r"\d+", rest)
        assert digits is not None
        text = f"{whole}.{digits.group()[:6].ljust(6, '0')}{rest[digits.end() :]}"
    try:
        return datetime.fromisoformat(text)
    except ValueError:
        raise MalformedLeaseError(f"spec.{field}: {shown(value)} is not an RFC 3339 time") from None


def parse_lease(obj: JsonObj) -> tuple[LeaseRecord, str]:
    """The record of a Lease and its resourceVersion; MalformedLeaseError naming the field that is wrong."""
    metadata = obj.get("metadata")
    if not isinstance(metadata, dict) or not isinstance(metadata.get("resourceVersion"), str):
        raise MalformedLeaseError("metadata.resourceVersion is missing")
    spec = obj.get("spec", {})
    if not isinstance(spec, dict):
        raise MalformedLeaseError(f"spec: {shown(spec)} is not an object")
    holder = spec.get("holderIdentity") or ""
    if not isinstance(holder, str):
        raise MalformedLeaseError(f"spec.holderIdentity: {shown(holder)} is not a string")
    duration = spec.get("leaseDurationSeconds", 0)
    if not isinstance(duration, int) or isinstance(duration, bool) or not 0 <= duration <= 86_400:
        raise MalformedLeaseError(f"spec.leaseDurationSeconds: {shown(duration)} is not a number of seconds")
    transitions = spec.get("leaseTransitions", 0)
    if not isinstance(transitions, int) or isinstance(transitions, bool) or transitions < 0:
        raise MalformedLeaseError(f"spec.leaseTransitions: {shown(transitions)} is not a count")
    record = LeaseRecord(
        holder,
        duration,
        _time(spec.get("acquireTime"), "acquireTime"),
        _time(spec.get("renewTime"), "renewTime"),
        transitions,
    )
    return record, metadata["resourceVersion"]


def lease_body(
    namespace: str,
    name: str,
    record: LeaseRecord,
    *,
    resource_version: str = "",
    role: str = "leader",
    annotations: Mapping[str, str] | None = None,
) -> JsonObj:
    """The Lease object of ``record`` (with ``resource_version`` for a replace)."""
    metadata: JsonObj = {"name": name, "namespace": namespace, "labels": {MANAGED_BY: MANAGER, ROLE: role}}
    if resource_version:
        metadata["resourceVersion"] = resource_version
    if annotations:
        metadata["annotations"] = dict(annotations)
    spec: JsonObj = {
        "holderIdentity": record.holder,
        "leaseDurationSeconds": record.duration_seconds,
        "leaseTransitions": record.transitions,
    }
    if record.acquire_time is not None:
        spec["acquireTime"] = micro_time(record.acquire_time)
    if record.renew_time is not None:
        spec["renewTime"] = micro_time(record.renew_time)
    return {"apiVersion": LEASES.api_version, "kind": LEASES.kind, "metadata": metadata, "spec": spec}


def check_name(name: str, what: str) -> str:
    """``name`` when it is a Kubernetes object name (an RFC 1123 subdomain), else ValueError naming ``what``."""
    if len(name) > 253 or not _NAME.fullmatch(name):
        raise ValueError(f"{what}: {shown(name)} is not a Kubernetes object name (lowercase letters, digits, '-', '.')")
    return name


class _Observed:
    """When the local clock last saw a Lease's record change (client-go's ``observedTime``)."""

    __slots__ = ("at", "duration", "key")

    def __init__(self) -> None:
        self.key: object = None
        self.at = 0.0
        self.duration = 0.0

    def see(self, key: object, duration: float, now: float) -> None:
        if key != self.key:
            self.key, self.at, self.duration = key, now, duration

    def expires(self) -> float:
        return self.at + self.duration


class LeaderElector:
    """See the module docstring. ``identity`` is this replica's holderIdentity (its pod name); the callbacks run
    in the elector's thread and must not block long (leadership is renewed from the same thread)."""

    def __init__(
        self,
        client: KubeClient,
        namespace: str,
        name: str,
        identity: str,
        *,
        timing: LeaseTiming | None = None,
        on_started_leading: Callable[[], None] | None = None,
        on_stopped_leading: Callable[[], None] | None = None,
        clock: Clock = utcnow,
        monotonic: Callable[[], float] = time.monotonic,
        rng: random.Random | None = None,
    ) -> None:
        if not identity:
            raise ValueError("leader election: the identity is empty")
        self.client = client
        self.namespace = namespace
        self.name = name
        self.identity = identity
        self.timing = timing or LeaseTiming()
        self._on_started = on_started_leading
        self._on_stopped = on_stopped_leading
        self._clock = clock
        self._monotonic = monotonic
        self._rng = rng or random.Random()  # noqa: S311 (jitter, not secrets)
        self._lock = threading.Lock()
        self._stopped = threading.Event()
        self._thread: threading.Thread | None = None
        self._observed = _Observed()
        self._record: LeaseRecord | None = None  # as last read or written
        self._version = ""
        self._leading = False
        self._renewed = 0.0  # monotonic time of the last successful acquire or renew
        self._malformed: str | None = None
        self._last_error: str | None = None
        self.transitions_seen = 0  # how many times this elector started leading

    # -- readers
    @property
    def is_leader(self) -> bool:
        """This replica holds the Lease and renewed it within the renew deadline."""
        with self._lock:
            return self._leading and self._monotonic() - self._renewed < self.timing.renew_deadline

    @property
    def renewed_at(self) -> float | None:
        """The monotonic time of the last successful acquire or renew (taken before its request was sent; None
        before the first): while leading, :attr:`is_leader` turns False a renew deadline after it."""
        with self._lock:
            return self._renewed or None

    @property
    def leader(self) -> str:
        """The holder as last seen ("" when none, or unknown)."""
        with self._lock:
            return self._record.holder if self._record is not None else ""

    # -- lifecycle
    def start(self) -> None:
        if self._thread is None:
            self._stopped.clear()
            self._thread = threading.Thread(target=self._run, name=f"lease-{self.name}", daemon=True)
            self._thread.start()

    def stop(self, *, release: bool = True) -> None:
        """Stop electing and wait for the thread; a leader steps down and, with ``release``, clears the Lease
        (without: as a process that died, the Lease expires a lease duration later)."""
        self._stopped.set()
        thread, self._thread = self._thread, None
        if thread is not None:
            thread.join()
        if self._leading:
            if release:
                self._release()
            self._step_down("stopped")

    # -- the thread
    def _run(self) -> None:
        while not self._stopped.is_set():
            now = self._monotonic()
            if self._try_acquire_or_renew():
                if not self._leading:
                    self._start_leading()
                wait = self.timing.retry_period
            elif self._leading:
                if self._monotonic() - self._renewed >= self.timing.renew_deadline:
                    self._step_down(self._last_error or "the Lease could not be renewed within the renew deadline")
                wait = self.timing.retry_period
            else:
                wait = self.timing.retry_period * self._rng.uniform(0.8, 1.0)
                expires = self._observed.expires() - self._monotonic()
                if self._record is not None and self._record.holder and 0 < expires < wait:
                    wait = expires + 0.001
            if self._leading:  # never sleep past the renew deadline
                wait = min(wait, max(0.0, self._renewed + self.timing.renew_deadline - self._monotonic()))
            self._stopped.wait(max(0.0, wait - (self._monotonic() - now)))

    def _start_leading(self) -> None:
        with self._lock:
            self._leading = True
        self.transitions_seen += 1
        log.info("leader election: %s now holds Lease %s/%s", self.identity, self.namespace, self.name)
        if self._on_started is not None:
            try:
                self._on_started()
            except Exception:
                log.exception("leader election: the on_started_leading callback failed")

    def _step_down(self, why: str) -> None:
        with self._lock:
            if not self._leading:
                return
            self._leading = False
        log.warning(
            "leader election: %s stopped leading Lease %s/%s: %s", self.identity, self.namespace, self.name, why
        )
        if self._on_stopped is not None:
            try:
                self._on_stopped()
            except Exception:
                log.exception("leader election: the on_stopped_leading callback failed")

    def _try_acquire_or_renew(self) -> bool:
        """One attempt (client-go's ``tryAcquireOrRenew``); True when this replica holds the Lease now."""
        started = self._monotonic()
        wall = self._clock()
        try:
            obj = self.client.read(LEASES, self.namespace, self.name)
            if obj is None:
                record = LeaseRecord(self.identity, self.timing.duration_seconds, wall, wall, 0)
                created = self.client.create(LEASES, self.namespace, lease_body(self.namespace, self.name, record))
                return self._took(record, created, started)
            try:
                current, version = parse_lease(obj)
            except MalformedLeaseError as err:
                return self._unreadable(obj, err)
            self._malformed = None
            self._see(current, version)
            if current.holder and current.holder != self.identity and self._monotonic() < self._observed.expires():
                return False
            if current.holder == self.identity:
                record = LeaseRecord(
                    self.identity, self.timing.duration_seconds, current.acquire_time, wall, current.transitions
                )
            else:
                record = LeaseRecord(self.identity, self.timing.duration_seconds, wall, wall, current.transitions + 1)
            body = lease_body(self.namespace, self.name, record, resource_version=version)
            return self._took(record, self.client.replace(LEASES, self.namespace, body), started)
        except KubeConflictError as err:
            self._failed(f"another replica wrote the Lease first ({err})", logging.INFO)
            return False
        except KubeApiError as err:
            self._failed(str(err), logging.WARNING)
            return False

    def _took(self, record: LeaseRecord, written: JsonObj, started: float) -> bool:
        try:
            record, version = parse_lease(written)
        except MalformedLeaseError as err:
            self._failed(f"the API answered the Lease write with an unreadable Lease: {err}", logging.WARNING)
            return False
        with self._lock:
            self._record, self._version = record, version
            self._renewed = started  # the renewal counts from before the request: the conservative side
        self._observed.see(_key(record), record.duration_seconds, started)
        self._last_error = None
        return True

    def _see(self, record: LeaseRecord, version: str) -> None:
        with self._lock:
            self._record, self._version = record, version
        self._observed.see(_key(record), float(record.duration_seconds), self._monotonic())

    def _unreadable(self, obj: JsonObj, err: MalformedLeaseError) -> bool:
        """A Lease that is not a leader-election record: held (by no one we know) until it expires, then taken."""
        version = text(obj, "metadata", "resourceVersion")
        if self._malformed != str(err):
            self._malformed = str(err)
            log.error(
                "leader election: Lease %s/%s cannot be read (%s); taking it as held until it expires",
                self.namespace,
                self.name,
                err,
            )
        with self._lock:
            self._record = LeaseRecord("", 0, None, None, 0)
        self._observed.see(("malformed", version), self.timing.duration, self._monotonic())
        if self._monotonic() < self._observed.expires() or not version:
            return False
        wall = self._clock()
        record = LeaseRecord(self.identity, self.timing.duration_seconds, wall, wall, 1)
        started = self._monotonic()
        body = lease_body(self.namespace, self.name, record, resource_version=version)
        return self._took(record, self.client.replace(LEASES, self.namespace, body), started)

    def _failed(self, message: str, level: int) -> None:
        if message != self._last_error:
            log.log(level, "leader election: %s: %s", self.identity, message)
        self._last_error = message

    def _release(self) -> None:
        """Clear the holder (client-go's ReleaseOnCancel): the next contender takes over at once."""
        with self._lock:
            record, version = self._record, self._version
        if record is None or record.holder != self.identity or not version:
            return
        wall = self._clock()
        released = LeaseRecord("", 1, wall, wall, record.transitions)
        try:
            self.client.replace(
                LEASES, self.namespace, lease_body(self.namespace, self.name, released, resource_version=version)
            )
        except KubeApiError as err:
            log.warning("leader election: could not release Lease %s/%s: %s", self.namespace, self.name, err)
            return
        log.info("leader election: %s released Lease %s/%s", self.identity, self.namespace, self.name)


def _key(record: LeaseRecord) -> object:
    return (record.holder, record.duration_seconds, record.acquire_time, record.renew_time, record.transitions)


# ------------------------------------------------------------------------------------------ replica Leases


@dataclass(frozen=True, slots=True)
class Replica:
    """A replica's Lease as read: its holder (the replica's identity) and its annotations."""

    name: str
    identity: str
    annotations: Mapping[str, str]
    resource_version: str


class ReplicaLease:
    """The Lease of one replica (``mesh-identity-replica-<identity>``), renewed by :meth:`publish` with the
    annotations given. Not thread-safe: one thread publishes."""

    def __init__(
        self, client: KubeClient, namespace: str, identity: str, *, timing: LeaseTiming, clock: Clock = utcnow
    ) -> None:
        self.client = client
        self.namespace = namespace
        self.identity = identity
        self.name = check_name(REPLICA_PREFIX + identity, "the replica's Lease name")
        self.timing = timing
        self._clock = clock
        self._version = ""
        self._acquired: datetime | None = None
        self._error: str | None = None

    def publish(self, annotations: Mapping[str, str]) -> bool:
        """Create or renew the Lease with ``annotations``; False (logged once per distinct error) when it failed."""
        wall = self._clock()
        record = LeaseRecord(self.identity, self.timing.duration_seconds, self._acquired or wall, wall, 0)
        try:
            if not self._version:
                current = self.client.read(LEASES, self.namespace, self.name)
                if current is None:
                    body = lease_body(self.namespace, self.name, record, role="replica", annotations=annotations)
                    written = self.client.create(LEASES, self.namespace, body)
                    return self._wrote(written, wall)
                self._version = text(current, "metadata", "resourceVersion")
            body = lease_body(
                self.namespace,
                self.name,
                record,
                resource_version=self._version,
                role="replica",
                annotations=annotations,
            )
            return self._wrote(self.client.replace(LEASES, self.namespace, body), wall)
        except KubeApiError as err:
            self._version = ""  # read again next time
            if str(err) != self._error:
                log.warning("replica Lease %s/%s: cannot renew it: %s", self.namespace, self.name, err)
            self._error = str(err)
            return False

    def _wrote(self, written: JsonObj, wall: datetime) -> bool:
        self._version = text(written, "metadata", "resourceVersion")
        self._acquired = self._acquired or wall
        if self._error is not None:
            log.info("replica Lease %s/%s: renewed again", self.namespace, self.name)
        self._error = None
        return True

    def delete(self) -> None:
        """Remove the Lease (a replica that stops cleanly is no longer waited for)."""
        if not self._version:
            return
        try:
            self.client.delete(LEASES, self.namespace, self.name, self._version)
        except KubeApiError as err:
            log.warning("replica Lease %s/%s: cannot delete it: %s", self.namespace, self.name, err)
        self._version = ""


class ReplicaLeases:
    """The replicas' Leases as the leader reads them: each live one (its record changed within its lease duration
    on the local clock), and the expired ones to collect. Not thread-safe: one thread reads."""

    def __init__(self, client: KubeClient, namespace: str, *, monotonic: Callable[[], float] = time.monotonic) -> None:
        self.client = client
        self.namespace = namespace
        self._monotonic = monotonic
        self._observed: dict[str, _Observed] = {}
        self._malformed: set[tuple[str, str]] = set()

    def read(self) -> tuple[list[Replica], list[Replica]]:
        """(live, expired) replicas; KubeApiError when the list fails."""
        listing = self.client.list(LEASES, f"{MANAGED_BY}={MANAGER},{ROLE}=replica", namespace=self.namespace)
        now = self._monotonic()
        live: list[Replica] = []
        expired: list[Replica] = []
        names = set()
        for obj in listing.items:
            name = text(obj, "metadata", "name")
            try:
                record, version = parse_lease(obj)
            except MalformedLeaseError as err:
                if (name, str(err)) not in self._malformed:
                    self._malformed.add((name, str(err)))
                    log.error("replica Lease %s/%s cannot be read (%s); it counts as live", self.namespace, name, err)
                record, version = LeaseRecord("", 15, None, None, 0), text(obj, "metadata", "resourceVersion")
            annotations = field(obj, "metadata", "annotations")
            if not isinstance(annotations, dict) or not all(isinstance(v, str) for v in annotations.values()):
                annotations = {}
            names.add(name)
            observed = self._observed.setdefault(name, _Observed())
            observed.see(_key(record), float(record.duration_seconds or 1), now)
            replica = Replica(name, record.holder or name.removeprefix(REPLICA_PREFIX), annotations, version)
            (live if now < observed.expires() else expired).append(replica)
        for gone in set(self._observed) - names:
            del self._observed[gone]
        return live, expired

    def collect(self, replica: Replica) -> None:
        """Delete an expired replica's Lease, if it is still at the version read (it may have come back)."""
        try:
            self.client.delete(LEASES, self.namespace, replica.name, replica.resource_version)
        except KubeConflictError:
            return
        except KubeApiError as err:
            log.warning("replica Lease %s/%s: cannot delete it: %s", self.namespace, replica.name, err)
            return
        log.info("replica Lease %s/%s expired and was deleted", self.namespace, replica.name)
        self._observed.pop(replica.name, None)
