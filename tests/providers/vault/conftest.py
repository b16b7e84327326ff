"""Fixtures for the Vault provider tests, and the real-Vault tier.

Every test here talks HTTP(S) to a Vault: by default the test server of ``tests/fakes/vault_server.py`` on an
ephemeral loopback port. Tests marked ``@pytest.mark.integration`` run the provider tests against a real Vault
and need ``VAULT_ADDR`` and ``VAULT_TOKEN`` (a token allowed to mount and configure a PKI engine, e.g. the root
token of ``vault server -dev``; ``VAULT_CACERT`` for an HTTPS dev server). Without them those tests are
deselected, not skipped, so a plain run says "N deselected" instead of hiding a failure.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.fakes.vault_server import ListenerTLS, VaultServer

HERE = Path(__file__).parent
REAL_VAULT = bool(os.environ.get("VAULT_ADDR") and os.environ.get("VAULT_TOKEN"))


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if REAL_VAULT:
        return
    mine = [i for i in items if HERE in Path(str(i.path)).parents and i.get_closest_marker("integration")]
    if mine:
        config.hook.pytest_deselected(items=mine)
        items[:] = [i for i in items if i not in mine]


@pytest.fixture
def vault() -> Iterator[VaultServer]:
    """A Vault test server over plain HTTP on loopback, with nothing mounted."""
    with VaultServer() as server:
        yield server


@pytest.fixture(scope="session")
def listener_tls(tmp_path_factory: pytest.TempPathFactory) -> ListenerTLS:
    """TLS files for a Vault listener: a CA, a server certificate for 127.0.0.1/localhost, a client certificate."""
    return ListenerTLS.create(tmp_path_factory.mktemp("vault-tls"))


@pytest.fixture
def vault_tls(listener_tls: ListenerTLS) -> Iterator[VaultServer]:
    """A Vault test server over HTTPS."""
    with VaultServer(tls=listener_tls) as server:
        yield server
