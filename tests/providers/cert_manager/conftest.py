"""Fixtures for the cert-manager provider tests, and the real-cluster tier.

Tests marked ``@pytest.mark.integration`` in this directory talk to a real cluster with cert-manager
installed and run only when ``KUBECONFIG`` is set; otherwise they are deselected (not skipped), so a plain run
reports them as deselected rather than hiding a failure. See ``test_cert_manager_integration.py`` for the
variables they read.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.fakes.cert_manager import cert_manager_signer, install_crds
from tests.fakes.kube import KubeServer, kube_api_client

__all__ = ["cert_manager_signer", "kube_api_client", "kube_server"]

HERE = Path(__file__).parent


@pytest.fixture
def kube_server() -> Iterator[KubeServer]:
    """A running test API server with cert-manager's CRDs installed (every test here expects them)."""
    with install_crds(KubeServer()) as server:
        yield server


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if os.environ.get("KUBECONFIG"):
        return
    mine = [i for i in items if HERE in Path(str(i.path)).parents and i.get_closest_marker("integration")]
    if mine:
        config.hook.pytest_deselected(items=mine)
        items[:] = [i for i in items if i not in mine]
