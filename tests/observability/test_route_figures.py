"""Route figures from a sidecar's stats text (the format Envoy's /stats/prometheus writes with our tags), and the
quantile estimate (linear inside a bucket, as Prometheus' histogram_quantile)."""

from __future__ import annotations

import math

import pytest

from xds_sds.mesh.figures import RouteCounts, RouteKey, figures, merge, quantile, route_counts, table

SRC = 'direction="outbound",protocol="{p}",source_service="{a}",source_identity="t/ns/x/sa/{a}",destination_service="{b}",destination_identity="t/ns/x/sa/{b}"'


def envoy_text(a: str, b: str, *, protocol: str = "http", requests: int = 0, xx: dict[str, int] | None = None,
               codes: dict[str, int] | None = None, buckets: dict[str, int] | None = None, cx: int = 0,
               cx_fail: int = 0, cx_buckets: dict[str, int] | None = None) -> str:  # fmt: skip
    labels = SRC.format(p=protocol, a=a, b=b)
    lines = [
        "# TYPE envoy_cluster_upstream_rq_total counter",
        f"envoy_cluster_upstream_rq_total{{{labels}}} {requests}",
        'envoy_cluster_upstream_rq_total{envoy_cluster_name="mesh-identity-xds"} 99',
        "# TYPE envoy_cluster_upstream_rq counter",  # Envoy's upstream_rq_<code>: not a total
        *(f'envoy_cluster_upstream_rq{{{labels},envoy_response_code="{c}"}} {n}' for c, n in (codes or {}).items()),
        "# TYPE envoy_cluster_upstream_rq_xx counter",
        *(
            f'envoy_cluster_upstream_rq_xx{{{labels},envoy_response_code_class="{c}"}} {n}'
            for c, n in (xx or {}).items()
        ),
        "# TYPE envoy_cluster_upstream_cx_total counter",
        f"envoy_cluster_upstream_cx_total{{{labels}}} {cx}",
        "# TYPE envoy_cluster_upstream_cx_connect_fail counter",
        f"envoy_cluster_upstream_cx_connect_fail{{{labels}}} {cx_fail}",
        "# TYPE envoy_http_downstream_rq_total counter",  # a listener's: not a route of the clusters
        f'envoy_http_downstream_rq_total{{direction="outbound",route="outbound|{b}",source_service="{a}"}} 1000',
    ]
    for name, values in (("upstream_rq_time", buckets), ("upstream_cx_length_ms", cx_buckets)):
        if values:
            lines.append(f"# TYPE envoy_cluster_{name} histogram")
            lines += [f'envoy_cluster_{name}_bucket{{{labels},le="{le}"}} {n}' for le, n in values.items()]
            lines.append(f"envoy_cluster_{name}_sum{{{labels}}} 0")
            lines.append(f"envoy_cluster_{name}_count{{{labels}}} {list(values.values())[-1]}")
    return "\n".join(lines) + "\n"


KEY = RouteKey("frontend", "backend", "spiffe://t/ns/x/sa/frontend", "spiffe://t/ns/x/sa/backend")


def test_an_http_route_over_a_window() -> None:
    before = route_counts(
        envoy_text(
            "frontend",
            "backend",
            requests=100,
            xx={"2": 95, "4": 3, "5": 2},
            codes={"200": 95},
            buckets={"1": 50, "5": 90, "+Inf": 100},
        )
    )
    after = route_counts(
        envoy_text(
            "frontend",
            "backend",
            requests=300,
            xx={"2": 280, "4": 8, "5": 12},
            codes={"200": 280},
            buckets={"1": 150, "5": 290, "+Inf": 300},
        )
    )
    assert set(after) == {KEY}  # only outbound clusters with both ends named
    [row] = figures(before, after, 10.0)
    assert (row.kind, row.rate, row.error_ratio, row.refused_ratio) == ("http", 20.0, 0.05, 0.025)
    assert row.p50 == pytest.approx(1.0)  # 100 of 200 in the first bucket: its top
    assert row.p99 == pytest.approx(4.92)  # rank 198: 98 of the 100 in (1, 5]
    lines = table([row])
    assert lines[0].split()[:7] == ["ROUTE", "KIND", "REQ/S", "ERR%", "4XX%", "P50", "P99"]
    assert lines[1].split() == ["frontend", "->", "backend", "http", "20.0", "5.0%", "2.5%", "1.00ms", "4.92ms",
                                "spiffe://t/ns/x/sa/frontend", "->", "spiffe://t/ns/x/sa/backend"]  # fmt: skip


def test_a_tcp_route_counts_connections() -> None:
    after = route_counts(
        envoy_text(
            "frontend",
            "ledger",
            protocol="tcp",
            requests=40,
            cx=40,
            cx_fail=4,
            cx_buckets={"2": 30, "10": 36, "+Inf": 36},
        )
    )
    [row] = figures({}, after, 4.0)
    assert (row.kind, row.rate, row.error_ratio, row.refused_ratio) == ("tcp", 10.0, 0.1, 0.0)
    assert row.p50 == pytest.approx(18 / 30 * 2)


def test_an_idle_route_and_a_restarted_sidecar() -> None:
    text = envoy_text("frontend", "backend", requests=5, buckets={"1": 5, "+Inf": 5})
    [idle] = figures(route_counts(text), route_counts(text), 1.0)
    assert (idle.rate, idle.error_ratio, idle.p50, idle.p99) == (0.0, None, None, None)
    restarted = route_counts(envoy_text("frontend", "backend", requests=2, buckets={"1": 2, "+Inf": 2}))
    [row] = figures(route_counts(envoy_text("frontend", "backend", requests=50)), restarted, 1.0)
    assert row.rate == 2.0  # counters that went down count from zero


def test_instances_of_one_service_add_up() -> None:
    one = route_counts(envoy_text("frontend", "backend", requests=10, xx={"5": 1}))
    two = route_counts(envoy_text("frontend", "backend", requests=30, xx={"5": 3}))
    merged = merge([one, two])
    assert (merged[KEY].requests, merged[KEY].errors) == (40, 4)


@pytest.mark.parametrize(
    ("q", "buckets", "expected"),
    [
        (0.5, {1.0: 0, 2.0: 10, math.inf: 10}, 1.5),
        (0.9, {1.0: 0, 2.0: 10, math.inf: 10}, 1.9),
        (0.5, {0.5: 10, math.inf: 10}, 0.25),
        (0.99, {1.0: 5, math.inf: 10}, 1.0),  # in the +Inf bucket: the highest finite bound
        (0.5, {1.0: 0, math.inf: 0}, None),
        (0.5, {}, None),
    ],
)
def test_quantile_as_prometheus(q: float, buckets: dict[float, float], expected: float | None) -> None:
    assert quantile(q, buckets) == (pytest.approx(expected) if expected is not None else None)


def test_text_that_is_not_prometheus_is_refused() -> None:
    with pytest.raises(ValueError, match="not Prometheus text"):
        route_counts('envoy_cluster_upstream_rq_total{direction="outbound" 1\n')
    assert route_counts("") == {}
    assert RouteCounts().requests == 0
