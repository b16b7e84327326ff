"""A live mesh (real Envoys, the control plane ``serve`` runs) scraped by the real Prometheus with the example config.

One mesh and one Prometheus for the whole module (see :mod:`tests.observability.observed`); traffic flows along
every route throughout. The last test cuts one sidecar off the xDS server across a rotation: its stale
certificate shows in the prober's metric and fires its alert, for that sidecar only, until it is reconnected.
"""

from __future__ import annotations

import json
import re
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
import yaml

from mesh_identity.cli.main import main
from mesh_identity.clock import utcnow
from mesh_identity.demo.apps import get_json
from mesh_identity.demo.mesh import routes
from mesh_identity.demo.view import Frame, render
from mesh_identity.demo.view import Traffic as DemoTraffic
from tests.metrics.test_alerts import injector_metrics
from tests.observability.observed import RELAYED, ROUTES, ObservedMesh, Traffic, identity, observed_mesh
from tests.observability.promserver import PROMTOOL, PrometheusServer
from tests.waiting import wait_until
from xds_sds.mesh.figures import read_stats
from xds_sds.mesh.handshake import presented_chain
from xds_sds.mesh.targets import read_targets, targets_path

pytestmark = pytest.mark.e2e

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"
PROMETHEUS_YML = EXAMPLES / "prometheus" / "prometheus.yml"
DASHBOARD = EXAMPLES / "grafana" / "mesh-identity.json"
ALERTS = EXAMPLES / "alerts.yaml"
STALE = "MeshIdentitySidecarStaleCertificate"
# What Envoy's own naming makes promtool say (its counters lack "_total", it sends no HELP, it uses "ms"...);
# anything else (a parse error, a duplicate, a bad histogram) is a finding.
ENVOY_NAMING = (
    'counter metrics should have "_total" suffix',
    "no help text",
    "metric names should not contain abbreviated units",
    'non-counter metrics should not have "_total" suffix',
    'non-histogram and non-summary metrics should not have "_count" suffix',
    'use base unit "seconds" instead of "days"',
)


def prometheus_config(observed: ObservedMesh) -> dict[str, Any]:
    """examples/prometheus/prometheus.yml pointed at this mesh, with intervals of a second."""
    document = yaml.safe_load(PROMETHEUS_YML.read_text())
    document["global"] = {"scrape_interval": "1s", "scrape_timeout": "1s", "evaluation_interval": "1s"}
    document["rule_files"] = [str(ALERTS)]
    jobs = {job["job_name"]: job for job in document["scrape_configs"]}
    assert set(jobs) == {"mesh-identity", "mesh-identity-sidecars"}
    jobs["mesh-identity"]["static_configs"] = [{"targets": [observed.metrics_address]}]
    jobs["mesh-identity-sidecars"]["file_sd_configs"] = [{"files": [str(targets_path(observed.state_dir))]}]
    return document


@pytest.fixture(scope="module")
def observed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ObservedMesh]:
    with observed_mesh(tmp_path_factory.mktemp("observed")) as mesh:
        yield mesh


@pytest.fixture(scope="module")
def traffic(observed: ObservedMesh) -> Iterator[Traffic]:
    with Traffic(observed) as running:
        wait_until(lambda: running.results["frontend ok", "200"] >= 10, "traffic along frontend -> backend -> ratings")
        yield running


@pytest.fixture(scope="module")
def prometheus(
    observed: ObservedMesh, traffic: Traffic, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[PrometheusServer]:
    server = PrometheusServer(prometheus_config(observed), tmp_path_factory.mktemp("prometheus")).start()
    try:
        expected = 1 + len(observed.mesh.nodes())
        wait_until(lambda: sum(server.targets_up().values()) == expected, "every target to be scraped", 60)
        yield server
    finally:
        server.stop()


def values(prometheus: PrometheusServer, expr: str, *labels: str) -> dict[tuple[str, ...], float]:
    return {tuple(r["metric"].get(name, "") for name in labels): float(r["value"][1]) for r in prometheus.query(expr)}


# -- the sidecars' stats endpoint ---------------------------------------------------------------------------


def _get(url: str, method: str = "GET") -> tuple[int, bytes]:
    request = urllib.request.Request(url, method=method, data=b"" if method == "POST" else None)
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as err:
        return err.code, err.read()


def test_the_stats_endpoint_serves_prometheus_text_and_nothing_else(observed: ObservedMesh, traffic: Traffic) -> None:
    stats = observed.instance("frontend").stats
    code, body = _get(f"http://{stats}/stats/prometheus")
    assert code == 200 and b"envoy_cluster_upstream_rq_total{" in body
    for path, method in (("/certs", "GET"), ("/config_dump", "GET"), ("/quitquitquit", "POST"),
                         ("/stats/prometheus", "POST"), ("/stats/prometheus/../../certs", "GET"), ("//certs", "GET")):  # fmt: skip
        code, body = _get(f"http://{stats}{path}", method)
        assert (code, body) == (404, b"only GET /stats/prometheus is served here\n"), path
    assert observed.envoys["frontend-1"].exit_code() is None  # /quitquitquit never reached the admin


def test_every_exposition_passes_promtool(observed: ObservedMesh, traffic: Traffic) -> None:
    def control_plane_metrics() -> bytes:
        return bytes(urllib.request.urlopen(f"http://{observed.metrics_address}/metrics", timeout=10).read())

    wait_until(lambda: control_plane_metrics().count(b"mesh_identity_sidecar_certificate_newest{") == 6, "every probe")
    control_plane = control_plane_metrics()
    checked = subprocess.run([PROMTOOL, "check", "metrics"], input=control_plane, capture_output=True, check=False)
    assert (checked.returncode, checked.stdout + checked.stderr) == (0, b"")
    assert b"mesh_identity_sidecar_certificate_newest{" in control_plane
    for node in observed.mesh.nodes():
        instance = observed.mesh.instance(node)
        assert instance is not None and instance[1].stats is not None
        text = read_stats(instance[1].stats).encode()
        checked = subprocess.run([PROMTOOL, "check", "metrics"], input=text, capture_output=True, check=False)
        assert checked.returncode in (0, 3), checked.stderr  # 1: it does not parse; 3: lint findings only
        findings = {line.split(" ", 1)[1] for line in (checked.stdout + checked.stderr).decode().splitlines()}
        assert findings <= set(ENVOY_NAMING), (node, findings - set(ENVOY_NAMING))


def test_the_targets_file_lists_every_sidecar(observed: ObservedMesh) -> None:
    found = read_targets(targets_path(observed.state_dir))
    expected = []
    for service in observed.mesh.services.values():
        instance = service.instances[0]
        expected.append(
            (str(instance.stats), {"service": service.name, "identity": str(service.identity), "node": instance.node})
        )
    assert sorted(found) == sorted(expected)


# -- Prometheus ---------------------------------------------------------------------------------------------


def test_request_and_error_rates_of_every_route_carry_both_identities(prometheus: PrometheusServer) -> None:
    pair = ("source_service", "source_identity", "destination_service", "destination_identity")
    expected = {(a, identity(a), b, identity(b)) for a, b in ROUTES}
    rate = 'sum by (source_service, source_identity, destination_service, destination_identity) (rate({}{{direction="outbound"{}}}[5s]))'

    def rates(metric: str, extra: str = "") -> dict[tuple[str, ...], float]:
        return values(prometheus, rate.format(metric, extra), *pair)

    def every_route_has_traffic() -> bool:
        http = {k for k, v in rates("envoy_cluster_upstream_rq_total").items() if v > 0}
        tcp = {k for k, v in rates("envoy_cluster_upstream_cx_total").items() if v > 0}
        return http | tcp >= expected

    wait_until(every_route_has_traffic, "a request rate on every route", 60)
    requests = values(prometheus, rate.format("envoy_cluster_upstream_rq_total", ',protocol="http"'), *pair)
    assert {k for k, v in requests.items() if v > 0} == expected - {
        ("frontend", identity("frontend"), "ledger", identity("ledger"))
    }
    connections = rates("envoy_tcp_downstream_cx_total")
    assert connections[("frontend", identity("frontend"), "ledger", identity("ledger"))] > 0
    # errors: frontend -> backend gets 502 for /call/ratings/nope, batch -> backend the policy's 403
    wait_until(lambda: rates("envoy_cluster_upstream_rq_xx", ',envoy_response_code_class="5"'), "a 5xx rate", 60)
    errors = {k for k, v in rates("envoy_cluster_upstream_rq_xx", ',envoy_response_code_class="5"').items() if v > 0}
    assert errors == {("frontend", identity("frontend"), "backend", identity("backend"))}
    refused = {k for k, v in rates("envoy_cluster_upstream_rq_xx", ',envoy_response_code_class="4"').items() if v > 0}
    assert ("batch", identity("batch"), "backend", identity("backend")) in refused
    # per route (the caller's listener), with the route's name
    routes = values(
        prometheus,
        'sum by (route, source_identity, destination_identity) (rate(envoy_http_downstream_rq_total{direction="outbound"}[5s]))',
        "route",
        "source_identity",
        "destination_identity",
    )
    assert ("outbound|backend", identity("frontend"), identity("backend")) in routes
    assert ("outbound|ratings", identity("backend"), "") in routes  # a split: the identity is per backend
    latency = values(
        prometheus,
        'histogram_quantile(0.99, sum by (le, source_service, destination_service) (rate(envoy_cluster_upstream_rq_time_bucket{direction="outbound"}[10s])))',
        "source_service",
        "destination_service",
    )
    assert latency[("frontend", "backend")] > 0


def test_certificate_series_are_there_for_every_identity_and_sidecar(
    observed: ObservedMesh, prometheus: PrometheusServer
) -> None:
    expiry = values(prometheus, "mesh_identity_certificate_expiry_timestamp_seconds", "spiffe_id")
    assert {identity(s) for s in observed.mesh.services} <= {k[0] for k in expiry}
    nodes = set(observed.mesh.nodes())
    wait_until(lambda: {k[0] for k, v in values(prometheus, "mesh_identity_sidecar_certificate_newest", "node").items() if v == 1} == nodes,
               "every sidecar to be seen serving its newest certificate", 60)  # fmt: skip
    valid = values(prometheus, "mesh_identity_sidecar_certificate_chain_valid", "node", "spiffe_id")
    assert valid == {(f"{s}-1", identity(s)): 1.0 for s in observed.mesh.services}
    served = values(prometheus, "mesh_identity_sidecar_served_certificate_info", "node", "serial")
    assert {k[0] for k in served} == nodes
    assert all(re.fullmatch(r"[0-9a-f]+", serial) for _, serial in served)
    assert values(prometheus, "mesh_identity_sidecar_reload_grace_seconds") == {(): 7.5}
    assert not prometheus.firing(STALE)


def test_every_metric_an_alert_or_a_panel_names_is_in_prometheus(
    observed: ObservedMesh, prometheus: PrometheusServer
) -> None:
    assert observed.system.service is not None
    observed.system.service.engine.rotate(observed.mesh.service("ratings").identity)  # so rotations have a series
    wait_until(lambda: "mesh_identity_rotations_total" in prometheus.metric_names(), "a rotation in Prometheus")
    names = prometheus.metric_names()
    alerts = yaml.safe_load(ALERTS.read_text())
    used = {
        name
        for group in alerts["groups"]
        for rule in group["rules"]
        for name in re.findall(r"\bmesh_identity_[a-z_]+\b", rule["expr"])
    } - injector_metrics()  # only a server with inject exports those: tests/inject/test_injector_serve.py
    assert used <= names, sorted(used - names)
    dashboard = json.loads(DASHBOARD.read_text())
    exprs = [t["expr"] for p in dashboard["panels"] for t in p.get("targets", [])]
    exprs += [v["query"]["query"] for v in dashboard["templating"]["list"] if v["type"] == "query"]
    assert len(exprs) >= 20
    for expr in exprs:
        variable = re.fullmatch(r"label_values\((.*), *(\w+)\)", expr)  # Grafana's: a label's values in a selector
        query = variable.group(1) if variable else expr
        metrics = metric_names_in(query)
        assert metrics, expr
        assert metrics <= names, (expr, sorted(metrics - names))
        query = (
            query.replace("$__rate_interval", "15s")
            .replace('=~"$source"', '=~".*"')
            .replace('=~"$destination"', '=~".*"')
        )
        found = wait_until(lambda q=query: prometheus.query(q), f"data for {query}")  # evaluates, has data here
        if variable:
            assert all(variable.group(2) in r["metric"] for r in found), expr


PROMQL_WORDS = {
    "sum", "min", "max", "avg", "count", "by", "without", "on", "ignoring", "group_left", "group_right", "rate",
    "irate", "increase", "histogram_quantile", "time", "label_values", "and", "or", "unless", "le", "bool",
}  # fmt: skip


def metric_names_in(expr: str) -> set[str]:
    """The metric names of a PromQL expression: identifiers that are not functions, keywords, label names or
    values (label matchers and ``by (...)`` lists are removed first)."""
    text = re.sub(r"\{[^}]*\}", "", expr)
    text = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", "", text)
    text = re.sub(r'"[^"]*"', "", text)
    text = re.sub(r"\[[^\]]*\]", "", text)
    words = set(re.findall(r"[a-zA-Z_:][a-zA-Z0-9_:]*", text))
    return {w for w in words if w not in PROMQL_WORDS and not w.startswith("__")}


def test_the_dashboard_is_valid_grafana_json() -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    assert {"title", "uid", "panels", "templating", "schemaVersion"} <= set(dashboard)
    ids = [p["id"] for p in dashboard["panels"]]
    assert len(ids) == len(set(ids))
    titles = " ".join(p["title"] for p in dashboard["panels"])
    for topic in ("Request rate", "Error rate", "p50 and p99", "expiry", "Rotations", "superseded"):
        assert topic in titles, topic
    for p in dashboard["panels"]:
        if p["type"] != "row":
            assert p["targets"] and p["datasource"]["type"] == "prometheus", p["title"]
            assert {"h", "w", "x", "y"} <= set(p["gridPos"]) and p["gridPos"]["x"] + p["gridPos"]["w"] <= 24


# -- mesh-identity top, access logs ---------------------------------------------------------------------------


def test_top_once_shows_every_route(
    observed: ObservedMesh, traffic: Traffic, capsys: pytest.CaptureFixture[str]
) -> None:
    code = main(["top", "--once", "--interval", "2", "--targets", str(targets_path(observed.state_dir))])
    out = capsys.readouterr().out
    assert code == 0, out
    lines = out.splitlines()
    assert lines[1].split() == [
        "ROUTE",
        "KIND",
        "REQ/S",
        "ERR%",
        "4XX%",
        "P50",
        "P99",
        "SOURCE",
        "IDENTITY",
        "->",
        "DESTINATION",
        "IDENTITY",
    ]
    rows = {" ".join(line.split()[:3]): line.split() for line in lines[2:]}
    for a, b in ROUTES:
        row = rows[f"{a} -> {b}"]
        assert row[3] == ("tcp" if b == "ledger" else "http"), row
        assert float(row[4]) > 0, row  # requests (connections) per second
        assert row[-3:] == [identity(a), "->", identity(b)]
    assert rows["frontend -> backend"][5] != "0.0%", out  # the 5xx on purpose
    assert rows["batch -> backend"][6] == "100.0%", out  # refused by policy: every request a 403
    assert rows["frontend -> backend"][7].endswith("ms") and rows["frontend -> backend"][8].endswith("ms")


def test_the_demo_view_shows_the_same_figures(observed: ObservedMesh, traffic: Traffic) -> None:
    """The demo's live view reads the same stats endpoints (those of the mesh's instances) and shows top's table."""
    view = DemoTraffic(observed.mesh, routes(observed.mesh), get_json)  # its counters stay 0: our Traffic sends
    view.stats()
    time.sleep(2)
    stats = view.stats()
    frame = Frame(utcnow(), timedelta(seconds=2), None, (), (), tuple(stats), ())
    text = render(frame)
    table = (
        text.split("TRAFFIC, FROM THE SIDECARS' STATS (as mesh-identity top shows it)\n", 1)[1]
        .split("\n\n")[0]
        .splitlines()
    )
    assert table[0].split()[:7] == ["ROUTE", "KIND", "REQ/S", "ERR%", "4XX%", "P50", "P99"]
    shown = {" ".join(line.split()[:3]): line.split() for line in table[1:]}
    assert set(shown) == {f"{a} -> {b}" for a, b in ROUTES}
    assert all(float(row[4]) > 0 for row in shown.values())
    by_route = {s.route.name: {f.key.name for f in s.figures} for s in stats}
    assert by_route["frontend -> backend -> ratings"] == {
        "frontend -> backend",
        "backend -> ratings",
        "backend -> ratings-v2",
    }


def test_access_logs_are_json_lines_with_the_verified_peer(observed: ObservedMesh, traffic: Traffic) -> None:
    def lines(node: str) -> list[dict[str, Any]]:
        path = observed.access_log(node)
        return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []

    wait_until(lambda: any(e["direction"] == "inbound" for e in lines("backend-1")), "backend's inbound access log")
    inbound = [e for e in lines("backend-1") if e["direction"] == "inbound"]
    callers = {e["peer"] for e in inbound}
    assert callers == {identity("frontend"), identity("batch")}  # as the TLS handshake verified them
    assert {e["response_code"] for e in inbound if e["peer"] == identity("batch")} == {403}
    entry = next(e for e in inbound if e["peer"] == identity("frontend") and e["response_code"] == 200)
    assert entry["route"] == "inbound|backend" and entry["destination_identity"] == identity("backend")
    assert entry["source_identity"] == identity("frontend") and entry["method"] == "GET"
    assert isinstance(entry["duration_ms"], int) and entry["path"].startswith("/call/ratings")
    outbound = [e for e in lines("frontend-1") if e["route"] == "outbound|ledger"]
    assert outbound and {e["peer"] for e in outbound} == {identity("ledger")}
    assert "response_code" not in outbound[0] and outbound[0]["bytes_sent"] == 4  # TCP: no HTTP fields


# -- served-certificate verification: a sidecar cut off from its new certificate ---------------------------


def test_a_sidecar_cut_off_across_a_rotation_fires_the_stale_alert_alone(
    observed: ObservedMesh, prometheus: PrometheusServer
) -> None:
    service = observed.system.service
    assert service is not None
    engine = service.engine
    backend, ratings = observed.mesh.service("backend").identity, observed.mesh.service("ratings").identity
    envoy = observed.envoys[RELAYED]

    def newest(node: str) -> float | None:
        found = values(prometheus, f'mesh_identity_sidecar_certificate_newest{{node="{node}"}}')
        return found.get(())

    # a fresh certificate first, so the one the cut-off sidecar keeps serving has most of its life ahead
    assert engine.rotate(backend, requested_by="observability test")
    fresh = engine.source(backend).svid()
    wait_until(lambda: fresh.leaf.serial_number in envoy.cert_serials(backend), "backend-1 to load a fresh SVID")
    wait_until(lambda: newest(RELAYED) == 1.0, "Prometheus to see backend-1 serve its newest certificate", 60)

    observed.relay.stop()
    wait_until(lambda: envoy.stats("control_plane.connected_state").get("control_plane.connected_state") == 0,
               "backend-1 to lose the xDS server")  # fmt: skip
    assert engine.rotate(backend, requested_by="observability test")
    assert engine.rotate(ratings, requested_by="observability test")  # a sidecar that reloads: no alert for it
    missed = engine.source(backend).svid()

    def firing_nodes() -> set[str]:
        return {labels["node"] for labels in prometheus.firing(STALE)}

    wait_until(lambda: firing_nodes() == {RELAYED}, f"{STALE} to fire for {RELAYED}", 90)
    stale = values(prometheus, "mesh_identity_sidecar_certificate_stale_seconds", "node")
    assert stale[(RELAYED,)] > 7.5
    assert all(v <= 7.5 for (node,), v in stale.items() if node != RELAYED), stale
    assert values(prometheus, "mesh_identity_sidecar_certificate_newest", "node")[("ratings-1",)] == 1.0
    served = values(prometheus, f'mesh_identity_sidecar_served_certificate_info{{node="{RELAYED}"}}', "serial")
    assert served == {(fresh.serial,): 1.0}  # the inbound listener kept serving the certificate it had
    # seen directly too (Envoy's /certs would show the missed serial: in the bootstrap certificate of its xDS
    # cluster, which serve renews on disk, not in the inbound listener)
    client = engine.source(observed.mesh.service("frontend").identity).svid()
    [presented, *_] = presented_chain(observed.instance("backend").inbound, client=client)
    assert presented.serial_number == fresh.leaf.serial_number
    [alert] = prometheus.firing(STALE)
    assert (alert["spiffe_id"], alert["service"], alert["severity"]) == (str(backend), "backend", "critical")

    observed.relay.start()
    wait_until(
        lambda: missed.leaf.serial_number in envoy.cert_serials(backend), "backend-1 to load the SVID it missed", 60
    )
    wait_until(lambda: not firing_nodes(), f"{STALE} to clear", 60)
    assert newest(RELAYED) == 1.0
    assert values(prometheus, f'mesh_identity_sidecar_certificate_stale_seconds{{node="{RELAYED}"}}') == {(): 0.0}
