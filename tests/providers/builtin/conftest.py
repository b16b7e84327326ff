"""Fixtures of the Secret store's tests: :mod:`tests.providers.builtin.secretcluster`'s server, and providers
with ``store: kubernetes`` on it."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from mesh_identity.provider import ProviderContext
from providers.builtin.provider import SPEC, BuiltinProvider
from tests.fakes.kube import CONFIG_MAP, LEASE, NAMESPACE, KubeServer
from tests.providers.builtin.secretcluster import (
    NAMESPACE_NAME,
    PASSPHRASE,
    VALIDATED_SECRET,
    MakeProvider,
    SecretCluster,
)


@pytest.fixture
def secret_cluster(tmp_path: Path) -> Iterator[SecretCluster]:
    key_file = tmp_path / "ca-key-passphrase"
    key_file.write_text(PASSPHRASE + "\n")
    with KubeServer(kinds=(VALIDATED_SECRET, CONFIG_MAP, NAMESPACE, LEASE)) as server:
        yield SecretCluster(server, server.write_kubeconfig(tmp_path / "kubeconfig"), key_file)


@pytest.fixture
def make_secret_provider(
    secret_cluster: SecretCluster, make_context: Callable[..., ProviderContext]
) -> Iterator[MakeProvider]:
    """``make(**options)``: a built-in provider with ``store: kubernetes`` on the test server (closed after the
    test); options override the defaults (namespace ``mesh-identity``, the kubeconfig, the key file)."""
    made: list[BuiltinProvider] = []

    def make(context: ProviderContext | None = None, **options: Any) -> BuiltinProvider:
        raw: dict[str, Any] = {
            "store": "kubernetes",
            "secret_namespace": NAMESPACE_NAME,
            "kubeconfig": str(secret_cluster.kubeconfig),
            "key_encryption_file": str(secret_cluster.key_file),
        }
        raw.update(options)
        provider = SPEC.factory(context or make_context(), SPEC.validate_options(raw))
        assert isinstance(provider, BuiltinProvider)
        made.append(provider)
        return provider

    yield make
    for provider in made:
        provider.close()
