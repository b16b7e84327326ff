"""Prometheus metrics of the signing API, in the registry it is given (the service's; a private one by default).

``mesh_identity_signing_requests_total{rpc, code}`` counts requests by RPC and gRPC status (``OK`` for a grant);
``mesh_identity_signing_request_seconds{rpc}`` is their latency, from arrival to answer (the CA's signing, a
TokenReview, and waiting for a free worker included); ``mesh_identity_signing_in_flight`` the requests being
worked on now. ``rpc`` is one of the four RPC names, so a client cannot grow the label set.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

RPCS = ("Attest", "SignX509", "SignJwt", "FetchBundle")
BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


class SigningMetrics:
    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "mesh_identity_signing_requests", "Signing API requests by RPC and gRPC status", ["rpc", "code"], registry=r
        )
        self.latency = Histogram(
            "mesh_identity_signing_request_seconds",
            "Signing API request latency, arrival to answer",
            ["rpc"],
            buckets=BUCKETS,
            registry=r,
        )
        self.in_flight = Gauge("mesh_identity_signing_in_flight", "Signing API requests being worked on", registry=r)

    def observe(self, rpc: str, code: str, seconds: float) -> None:
        self.requests.labels(rpc, code).inc()
        self.latency.labels(rpc).observe(seconds)

    def value(self, name: str, **labels: str) -> float:
        """Current value of a sample (0 when absent): ``value("mesh_identity_signing_requests_total", ...)``."""
        found = self.registry.get_sample_value(name, labels)
        return 0.0 if found is None else found
