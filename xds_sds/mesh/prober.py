"""Proof from the outside that every sidecar serves its newest certificate.

The xDS server knows what it sent and what a sidecar acknowledged; neither says what the sidecar's inbound
listener really presents to a client (a sidecar cut off from the server keeps serving the certificate it has).
:class:`SidecarProber`, a component of ``mesh-identity serve``, finds out: every ``interval`` it connects to
each sidecar's inbound listener like any client of the mesh (presenting the control plane's own SVID, which
the listener accepts: it is of the trust domain), takes the whole chain presented (:mod:`.handshake`) and
compares its leaf with the SVID the rotation engine issued last for that sidecar's identity. It closes the
connection after the handshake: no request reaches the app (a TCP service's app sees a connection open and
close).

Exported on the server's ``/metrics`` (labels ``node``, ``service``, ``spiffe_id``):

====================================================================  =============================================
``mesh_identity_sidecar_probe_up``                                   1 when the last handshake succeeded
``mesh_identity_sidecar_probe_timestamp_seconds``                    when it was tried
``mesh_identity_sidecar_probes_total``                               handshakes, by ``result`` (ok, failed)
``mesh_identity_sidecar_served_certificate_info``                    1, with the ``serial`` the sidecar serves
``mesh_identity_sidecar_certificate_newest``                         1 when that is the SVID issued last
``mesh_identity_sidecar_certificate_stale_seconds``                  how long it has served a superseded one
                                                                     (0 when newest)
``mesh_identity_sidecar_certificate_chain_valid``                    1 when the chain, as presented, verifies to
                                                                     the current trust bundle
``mesh_identity_sidecar_certificate_expiry_timestamp_seconds``       NotAfter of the served leaf
``mesh_identity_sidecar_reload_grace_seconds``                       how long a sidecar may take to load a new
                                                                     SVID before the alert fires
====================================================================  =============================================

A served certificate has been superseded since its successor was issued (the prober follows every
identity's SVID source); for one it never saw issued (from before a restart) since the first probe that found
it stale. The certificate series are left out while a sidecar cannot be reached. ``examples/alerts.yaml``
alerts when ``stale_seconds`` passes the grace and when a chain does not verify. In agent mode the node agents
sign, not the engine: there ``newest`` and ``stale_seconds`` are left out for identities the engine does not
issue.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import datetime, timedelta

from cryptography import x509
from prometheus_client import CollectorRegistry
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from mesh_identity.clock import Clock, utcnow
from mesh_identity.errors import MeshIdentityError
from mesh_identity.mesh.model import Address, Mesh
from mesh_identity.registry.base import WorkloadRegistry, Workloads, control_plane_identity
from mesh_identity.rotation.engine import RotationEngine
from mesh_identity.spiffe import SpiffeId
from mesh_identity.svid import Fingerprint, Serial, X509Svid, fingerprint_of, serial_of
from mesh_identity.verify import chain_problem
from xds_sds.mesh.handshake import HandshakeError, presented_chain

log = logging.getLogger(__name__)

PREFIX = "mesh_identity_sidecar"
LABELS = ("node", "service", "spiffe_id")
MIN_INTERVAL = timedelta(seconds=1)
MAX_INTERVAL = timedelta(seconds=30)
MAX_GRACE = timedelta(minutes=2)
WORKERS = 4


def probe_interval(workload_ttl: timedelta, rotate_after: float) -> timedelta:
    """How often to probe: a tenth of the renewal window, between 1 s and 30 s (30 s TTL at 0.5: 1.5 s)."""
    return min(MAX_INTERVAL, max(MIN_INTERVAL, workload_ttl * (1 - rotate_after) / 10))


def reload_grace(workload_ttl: timedelta, rotate_after: float) -> timedelta:
    """How long a sidecar may serve a superseded SVID before it counts as a missed reload: a quarter of the
    renewal window (the old one is still valid for the rest), at least two probe intervals, at most 2 minutes."""
    interval = probe_interval(workload_ttl, rotate_after)
    return max(2 * interval, min(MAX_GRACE, workload_ttl * (1 - rotate_after) / 4))


@dataclass(frozen=True, slots=True)
class Target:
    """A sidecar to probe: its node, service, identity and inbound address."""

    node: str
    service: str
    spiffe_id: SpiffeId
    address: Address


@dataclass(frozen=True, slots=True)
class Probe:
    """What one probe of a sidecar found. ``problem`` is why the handshake failed (then nothing else is known),
    ``chain_problem`` why the presented chain does not verify (None when it does)."""

    target: Target
    at: datetime
    problem: str | None = None
    serial: Serial | None = None
    not_after: datetime | None = None
    newest: bool | None = None  # None: the engine issues no SVID for this identity (agent mode)
    stale_since: datetime | None = None
    chain_problem: str | None = None

    @property
    def up(self) -> bool:
        return self.problem is None

    def stale_seconds(self, now: datetime) -> float:
        return 0.0 if self.stale_since is None else max(0.0, (now - self.stale_since).total_seconds())


def targets_of(mesh: Mesh) -> list[Target]:
    return [
        Target(instance.node, service.name, service.identity, instance.inbound)
        for service in mesh.services.values()
        for instance in service.instances
    ]


class SidecarProber:
    """See the module docstring. :meth:`probe_all` runs one round now (the thread calls it every ``interval``)."""

    def __init__(
        self,
        engine: RotationEngine,
        registry: WorkloadRegistry,
        *,
        interval: timedelta,
        grace: timedelta,
        metrics: CollectorRegistry | None = None,
        timeout: float = 5.0,
        clock: Clock = utcnow,
    ) -> None:
        self.engine = engine
        self.registry = registry
        self.interval = interval
        self.grace = grace
        self.timeout = timeout
        self.clock = clock
        self.identity = control_plane_identity(registry.trust_domain)
        self._lock = threading.Lock()
        self._probes: dict[str, Probe] = {}
        self._counts = {"ok": 0, "failed": 0}
        self._latest: dict[SpiffeId, Fingerprint] = {}  # each identity's newest SVID as the prober saw it issued
        self._superseded: dict[Fingerprint, datetime] = {}  # when each SVID got a successor
        self._stale_seen: dict[tuple[str, Fingerprint], datetime] = {}  # fallback: first probe that found it stale
        self._unsubscribes: dict[SpiffeId, Callable[[], None]] = {}
        self._unsubscribe_registry: Callable[[], None] | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        if metrics is not None:
            metrics.register(_ProberCollector(self))

    # -- lifecycle -----------------------------------------------------------------------------------------

    def start(self) -> None:
        """Follow the registry and the engine (:meth:`follow`) and probe every ``interval``, first now."""
        self.follow()
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, name="sidecar-prober", daemon=True)
        self._thread.start()

    def follow(self) -> None:
        """Learn of every SVID the engine issues for the mesh's identities (when each predecessor was superseded)
        and of every new set of the registry, from now on."""
        if self._unsubscribe_registry is None:
            self._unsubscribe_registry = self.registry.subscribe(self._registry_changed)
        self._follow_all(self.registry.current().mesh)

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(self.timeout * 2 + 5)
            self._thread = None
        if self._unsubscribe_registry is not None:
            self._unsubscribe_registry()
            self._unsubscribe_registry = None
        with self._lock:
            unsubscribes, self._unsubscribes = list(self._unsubscribes.values()), {}
        for unsubscribe in unsubscribes:
            unsubscribe()

    def _run(self) -> None:
        while True:
            try:
                self.probe_all()
            except Exception:
                log.exception("probing the sidecars failed")
            if self._stop.wait(self.interval.total_seconds()):
                return

    # -- following what the engine issues ------------------------------------------------------------------

    def _registry_changed(self, workloads: Workloads) -> None:
        self._follow_all(workloads.mesh)
        nodes = set(workloads.mesh.nodes())
        with self._lock:
            for node in set(self._probes) - nodes:
                del self._probes[node]
            for key in [key for key in self._stale_seen if key[0] not in nodes]:
                del self._stale_seen[key]

    def _follow_all(self, mesh: Mesh) -> None:
        identities = mesh.identities
        with self._lock:
            left = [i for i in self._unsubscribes if i not in identities]
            unsubscribes = [self._unsubscribes.pop(i) for i in left]
            for identity in left:
                self._latest.pop(identity, None)
        for unsubscribe in unsubscribes:
            unsubscribe()
        for identity in sorted(identities - set(self._unsubscribes), key=str):
            try:
                source = self.engine.source(identity)
            except MeshIdentityError:  # not issued by the engine (agent mode, or not yet)
                continue
            with self._lock:
                self._unsubscribes[identity] = source.subscribe(self._issued)
            current = source.current()
            if current is not None:
                self._issued(current)

    def _issued(self, svid: X509Svid) -> None:
        now = self.clock()
        with self._lock:
            previous = self._latest.get(svid.spiffe_id)
            if previous is not None and previous != svid.fingerprint:
                self._superseded.setdefault(previous, now)
            self._latest[svid.spiffe_id] = svid.fingerprint
            if len(self._superseded) > 10_000:  # bounded: forget the oldest
                for key in sorted(self._superseded, key=self._superseded.__getitem__)[:1000]:
                    del self._superseded[key]

    # -- probing -------------------------------------------------------------------------------------------

    def probe_all(self) -> list[Probe]:
        """Probe every sidecar of the registry's current set once; returns what was found (also kept for
        :meth:`probes` and the metrics)."""
        targets = targets_of(self.registry.current().mesh)
        client = self._client()
        if not targets:
            return []
        with ThreadPoolExecutor(max_workers=min(WORKERS, len(targets)), thread_name_prefix="probe") as pool:
            return list(pool.map(lambda target: self.probe(target, client), targets))

    def _client(self) -> X509Svid | None:
        try:
            return self.engine.source(self.identity).current()
        except MeshIdentityError:
            return None

    def probe(self, target: Target, client: X509Svid | None = None) -> Probe:
        """Probe one sidecar (presenting ``client``, default the control plane's SVID) and record the result."""
        client = client if client is not None else self._client()
        try:
            chain = presented_chain(target.address, client=client, timeout=self.timeout)
            if not chain:
                raise HandshakeError(f"{target.address} presented no certificate")
        except HandshakeError as err:
            result = Probe(target, self.clock(), problem=str(err))
        else:
            result = self._judge(target, chain)
        with self._lock:
            self._probes[target.node] = result
            self._counts["ok" if result.up else "failed"] += 1
        return result

    def _judge(self, target: Target, chain: Sequence[x509.Certificate]) -> Probe:
        now = self.clock()
        leaf, above = chain[0], tuple(chain[1:])
        served = fingerprint_of(leaf)
        bundle = self.engine.bundles.current()
        problem = "no trust bundle yet" if bundle is None else chain_problem(leaf, above, bundle, now)
        with self._lock:
            latest = self._latest.get(target.spiffe_id)
            newest = None if latest is None else served == latest
            stale_since = None
            if newest is False:
                first = self._stale_seen.setdefault((target.node, served), now)
                stale_since = self._superseded.get(served, first)
            for key in [k for k in self._stale_seen if k[0] == target.node and k[1] != served]:
                del self._stale_seen[key]
        return Probe(target, now, None, serial_of(leaf), leaf.not_valid_after_utc, newest, stale_since, problem)

    def probes(self) -> dict[str, Probe]:
        """The last probe of every sidecar, by node."""
        with self._lock:
            return dict(self._probes)

    def counts(self) -> dict[str, int]:
        with self._lock:
            return dict(self._counts)


class _ProberCollector:
    """The prober's metrics, read from its last probes at scrape time."""

    def __init__(self, prober: SidecarProber) -> None:
        self.prober = prober

    def collect(self) -> Iterator[GaugeMetricFamily | CounterMetricFamily]:
        now = self.prober.clock()
        probes = sorted(self.prober.probes().values(), key=lambda p: p.target.node)

        def family(name: str, text: str, extra: Sequence[str] = ()) -> GaugeMetricFamily:
            return GaugeMetricFamily(f"{PREFIX}_{name}", text, labels=[*LABELS, *extra])

        up = family("probe_up", "1 when the last TLS handshake with the sidecar's inbound listener succeeded.")
        at = family("probe_timestamp_seconds", "When the sidecar was last probed.")
        info = family("served_certificate_info", "The certificate the sidecar serves, by serial.", ["serial"])
        newest = family("certificate_newest", "1 when the sidecar serves the SVID issued last for its identity.")
        stale = family("certificate_stale_seconds", "Seconds the sidecar has served a superseded SVID (0: newest).")
        valid = family(
            "certificate_chain_valid", "1 when the chain the sidecar presents verifies to the current trust bundle."
        )
        expiry = family("certificate_expiry_timestamp_seconds", "NotAfter of the certificate the sidecar serves.")
        for probe in probes:
            labels = [probe.target.node, probe.target.service, str(probe.target.spiffe_id)]
            up.add_metric(labels, 1.0 if probe.up else 0.0)
            at.add_metric(labels, probe.at.timestamp())
            if not probe.up or probe.serial is None or probe.not_after is None:
                continue
            info.add_metric([*labels, probe.serial], 1.0)
            valid.add_metric(labels, 1.0 if probe.chain_problem is None else 0.0)
            expiry.add_metric(labels, probe.not_after.timestamp())
            if probe.newest is not None:
                newest.add_metric(labels, 1.0 if probe.newest else 0.0)
                stale.add_metric(labels, probe.stale_seconds(now))
        counts = self.prober.counts()
        total = CounterMetricFamily(f"{PREFIX}_probes", "TLS handshakes with sidecars, by result.", labels=["result"])
        for result in ("ok", "failed"):
            total.add_metric([result], float(counts[result]))
        grace = GaugeMetricFamily(
            f"{PREFIX}_reload_grace_seconds", "How long a sidecar may take to serve a new SVID before it is stale."
        )
        grace.add_metric([], self.prober.grace.total_seconds())
        yield from (up, at, total, info, newest, stale, valid, expiry, grace)
