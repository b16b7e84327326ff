"""The agent's Prometheus metrics (a registry of its own) and its health.

What describes the present is read from the key keeper at scrape time (:class:`~xds_sds.agent.keeper.KeeperStatus`),
so nothing goes stale:

=====================================================  ==========================================================
metric                                                 meaning
=====================================================  ==========================================================
``mesh_identity_agent_svid_expiry_timestamp_seconds``   NotAfter of each SVID the agent holds (``spiffe_id``,
                                                       ``own``: 1 for the agent's own)
``mesh_identity_agent_last_renewal_timestamp_seconds``  when each identity last got an SVID
``mesh_identity_agent_next_renewal_timestamp_seconds``  the next planned attempt of each identity
``mesh_identity_agent_consecutive_renewal_failures``   consecutive failed attempts of each identity
``mesh_identity_agent_renewal_failures_total``         failed attempts of each identity since the agent started
``mesh_identity_agent_outage_budget_seconds``          seconds until the first SVID expires if no renewal
                                                       succeeds (0 when one is missing or expired)
``mesh_identity_agent_svids``                          SVIDs held and valid now
``mesh_identity_agent_jwt_keys``                       JWT signing keys in the bundle
``mesh_identity_agent_bundle_sequence``                the trust bundle's sequence number
``mesh_identity_agent_workload_api_streams``           open Workload API streams (``method``)
``mesh_identity_agent_workload_api_calls_total``       Workload API calls answered (``method``, ``code``)
``mesh_identity_agent_connections``                    open connections on each socket (``socket``)
``mesh_identity_xds_*``                                the agent's SDS server (as the control plane's xDS)
=====================================================  ==========================================================

Health (``/healthz``): 503 while any SVID (the agent's own or an entry's) is missing or expired.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from datetime import datetime
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from mesh_identity.clock import Clock, utcnow
from xds_sds.agent.keeper import KeeperStatus

PREFIX = "mesh_identity_agent"


def outage_budget(status: KeeperStatus, now: datetime) -> float:
    """Seconds until the first SVID held expires (0 when one is missing or expired)."""
    ends = [identity.not_after for identity in status.identities]
    if not ends or any(end is None for end in ends):
        return 0.0
    return max(0.0, min((end - now).total_seconds() for end in ends if end is not None))


def health_problem(status: KeeperStatus, now: datetime) -> str | None:
    """Why the agent is not healthy (an SVID missing or expired), or None."""
    for identity in status.identities:
        what = "the agent's own SVID" if identity.own else f"the SVID of {identity.spiffe_id}"
        if identity.not_after is None:
            reason = f": {identity.last_error}" if identity.last_error else ""
            return f"{what} has not been issued yet{reason}"
        if now >= identity.not_after:
            reason = f" ({identity.last_error})" if identity.last_error else ""
            return f"{what} expired at {identity.not_after:%Y-%m-%dT%H:%M:%SZ}{reason}"
    return None


class _KeeperCollector:
    def __init__(self, status: Callable[[], KeeperStatus], clock: Clock) -> None:
        self._status = status
        self._clock = clock

    def describe(self) -> list[Any]:
        return []

    def collect(self) -> Iterator[Any]:
        status = self._status()
        now = self._clock()
        labels = ["spiffe_id", "own"]
        expiry = GaugeMetricFamily(
            f"{PREFIX}_svid_expiry_timestamp_seconds", "NotAfter of each SVID held.", labels=labels
        )
        last = GaugeMetricFamily(
            f"{PREFIX}_last_renewal_timestamp_seconds", "When each identity last got an SVID.", labels=labels
        )
        upcoming = GaugeMetricFamily(
            f"{PREFIX}_next_renewal_timestamp_seconds", "The next planned attempt of each identity.", labels=labels
        )
        failing = GaugeMetricFamily(
            f"{PREFIX}_consecutive_renewal_failures", "Consecutive failed attempts of each identity.", labels=labels
        )
        failures = CounterMetricFamily(
            f"{PREFIX}_renewal_failures", "Failed attempts of each identity since the agent started.", labels=labels
        )
        held = 0
        for identity in status.identities:
            values = [identity.spiffe_id, "1" if identity.own else "0"]
            if identity.not_after is not None:
                expiry.add_metric(values, identity.not_after.timestamp())
                held += now < identity.not_after
            if identity.last_success is not None:
                last.add_metric(values, identity.last_success.timestamp())
            if identity.next_attempt is not None:
                upcoming.add_metric(values, identity.next_attempt.timestamp())
            failing.add_metric(values, identity.failures)
            failures.add_metric(values, identity.failures_total)
        yield from (expiry, last, upcoming, failing, failures)
        yield GaugeMetricFamily(
            f"{PREFIX}_outage_budget_seconds",
            "Seconds until the first SVID expires if no renewal succeeds.",
            value=outage_budget(status, now),
        )
        yield GaugeMetricFamily(f"{PREFIX}_svids", "SVIDs held and valid now.", value=held)
        yield GaugeMetricFamily(f"{PREFIX}_jwt_keys", "JWT signing keys in the bundle.", value=status.jwt_keys)
        yield GaugeMetricFamily(
            f"{PREFIX}_bundle_sequence", "The trust bundle's sequence.", value=status.bundle_sequence
        )


class AgentMetrics:
    """The agent's registry: the keeper's state (read at scrape time), the Workload API and the sockets."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        r = self.registry
        self.streams = Gauge(f"{PREFIX}_workload_api_streams", "Open Workload API streams.", ["method"], registry=r)
        self.calls = Counter(
            f"{PREFIX}_workload_api_calls", "Workload API calls answered.", ["method", "code"], registry=r
        )
        self.connections = Gauge(f"{PREFIX}_connections", "Open connections on each socket.", ["socket"], registry=r)

    def watch(self, status: Callable[[], KeeperStatus], clock: Clock = utcnow) -> None:
        self.registry.register(_KeeperCollector(status, clock))

    def text(self) -> bytes:
        return generate_latest(self.registry)

    def value(self, name: str, **labels: str) -> float:
        found = self.registry.get_sample_value(name, labels)
        return 0.0 if found is None else found
