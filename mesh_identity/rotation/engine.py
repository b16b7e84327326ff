"""The rotation engine: one APScheduler job per identity, each due from its own certificate.

Every identity has a job whose trigger is the identity's own state: it fires at ``wake``, the jittered due time
of the current certificate (see :mod:`mesh_identity.rotation.schedule`) or, after a failure, the backoff time.
After each attempt the job is moved to the next time computed from the certificate just received. Nothing
rescans the fleet. A renewal always generates a fresh key. A failed renewal keeps the current SVID in service,
emits a :class:`~mesh_identity.events.RotationFailed` event (``error`` severity once expiry is near) and
retries with backoff.

In intermediate mode the intermediate CA has its own job, due from the intermediate's own validity. Workloads
move to a new intermediate at their own next renewal; both chain to the same root. When the intermediate is
close to its end (its renewal failing), leaves are issued with a lifetime cut to the intermediate's NotAfter
rather than refused.
"""

from __future__ import annotations

import contextlib
import logging
import random
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any, Protocol

from apscheduler.executors.pool import ThreadPoolExecutor
from apscheduler.jobstores.base import JobLookupError
from apscheduler.schedulers.background import BackgroundScheduler
from apscheduler.triggers.base import BaseTrigger
from apscheduler.triggers.interval import IntervalTrigger

from mesh_identity.authority import Authority
from mesh_identity.clock import Clock, utcnow
from mesh_identity.errors import (
    IssuanceError,
    MeshIdentityError,
    ProviderAuthError,
    ProviderError,
    ProviderUnavailableError,
)
from mesh_identity.events import CertificateRotated, CertKind, EventSink, NullSink, RotationFailed, Severity
from mesh_identity.provider import Health, Mode
from mesh_identity.rotation.schedule import (
    RetryPolicy,
    Validity,
    check_fraction,
    due_bounds,
    due_time,
    failure_severity,
    next_attempt,
)
from mesh_identity.rotation.source import BundleSource, SvidSource
from mesh_identity.spiffe import SpiffeId
from mesh_identity.svid import X509Svid

log = logging.getLogger(__name__)

INTERMEDIATE_JOB = "intermediate"
HEALTH_JOB = "provider-health"
_STRIPES = 64
_EARLY = timedelta(milliseconds=50)
WATCHDOG = timedelta(seconds=30)


@dataclass(frozen=True, slots=True)
class RotationSettings:
    """``rotate_after`` and ``jitter`` as in ``ca.rotate_after``/``ca.jitter``; ``retry`` None derives the
    backoff from each certificate's lifetime (:meth:`RetryPolicy.for_lifetime`)."""

    rotate_after: float = 0.5
    jitter: float = 0.1
    retry: RetryPolicy | None = None
    workers: int = 8
    health_interval: timedelta = timedelta(seconds=30)

    def __post_init__(self) -> None:
        check_fraction(self.rotate_after, self.jitter)


@dataclass(frozen=True, slots=True)
class RotationState:
    """One identity (or the intermediate) as the engine sees it now."""

    subject: str
    kind: CertKind
    serial: str | None
    not_before: datetime | None
    not_after: datetime | None
    next_rotation: datetime | None
    provider: str
    failures: int
    last_error: str | None


@dataclass(frozen=True, slots=True)
class RotationSummary:
    rotated: int
    failed: tuple[SpiffeId, ...]


class IssuanceObserver(Protocol):
    """Told how long each issuance took (the metrics implement it)."""

    def observe_issuance(self, provider: str, kind: CertKind, seconds: float) -> None: ...


class _Timer(BaseTrigger):  # type: ignore[misc]  # apscheduler is untyped
    """Rotation state of one certificate, and the APScheduler trigger of its job: it fires at ``wake``.

    When the job has just fired and has not yet moved ``wake`` on, the trigger answers ``now + WATCHDOG``: a
    job that died without rescheduling is retried rather than forgotten. A run that finds its timer not due
    (the watchdog fired during a slow renewal) only re-arms; several instances may be queued for that reason,
    the per-identity lock runs them one at a time.
    """

    __slots__ = ("armed", "failures", "key", "last_error", "validity", "wake")

    def __init__(self, key: str) -> None:
        self.key = key
        self.wake: datetime | None = None
        self.armed: datetime | None = None  # when the scheduler will run the job, as last set or answered
        self.validity: Validity | None = None
        self.failures = 0
        self.last_error: str | None = None

    def get_next_fire_time(self, previous_fire_time: datetime | None, now: datetime) -> datetime | None:
        wake = self.wake
        if wake is None:
            self.armed = None
        elif previous_fire_time is None or wake > previous_fire_time:
            self.armed = wake
        else:
            self.armed = now + WATCHDOG
        return self.armed

    def __str__(self) -> str:
        return f"wake at {self.wake.isoformat() if self.wake else 'never'}"


class _Identity(_Timer):
    __slots__ = ("removed", "source")

    def __init__(self, source: SvidSource) -> None:
        super().__init__(str(source.spiffe_id))
        self.source = source
        self.removed = False


class RotationEngine:
    """Keeps the SVIDs of a set of identities (and the intermediate) renewed.

    ``clock`` decides (due times, severities); the scheduler sleeps in real time, so tests that inject a clock
    start the engine ``paused`` and drive it with :meth:`rotate`. ``rng`` draws the jitter.
    """

    def __init__(
        self,
        authority: Authority,
        settings: RotationSettings | None = None,
        *,
        events: EventSink | None = None,
        observer: IssuanceObserver | None = None,
        clock: Clock = utcnow,
        rng: random.Random | None = None,
    ) -> None:
        self.authority = authority
        self.settings = settings or RotationSettings()
        self.events: EventSink = events or NullSink()
        self.observer = observer
        self.clock = clock
        self.rng = rng or random.Random()  # noqa: S311 - jitter, not secrets
        self.bundles = BundleSource()
        self._entries: dict[SpiffeId, _Identity] = {}
        self._lock = threading.Lock()
        self._stripes = tuple(threading.RLock() for _ in range(_STRIPES))
        self._ca = _Timer(INTERMEDIATE_JOB)
        self._ca_lock = threading.RLock()
        self._health: Health | None = None
        self._scheduler = BackgroundScheduler(
            timezone=UTC,
            executors={"default": ThreadPoolExecutor(max_workers=self.settings.workers)},
            job_defaults={"misfire_grace_time": None, "coalesce": True, "max_instances": 3},
        )

    @property
    def provider_name(self) -> str:
        return self.authority.provider.name

    @property
    def intermediate_mode(self) -> bool:
        return self.authority.settings.mode is Mode.INTERMEDIATE

    # -- lifecycle -----------------------------------------------------------------------------------------

    def start(self, *, paused: bool = False) -> None:
        """Publish the bundle, schedule the intermediate, the health check and every identity added so far.
        The authority must have started."""
        self.publish_bundle()
        signing = self.authority.signing_ca
        if self.intermediate_mode and signing is not None and self._ca.validity is None:
            self._ca.validity = Validity.of(signing.certificate, self.clock())
            self._ca.wake = self._due(self._ca.validity)
        self.check_health()
        self._scheduler.start(paused=paused)
        if self.intermediate_mode:
            self._add_job(self._ca)
        self._scheduler.add_job(
            self.check_health,
            IntervalTrigger(seconds=self.settings.health_interval.total_seconds(), timezone=UTC),
            id=HEALTH_JOB,
            name=HEALTH_JOB,
        )
        with self._lock:
            entries = list(self._entries.values())
        for entry in entries:
            if entry.wake is not None:
                self._add_job(entry)

    def resume(self) -> None:
        self._scheduler.resume()

    def stop(self) -> None:
        """Stop scheduling (waits for running rotations) and close every source."""
        if self._scheduler.running:
            self._scheduler.shutdown(wait=True)
        with self._lock:
            entries = list(self._entries.values())
        for entry in entries:
            entry.source.close()
        self.bundles.close()

    @property
    def running(self) -> bool:
        return bool(self._scheduler.running)

    def job_times(self) -> dict[str, datetime | None]:
        """Job id -> next run time, as the scheduler holds them (for tests and debugging)."""
        return {job.id: job.next_run_time for job in self._scheduler.get_jobs()}

    # -- identities ----------------------------------------------------------------------------------------

    def add(self, spiffe_id: SpiffeId) -> SvidSource:
        """Start managing ``spiffe_id``: issue its first SVID now and schedule its renewal. When the first
        issuance fails the identity is kept and retried with backoff (its source has no SVID until then)."""
        with self._lock:
            existing = self._entries.get(spiffe_id)
            if existing is not None:
                return existing.source
            entry = _Identity(SvidSource(spiffe_id, self.bundles))
            self._entries[spiffe_id] = entry
        self._rotate_entry(entry, "rotation")
        return entry.source

    def add_all(self, spiffe_ids: Iterable[SpiffeId]) -> list[SvidSource]:
        return [self.add(spiffe_id) for spiffe_id in spiffe_ids]

    def remove(self, spiffe_id: SpiffeId) -> None:
        with self._lock:
            entry = self._entries.pop(spiffe_id, None)
        if entry is None:
            return
        with self._stripe(entry):
            entry.removed = True
        with contextlib.suppress(JobLookupError):
            self._scheduler.remove_job(entry.key)
        entry.source.close()

    def source(self, spiffe_id: SpiffeId) -> SvidSource:
        with self._lock:
            entry = self._entries.get(spiffe_id)
        if entry is None:
            raise IssuanceError(f"{spiffe_id} is not managed by the rotation engine")
        return entry.source

    def identities(self) -> list[SpiffeId]:
        with self._lock:
            return list(self._entries)

    def sources(self) -> list[SvidSource]:
        with self._lock:
            return [entry.source for entry in self._entries.values()]

    def __len__(self) -> int:
        return len(self._entries)

    # -- rotation ------------------------------------------------------------------------------------------

    def rotate(self, spiffe_id: SpiffeId, requested_by: str = "rotation") -> bool:
        """Renew ``spiffe_id`` now (fresh key); False when it failed (the failure is handled as a due renewal's
        would be: event, backoff)."""
        with self._lock:
            entry = self._entries.get(spiffe_id)
        if entry is None:
            raise IssuanceError(f"{spiffe_id} is not managed by the rotation engine")
        return self._rotate_entry(entry, requested_by)

    def rotate_all(self, requested_by: str = "rotate-all") -> RotationSummary:
        """Renew every identity now, in this thread (e.g. after a root activation).

        A renewed identity's job stays where it is armed when that time lies in the new certificate's jitter
        window (it becomes the due time) or before it (the job wakes there, finds nothing due and moves itself).
        So a mass renewal does not also reorder the whole job store one job at a time."""
        with self._lock:
            entries = list(self._entries.values())
        failed = [entry.source.spiffe_id for entry in entries if not self._rotate_entry(entry, requested_by, lazy=True)]
        return RotationSummary(len(entries) - len(failed), tuple(failed))

    def _run(self, entry: _Identity) -> None:
        """The job of one identity."""
        self._rotate_entry(entry, "rotation", due_only=True)

    def _stripe(self, entry: _Timer) -> threading.RLock:
        return self._stripes[hash(entry.key) % _STRIPES]

    def _rotate_entry(self, entry: _Identity, requested_by: str, *, due_only: bool = False, lazy: bool = False) -> bool:
        with self._stripe(entry):
            if entry.removed:
                return False
            if due_only and _not_due(entry, self.clock()):
                self._schedule(entry)  # the watchdog, or a run that waited for another to finish: re-arm
                return True
            old = entry.source.current()
            started = time.perf_counter()
            try:
                svid = self._issue(entry.source.spiffe_id, requested_by)
            except Exception as err:
                self._failed(entry, CertKind.WORKLOAD, err)
                return False
            self._observe(svid.provider, CertKind.WORKLOAD, time.perf_counter() - started)
            now = self.clock()
            if not self.intermediate_mode:
                self._upstream_answered(now)
            entry.validity = Validity.of(svid.leaf, now)
            entry.wake = self._due(entry.validity, keep=entry.armed if lazy else None)
            entry.failures, entry.last_error = 0, None
            entry.source.update(svid)
            if old is not None:
                self.events.emit(
                    CertificateRotated(
                        subject=entry.key,
                        kind=CertKind.WORKLOAD,
                        old_serial=old.serial,
                        new_serial=svid.serial,
                        not_after=entry.validity.end,
                        provider=svid.provider,
                        at=now,
                    )
                )
            self._schedule(entry, lazy=lazy)
            return True

    def _issue(self, spiffe_id: SpiffeId, requested_by: str) -> X509Svid:
        """Issue with a fresh key; in intermediate mode cut the TTL to what the signing intermediate has left."""
        ttl: timedelta | None = None
        signing = self.authority.signing_ca
        if signing is not None:
            left = signing.signer.not_after - self.clock()
            margin = min(timedelta(seconds=1), left / 20)  # the authority reads its clock again a moment later
            if timedelta(0) < left and left - margin < self.authority.settings.workload_ttl:
                ttl = left - margin
        return self.authority.issue(spiffe_id, ttl=ttl, requested_by=requested_by)

    # -- the intermediate ----------------------------------------------------------------------------------

    def rotate_intermediate(self, requested_by: str = "rotation", *, due_only: bool = False) -> bool:
        """Obtain a new intermediate now (intermediate mode); False when it failed (then retried with backoff)."""
        with self._ca_lock:
            if due_only and _not_due(self._ca, self.clock()):
                self._schedule(self._ca)
                return True
            old = self.authority.signing_ca
            started = time.perf_counter()
            try:
                signing = self.authority.rotate_intermediate(requested_by)
            except Exception as err:
                self._failed(self._ca, CertKind.INTERMEDIATE, err)
                return False
            self._observe(self.provider_name, CertKind.INTERMEDIATE, time.perf_counter() - started)
            now = self.clock()
            self._upstream_answered(now)
            self._ca.validity = Validity.of(signing.certificate, now)
            self._ca.wake = self._due(self._ca.validity)
            self._ca.failures, self._ca.last_error = 0, None
            if old is not None:
                self.events.emit(
                    CertificateRotated(
                        subject=str(self.authority.trust_domain.id),
                        kind=CertKind.INTERMEDIATE,
                        old_serial=old.serial,
                        new_serial=signing.serial,
                        not_after=signing.certificate.not_valid_after_utc,
                        provider=self.provider_name,
                        at=now,
                    )
                )
            self.publish_bundle()
            self._schedule(self._ca)
            return True

    def _run_intermediate(self, timer: _Timer) -> None:
        self.rotate_intermediate(due_only=True)

    def publish_bundle(self) -> bool:
        """Serve the authority's current bundle (after a CA change); True when it changed."""
        return self.bundles.publish(self.authority.bundle())

    # -- failures ------------------------------------------------------------------------------------------

    def _failed(self, timer: _Timer, kind: CertKind, err: Exception) -> None:
        now = self.clock()
        if not isinstance(err, MeshIdentityError):
            log.error("renewal of %s failed unexpectedly", timer.key, exc_info=err)
        retryable = err.retryable if isinstance(err, ProviderError) else True
        if isinstance(err, ProviderUnavailableError | ProviderAuthError):
            self._health = Health(False, f"a signing request failed: {_one_line(err)}", now)
        timer.failures += 1
        timer.last_error = _one_line(err)
        validity = timer.validity
        lifetime = validity.lifetime if validity is not None else self._default_lifetime(kind)
        policy = self.settings.retry or RetryPolicy.for_lifetime(lifetime)
        attempt = timer.failures if retryable else 64  # retrying cannot help soon: only at the longest interval
        expires = validity.end if validity is not None else None
        timer.wake = next_attempt(now, attempt, policy, self.rng.random(), expires)
        severity = failure_severity(now, validity, self.settings.rotate_after, retryable=retryable)
        subject = str(self.authority.trust_domain.id) if kind is CertKind.INTERMEDIATE else timer.key
        log.log(
            logging.ERROR if severity is Severity.ERROR else logging.WARNING,
            "renewal of %s %s failed (attempt %d, next at %s): %s",
            kind,
            subject,
            timer.failures,
            timer.wake.isoformat(),
            timer.last_error,
        )
        self.events.emit(
            RotationFailed(
                subject=subject,
                kind=kind,
                error=timer.last_error,
                attempt=timer.failures,
                next_attempt=timer.wake,
                expires=expires,
                severity=severity,
                provider=self.provider_name,
                at=now,
            )
        )
        self._schedule(timer)

    def _default_lifetime(self, kind: CertKind) -> timedelta:
        settings = self.authority.settings
        return settings.intermediate_ttl if kind is CertKind.INTERMEDIATE else settings.workload_ttl

    # -- scheduling ----------------------------------------------------------------------------------------

    def _due(self, validity: Validity, keep: datetime | None = None) -> datetime:
        """A jittered due time for ``validity``; ``keep`` when it already lies in the jitter window (a job armed
        there needs no move, and the fleet keeps its spread)."""
        if keep is not None:
            earliest, latest = due_bounds(validity, self.settings.rotate_after, self.settings.jitter)
            if earliest <= keep <= latest:
                return keep
        return due_time(validity, self.settings.rotate_after, self.settings.jitter, self.rng.random())

    def _schedule(self, timer: _Timer, *, lazy: bool = False) -> None:
        """Move the job of ``timer`` to ``timer.wake`` (no-op before :meth:`start`). ``lazy`` leaves a job that
        will run no later than ``wake`` where it is: it re-arms itself when it finds nothing due."""
        wake = timer.wake
        if not self._scheduler.running or wake is None:
            return
        if lazy and timer.armed is not None and timer.armed <= wake:
            return
        if timer.armed is None:  # never handed to the scheduler: no job yet
            self._add_job(timer)
            return
        try:
            self._scheduler.modify_job(timer.key, next_run_time=wake)
            timer.armed = wake
        except JobLookupError:
            self._add_job(timer)

    def _add_job(self, timer: _Timer) -> None:
        if isinstance(timer, _Identity):
            if timer.removed:
                return
            func: Any = self._run
        else:
            func = self._run_intermediate
        self._scheduler.add_job(func, timer, args=(timer,), id=timer.key, name=timer.key, replace_existing=True)

    # -- health --------------------------------------------------------------------------------------------

    def check_health(self) -> Health:
        """Ask the provider now; the answer is kept for :meth:`health` (the metrics read it)."""
        try:
            health = self.authority.provider.health()
        except Exception as err:
            health = Health(False, f"health check failed: {_one_line(err)}", self.clock())
        self._health = health
        return health

    def health(self) -> Health | None:
        """The provider's health: the last periodic check, or the outcome of the last upstream request if later."""
        return self._health

    def _upstream_answered(self, now: datetime) -> None:
        health = self._health
        if health is None or not health.healthy:
            self._health = Health(True, "the last signing request succeeded", now)

    # -- views ---------------------------------------------------------------------------------------------

    def states(self) -> list[RotationState]:
        """Every identity's current state (one pass, no locks held across it)."""
        with self._lock:
            entries = list(self._entries.values())
        return [self._state(entry) for entry in entries]

    def state(self, spiffe_id: SpiffeId) -> RotationState:
        with self._lock:
            entry = self._entries.get(spiffe_id)
        if entry is None:
            raise IssuanceError(f"{spiffe_id} is not managed by the rotation engine")
        return self._state(entry)

    def _state(self, entry: _Identity) -> RotationState:
        svid = entry.source.current()
        return RotationState(
            subject=entry.key,
            kind=CertKind.WORKLOAD,
            serial=svid.serial if svid else None,
            not_before=svid.not_before if svid else None,
            not_after=svid.not_after if svid else None,
            next_rotation=entry.wake,
            provider=svid.provider if svid else self.provider_name,
            failures=entry.failures,
            last_error=entry.last_error,
        )

    def intermediate_state(self) -> RotationState | None:
        """The signing intermediate (intermediate mode), else None."""
        signing = self.authority.signing_ca
        if not self.intermediate_mode:
            return None
        cert = signing.certificate if signing is not None else None
        return RotationState(
            subject=str(self.authority.trust_domain.id),
            kind=CertKind.INTERMEDIATE,
            serial=signing.serial if signing is not None else None,
            not_before=cert.not_valid_before_utc if cert is not None else None,
            not_after=cert.not_valid_after_utc if cert is not None else None,
            next_rotation=self._ca.wake,
            provider=self.provider_name,
            failures=self._ca.failures,
            last_error=self._ca.last_error,
        )

    def _observe(self, provider: str, kind: CertKind, seconds: float) -> None:
        if self.observer is not None:
            self.observer.observe_issuance(provider, kind, seconds)


def _not_due(timer: _Timer, now: datetime) -> bool:
    return timer.wake is not None and timer.wake - now > _EARLY


def _one_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    message = text[0] if text else ""
    return message or type(err).__name__
