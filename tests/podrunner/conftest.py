"""The pod runner's tests make network namespaces, veths, a bridge and iptables rules, and start processes as
other uids: they need root, and fail (not skip) without it, as the agent tests do."""

from __future__ import annotations

import os

import pytest


@pytest.fixture(scope="session", autouse=True)  # before the module-scoped pods
def _needs_root() -> None:
    if os.getuid() != 0:
        pytest.fail(
            "the pod runner makes network namespaces and iptables rules: run the suite as root (tests/run.sh, as CI does)"
        )
