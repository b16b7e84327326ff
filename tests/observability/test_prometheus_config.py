"""The example Prometheus configs: prometheus.yml passes promtool as shipped; kubernetes.yml (which Debian's
Prometheus, built without Kubernetes discovery, cannot load) scrapes, relabels and alerts as prometheus.yml does."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path
from typing import Any

import yaml

from tests.observability.promserver import PROMTOOL

EXAMPLES = Path(__file__).resolve().parents[2] / "examples" / "prometheus"


def load(name: str) -> dict[str, Any]:
    document: dict[str, Any] = yaml.safe_load((EXAMPLES / name).read_text())
    return document


def jobs(document: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {job["job_name"]: job for job in document["scrape_configs"]}


def test_prometheus_yml_passes_promtool() -> None:
    checked = subprocess.run(
        [PROMTOOL, "check", "config", "prometheus.yml"], cwd=EXAMPLES, capture_output=True, text=True, check=False
    )
    assert checked.returncode == 0, checked.stdout + checked.stderr
    assert "SUCCESS: 1 rule files found" in checked.stdout


def test_kubernetes_yml_scrapes_and_relabels_the_sidecars_as_prometheus_yml_does() -> None:
    plain, kube = load("prometheus.yml"), load("kubernetes.yml")
    assert kube["rule_files"] == plain["rule_files"] and set(jobs(kube)) == set(jobs(plain))
    sidecars, reference = jobs(kube)["mesh-identity-sidecars"], jobs(plain)["mesh-identity-sidecars"]
    assert sidecars["metrics_path"] == reference["metrics_path"] == "/stats/prometheus"
    assert sidecars["metric_relabel_configs"] == reference["metric_relabel_configs"]
    assert sidecars["kubernetes_sd_configs"] == [{"role": "pod"}]
    targets = {r.get("target_label"): r for r in sidecars["relabel_configs"]}
    assert {"__address__", "node", "service", "identity", "namespace"} <= set(targets)
    assert targets["identity"]["source_labels"] == ["__meta_kubernetes_pod_annotation_mesh_identity_io_identity"]
    # Prometheus anchors relabel regexes and joins source labels with ";"
    address = targets["__address__"]
    match = re.fullmatch(address["regex"], "10.1.2.3:8080;15090")
    assert match is not None and match.expand(address["replacement"].replace("$", "\\")) == "10.1.2.3:15090"
    assert re.fullmatch(address["regex"], "10.1.2.3;15090") is not None  # a pod without a declared port


def test_the_identity_relabelling_puts_the_scheme_back() -> None:
    [source, destination] = jobs(load("prometheus.yml"))["mesh-identity-sidecars"]["metric_relabel_configs"]
    for rule, label in ((source, "source_identity"), (destination, "destination_identity")):
        assert (rule["source_labels"], rule["target_label"]) == ([label], label)
        match = re.fullmatch(rule["regex"], "example.org/ns/shop/sa/web")
        assert (
            match is not None
            and match.expand(rule["replacement"].replace("$", "\\")) == "spiffe://example.org/ns/shop/sa/web"
        )
        assert re.fullmatch(rule["regex"], "") is None  # an absent label stays absent
