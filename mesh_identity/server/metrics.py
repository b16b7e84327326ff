"""Prometheus metrics of a mesh-identity server, in a registry of their own (never the global one).

Counters and the latency histogram are fed by lifecycle events and the rotation engine; everything that
describes the present (expiry and next rotation of every identity and CA, provider health, outage budget, root
rotation phase, readiness) is read from a :class:`~mesh_identity.server.status.Snapshot` at scrape time, so
no per-identity metric objects are kept and nothing can go stale.

=========================================================  ======================================================
metric                                                     meaning
=========================================================  ======================================================
``mesh_identity_certificates_issued_total``                certificates issued, by ``provider`` and ``kind``
``mesh_identity_rotations_total``                          renewals, by ``kind`` and ``result`` (success, failure)
``mesh_identity_ca_changes_total``                         CA changes, by ``kind`` and ``phase``
``mesh_identity_issuance_duration_seconds``                issuance latency histogram, by ``provider``
``mesh_identity_certificate_expiry_timestamp_seconds``     NotAfter of each identity's SVID (``spiffe_id``)
``mesh_identity_certificate_next_rotation_timestamp_seconds``  next renewal attempt of each identity
``mesh_identity_certificate_rotation_failures``            consecutive failed renewals of each identity
``mesh_identity_ca_expiry_timestamp_seconds``              NotAfter of each CA in the chain (``kind``, ``serial``)
``mesh_identity_ca_next_rotation_timestamp_seconds``       next renewal of the intermediate
``mesh_identity_ca_rotation_failures``                     consecutive failed renewals of the intermediate
``mesh_identity_provider_up``                              1 when the provider's last health check passed
``mesh_identity_outage_budget_seconds``                    seconds until the first certificate in use expires if
                                                           no renewal succeeds
``mesh_identity_identities``                               identities managed
``mesh_identity_root_rotation_phase``                      1 for the current phase (``phase``), 0 for the others
``mesh_identity_ready``                                    1 when the authority can sign
=========================================================  ======================================================
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily

from mesh_identity.events import CaRotated, CertificateIssued, CertificateRotated, CertKind, Event, RotationFailed
from mesh_identity.rotation.roots import PHASES
from mesh_identity.server.status import Snapshot

PREFIX = "mesh_identity"
LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


class Metrics:
    """The metrics of one server. Implements :class:`~mesh_identity.events.EventSink` and
    :class:`~mesh_identity.rotation.engine.IssuanceObserver`; :meth:`watch` connects the snapshot."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        self.issued = Counter(
            f"{PREFIX}_certificates_issued",
            "Certificates issued, by provider and kind.",
            ["provider", "kind"],
            registry=self.registry,
        )
        self.rotations = Counter(
            f"{PREFIX}_rotations",
            "Certificate renewals, by kind and result.",
            ["kind", "result"],
            registry=self.registry,
        )
        self.ca_changes = Counter(
            f"{PREFIX}_ca_changes",
            "CA changes: new intermediates and root rotation phases.",
            ["kind", "phase"],
            registry=self.registry,
        )
        self.issuance_seconds = Histogram(
            f"{PREFIX}_issuance_duration_seconds",
            "Time to issue one certificate (key generation and signing, upstream round trip included).",
            ["provider"],
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self._children: dict[tuple[str, ...], Any] = {}
        self._snapshot: Callable[[], Snapshot] | None = None
        self.registry.register(_StateCollector(self))

    def watch(self, snapshot: Callable[[], Snapshot]) -> None:
        """Read the present state from ``snapshot()`` at every scrape."""
        self._snapshot = snapshot

    def snapshot(self) -> Snapshot | None:
        return self._snapshot() if self._snapshot is not None else None

    def render(self) -> bytes:
        """The text exposition format, as served on ``/metrics``."""
        return bytes(generate_latest(self.registry))

    # -- event sink and observer ---------------------------------------------------------------------------

    def emit(self, event: Event) -> None:
        if isinstance(event, CertificateIssued):
            self._child("issued", event.provider, event.kind.value).inc()
        elif isinstance(event, CertificateRotated):
            self._child("rotations", event.kind.value, "success").inc()
        elif isinstance(event, RotationFailed):
            self._child("rotations", event.kind.value, "failure").inc()
        elif isinstance(event, CaRotated):
            self._child("ca_changes", event.kind.value, event.phase).inc()

    def observe_issuance(self, provider: str, kind: CertKind, seconds: float) -> None:
        self._child("issuance_seconds", provider).observe(seconds)

    def _child(self, metric: str, *labels: str) -> Any:
        key = (metric, *labels)
        child = self._children.get(key)
        if child is None:
            child = self._children[key] = getattr(self, metric).labels(*labels)
        return child


class _StateCollector:
    """Reads a snapshot at scrape time and yields the gauges that describe the present."""

    def __init__(self, metrics: Metrics) -> None:
        self.metrics = metrics

    def describe(self) -> list[Any]:
        return []

    def collect(self) -> Iterator[GaugeMetricFamily]:
        snap = self.metrics.snapshot()
        if snap is None:
            return
        expiry = _gauge("certificate_expiry_timestamp_seconds", "NotAfter of each identity's SVID.", ["spiffe_id"])
        due = _gauge(
            "certificate_next_rotation_timestamp_seconds", "Next renewal attempt of each identity.", ["spiffe_id"]
        )
        failures = _gauge(
            "certificate_rotation_failures", "Consecutive failed renewals of each identity.", ["spiffe_id"]
        )
        for state in snap.identities:
            if state.not_after is not None:
                expiry.add_metric([state.subject], state.not_after.timestamp())
            if state.next_rotation is not None:
                due.add_metric([state.subject], state.next_rotation.timestamp())
            failures.add_metric([state.subject], state.failures)
        yield from (expiry, due, failures)

        ca_expiry = _gauge("ca_expiry_timestamp_seconds", "NotAfter of each CA in the chain.", ["kind", "serial"])
        for root in snap.evidence.roots:
            ca_expiry.add_metric([CertKind.ROOT.value, root.serial], root.not_after.timestamp())
        ca_due = _gauge("ca_next_rotation_timestamp_seconds", "Next renewal of the intermediate.", ["kind"])
        ca_failures = _gauge("ca_rotation_failures", "Consecutive failed renewals of the intermediate.", ["kind"])
        inter = snap.intermediate
        if inter is not None:
            kind = CertKind.INTERMEDIATE.value
            if inter.not_after is not None and inter.serial is not None:
                ca_expiry.add_metric([kind, inter.serial], inter.not_after.timestamp())
            if inter.next_rotation is not None:
                ca_due.add_metric([kind], inter.next_rotation.timestamp())
            ca_failures.add_metric([kind], inter.failures)
        yield from (ca_expiry, ca_due, ca_failures)

        up = _gauge("provider_up", "1 when the provider's last health check passed.", ["provider"])
        if snap.health is not None:
            up.add_metric([snap.provider], 1.0 if snap.health.healthy else 0.0)
        yield up
        budget = snap.outage_budget
        if budget is not None:
            yield GaugeMetricFamily(
                f"{PREFIX}_outage_budget_seconds",
                "Seconds until the first certificate in use expires if no renewal succeeds.",
                value=budget.total_seconds(),
            )
        yield GaugeMetricFamily(f"{PREFIX}_identities", "Identities managed.", value=len(snap.identities))
        phase = _gauge("root_rotation_phase", "1 for the current root rotation phase.", ["phase"])
        for name in PHASES:
            phase.add_metric([name], 1.0 if snap.evidence.phase == name else 0.0)
        yield phase
        yield GaugeMetricFamily(f"{PREFIX}_ready", "1 when the authority can sign.", value=1.0 if snap.ready else 0.0)


def _gauge(name: str, documentation: str, labels: list[str]) -> GaugeMetricFamily:
    return GaugeMetricFamily(f"{PREFIX}_{name}", documentation, labels=labels)
