"""The ``inject`` section of the config (mesh_identity.injectconfig) and the sections it needs beside it."""

from __future__ import annotations

import copy
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest

from mesh_identity.config import Egress, parse_config
from mesh_identity.errors import ConfigError
from mesh_identity.injectconfig import HostPort, WebhookService

BASE: dict[str, Any] = {
    "trust_domain": "cluster.local",
    "registry": {"kind": "kubernetes", "mesh_name": "demo", "kubeconfig": "kubeconfig", "namespace": "mesh"},
    "xds": {"listen": "0.0.0.0:15010", "secrets": "agent"},
    "signing": {
        "listen": "0.0.0.0:15011",
        "attest_listen": "0.0.0.0:15012",
        "kubernetes": {"kubeconfig": "kubeconfig"},
    },
    "inject": {
        "listen": "0.0.0.0:9443",
        "webhook": {"service": {"namespace": "mesh", "name": "mesh-identity-injector"}},
        "sidecars": {"xds": "mesh-identity.mesh.svc:15010", "signing": "10.96.0.5:15011", "attest": "[fd00::5]:15012"},
    },
}


def _doc(**changes: Any) -> dict[str, Any]:
    doc = copy.deepcopy(BASE)
    for dotted, value in changes.items():
        parts = dotted.split("__")
        target = doc
        for part in parts[:-1]:
            target = target.setdefault(part, {})
        if value is None:
            target.pop(parts[-1], None)
        else:
            target[parts[-1]] = value
    return doc


def test_the_inject_section_with_its_defaults(tmp_path: Path) -> None:
    config = parse_config(_doc(), tmp_path)
    inject = config.inject
    assert inject is not None
    assert inject.listen == HostPort("0.0.0.0", 9443)
    assert inject.service == WebhookService("mesh", "mesh-identity-injector", 443)
    assert inject.server_names == ("mesh-identity-injector.mesh.svc",)
    assert (inject.xds, inject.signing, inject.attest) == (
        HostPort("mesh-identity.mesh.svc", 15010),
        HostPort("10.96.0.5", 15011),
        HostPort("fd00::5", 15012),
    )
    assert (inject.failure_policy, inject.failure_mode, inject.timeout) == ("Fail", "deny", timedelta(seconds=10))
    assert inject.cert_ttl == timedelta(hours=24) and inject.exclude_inbound_ports == (15090,)
    assert inject.capture_image == inject.agent_image
    assert config.registry is not None and config.registry.egress is Egress.DENY


def test_a_url_webhook_and_every_setting(tmp_path: Path) -> None:
    config = parse_config(
        _doc(
            inject__webhook={"url": "https://127.0.0.1:9443/mutate", "failure_policy": "Ignore", "timeout": "5s"},
            inject__failure_mode="allow",
            inject__cert_ttl="2h",
            inject__images={"envoy": "envoy:1", "agent": "agent:2", "capture": "capture:3"},
            inject__capture={
                "exclude_outbound_ports": [5432],
                "exclude_inbound_ports": [],
                "exclude_outbound_ip_ranges": ["169.254.169.254/32"],
            },
            registry__egress="passthrough",
        ),
        tmp_path,
    )
    inject = config.inject
    assert inject is not None and inject.service is None
    assert inject.url == "https://127.0.0.1:9443/mutate" and inject.server_names == ("127.0.0.1",)
    assert (inject.failure_policy, inject.failure_mode, inject.cert_ttl) == ("Ignore", "allow", timedelta(hours=2))
    assert (inject.envoy_image, inject.agent_image, inject.capture_image) == ("envoy:1", "agent:2", "capture:3")
    assert inject.exclude_outbound_ports == (5432,) and inject.exclude_inbound_ports == ()
    assert inject.exclude_outbound_ip_ranges == ("169.254.169.254/32",)
    assert config.registry is not None and config.registry.egress is Egress.PASSTHROUGH


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"inject__listen": None}, "inject.listen: required"),
        ({"inject__colour": "red"}, "inject.colour: unknown key"),
        ({"inject__webhook": {}}, "inject.webhook: give either service"),
        (
            {"inject__webhook": {"url": "http://x/mutate"}},
            "inject.webhook.url: 'http://x/mutate' is not an https:// URL",
        ),
        ({"inject__webhook": {"url": "https://x/m?a=b"}}, "inject.webhook.url: .* no query"),
        (
            {"inject__webhook__failure_policy": "fail"},
            "inject.webhook.failure_policy: 'fail' is not one of Fail, Ignore",
        ),
        ({"inject__webhook__timeout": "31s"}, "inject.webhook.timeout: '31s' is not between"),
        ({"inject__webhook__service": {"namespace": "Mesh", "name": "x"}}, "inject.webhook.service.namespace: 'Mesh'"),
        ({"inject__webhook__service": {"name": "x"}}, "inject.webhook.service.namespace: required"),
        ({"inject__sidecars__xds": "nowhere"}, "inject.sidecars.xds: 'nowhere' is not HOST:PORT"),
        ({"inject__sidecars__xds": "a.b:0"}, "inject.sidecars.xds: 'a.b:0' is not HOST:PORT"),
        ({"inject__sidecars__attest": None}, "inject.sidecars.attest: required"),
        ({"inject__failure_mode": "ignore"}, "inject.failure_mode: 'ignore' is not one of deny, allow"),
        ({"inject__cert_ttl": "9s"}, "inject.cert_ttl: .9s. is not at least"),
        ({"inject__images": {"envoy": "envoy 1"}}, "inject.images.envoy: 'envoy 1' is not an image reference"),
        ({"inject__capture": {"exclude_outbound_ports": [0]}}, r"inject.capture.exclude_outbound_ports\[0\]: 0 is out"),
        (
            {"inject__capture": {"exclude_outbound_ip_ranges": ["10.0.0.1/8"]}},
            r"inject.capture.exclude_outbound_ip_ranges\[0\]: '10.0.0.1/8' is not a CIDR",
        ),
        ({"inject__capture": {"exclude_outbound_ip_ranges": ["fd00::/8"]}}, "is IPv6"),
        ({"registry__egress": "allow"}, "registry.egress: 'allow' is not deny or passthrough"),
        ({"registry": None}, r"inject: needs registry \(kind: kubernetes\)"),
        ({"xds__secrets": "control-plane", "signing": None}, r"inject: needs xds.secrets: agent"),
        ({"signing__kubernetes": None}, r"inject: needs signing.kubernetes"),
        ({"ca": {"mode": "per-workload"}}, r"inject: needs ca.mode: intermediate"),
    ],
)
def test_bad_inject_settings_name_the_key(changes: dict[str, Any], message: str, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=message):
        parse_config(_doc(**changes), tmp_path)
