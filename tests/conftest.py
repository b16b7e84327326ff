"""Shared fixtures: a built-in provider and an authority on a temporary state directory."""

from __future__ import annotations

from collections.abc import Callable
from datetime import timedelta
from pathlib import Path

import pytest

from mesh_identity.authority import Authority, AuthoritySettings
from mesh_identity.clock import utcnow
from mesh_identity.events import ListSink
from mesh_identity.keys import KeyType
from mesh_identity.provider import Mode, ProviderContext
from mesh_identity.spiffe import SpiffeId, TrustDomain
from providers.builtin.provider import SPEC as BUILTIN

TD = TrustDomain("example.org")


@pytest.fixture
def trust_domain() -> TrustDomain:
    return TD


@pytest.fixture
def make_context(tmp_path: Path) -> Callable[..., ProviderContext]:
    def make(
        state_dir: Path | None = None,
        key_type: KeyType = KeyType.ECDSA_P256,
        mode: Mode = Mode.INTERMEDIATE,
        create: bool = True,
    ) -> ProviderContext:
        return ProviderContext(TD, state_dir or tmp_path / "state", key_type, mode, utcnow, create)

    return make


@pytest.fixture
def make_authority(make_context: Callable[..., ProviderContext]) -> Callable[..., Authority]:
    def make(
        mode: Mode = Mode.INTERMEDIATE,
        options: dict[str, object] | None = None,
        sink: ListSink | None = None,
        workload_ttl: timedelta = timedelta(hours=1),
        intermediate_ttl: timedelta = timedelta(days=1),
        key_type: KeyType = KeyType.ECDSA_P256,
        state_dir: Path | None = None,
    ) -> Authority:
        context = make_context(state_dir=state_dir, mode=mode, key_type=key_type)
        provider = BUILTIN.factory(context, BUILTIN.validate_options(options or {}))
        authority = Authority(
            provider,
            AuthoritySettings(TD, mode, key_type, workload_ttl, intermediate_ttl),
            events=sink,
        )
        authority.start()
        return authority

    return make


@pytest.fixture
def authority(make_authority: Callable[..., Authority]) -> Authority:
    return make_authority()


@pytest.fixture
def web_id() -> SpiffeId:
    return SpiffeId.for_kubernetes(TD, "default", "web")
