"""The running server: rotation engine + registry membership + root rotation + metrics/admin endpoint.

``mesh-identity serve`` runs one :class:`Service`, built by :func:`mesh_identity.assembly.build_service`
(which makes its Authority and engine). With a workload registry, the service keeps the registry's identities
issued (:class:`~mesh_identity.rotation.membership.Membership`), plus ``keep``. Other parts (the xDS server)
join it as components: they are started after the engine has issued every identity's first SVID and the
endpoint listens, and stopped first. They reach the SVIDs through :attr:`Service.engine`
(``engine.source(spiffe_id).subscribe(...)``, ``engine.bundles.subscribe(...)``), the workloads through
:attr:`Service.registry`, and report proxy acknowledgements with :meth:`Service.set_ack_source`.

At start the service writes ``<state_dir>/admin.token`` (0600, a new random token each start) and
``<state_dir>/admin.addr`` (the URL it listens on); the CLI reads both. They are removed at stop.
"""

from __future__ import annotations

import logging
import secrets
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any, Protocol

from mesh_identity.clock import Clock, utcnow
from mesh_identity.config import Config, ListenConfig
from mesh_identity.events import Event, EventSink, NullSink
from mesh_identity.files import ensure_private_dir, write_private
from mesh_identity.ports import is_loopback
from mesh_identity.registry.base import WorkloadRegistry
from mesh_identity.rotation.engine import RotationEngine
from mesh_identity.rotation.membership import Membership
from mesh_identity.rotation.roots import AckSource, RootRotation, RootStep, StepOverride
from mesh_identity.server.endpoint import Endpoint
from mesh_identity.server.metrics import Metrics
from mesh_identity.server.status import Snapshot, signing_problem, snapshot
from mesh_identity.spiffe import SpiffeId
from mesh_identity.ttlcheck import TtlReport, chain_for, check_ttl_chain

log = logging.getLogger(__name__)

ADMIN_TOKEN = "admin.token"  # noqa: S105 - a file name
ADMIN_ADDR = "admin.addr"
DEFAULT_LISTEN = ListenConfig("127.0.0.1", 9102)


class Component(Protocol):
    """A part of the server with a lifecycle (the xDS server)."""

    def start(self) -> object: ...

    def stop(self) -> object: ...


class RootStepper(Protocol):
    """Who takes the admin endpoint's root-rotation steps when it is not this service alone (HA: the leader's
    :class:`~mesh_identity.server.cluster.HaComponent`, which refuses them on a follower)."""

    def root_step(self, step: RootStep, override: StepOverride | None = None) -> str: ...


class Fanout:
    """An event sink that forwards to several; one that raises is logged and skipped."""

    def __init__(self, *sinks: EventSink) -> None:
        self.sinks = sinks

    def emit(self, event: Event) -> None:
        for sink in self.sinks:
            try:
                sink.emit(event)
            except Exception:
                log.exception("event sink %r failed on %s", sink, type(event).__name__)


class Service:
    """See the module docstring. ``events`` is the sink the Authority and engine already report to."""

    def __init__(
        self,
        config: Config,
        engine: RotationEngine,
        *,
        metrics: Metrics,
        events: EventSink | None = None,
        keep: Iterable[SpiffeId] = (),
        registry: WorkloadRegistry | None = None,
        clock: Clock = utcnow,
    ) -> None:
        self.config = config
        self.engine = engine
        self.authority = engine.authority
        self.provider = engine.authority.provider
        self.clock = clock
        self.metrics = metrics
        self.events: EventSink = events or NullSink()
        self.registry = registry
        self.keep: Sequence[SpiffeId] = tuple(keep)
        self.membership = Membership(engine, registry, self.keep) if registry is not None else None
        self.roots = RootRotation(self.engine, events=self.events, clock=clock, ack_timeout=config.xds_ack_timeout)
        self.metrics.watch(self.snapshot)
        self.ttl_report: TtlReport | None = None
        self.endpoint: Endpoint | None = None
        self._components: list[Component] = []
        self._started: list[Component] = []
        self._registry_started = False
        self.root_stepper: RootStepper | None = None

    # -- composition ---------------------------------------------------------------------------------------

    def add_component(self, component: Component) -> None:
        """Start ``component`` with the service (after the engine and the endpoint), stop it first."""
        self._components.append(component)

    def set_ack_source(self, acks: AckSource | None) -> None:
        """Where root rotation asks which proxies have acknowledged what (the xDS server)."""
        self.roots.acks = acks

    @property
    def listen(self) -> ListenConfig:
        return self.config.metrics_listen or DEFAULT_LISTEN

    @property
    def url(self) -> str:
        if self.endpoint is None:
            raise RuntimeError("the service has not started")
        return self.endpoint.url

    # -- lifecycle -----------------------------------------------------------------------------------------

    def start(self, *, paused: bool = False) -> None:
        """Check the TTL chain (refuse an unsound one), start the authority and the engine, issue every
        identity's first SVID (the kept ones, then the registry's), open the endpoint, then start the
        components. ``paused`` keeps the scheduler from firing (tests that drive rotations themselves)."""
        chain = chain_for(self.config, self.provider, self.provider.trust_bundle())
        self.ttl_report = check_ttl_chain(chain, self.clock())
        self.ttl_report.require_sound()
        for warning in self.ttl_report.warnings:
            log.warning("TTL chain: %s", warning)
        self.authority.start()
        self.engine.start(paused=paused)
        if self.registry is not None:
            self.registry.start()
            self._registry_started = True
        if self.membership is not None:
            self.membership.start()
        else:
            self.engine.add_all(self.keep)
        listen = self.listen
        beyond = self.config.admin_beyond_loopback
        if not is_loopback(listen.host):
            log.warning(
                "the metrics and admin endpoint listens on %s, beyond loopback: admin requests are %s",
                listen,
                "accepted with the token (metrics.admin_beyond_loopback; put TLS in front)"
                if beyond
                else "refused (set metrics.admin_beyond_loopback with TLS in front to allow them)",
            )
        token = secrets.token_urlsafe(32)
        self.endpoint = Endpoint(self, listen.host, listen.port, token, admin_beyond_loopback=beyond)
        state = ensure_private_dir(self.config.state_dir)
        write_private(state / ADMIN_TOKEN, token.encode() + b"\n")
        self.endpoint.start()
        write_private(state / ADMIN_ADDR, self.endpoint.url.encode() + b"\n")
        for component in self._components:
            component.start()
            self._started.append(component)

    def reload(self) -> bool:
        """Read the registry's source again (SIGHUP); False when there is none or it failed (last good kept)."""
        if self.registry is None:
            log.warning("reload: the server has no workload registry; nothing to reload")
            return False
        return self.registry.reload()

    def stop(self) -> None:
        while self._started:
            component = self._started.pop()
            try:
                component.stop()
            except Exception:
                log.exception("stopping %r failed", component)
        if self.membership is not None:
            self.membership.stop()
        if self.registry is not None and self._registry_started:
            self.registry.stop()
            self._registry_started = False
        if self.endpoint is not None:
            self.endpoint.stop()
            self.endpoint = None
            for name in (ADMIN_ADDR, ADMIN_TOKEN):
                Path(self.config.state_dir / name).unlink(missing_ok=True)
        self.engine.stop()
        self.provider.close()

    def __enter__(self) -> Service:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- what the endpoint serves --------------------------------------------------------------------------

    def snapshot(self) -> Snapshot:
        return snapshot(self.engine, self.roots, self.clock())

    def metrics_text(self) -> bytes:
        return self.metrics.render()

    def health_problem(self) -> str | None:
        return None if self.engine.running else "the rotation engine is not running"

    def ready_problem(self) -> str | None:
        return signing_problem(self.engine, self.clock())

    def status_json(self) -> dict[str, Any]:
        return self.snapshot().to_json()

    def root_step(self, step: RootStep, override: StepOverride | None = None) -> str:
        if self.root_stepper is not None:
            return self.root_stepper.root_step(step, override)
        message = self.roots.step(step, override)
        log.info("root rotation: %s", message)
        return message
