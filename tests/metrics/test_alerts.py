"""examples/alerts.yaml: well-formed rules that cover the three alarms and only name metrics we really export."""

from __future__ import annotations

import re
import urllib.request
from pathlib import Path

import yaml
from prometheus_client.parser import text_string_to_metric_families

from mesh_identity.compose import Stage, build
from mesh_identity.config import parse_config
from mesh_identity.mesh.model import Instance, Mesh, Protocol, Service
from mesh_identity.registry.base import StaticRegistry
from mesh_identity.spiffe import SpiffeId
from tests.e2e.harness import free_address
from tests.observability.tlsserver import TlsServer
from tests.waiting import wait_until

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
    """Scraped from ``serve``'s composition with a mesh of one sidecar (a TLS server standing in for its inbound
    listener), so the prober's metrics are there too."""
    config = parse_config(
        {"trust_domain": "example.org", "state_dir": "state", "metrics": {"listen": "127.0.0.1:0"},
         "xds": {"listen": "127.0.0.1:0"}, "plugins": {"audit": {"enabled": False}}},
        tmp_path,
    )  # fmt: skip
    sidecar = TlsServer(tmp_path / "sidecar", b"")
    web = SpiffeId.parse("spiffe://example.org/ns/default/sa/web")
    mesh = Mesh(
        config.trust_domain,
        {"web": Service("web", web, Protocol.HTTP, (Instance("web-1", free_address(), sidecar.address),))},
    )
    system = build(config, Stage.SERVER, create=True, registry=StaticRegistry(mesh))
    assert system.service is not None
    service = system.service
    service.start()
    try:
        sidecar.roots = service.engine.bundles.bundle().pem()
        sidecar.serve(service.engine.source(web).svid()).start()
        service.engine.rotate(web)  # so counters have samples
        assert system.prober is not None
        system.prober.probe_all()  # now, not in a probe interval

        def scrape() -> str:
            with urllib.request.urlopen(service.url + "/metrics", timeout=30) as response:
                return response.read().decode()

        text = wait_until(
            lambda: next((t for t in [scrape()] if "mesh_identity_sidecar_certificate_newest{" in t), ""), "a probe"
        )
    finally:
        service.stop()
        sidecar.stop()
    exported = {sample.name for family in text_string_to_metric_families(text) for sample in family.samples}
    used = {name for rule in rules() for name in METRIC.findall(rule["expr"])} - injector_metrics()
    assert used, "the rules name no metric"
    assert used <= exported, sorted(used - exported)


def injector_metrics() -> set[str]:
    """The metrics the alerts name that only a server with ``inject`` exports (checked against its scrape in
    tests/inject/test_injector_serve.py)."""
    return {
        name for rule in rules() for name in METRIC.findall(rule["expr"]) if name.startswith("mesh_identity_injector_")
    }
