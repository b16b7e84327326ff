"""The scheduling functions: due time, jitter bounds, backoff, escalation. Every time is given, nothing waits."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest
from hypothesis import given
from hypothesis import strategies as st

from mesh_identity.errors import ConfigError
from mesh_identity.events import Severity
from mesh_identity.rotation.engine import RotationSettings
from mesh_identity.rotation.schedule import (
    RetryPolicy,
    Validity,
    check_fraction,
    due_bounds,
    due_for_rotation,
    due_time,
    failure_severity,
    next_attempt,
    retry_delay,
)

T0 = datetime(2030, 1, 1, tzinfo=UTC)
HOUR = Validity(T0, T0 + timedelta(hours=1))
S = timedelta(seconds=1)


def test_due_bounds_of_an_hour_at_half_with_ten_percent_jitter():
    assert due_bounds(HOUR, 0.5, 0.1) == (T0 + timedelta(minutes=27), T0 + timedelta(minutes=30))


@pytest.mark.parametrize(
    ("draw", "expected"),
    [(0.0, timedelta(minutes=27)), (0.5, timedelta(minutes=28, seconds=30)), (1.0, timedelta(minutes=30))],
)
def test_due_time_is_placed_in_the_jitter_window_by_the_draw(draw, expected):
    assert due_time(HOUR, 0.5, 0.1, draw) == T0 + expected


def test_without_jitter_the_due_time_is_exactly_the_fraction():
    assert due_time(HOUR, 0.8, 0.0, 0.37) == T0 + timedelta(minutes=48)


@given(
    lifetime=st.integers(min_value=1, max_value=10**8),
    rotate_after=st.floats(min_value=0.01, max_value=0.99),
    jitter=st.floats(min_value=0.0, max_value=0.49),
    draw=st.floats(min_value=0.0, max_value=1.0),
)
def test_due_time_stays_in_its_bounds_and_inside_the_lifetime(lifetime, rotate_after, jitter, draw):
    validity = Validity(T0, T0 + timedelta(milliseconds=lifetime))
    earliest, latest = due_bounds(validity, rotate_after, jitter)
    due = due_time(validity, rotate_after, jitter, draw)
    assert validity.start < earliest <= due <= latest < validity.end
    assert latest - validity.start <= validity.lifetime * rotate_after  # jitter never renews later


def test_a_backdated_not_before_counts_from_receipt():
    class Cert:
        not_valid_before_utc = T0 - timedelta(minutes=1)
        not_valid_after_utc = T0 + timedelta(seconds=4)

    received = Validity.of(Cert(), received_at=T0)  # type: ignore[arg-type]
    assert received == Validity(T0, T0 + timedelta(seconds=4))
    assert due_time(received, 0.5, 0, 0) == T0 + timedelta(seconds=2)
    assert Validity.of(Cert()) == Validity(T0 - timedelta(minutes=1), T0 + timedelta(seconds=4))  # type: ignore[arg-type]
    # received before NotBefore (our clock behind the CA's) or after NotAfter: NotBefore stands
    assert Validity.of(Cert(), received_at=T0 - timedelta(hours=1)).start == Cert.not_valid_before_utc  # type: ignore[arg-type]
    assert Validity.of(Cert(), received_at=T0 + timedelta(hours=1)).start == Cert.not_valid_before_utc  # type: ignore[arg-type]


def test_a_validity_must_end_after_it_starts():
    with pytest.raises(ValueError) as raised:
        Validity(T0, T0)
    assert str(raised.value) == (
        "validity ends at 2030-01-01T00:00:00+00:00, not after its start 2030-01-01T00:00:00+00:00"
    )


@pytest.mark.parametrize(
    ("now", "due"),
    [
        (T0 + timedelta(minutes=29, seconds=59), False),
        (T0 + timedelta(minutes=30), True),
        (T0 + timedelta(hours=2), True),
    ],
)
def test_due_for_rotation(now, due):
    assert due_for_rotation(HOUR, 0.5, now) is due


POLICY = RetryPolicy(S, 10 * S)


@pytest.mark.parametrize(
    ("attempt", "draw", "delay"),
    [
        (1, 1.0, 1 * S),
        (2, 1.0, 2 * S),
        (3, 1.0, 4 * S),
        (4, 1.0, 8 * S),
        (5, 1.0, 10 * S),
        (60, 1.0, 10 * S),
        (1, 0.0, S / 2),
        (3, 0.0, 2 * S),
        (5, 0.0, 5 * S),
        (3, 0.5, 3 * S),
    ],
)
def test_backoff_doubles_is_capped_and_jittered_into_half_to_full(attempt, draw, delay):
    assert retry_delay(attempt, POLICY, draw) == delay


@pytest.mark.parametrize("attempt", [1, 2, 3])
def test_below_the_cap_backoff_never_shrinks_whatever_the_draws(attempt):
    assert retry_delay(attempt + 1, POLICY, 0.0) >= retry_delay(attempt, POLICY, 1.0)


@pytest.mark.parametrize(
    ("now", "attempt", "expected"),
    [
        (T0 + timedelta(minutes=30), 3, T0 + timedelta(minutes=30, seconds=4)),  # plenty of time: the backoff
        (T0 + timedelta(minutes=59, seconds=54), 4, T0 + timedelta(minutes=59, seconds=57)),  # half of 6 s left
        (T0 + timedelta(minutes=59, seconds=59, milliseconds=800), 4, T0 + timedelta(hours=1, milliseconds=300)),
        (T0 + timedelta(hours=2), 4, T0 + timedelta(hours=2, seconds=8)),  # expired: the backoff again
    ],
)
def test_next_attempt_never_sleeps_past_expiry(now, attempt, expected):
    assert next_attempt(now, attempt, POLICY, 1.0, HOUR.end) == expected


def test_next_attempt_without_a_certificate_is_the_backoff():
    assert next_attempt(T0, 2, POLICY, 1.0, None) == T0 + 2 * S


@pytest.mark.parametrize(
    ("lifetime", "initial", "maximum"),
    [
        (timedelta(hours=1), timedelta(seconds=30), timedelta(minutes=5)),
        (timedelta(minutes=10), timedelta(seconds=6), timedelta(minutes=1)),
        (timedelta(days=1), timedelta(seconds=30), timedelta(minutes=5)),
        (timedelta(seconds=4), timedelta(milliseconds=40), timedelta(milliseconds=400)),
    ],
)
def test_default_retry_policy_follows_the_lifetime(lifetime, initial, maximum):
    assert RetryPolicy.for_lifetime(lifetime) == RetryPolicy(initial, maximum)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        ((timedelta(0), S), "retry policy needs 0 < initial <= maximum, not 0:00:00 and 0:00:01"),
        ((2 * S, S), "retry policy needs 0 < initial <= maximum, not 0:00:02 and 0:00:01"),
        ((S, S, 0.5), "retry multiplier 0.5 is less than 1"),
    ],
)
def test_retry_policy_refuses_nonsense(args, message):
    with pytest.raises(ValueError) as raised:
        RetryPolicy(*args)
    assert str(raised.value) == message


@pytest.mark.parametrize(
    ("elapsed", "validity", "retryable", "severity"),
    [
        (timedelta(minutes=31), HOUR, True, Severity.WARNING),  # 29 min of a 30 min window left
        (timedelta(minutes=44, seconds=59), HOUR, True, Severity.WARNING),
        (timedelta(minutes=45), HOUR, True, Severity.ERROR),  # half the window is gone
        (timedelta(minutes=59), HOUR, True, Severity.ERROR),
        (timedelta(hours=2), HOUR, True, Severity.ERROR),  # expired
        (timedelta(minutes=31), None, True, Severity.ERROR),  # nothing to serve
        (timedelta(minutes=31), HOUR, False, Severity.ERROR),  # retrying will not help
    ],
)
def test_failures_escalate_to_error_when_expiry_nears(elapsed, validity, retryable, severity):
    assert failure_severity(T0 + elapsed, validity, 0.5, retryable=retryable) is severity


def test_escalation_follows_the_rotation_fraction():
    # rotate_after 0.8: the window is 12 min, the alarm goes off with 6 min left
    assert failure_severity(T0 + timedelta(minutes=53, seconds=59), HOUR, 0.8) is Severity.WARNING
    assert failure_severity(T0 + timedelta(minutes=54), HOUR, 0.8) is Severity.ERROR


@pytest.mark.parametrize(
    ("rotate_after", "jitter", "message"),
    [
        (0, 0.1, "ca.rotate_after: 0 is not a fraction strictly between 0 and 1"),
        (1, 0.1, "ca.rotate_after: 1 is not a fraction strictly between 0 and 1"),
        (1.5, 0.1, "ca.rotate_after: 1.5 is not a fraction strictly between 0 and 1"),
        (-0.2, 0.1, "ca.rotate_after: -0.2 is not a fraction strictly between 0 and 1"),
        (True, 0.1, "ca.rotate_after: True is not a fraction strictly between 0 and 1"),
        ("0.5", 0.1, "ca.rotate_after: '0.5' is not a fraction strictly between 0 and 1"),
        (0.5, 0.5, "ca.jitter: 0.5 is not a fraction in [0, 0.5)"),
        (0.5, -0.1, "ca.jitter: -0.1 is not a fraction in [0, 0.5)"),
    ],
)
def test_bad_fractions_are_refused_by_the_engine_settings(rotate_after, jitter, message):
    with pytest.raises(ConfigError) as raised:
        check_fraction(rotate_after, jitter)
    assert str(raised.value) == message
    with pytest.raises(ConfigError) as raised:
        RotationSettings(rotate_after=rotate_after, jitter=jitter)
    assert str(raised.value) == message


@pytest.mark.parametrize("draw", [-0.1, 1.5])
def test_a_draw_outside_the_unit_interval_is_a_bug(draw):
    with pytest.raises(ValueError) as raised:
        due_time(HOUR, 0.5, 0.1, draw)
    assert str(raised.value) == f"draw {draw} is not in [0, 1]"
