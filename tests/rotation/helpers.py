"""Test parts for rotation: an injected clock, a provider that refuses then recovers (the real built-in CA behind a
switch, registered through a real plugin object), event waiting, and chain checks."""

from __future__ import annotations

import contextlib
import random
import threading
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

from cryptography import x509

from mesh_identity.assembly import build_authority, build_provider
from mesh_identity.authority import Authority, AuthoritySettings
from mesh_identity.clock import utcnow
from mesh_identity.config import Config, parse_config
from mesh_identity.errors import ProviderRejectedError, ProviderUnavailableError
from mesh_identity.events import Event
from mesh_identity.provider import (
    Capabilities,
    CAProvider,
    Health,
    Limits,
    Mode,
    OptionSpec,
    OptionType,
    ProviderContext,
    ProviderSpec,
    SignedCertificate,
)
from mesh_identity.rotation.engine import RotationEngine, RotationSettings
from mesh_identity.spiffe import SpiffeId, TrustDomain
from mesh_identity.svid import TrustBundle, X509Svid
from mesh_identity.verify import chain_problem
from plugins import hookimpl
from plugins.manager import Plugins, get_plugin_manager
from providers.builtin.provider import SPEC as BUILTIN
from providers.builtin.provider import BuiltinProvider

TD = TrustDomain("example.org")


def ids(*names: str) -> list[SpiffeId]:
    return [SpiffeId.for_kubernetes(TD, "default", name) for name in names]


class FakeClock:
    """A clock the test moves by hand. It starts on a whole second, as certificate times are."""

    def __init__(self, start: datetime | None = None) -> None:
        self.now = start or utcnow().replace(microsecond=0)

    def __call__(self) -> datetime:
        return self.now

    def advance(self, delta: timedelta) -> datetime:
        self.now += delta
        return self.now


def make_config(tmp_path: Path, *, identities: Iterable[SpiffeId] = (), **ca: Any) -> Config:
    """A config on ``tmp_path/state``, metrics on a free loopback port; ``ca`` holds ``ca.*`` keys."""
    return parse_config(
        {
            "trust_domain": TD.name,
            "state_dir": "state",
            "metrics": {"listen": "127.0.0.1:0"},
            "ca": ca,
            "identities": [str(i) for i in identities],
            "plugins": {"audit": {"enabled": False}},
        },
        tmp_path,
    )


# -- a provider that fails on demand -------------------------------------------------------------------------


class Switch:
    """Shared by every provider the plugin builds, so it survives a restart of the service."""

    def __init__(self) -> None:
        self.refusing = False
        self.rejecting = False
        self.deny: set[SpiffeId] = set()
        self.calls = 0


class FlakyProvider(CAProvider):
    """The real built-in provider, except while the switch says no: then signing fails as an unreachable
    upstream would (``refusing``), or as a policy refusal (``rejecting``); ``deny`` refuses single identities."""

    name = "flaky"

    def __init__(self, context: ProviderContext, options: Mapping[str, Any], switch: Switch) -> None:
        self.inner = BuiltinProvider(context, BUILTIN.validate_options({}))
        self.switch = switch
        self.max_intermediate_ttl: timedelta | None = options.get("max_intermediate_ttl")

    def _gate(self, what: str) -> None:
        self.switch.calls += 1
        if self.switch.refusing:
            raise ProviderUnavailableError(self.name, f"upstream CA unreachable while signing {what}")
        if self.switch.rejecting:
            raise ProviderRejectedError(self.name, f"upstream CA refused to sign {what}")

    def capabilities(self) -> Capabilities:
        return self.inner.capabilities()

    def trust_bundle(self) -> TrustBundle:
        return self.inner.trust_bundle()

    def sign_intermediate(self, csr: x509.CertificateSigningRequest, ttl: timedelta) -> SignedCertificate:
        self._gate("an intermediate")
        return self.inner.sign_intermediate(csr, ttl)

    def sign_workload(
        self, csr: x509.CertificateSigningRequest, spiffe_id: SpiffeId, ttl: timedelta
    ) -> SignedCertificate:
        self._gate(str(spiffe_id))
        if spiffe_id in self.switch.deny:
            raise ProviderUnavailableError(self.name, f"upstream CA unreachable for {spiffe_id}")
        return self.inner.sign_workload(csr, spiffe_id, ttl)

    def health(self) -> Health:
        if self.switch.refusing:
            return Health(False, "upstream CA unreachable", self.inner.context.clock())
        return self.inner.health()

    def limits(self) -> Limits:
        inner = self.inner.limits()
        return Limits(
            inner.max_workload_ttl, self.max_intermediate_ttl or inner.max_intermediate_ttl, inner.ca_not_after
        )

    def root_phase(self) -> str:
        return self.inner.root_phase()

    def prepare_root(self) -> x509.Certificate:
        return self.inner.prepare_root()

    def activate_root(self) -> x509.Certificate:
        return self.inner.activate_root()

    def retire_root(self) -> tuple[x509.Certificate, ...]:
        return self.inner.retire_root()


class FlakyPlugin:
    """A plugin object (registered with the plugin manager like any plugin) offering the ``flaky`` provider."""

    def __init__(self) -> None:
        self.switch = Switch()
        self.spec = ProviderSpec(
            name="flaky",
            description="the built-in CA behind a test switch",
            capabilities=Capabilities(frozenset(Mode), root_rotation=True),
            factory=lambda context, options: FlakyProvider(context, options, self.switch),
            options=(OptionSpec("max_intermediate_ttl", OptionType.DURATION, "a limit to report"),),
        )

    @hookimpl
    def mesh_identity_providers(self) -> Sequence[ProviderSpec]:
        return [self.spec]


def provider_for(config: Config, plugin: object | None = None, clock: Callable[[], datetime] = utcnow) -> CAProvider:
    """Build ``config.ca.provider`` through a real plugin manager (with ``plugin`` registered)."""
    plugins = Plugins(get_plugin_manager(extra=[plugin] if plugin is not None else ()))
    spec = plugins.provider(config.ca.provider)
    options = plugins.validate_provider_options(spec.name, config.ca.provider_options)
    return build_provider(config, spec, options, clock=clock)


# -- waiting and checking ------------------------------------------------------------------------------------


class Recorder:
    """An event sink that lets a test wait for events (with a deadline, never asserting a speed)."""

    def __init__(self) -> None:
        self.events: list[Event] = []
        self._cond = threading.Condition()

    def emit(self, event: Event) -> None:
        with self._cond:
            self.events.append(event)
            self._cond.notify_all()

    def of(self, kind: type[Any]) -> list[Any]:
        with self._cond:
            return [e for e in self.events if isinstance(e, kind)]

    def wait_for(self, predicate: Callable[[list[Event]], bool], timeout: float = 60.0) -> list[Event]:
        with self._cond:
            if not self._cond.wait_for(lambda: predicate(self.events), timeout):
                raise AssertionError(f"gave up waiting after {timeout}s; events: {self.events[-10:]}")
            return list(self.events)


def verify_problem(svid: X509Svid, bundle: TrustBundle, now: datetime | None = None) -> str | None:
    return chain_problem(svid.leaf, svid.chain, bundle, now)


def engine_over(
    provider: CAProvider, mode: Mode, workload_ttl: timedelta, *, seed: int, paused: bool = True
) -> tuple[RotationEngine, Recorder]:
    """An authority on ``provider`` (trust domain example.org, 2 h intermediates) and a started rotation engine
    over it (rotate_after 0.5, jitter 0.1, a seeded random source), both reporting to one :class:`Recorder`."""
    recorder = Recorder()
    authority = Authority(
        provider,
        AuthoritySettings(
            TrustDomain("example.org"), mode=mode, workload_ttl=workload_ttl, intermediate_ttl=timedelta(hours=2)
        ),
        events=recorder,
    )
    authority.start()
    engine = RotationEngine(authority, RotationSettings(0.5, 0.1), events=recorder, rng=random.Random(seed))
    engine.start(paused=paused)
    return engine, recorder


@contextlib.contextmanager
def paused_engine(tmp_path: Path) -> Iterator[RotationEngine]:
    """A started, paused rotation engine over the built-in CA of a config in ``tmp_path`` (the test rotates)."""
    config = make_config(tmp_path)
    authority = build_authority(config, provider_for(config))
    authority.start()
    engine = RotationEngine(authority)
    engine.start(paused=True)
    try:
        yield engine
    finally:
        engine.stop()
