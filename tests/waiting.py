"""Waiting for what another thread or process does: the one bounded poll every test uses.

:func:`wait_until` polls a predicate until it returns something truthy and returns that value. Its deadline
only stops a broken test from hanging, it is not a speed test: call sites pick generous bounds. After the
deadline it raises AssertionError naming what it waited for.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")


def wait_until(predicate: Callable[[], T], what: str, timeout: float = 30.0, interval: float = 0.05) -> T:
    """Call ``predicate`` every ``interval`` seconds until its value is truthy and return it; AssertionError
    ("gave up waiting for <what> after <timeout>s") once ``timeout`` seconds have passed without that."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"gave up waiting for {what} after {timeout}s")
        time.sleep(interval)
