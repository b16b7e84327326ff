"""When to renew, how to back off, when to raise the alarm: pure functions of a certificate's validity and ``now``.

Nothing here reads a clock or a random generator: callers pass ``now`` and ``draw`` (a number in [0, 1)), so
the engine and the tests compute exactly the same times.

* **Due time.** A certificate is due at ``start + rotate_after * lifetime`` where ``lifetime = NotAfter - start``.
  ``start`` is the certificate's NotBefore or, when later, the moment we received it: CAs backdate NotBefore
  for clock skew (ours by a minute, Vault by 30 s) and that backdated time was never usable. With jitter, the
  due time is drawn from ``[start + rotate_after * (1 - jitter) * lifetime, start + rotate_after * lifetime]``:
  jitter only ever renews *earlier* than ``rotate_after`` says, never later.
* **Backoff.** After the n-th consecutive failure the next attempt waits ``initial * 2**(n-1)``, capped at
  ``maximum``, jittered to between half and all of that, and never more than half the time left before expiry
  (so attempts get denser as expiry nears instead of sleeping past it).
* **Escalation.** A failure is a warning while more than half of the renewal window (``NotAfter - due``) is
  left, and an error after that, once the certificate has expired, when nothing is being served yet, or when
  the error is one that retrying will not fix.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta

from cryptography import x509

from mesh_identity.errors import ConfigError
from mesh_identity.events import Severity


def check_fraction(rotate_after: float, jitter: float) -> None:
    """ConfigError unless ``0 < rotate_after < 1`` and ``0 <= jitter < 0.5``."""
    if isinstance(rotate_after, bool) or not isinstance(rotate_after, int | float) or not 0 < rotate_after < 1:
        raise ConfigError(f"ca.rotate_after: {rotate_after!r} is not a fraction strictly between 0 and 1")
    if isinstance(jitter, bool) or not isinstance(jitter, int | float) or not 0 <= jitter < 0.5:
        raise ConfigError(f"ca.jitter: {jitter!r} is not a fraction in [0, 0.5)")


@dataclass(frozen=True, slots=True)
class Validity:
    """The usable validity of a certificate: from ``start`` (NotBefore, or receipt if later) to ``end`` (NotAfter)."""

    start: datetime
    end: datetime

    def __post_init__(self) -> None:
        if self.end <= self.start:
            raise ValueError(f"validity ends at {self.end.isoformat()}, not after its start {self.start.isoformat()}")

    @classmethod
    def of(cls, cert: x509.Certificate, received_at: datetime | None = None) -> Validity:
        """The validity read from ``cert``; ``received_at`` moves the start later when NotBefore was backdated.
        A certificate received after its own NotAfter keeps its NotBefore (its lifetime is then in the past)."""
        start, end = cert.not_valid_before_utc, cert.not_valid_after_utc
        if received_at is not None and start < received_at < end:
            start = received_at
        return cls(start, end)

    @property
    def lifetime(self) -> timedelta:
        return self.end - self.start

    def left(self, now: datetime) -> timedelta:
        return self.end - now


def due_bounds(validity: Validity, rotate_after: float, jitter: float) -> tuple[datetime, datetime]:
    """The earliest and latest due time that jitter may pick."""
    latest = validity.start + validity.lifetime * rotate_after
    earliest = validity.start + validity.lifetime * (rotate_after * (1 - jitter))
    return earliest, latest


def due_time(validity: Validity, rotate_after: float, jitter: float, draw: float) -> datetime:
    """The due time at position ``draw`` (in [0, 1)) of the jitter window: 0 is the earliest, 1 the latest."""
    earliest, latest = due_bounds(validity, rotate_after, jitter)
    return earliest + (latest - earliest) * _unit(draw)


def due_for_rotation(validity: Validity, rotate_after: float, now: datetime) -> bool:
    """Whether ``now`` is at or past the un-jittered due time."""
    return now >= due_bounds(validity, rotate_after, 0.0)[1]


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    """Exponential backoff: ``initial * multiplier**(attempt-1)``, at most ``maximum``."""

    initial: timedelta
    maximum: timedelta
    multiplier: float = 2.0

    def __post_init__(self) -> None:
        if self.initial <= timedelta(0) or self.maximum < self.initial:
            raise ValueError(f"retry policy needs 0 < initial <= maximum, not {self.initial} and {self.maximum}")
        if self.multiplier < 1:
            raise ValueError(f"retry multiplier {self.multiplier} is less than 1")

    @classmethod
    def for_lifetime(cls, lifetime: timedelta) -> RetryPolicy:
        """The default for a certificate of ``lifetime``: start at 1% of it (at most 30 s), cap at 10% (at most
        5 min). A 1 h certificate retries after 30 s, 1 min, 2 min, 4 min, then every 5 min."""
        lifetime = max(lifetime, timedelta(milliseconds=10))
        initial = min(lifetime / 100, timedelta(seconds=30))
        maximum = max(initial, min(lifetime / 10, timedelta(minutes=5)))
        return cls(initial, maximum)


def retry_delay(attempt: int, policy: RetryPolicy, draw: float) -> timedelta:
    """The backoff before retry number ``attempt`` (1 after the first failure), jittered into [half, all] of it."""
    if attempt < 1:
        raise ValueError(f"attempt {attempt} is not a positive number")
    growth = policy.multiplier ** min(attempt - 1, 64)
    ceiling = policy.maximum / policy.initial
    delay = policy.maximum if growth >= ceiling else policy.initial * growth
    return delay * (0.5 + 0.5 * _unit(draw))


def next_attempt(now: datetime, attempt: int, policy: RetryPolicy, draw: float, expires: datetime | None) -> datetime:
    """When to retry after failure number ``attempt``: the backoff, but never more than half the time left before
    ``expires`` (and never sooner than ``policy.initial`` / 2, so a dying certificate cannot cause a busy loop)."""
    delay = retry_delay(attempt, policy, draw)
    if expires is not None and expires > now:
        delay = min(delay, max((expires - now) / 2, policy.initial / 2))
    return now + delay


def failure_severity(
    now: datetime, validity: Validity | None, rotate_after: float, *, retryable: bool = True
) -> Severity:
    """ERROR when the certificate is past the middle of its renewal window, expired or missing, or when retrying
    cannot help; WARNING otherwise."""
    if validity is None or not retryable:
        return Severity.ERROR
    left = validity.left(now)
    window = validity.lifetime * (1 - rotate_after)
    return Severity.ERROR if left <= window / 2 else Severity.WARNING


def _unit(draw: float) -> float:
    if not 0 <= draw <= 1:
        raise ValueError(f"draw {draw!r} is not in [0, 1]")
    return draw
