"""The JWT key rotation timer, over the real JWT authority with a clock the test moves."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path

from mesh_identity.config import JwtConfig
from mesh_identity.jwtkeys import JwtAuthority
from mesh_identity.spiffe import TrustDomain
from tests.waiting import wait_until
from xds_sds.signing.keytimer import KeyRotationTimer


class Clock:
    def __init__(self) -> None:
        self.offset = timedelta(0)

    def __call__(self) -> datetime:
        return datetime.now(UTC) + self.offset


def test_the_timer_rotates_the_keys_when_they_come_due(tmp_path: Path) -> None:
    clock = Clock()
    keys = JwtAuthority(TrustDomain("example.org"), tmp_path, settings=JwtConfig(), clock=clock)
    keys.start()
    before = set(keys.bundle().keys)
    timer = KeyRotationTimer(keys, clock=clock, check=timedelta(seconds=0.1))
    timer.start()
    try:
        assert timer.rotations == 0
        clock.offset = keys.next_rotation() - datetime.now(UTC) + timedelta(seconds=1)  # the next key is due
        wait_until(lambda: timer.rotations >= 1, "the timer to rotate the keys")
    finally:
        timer.stop()
    assert set(keys.bundle().keys) > before  # the next key is published beside the current one


class Failing:
    def __init__(self) -> None:
        self.calls = 0

    def next_rotation(self) -> datetime:
        return datetime.now(UTC) - timedelta(seconds=1)  # always due

    def rotate_if_due(self) -> bool:
        self.calls += 1
        raise OSError("the disk is full")


def test_a_failing_rotation_is_retried_after_the_retry_delay_not_in_a_loop() -> None:
    keys = Failing()
    timer = KeyRotationTimer(keys, check=timedelta(seconds=0.05), retry=timedelta(minutes=5))
    timer.start()
    try:
        wait_until(lambda: keys.calls >= 1, "the first attempt")
    finally:
        timer.stop()  # wakes it from its retry wait
    assert keys.calls == 1
    assert timer.failures == 1
