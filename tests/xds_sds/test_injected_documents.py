"""The config files of an injected pod's sidecars (xds_sds.mesh.injected): the agent's config as the agent reads
it, and Envoy's bootstrap as a real Envoy validates it, with the node id on the command line (that Envoy then
uses it is shown by the injection e2e: the xDS server serves the pod by its real name)."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
import yaml

from mesh_identity.mesh.model import Address
from mesh_identity.spiffe import SpiffeId, TrustDomain
from tests.e2e.harness import ENVOY
from xds_sds.agent.config import parse_agent_config
from xds_sds.agent.selectors import Selector
from xds_sds.mesh.injected import ControlPlaneAddresses, PodPaths, sidecar_documents

TD = TrustDomain.parse("cluster.local")
WEB = SpiffeId.for_kubernetes(TD, "shop", "web")
PATHS = PodPaths(
    sds_socket=Path("/var/run/mesh-identity/sockets/sds.sock"),
    workload_socket=Path("/var/run/mesh-identity/sockets/workload.sock"),
    agent_state_dir=Path("/var/run/mesh-identity/agent"),
    token_file=Path("/var/run/secrets/tokens/mesh-identity"),
    bundle_file=Path("/var/run/mesh-identity/ca/ca.crt"),
)
CONTROL_PLANE = ControlPlaneAddresses(
    Address("mesh-identity.mesh-identity-system.svc", 15010), Address("10.96.0.5", 15011), Address("10.96.0.5", 15012)
)


def _documents(**changes: object) -> tuple[str, str]:
    values: dict[str, object] = {
        "namespace": "shop", "pod_name": "web-7d9f", "service_account": "web", "identity": WEB, "app_uids": (1001,),
    }  # fmt: skip
    values.update(changes)
    return sidecar_documents(TD, CONTROL_PLANE, PATHS, **values)  # type: ignore[arg-type]


def test_the_agent_config_is_one_the_agent_accepts_with_the_pods_token_and_identity() -> None:
    _, text = _documents()
    config = parse_agent_config(yaml.safe_load(text), Path("/"))
    assert config.trust_domain == TD and config.host == "web-7d9f"
    assert config.credential is not None and config.credential.kubernetes_token_file == PATHS.token_file
    assert (config.control_plane.signing.host, config.control_plane.signing.port) == ("10.96.0.5", 15011)
    assert config.control_plane.bundle == PATHS.bundle_file
    assert (config.sds_socket, config.workload_socket) == (PATHS.sds_socket, PATHS.workload_socket)
    assert config.identities == (WEB,)
    assert sorted(next(iter(e.selectors)) for e in config.entries) == [
        Selector.parse("unix:uid:1001"),
        Selector.parse("unix:uid:1337"),
    ]  # Envoy's user and the app's
    assert config.metrics_listen is not None and config.metrics_listen.host == "127.0.0.1"


def test_nothing_in_the_documents_is_secret() -> None:
    bootstrap, agent = _documents()
    for text in (bootstrap, agent):
        assert "PRIVATE KEY" not in text and "BEGIN CERTIFICATE" not in text
    document = json.loads(bootstrap)
    assert "secrets" not in document.get("staticResources", {})  # certificates come from the agent's socket


def test_a_foreign_identity_is_refused() -> None:
    with pytest.raises(ValueError, match=r"is not in trust domain cluster\.local"):
        _documents(identity=SpiffeId.parse("spiffe://example.org/ns/shop/sa/web"))


@pytest.mark.e2e
def test_envoy_validates_the_bootstrap_with_the_node_id_on_its_command_line(tmp_path: Path) -> None:
    bootstrap, _ = _documents()
    path = tmp_path / "envoy.json"
    path.write_text(bootstrap)
    clusters = {c["name"]: c for c in json.loads(bootstrap)["staticResources"]["clusters"]}
    assert clusters["mesh-identity-xds"]["type"] == "LOGICAL_DNS"  # the control plane's Service name, resolved by Envoy
    listeners = [item["address"]["socketAddress"] for item in json.loads(bootstrap)["staticResources"]["listeners"]]
    assert {"address": "0.0.0.0", "portValue": 15090} in listeners  # Prometheus, excluded from capture
    done = subprocess.run(
        [str(ENVOY), "--mode", "validate", "-c", str(path), "--service-node", "web-7d9f-x2k4p.shop",
         "--disable-hot-restart", "-l", "info"],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr
    assert f"configuration '{path}' OK" in done.stdout
