"""The signing API as a part of ``mesh-identity serve``: a ``Component`` of the service.

:class:`SigningComponent` is started after the rotation engine has issued every identity's first SVID (the
control plane's own among them) and stopped before the engine. On start it

* starts the JWT authority (its keys in ``<state_dir>/jwt/``) and the timer that rotates them when due
  (:class:`~xds_sds.signing.keytimer.KeyRotationTimer`);
* builds the :class:`~xds_sds.signing.signer.Signer` over the service's Authority, the registry, the join
  tokens (``<state_dir>/join-tokens.json``), the TokenReview client (when ``signing.kubernetes`` is set) and the
  engine's trust bundle, and the :class:`~xds_sds.signing.server.SigningServer` with both listeners, presenting
  the control plane's SVID (``control_plane_identity(td)``);
* follows the engine: a renewed control-plane SVID is presented from the next handshake on, a new trust bundle is
  what client certificates must chain to from then on (no restart);
* writes ``<state_dir>/signing.addr`` and ``<state_dir>/attest.addr`` (``host:port``) once listening, and removes
  them at stop.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from datetime import datetime, timedelta
from pathlib import Path
from typing import Protocol

from mesh_identity.clock import Clock, utcnow
from mesh_identity.config import JwtConfig, SigningConfig
from mesh_identity.events import EventSink
from mesh_identity.files import write_private
from mesh_identity.jointokens import JoinTokens
from mesh_identity.registry.base import WorkloadRegistry, control_plane_identity
from mesh_identity.rotation.engine import RotationEngine
from mesh_identity.svid import TrustBundle, X509Svid
from xds_sds.protocol.credentials import ServerTls
from xds_sds.signing.keytimer import KeyRotationTimer
from xds_sds.signing.metrics import SigningMetrics
from xds_sds.signing.server import DEFAULT_MAX_CONNECTION_AGE, SigningServer
from xds_sds.signing.signer import JwtIssuer, Signer
from xds_sds.signing.tls import AttestTls
from xds_sds.signing.tokenreview import TokenReviewer

log = logging.getLogger(__name__)

SIGNING_ADDR = "signing.addr"
ATTEST_ADDR = "attest.addr"


def signing_connection_age(workload_ttl: timedelta, rotate_after: float) -> timedelta:
    """How long a caller's connection lives: a third of the renewal window (at most 30 minutes), so that it
    handshakes again, and meets the server's renewed certificate, long before the previous one expires."""
    return min(DEFAULT_MAX_CONNECTION_AGE, workload_ttl * (1 - rotate_after) / 3)


def bundle_refresh_hint(jwt: JwtConfig) -> timedelta:
    """How often a caller should fetch the bundle again: every 5 minutes at most, and well within the
    ``key_ttl / 2`` that a new JWT key is in the bundle before it signs."""
    return min(timedelta(minutes=5), jwt.key_ttl / 4)


class JwtKeys(JwtIssuer, Protocol):
    """The JWT authority's lifecycle (:class:`mesh_identity.jwtkeys.JwtAuthority`)."""

    def start(self) -> None: ...

    def rotate_if_due(self) -> bool: ...

    def next_rotation(self) -> datetime: ...


class SigningComponent:
    """See the module docstring.

    :param engine: the service's rotation engine (its Authority, the control plane's SVID, the trust bundle).
    :param registry: the workloads, and the host each instance runs on.
    :param jwt: the trust domain's JWT keys (started here).
    :param settings: ``signing``. :param state_dir: where the join tokens and the address files are.
    :param workload_ttl: the lifetime of the X.509-SVIDs it issues (``ca.workload_ttl``).
    :param events: where decisions are audited (the plugins). :param metrics: its collectors.
    :param max_connection_age: callers' connections are recycled after this long.
    :param refresh_hint: how often callers should fetch the bundle again (the bundle says so).
    """

    def __init__(
        self,
        engine: RotationEngine,
        registry: WorkloadRegistry,
        jwt: JwtKeys,
        *,
        settings: SigningConfig,
        state_dir: Path,
        workload_ttl: timedelta,
        events: EventSink,
        metrics: SigningMetrics | None = None,
        max_connection_age: timedelta = DEFAULT_MAX_CONNECTION_AGE,
        refresh_hint: timedelta = timedelta(minutes=5),
        clock: Clock = utcnow,
    ) -> None:
        self.engine = engine
        self.registry = registry
        self.jwt = jwt
        self.settings = settings
        self.state_dir = state_dir
        self.workload_ttl = workload_ttl
        self.events = events
        self.metrics = metrics if metrics is not None else SigningMetrics()
        self.max_connection_age = max_connection_age
        self.refresh_hint = refresh_hint
        self.clock = clock
        self.identity = control_plane_identity(registry.trust_domain)
        self.server: SigningServer | None = None
        self.signer: Signer | None = None
        self._reviewer: TokenReviewer | None = None
        self._unsubscribes: list[Callable[[], None]] = []
        self.timer = KeyRotationTimer(jwt, clock=clock)
        self._lock = threading.Lock()

    def summary(self) -> str:
        server = self.server
        if server is None:
            return f"signing API on {self.settings.listen} (mutual TLS), {self.settings.attest_listen} (attestation)"
        return f"signing API on {server.target} (mutual TLS), {server.attest_target} (attestation)"

    # -- lifecycle -------------------------------------------------------------------------------------------

    def start(self) -> tuple[int, int]:
        """Start the JWT keys, listen on both addresses, follow the engine; returns the two ports."""
        self.jwt.start()
        settings = self.settings
        reviewer = None
        if settings.kubernetes is not None:
            reviewer = self._reviewer = TokenReviewer(self.registry.trust_domain, settings.kubernetes)
        source = self.engine.source(self.identity)
        svid = source.svid()
        bundles = self.engine.bundles
        tls = ServerTls(svid.cert_chain_pem(), svid.key_pem(), bundles.bundle().pem())
        attest_tls = AttestTls.from_svid(svid)
        self.signer = Signer(
            self.engine.authority,
            self.registry,
            tokens=JoinTokens(self.state_dir, clock=self.clock),
            reviewer=reviewer,
            jwt=self.jwt,
            bundle=bundles.bundle,
            ttl=self.workload_ttl,
            max_csr_bytes=settings.max_csr_bytes,
            refresh_hint=self.refresh_hint,
            events=self.events,
            clock=self.clock,
        )
        server = SigningServer(
            self.signer,
            tls,
            attest_tls,
            listen=str(settings.listen),
            attest_listen=str(settings.attest_listen),
            metrics=self.metrics,
            max_connection_age=self.max_connection_age,
            local_signing=self.engine.intermediate_mode,
        )

        def server_svid(new: X509Svid) -> None:
            tls.update(new.cert_chain_pem(), new.key_pem())
            attest_tls.update_svid(new)

        def bundle(new: TrustBundle) -> None:
            tls.update_roots(new.pem())

        with self._lock:
            self._unsubscribes += [source.subscribe(server_svid), bundles.subscribe(bundle)]
        try:
            ports = server.start()
        except BaseException:
            self.stop()
            raise
        self.server = server
        write_private(self.state_dir / SIGNING_ADDR, f"{server.target}\n".encode(), mode=0o644)
        write_private(self.state_dir / ATTEST_ADDR, f"{server.attest_target}\n".encode(), mode=0o644)
        self.timer.start()
        return ports

    def stop(self) -> None:
        self.timer.stop()
        with self._lock:
            for unsubscribe in self._unsubscribes:
                unsubscribe()
            self._unsubscribes.clear()
        for name in (SIGNING_ADDR, ATTEST_ADDR):
            (self.state_dir / name).unlink(missing_ok=True)
        server, self.server = self.server, None
        if server is not None:
            server.stop()
        if self._reviewer is not None:
            self._reviewer.close()
            self._reviewer = None
