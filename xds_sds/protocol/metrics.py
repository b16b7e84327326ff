"""Prometheus metrics of the xDS server.

Each :class:`XdsMetrics` registers its collectors in the registry it is given (a private one by default, so
that several servers can live in one process, as in tests); ``mesh-identity serve`` passes the global one.
Type labels are the short type names (``Secret``, ``Cluster``...) and ``unknown`` for type URLs this server
does not serve, so a client cannot blow up the label set.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge

from xds_sds.protocol.typeurls import KNOWN, short_name


def type_label(type_url: str) -> str:
    return short_name(type_url) if type_url in KNOWN else "unknown"


class XdsMetrics:
    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        r = self.registry
        self.streams = Gauge("mesh_identity_xds_streams", "Open xDS streams", ["service"], registry=r)
        self.responses = Counter("mesh_identity_xds_responses", "Discovery responses sent", ["type"], registry=r)
        self.acks = Counter("mesh_identity_xds_acks", "Responses acknowledged (ACK)", ["type"], registry=r)
        self.nacks = Counter("mesh_identity_xds_nacks", "Responses rejected (NACK)", ["type"], registry=r)
        self.stale_nonces = Counter(
            "mesh_identity_xds_stale_nonces", "Requests ignored for a stale nonce", ["type"], registry=r
        )
        self.unknown_types = Counter(
            "mesh_identity_xds_unknown_type_requests",
            "Requests for a type URL this server does not serve",
            registry=r,
        )
        self.refused = Counter(
            "mesh_identity_xds_refused_streams", "Streams ended with an error status", ["code"], registry=r
        )
        self.denied = Counter(
            "mesh_identity_xds_access_denied",
            "Requests for a node or resource the peer may not have",
            ["type"],
            registry=r,
        )

    def value(self, name: str, **labels: str) -> float:
        """Current value of a sample (0 when absent): ``value("mesh_identity_xds_nacks_total", type="Secret")``."""
        found = self.registry.get_sample_value(name, labels)
        return 0.0 if found is None else found
