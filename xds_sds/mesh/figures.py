"""Traffic figures of a mesh read from its sidecars' stats: requests per second, error share, p50 and p99.

A route here is a hop between two services as the caller's sidecar sees it: the outbound cluster of one
backend (``direction="outbound"``, see :mod:`xds_sds.resources.stats`), so each side of a traffic split is a
route of its own. :func:`route_counts` reads the cumulative counters and latency histogram of every route from
a sidecar's ``/stats/prometheus`` text; :func:`figures` turns two readings into rates over the time between
them. HTTP routes count requests (errors: 5xx answers, including the 503 of a connection that failed; refusals:
4xx, e.g. a policy's 403) and time them (``upstream_rq_time``); TCP routes count connections (errors: failed
connects) and time how long they lasted (``upstream_cx_length_ms``). Quantiles are estimated from the histogram
buckets the way Prometheus' ``histogram_quantile`` does.

``mesh-identity top`` and the demo's live view show these figures.
"""

from __future__ import annotations

import http.client
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

from prometheus_client.parser import text_string_to_metric_families

from mesh_identity.mesh.model import Address
from xds_sds.resources.stats import STATS_PATH, identity_of_label

MAX_STATS_BYTES = 64 * 1024 * 1024


@dataclass(frozen=True, slots=True, order=True)
class RouteKey:
    """Who calls whom."""

    source_service: str
    destination_service: str
    source_identity: str
    destination_identity: str

    @property
    def name(self) -> str:
        return f"{self.source_service} -> {self.destination_service}"


@dataclass
class RouteCounts:
    """Cumulative counters of one route at one reading (summed over the sidecars that report it)."""

    protocol: str = "http"
    requests: float = 0.0  # started (Envoy counts a request when it begins)
    answered: float = 0.0  # answered, of any status class: the ratios' denominator, so that requests still in
    # flight at a reading do not count as neither error nor success
    errors: float = 0.0
    refused: float = 0.0
    connections: float = 0.0
    connect_failures: float = 0.0
    request_buckets: dict[float, float] = field(default_factory=dict)  # le (ms) -> cumulative count
    connection_buckets: dict[float, float] = field(default_factory=dict)

    def add(self, other: RouteCounts) -> None:
        self.requests += other.requests
        self.answered += other.answered
        self.errors += other.errors
        self.refused += other.refused
        self.connections += other.connections
        self.connect_failures += other.connect_failures
        for mine, theirs in ((self.request_buckets, other.request_buckets),
                             (self.connection_buckets, other.connection_buckets)):  # fmt: skip
            for le, count in theirs.items():
                mine[le] = mine.get(le, 0.0) + count


@dataclass(frozen=True, slots=True)
class RouteFigures:
    """A route's traffic over a window. ``kind`` is ``http`` (requests) or ``tcp`` (connections); the ratios
    and quantiles (milliseconds) are None when nothing happened in the window."""

    key: RouteKey
    kind: str
    rate: float
    error_ratio: float | None
    refused_ratio: float | None
    p50: float | None
    p99: float | None


_COUNTERS = {  # by name without "_total" (the parser adds it to every counter sample; Envoy's lack it)
    "envoy_cluster_upstream_rq": "requests",
    "envoy_cluster_upstream_cx": "connections",
    "envoy_cluster_upstream_cx_connect_fail": "connect_failures",
}


def route_counts(text: str) -> dict[RouteKey, RouteCounts]:
    """The outbound routes of one sidecar's ``/stats/prometheus`` text; ValueError when it does not parse."""
    found: dict[RouteKey, RouteCounts] = {}
    try:
        families = list(text_string_to_metric_families(text))
    except ValueError as err:
        raise ValueError(f"not Prometheus text: {err}") from None
    for family in families:
        if not family.name.startswith("envoy_cluster_"):
            continue
        for sample in family.samples:
            labels = sample.labels
            if labels.get("direction") != "outbound" or "source_service" not in labels:
                continue
            key = RouteKey(
                labels["source_service"],
                labels.get("destination_service", ""),
                identity_of_label(labels.get("source_identity", "")),
                identity_of_label(labels.get("destination_identity", "")),
            )
            counts = found.setdefault(key, RouteCounts(labels.get("protocol", "http")))
            name, value = sample.name, float(sample.value)
            if family.type == "counter":
                name = name.removesuffix("_total")
            if name in _COUNTERS and "envoy_response_code" not in labels:  # not Envoy's upstream_rq_<code>
                setattr(counts, _COUNTERS[name], getattr(counts, _COUNTERS[name]) + value)
            elif name == "envoy_cluster_upstream_rq_xx":
                code_class = labels.get("envoy_response_code_class")
                counts.answered += value
                if code_class == "5":
                    counts.errors += value
                elif code_class == "4":
                    counts.refused += value
            elif name == "envoy_cluster_upstream_rq_time_bucket":
                _bucket(counts.request_buckets, labels, value)
            elif name == "envoy_cluster_upstream_cx_length_ms_bucket":
                _bucket(counts.connection_buckets, labels, value)
    return found


def _bucket(buckets: dict[float, float], labels: Mapping[str, str], value: float) -> None:
    le = float(labels["le"])
    buckets[le] = buckets.get(le, 0.0) + value


def merge(readings: Iterable[Mapping[RouteKey, RouteCounts]]) -> dict[RouteKey, RouteCounts]:
    """The routes of several sidecars together (a service with several instances reports a route on each)."""
    merged: dict[RouteKey, RouteCounts] = {}
    for reading in readings:
        for key, counts in reading.items():
            merged.setdefault(key, RouteCounts(counts.protocol)).add(counts)
    return merged


def quantile(q: float, buckets: Mapping[float, float]) -> float | None:
    """The ``q`` quantile of a cumulative histogram (``{le: count}``), interpolated linearly inside the bucket
    it falls in, as Prometheus' ``histogram_quantile``; None when it holds no observation."""
    bounds = sorted(buckets)
    if not bounds or not math.isinf(bounds[-1]) or buckets[bounds[-1]] <= 0:
        return None
    total = buckets[bounds[-1]]
    rank = q * total
    lower, below = 0.0, 0.0
    for le in bounds:
        count = buckets[le]
        if count >= rank:
            if math.isinf(le):
                return lower  # in the +Inf bucket: the highest finite bound is all one can say
            inside = count - below
            return lower + (le - lower) * ((rank - below) / inside if inside > 0 else 1.0)
        lower, below = le, count
    return lower


def _delta(after: float, before: float) -> float:
    return after - before if after >= before else after  # a counter that went down: the sidecar restarted


def _window(after: Mapping[float, float], before: Mapping[float, float]) -> dict[float, float]:
    return {le: _delta(count, before.get(le, 0.0)) for le, count in after.items()}


def figures(
    before: Mapping[RouteKey, RouteCounts], after: Mapping[RouteKey, RouteCounts], seconds: float
) -> list[RouteFigures]:
    """Every route of ``after`` over the ``seconds`` since ``before`` (a route new since then counts from 0)."""
    if seconds <= 0:
        raise ValueError(f"a window of {seconds}s")
    out = []
    for key in sorted(after):
        now, then = after[key], before.get(key, RouteCounts())
        requests = _delta(now.requests, then.requests)
        tcp = now.protocol == "tcp"
        if tcp:
            count = done = _delta(now.connections, then.connections)
            errors, refused = _delta(now.connect_failures, then.connect_failures), 0.0
            buckets = _window(now.connection_buckets, then.connection_buckets)
        else:
            count, done = requests, _delta(now.answered, then.answered)
            errors, refused = _delta(now.errors, then.errors), _delta(now.refused, then.refused)
            buckets = _window(now.request_buckets, then.request_buckets)
        out.append(
            RouteFigures(
                key,
                "tcp" if tcp else "http",
                count / seconds,
                errors / done if done else None,
                refused / done if done else None,
                quantile(0.5, buckets),
                quantile(0.99, buckets),
            )
        )
    return out


def read_stats(address: Address, timeout: float = 5.0) -> str:
    """``GET /stats/prometheus`` from a sidecar's stats endpoint; OSError (or ValueError) when that fails."""
    connection = http.client.HTTPConnection(address.host, address.port, timeout=timeout)
    try:
        connection.request("GET", STATS_PATH)
        response = connection.getresponse()
        body = response.read(MAX_STATS_BYTES + 1)
    except http.client.HTTPException as err:
        raise OSError(f"{address}: {err}") from None
    finally:
        connection.close()
    if response.status != 200:
        raise OSError(f"{address}{STATS_PATH} answered {response.status}")
    if len(body) > MAX_STATS_BYTES:
        raise ValueError(f"{address}{STATS_PATH} sent more than {MAX_STATS_BYTES} bytes")
    return body.decode("utf-8", errors="replace")


def format_ms(value: float | None) -> str:
    if value is None:
        return "-"
    return f"{value:.2f}ms" if value < 10 else f"{value:.0f}ms"


def format_ratio(value: float | None) -> str:
    return "-" if value is None else f"{value:.1%}"


def table(rows: Sequence[RouteFigures]) -> list[str]:
    """The figures as an aligned text table, one route a line."""
    lines = [("ROUTE", "KIND", "REQ/S", "ERR%", "4XX%", "P50", "P99", "SOURCE IDENTITY -> DESTINATION IDENTITY")]
    for row in rows:
        lines.append(
            (
                row.key.name,
                row.kind,
                f"{row.rate:.1f}",
                format_ratio(row.error_ratio),
                format_ratio(row.refused_ratio) if row.kind == "http" else "-",
                format_ms(row.p50),
                format_ms(row.p99),
                f"{row.key.source_identity or '?'} -> {row.key.destination_identity or '?'}",
            )
        )
    widths = [max(len(line[i]) for line in lines) for i in range(len(lines[0]))]
    return ["  ".join(cell.ljust(w) for cell, w in zip(line, widths, strict=True)).rstrip() for line in lines]
