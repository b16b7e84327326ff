"""examples/alerts.yaml: well-formed rules that cover the three alarms and only name metrics we really export."""

from __future__ import annotations

import re
import urllib.request
from pathlib import Path

import yaml
from prometheus_client.parser import text_string_to_metric_families

from mesh_identity.assembly import build_service
from tests.rotation.helpers import ids, make_config, provider_for

ALERTS = Path(__file__).resolve().parents[2] / "examples" / "alerts.yaml"
METRIC = re.compile(r"\bmesh_identity_[a-z_]+\b")


def rules() -> list[dict]:
    document = yaml.safe_load(ALERTS.read_text())
    return [rule for group in document["groups"] for rule in group["rules"]]


def test_rules_are_complete():
    names = [rule["alert"] for rule in rules()]
    assert len(names) == len(set(names))
    for rule in rules():
        assert set(rule) <= {"alert", "expr", "for", "labels", "annotations"}, rule["alert"]
        assert rule["labels"]["severity"] in {"info", "warning", "critical"}, rule["alert"]
        assert rule["annotations"]["summary"], rule["alert"]
        assert METRIC.search(rule["expr"]), rule["alert"]
    assert {"MeshIdentityCertificateExpiresSoon", "MeshIdentityRotationFailing", "MeshIdentityProviderDown"} <= set(
        names
    )


def test_every_metric_an_alert_names_is_exported(tmp_path):
    config = make_config(tmp_path, identities=ids("web"))
    service = build_service(config, provider_for(config))
    service.start(paused=True)
    try:
        service.engine.rotate(ids("web")[0])  # so counters have samples
        with urllib.request.urlopen(service.url + "/metrics", timeout=30) as response:
            text = response.read().decode()
    finally:
        service.stop()
    exported = {sample.name for family in text_string_to_metric_families(text) for sample in family.samples}
    used = {name for rule in rules() for name in METRIC.findall(rule["expr"])}
    assert used, "the rules name no metric"
    assert used <= exported, sorted(used - exported)
