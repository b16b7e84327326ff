"""Replicas for the HA tests: real services (the built-in CA, Authority, rotation engine, admin endpoint) with an
:class:`~mesh_identity.server.cluster.HaComponent` each, against the API test server.

Until the built-in provider's Secret store is used here, the replicas share their CA state through the built-in
store on one directory, and :class:`SharedPlugin`'s provider tells the others when one changed it (as the
Secret's watch does): its ``watch_state`` callbacks are called after every prepare, activate and retire, and
``reload`` reads the shared store again. It counts the roots prepared, so a test can check one only was made.
"""

from __future__ import annotations

import dataclasses
import threading
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509

from mesh_identity.assembly import build_service
from mesh_identity.config import parse_config
from mesh_identity.provider import (
    Capabilities,
    CAProvider,
    Health,
    Mode,
    ProviderContext,
    ProviderSpec,
    SignedCertificate,
)
from mesh_identity.rotation.roots import root_of
from mesh_identity.server.cluster import HaComponent
from mesh_identity.server.service import Service
from mesh_identity.spiffe import SpiffeId
from mesh_identity.svid import TrustBundle, fingerprint_of
from plugins import hookimpl
from providers.builtin.provider import SPEC as BUILTIN
from providers.builtin.provider import BuiltinProvider
from tests.ha.conftest import FAST, HaCluster
from tests.rotation.helpers import TD, Recorder, ids, provider_for

TEAM = ids("web", "api", "db")


class Bus:
    """The shared CA state's change notifications, and how many roots were prepared."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.lock = threading.Lock()
        self.providers: list[SharedProvider] = []
        self.prepared: list[str] = []

    def changed(self, by: SharedProvider) -> None:
        with self.lock:
            others = [p for p in self.providers if p is not by]
        for provider in others:
            for callback in list(provider.watchers):
                callback()


class SharedProvider(CAProvider):
    name = "shared"

    def __init__(self, context: ProviderContext, bus: Bus) -> None:
        self.inner = BuiltinProvider(
            dataclasses.replace(context, state_dir=bus.directory), BUILTIN.validate_options({})
        )
        self.bus = bus
        self.watchers: list[Callable[[], None]] = []
        with bus.lock:
            bus.providers.append(self)

    def capabilities(self) -> Capabilities:
        return self.inner.capabilities()

    def trust_bundle(self) -> TrustBundle:
        return self.inner.trust_bundle()

    def sign_intermediate(self, csr: x509.CertificateSigningRequest, ttl: timedelta) -> SignedCertificate:
        return self.inner.sign_intermediate(csr, ttl)

    def sign_workload(
        self, csr: x509.CertificateSigningRequest, spiffe_id: SpiffeId, ttl: timedelta
    ) -> SignedCertificate:
        return self.inner.sign_workload(csr, spiffe_id, ttl)

    def health(self) -> Health:
        return self.inner.health()

    def root_phase(self) -> str:
        return self.inner.root_phase()

    def prepare_root(self) -> x509.Certificate:
        root = self.inner.prepare_root()
        self.bus.prepared.append(fingerprint_of(root))
        self.bus.changed(self)
        return root

    def activate_root(self) -> x509.Certificate:
        root = self.inner.activate_root()
        self.bus.changed(self)
        return root

    def retire_root(self) -> tuple[x509.Certificate, ...]:
        roots = self.inner.retire_root()
        self.bus.changed(self)
        return roots

    def watch_state(self, changed: Callable[[], None]) -> None:
        self.watchers.append(changed)

    def reload(self) -> None:
        self.inner.reload()

    def close(self) -> None:
        with self.bus.lock:
            if self in self.bus.providers:
                self.bus.providers.remove(self)


class SharedPlugin:
    def __init__(self, bus: Bus) -> None:
        self.spec = ProviderSpec(
            name="shared",
            description="the built-in CA on a shared directory, telling the other replicas of changes",
            capabilities=Capabilities(frozenset(Mode), root_rotation=True),
            factory=lambda context, options: SharedProvider(context, bus),
        )

    @hookimpl
    def mesh_identity_providers(self) -> Sequence[ProviderSpec]:
        return [self.spec]


class Proxies:
    """An ack source standing for one replica's proxies: ``missing`` have not acknowledged the new bundle."""

    def __init__(self, *missing: str) -> None:
        self.missing = list(missing)

    def proxies_missing_bundle(self, fingerprints: frozenset[str]) -> Sequence[str]:
        return list(self.missing)

    def proxies_chaining_to(self, fingerprints: frozenset[str]) -> Sequence[str]:
        return []

    def proxies_lagging(self, older_than: timedelta) -> Sequence[str]:
        return []


@dataclass
class Replica:
    name: str
    service: Service
    ha: HaComponent

    @property
    def leading(self) -> bool:
        return self.ha.is_leader()

    def served(self) -> frozenset[str]:
        bundle = self.service.engine.bundles.current()
        return bundle.fingerprints if bundle is not None else frozenset()

    def signing_root(self) -> str | None:
        signing = self.service.authority.signing_ca
        assert signing is not None
        top = signing.chain[-1] if signing.chain else signing.certificate
        return root_of(top, self.service.authority.bundle().authorities)

    def leaves_on(self, root: str) -> bool:
        """Every identity's current certificate chains to ``root``."""
        bundle = self.service.authority.bundle().authorities
        for source in self.service.engine.sources():
            svid = source.svid()
            if root_of(svid.chain[-1] if svid.chain else svid.leaf, bundle) != root:
                return False
        return True


@pytest.fixture
def make_replica(ha_cluster: HaCluster, tmp_path: Path) -> Iterator[Callable[..., Replica]]:
    bus = Bus(tmp_path / "shared-ca")
    plugin = SharedPlugin(bus)
    made: list[Replica] = []

    def make(name: str, *, registry: Any = None, acks: Any = None, options: Mapping[str, Any] | None = None) -> Replica:
        config = parse_config(
            {
                "trust_domain": TD.name,
                "state_dir": f"state-{name}",
                "metrics": {"listen": "127.0.0.1:0"},
                "ca": {"provider": "shared", **(options or {})},
                "identities": [str(i) for i in TEAM],
                "plugins": {"audit": {"enabled": False}},
            },
            tmp_path,
        )
        service = build_service(config, provider_for(config, plugin), events=Recorder())
        if acks is not None:
            service.set_ack_source(acks)
        service.start()
        settings = ha_cluster.settings(name)
        settings = dataclasses.replace(
            settings, leader_election=dataclasses.replace(settings.leader_election, identity=f"replica-{name}")
        )
        ha = HaComponent(service, ha_cluster.client(name), settings, registry=registry, timing=FAST)
        ha.start()
        replica = Replica(name, service, ha)
        made.append(replica)
        return replica

    make.bus = bus  # type: ignore[attr-defined]
    yield make
    for replica in made:
        if replica.ha._thread is not None:
            replica.ha.stop()
        if replica.service.endpoint is not None:
            replica.service.stop()
