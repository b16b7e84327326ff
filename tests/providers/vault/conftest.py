"""Fixtures for the Vault provider tests, and the real-Vault tier.

Every test here talks HTTP(S) to a Vault: by default the test server of ``tests/fakes/vault/`` on an
ephemeral loopback port. Tests that take the ``target`` fixture run twice: against the test server, and (marked
``integration``) against a real Vault given by ``VAULT_ADDR`` and ``VAULT_TOKEN`` (a token allowed to mount
PKI engines and write policies, e.g. the root token of ``vault server -dev``; ``VAULT_CACERT`` for HTTPS,
``VAULT_NAMESPACE`` for an Enterprise namespace). Both are set up the same way, through the API
(``targets.py``), and cleaned up afterwards. Without the variables the real-Vault runs are deselected, not
skipped, so a plain run says "N deselected" instead of hiding a failure.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.fakes.vault import ListenerTLS, VaultServer
from tests.providers.vault.targets import VaultTarget, set_up, tear_down

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


def _target(request: pytest.FixtureRequest, **kwargs: object) -> Iterator[VaultTarget]:
    if request.param == "test-server":
        with VaultServer() as server:
            yield set_up(server.url, server.root_token, server=server, **kwargs)  # type: ignore[arg-type]
        return
    target = set_up(
        os.environ["VAULT_ADDR"],
        os.environ["VAULT_TOKEN"],
        namespace=os.environ.get("VAULT_NAMESPACE") or None,
        ca_cert=os.environ.get("VAULT_CACERT") or None,
        **kwargs,  # type: ignore[arg-type]
    )
    try:
        yield target
    finally:
        tear_down(target)


BOTH = ["test-server", pytest.param("real-vault", marks=pytest.mark.integration)]


@pytest.fixture(params=BOTH)
def target(request: pytest.FixtureRequest) -> Iterator[VaultTarget]:
    """A fresh root-CA PKI mount with a SPIFFE role (max TTL 24h) and a policy for the provider."""
    yield from _target(request)


@pytest.fixture(params=BOTH)
def target_with_vault_intermediate(request: pytest.FixtureRequest) -> Iterator[VaultTarget]:
    """Like ``target``, but the mount holds an intermediate CA signed by a root on another mount."""
    yield from _target(request, intermediate=True)


@pytest.fixture(params=BOTH)
def target_short_ca(request: pytest.FixtureRequest) -> Iterator[VaultTarget]:
    """Like ``target``, but its root CA expires in one hour."""
    yield from _target(request, root_ttl="1h")
