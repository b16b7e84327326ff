"""The node agent, put together: ``mesh-identity agent --config FILE`` runs one :class:`Agent`.

::

    control plane ◄── TLS (its SPIFFE ID checked) ── tunnels ◄── gRPC client ◄── key keeper (keys made here)
                                                                                    │ subscribe
    Envoy ── sds socket ───────► front door (attest at accept) ──► internal gRPC: SDS ◄──┤
    workload ── workload_api ──► front door (attest at accept) ──► internal gRPC: Workload API ◄┘
    Prometheus ── metrics.listen (loopback) ──► /metrics, /healthz

Everything but the HTTP endpoint (a thread of its own) runs on one asyncio loop. The agent's private directory
(0700, made afresh at each start under the system's temporary directory) holds the internal sockets, the
relay's client sockets and the tunnels' local ends; it is removed at stop. The endpoint's address goes to
``<state_dir>/metrics.addr`` (``host:port``) once it listens.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import secrets
import shutil
import ssl
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc

from mesh_identity.errors import ConfigError, RotationError, StateError
from mesh_identity.files import owned_dir, write_private_at
from mesh_identity.registry.base import control_plane_identity
from mesh_identity.rotation.roots import RootStep, StepOverride
from mesh_identity.server.endpoint import Endpoint
from mesh_identity.spiffe import SpiffeId
from mesh_identity.svid import TrustBundle, load_certs_pem
from xds_sds.agent.attestation import PROC
from xds_sds.agent.client import ControlPlaneClient
from xds_sds.agent.config import AgentConfig
from xds_sds.agent.errors import AgentError
from xds_sds.agent.keeper import Keeper
from xds_sds.agent.metrics import AgentMetrics, health_problem, outage_budget
from xds_sds.agent.relay import Callers, FrontDoor
from xds_sds.agent.sds import AgentSds
from xds_sds.agent.store import AgentStore
from xds_sds.agent.tunnel import Tunnel, client_context
from xds_sds.agent.workload_api import WorkloadApi

log = logging.getLogger(__name__)

METRICS_ADDR = "metrics.addr"  # in state_dir: host:port of the endpoint once it listens
MAX_PRIVATE_DIR = 60  # bytes: room for the socket names under it (a Unix socket path is at most 107)


def load_roots(config: AgentConfig) -> TrustBundle:
    """The roots of ``control_plane.bundle``; ConfigError naming the file when they cannot be read."""
    path = config.control_plane.bundle
    try:
        data = path.read_bytes()
    except OSError as err:
        raise ConfigError(f"control_plane.bundle: cannot read {path}: {err.strerror}") from None
    try:
        roots = load_certs_pem(data, str(path))
    except ValueError as err:
        raise ConfigError(f"control_plane.bundle: {err}") from None
    if not roots:
        raise ConfigError(f"control_plane.bundle: {path} holds no certificate")
    return TrustBundle(config.trust_domain, roots)


def private_dir() -> Path:
    """A new directory (0700) for the agent's internal sockets, with a path short enough for them."""
    base = tempfile.gettempdir()
    if len(os.fsencode(base)) > MAX_PRIVATE_DIR - 20:
        base = "/tmp"  # noqa: S108 - mkdtemp makes a fresh 0700 directory with a random name
    return Path(tempfile.mkdtemp(prefix="mesh-identity-agent.", dir=base))


class _Contexts:
    """TLS settings for the tunnels, made again only when the roots or the agent's SVID changed."""

    def __init__(self, store: AgentStore) -> None:
        self.keeper: Keeper | None = None
        self._store = store
        self._cache: dict[bool, tuple[tuple[bytes, str | None], ssl.SSLContext]] = {}

    def get(self, mutual: bool) -> ssl.SSLContext:
        if self.keeper is None:
            raise ValueError("the agent is starting")
        roots = self.keeper.control_plane_roots_pem()
        own = self.keeper.own
        key = (roots, own.serial if mutual and own is not None else None)
        cached = self._cache.get(mutual)
        if cached is not None and cached[0] == key:
            return cached[1]
        if mutual and own is None:
            raise ValueError("the agent has no SVID of its own yet")
        context = client_context(roots, self._store.svid_file if mutual else None)
        self._cache[mutual] = (key, context)
        return context


@dataclass(frozen=True, slots=True)
class _Door:
    name: str
    public: Path
    internal: Path
    handler: grpc.GenericRpcHandler


class _App:
    """What the monitoring endpoint serves (:class:`mesh_identity.server.endpoint.App`)."""

    def __init__(self, agent: Agent) -> None:
        self._agent = agent

    def metrics_text(self) -> bytes:
        return self._agent.metrics.text()

    def health_problem(self) -> str | None:
        return self._agent.health_problem()

    def ready_problem(self) -> str | None:
        return self._agent.health_problem()

    def status_json(self) -> dict[str, Any]:
        return self._agent.status_json()

    def root_step(self, step: RootStep, override: StepOverride | None = None) -> str:
        raise RotationError("the node agent does no root rotation: the control plane does")


class Agent:
    """The node agent of ``config`` (see the module docstring). ``start`` and ``stop`` on the agent's loop."""

    def __init__(self, config: AgentConfig, *, proc: Path = PROC) -> None:
        self.config = config
        self.metrics = AgentMetrics()
        self.callers = Callers()
        self._proc = proc
        self._private: Path | None = None
        self._servers: list[grpc.aio.Server] = []
        self._doors: list[FrontDoor] = []
        self._client: ControlPlaneClient | None = None
        self._keeper: Keeper | None = None
        self._sds: AgentSds | None = None
        self._endpoint: Endpoint | None = None

    @property
    def keeper(self) -> Keeper:
        if self._keeper is None:
            raise RuntimeError("the agent is not started")
        return self._keeper

    @property
    def control_plane_id(self) -> SpiffeId:
        return control_plane_identity(self.config.trust_domain)

    @property
    def metrics_url(self) -> str | None:
        return self._endpoint.url if self._endpoint is not None else None

    async def start(self) -> None:
        """Listen on every socket and start keeping the SVIDs (the first ones arrive soon after)."""
        try:
            await self._start()
        except BaseException:
            await self.stop()
            raise

    async def _start(self) -> None:
        config = self.config
        roots = load_roots(config)
        try:
            with owned_dir(config.state_dir, create=True) as fd:
                os.fchmod(fd, 0o700)
        except OSError as err:
            raise StateError(f"state_dir: cannot use {config.state_dir}: {err}") from None
        store = AgentStore(config.state_dir)
        self._private = private = private_dir()
        (private / "c").mkdir(mode=0o700)
        contexts = _Contexts(store)
        cp = config.control_plane
        attest = Tunnel(
            "attest", private / "attest.sock", cp.attest, self.control_plane_id, lambda: contexts.get(False)
        )
        signing = Tunnel(
            "signing", private / "signing.sock", cp.signing, self.control_plane_id, lambda: contexts.get(True)
        )
        self._client = client = ControlPlaneClient(attest, signing)
        self._keeper = contexts.keeper = keeper = Keeper(config, client, store, roots)
        self.metrics.watch(keeper.status, keeper.now)
        await client.start()
        doors: list[_Door] = []
        if config.workload_socket is not None:
            api = WorkloadApi(keeper, self.callers, config.entries, self.metrics)
            doors.append(_Door("workload_api", config.workload_socket, private / "workload.sock", api.handler()))
        if config.sds_socket is not None:
            self._sds = AgentSds(keeper, self.callers, config.entries, self.metrics.registry)
            doors.append(_Door("sds", config.sds_socket, private / "sds.sock", self._sds.handler()))
        for door in doors:
            server = grpc.aio.server()
            server.add_generic_rpc_handlers((door.handler,))
            if server.add_insecure_port(f"unix:{door.internal}") == 0:
                raise AgentError(f"cannot listen on the internal socket {door.internal}")
            await server.start()
            self._servers.append(server)
            front = FrontDoor(
                door.name,
                door.public,
                door.internal,
                private / "c",
                self.callers,
                proc=self._proc,
                on_change=self._connections,
            )
            await front.start()
            self._doors.append(front)
            self._connections(door.name, 0)
        keeper.start()
        if config.metrics_listen is not None:
            listen = config.metrics_listen
            try:
                self._endpoint = Endpoint(_App(self), listen.host, listen.port, secrets.token_urlsafe(32))
            except OSError as err:
                raise AgentError(f"metrics.listen: cannot listen on {listen}: {err.strerror or err}") from None
            self._endpoint.start()
            host, port = self._endpoint.address
            with owned_dir(config.state_dir) as fd:
                write_private_at(fd, METRICS_ADDR, f"{host}:{port}\n".encode(), 0o644)
        log.info("agent of %s serving %s", config.host, ", ".join(f"{d.name} on {d.public}" for d in self._doors))

    def _connections(self, name: str, count: int) -> None:
        self.metrics.connections.labels(name).set(count)

    async def stop(self) -> None:
        """Stop serving; idempotent."""
        if self._endpoint is not None:
            await asyncio.to_thread(self._endpoint.stop)
            self._endpoint = None
            with contextlib.suppress(OSError):
                (self.config.state_dir / METRICS_ADDR).unlink()
        for door in self._doors:
            await door.stop()
        self._doors.clear()
        for server in self._servers:
            await server.stop(None)
        self._servers.clear()
        if self._sds is not None:
            self._sds.close()
            self._sds = None
        if self._keeper is not None:
            await self._keeper.stop()
        if self._client is not None:
            await self._client.stop()
            self._client = None
        if self._private is not None:
            with contextlib.suppress(OSError):
                shutil.rmtree(self._private)
            self._private = None

    # -- what the endpoint shows ----------------------------------------------------------------------------

    def health_problem(self) -> str | None:
        keeper = self._keeper
        if keeper is None:
            return "the agent is not started"
        return health_problem(keeper.status(), keeper.now())

    def status_json(self) -> dict[str, Any]:
        keeper = self.keeper
        status = keeper.status()
        now = keeper.now()
        return {
            "host": self.config.host,
            "trust_domain": self.config.trust_domain.name,
            "outage_budget_seconds": outage_budget(status, now),
            "healthy": health_problem(status, now) is None,
            "identities": [
                {
                    "spiffe_id": identity.spiffe_id,
                    "own": identity.own,
                    "not_after": identity.not_after.isoformat() if identity.not_after else None,
                    "last_renewal": identity.last_success.isoformat() if identity.last_success else None,
                    "next_attempt": identity.next_attempt.isoformat() if identity.next_attempt else None,
                    "failures": identity.failures,
                    "last_error": identity.last_error,
                }
                for identity in status.identities
            ],
            "sockets": {door.name: {"path": str(door.public), "connections": door.connections} for door in self._doors},
        }


async def run(config: AgentConfig, stop: asyncio.Event, ready: Callable[[Agent], None] | None = None) -> None:
    """Run an agent until ``stop`` is set; ``ready(agent)`` is called once it listens."""
    agent = Agent(config)
    await agent.start()
    try:
        if ready is not None:
            ready(agent)
        await stop.wait()
    finally:
        await agent.stop()
