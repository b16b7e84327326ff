"""The ``registry`` section of the config, its errors (naming the key), the client it configures (a kubeconfig or
the pod's service account, through the real client against the test API server), and the composition root
building the Kubernetes registry from it."""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest

from mesh_identity.compose import registry_for
from mesh_identity.config import RegistryConfig, parse_config
from mesh_identity.errors import ConfigError
from mesh_identity.registry.kube import KubernetesRegistry
from mesh_identity.registry.kube.client import connect
from mesh_identity.registry.kube.resources import NAMESPACES
from tests.registry.kube.conftest import MESH, TD, Cluster

BASE = {"trust_domain": TD.name}


def config(registry: Any, **more: Any) -> Any:
    return parse_config({**BASE, "registry": registry, **more}, Path("/etc/mesh"))


def test_a_kubeconfig_or_the_pods_service_account() -> None:
    with_file = config({"kind": "kubernetes", "mesh_name": "demo", "kubeconfig": "kube/config", "timeout": "3s"})

    def basics(registry: RegistryConfig) -> tuple[str, Path | None, timedelta]:
        return registry.mesh_name, registry.kubeconfig, registry.timeout  # leader election: tests/ha/test_config.py

    assert basics(with_file.registry) == ("demo", Path("/etc/mesh/kube/config"), timedelta(seconds=3))
    in_cluster = config({"kind": "kubernetes", "mesh_name": "demo.v2_a"})
    assert basics(in_cluster.registry) == ("demo.v2_a", None, timedelta(seconds=10))
    assert config({"kind": "kubernetes", "mesh_name": "m", "in_cluster": True}).registry.kubeconfig is None
    assert parse_config(BASE, Path("/")).registry is None


@pytest.mark.parametrize(
    ("registry", "message"),
    [
        ([], "registry: [] is not a mapping"),
        ({"mesh_name": "demo"}, "registry.kind: required (kubernetes)"),
        ({"kind": "kubernetes"}, "registry.mesh_name: required (the value of the namespaces' monitored-by label)"),
        (
            {"kind": "consul", "mesh_name": "demo"},
            "registry.kind: 'consul' is not kubernetes (a mesh file is given as mesh_file)",
        ),
        ({"kind": "kubernetes", "mesh_name": ""}, "registry.mesh_name: '' is not a non-empty string"),
        (
            {"kind": "kubernetes", "mesh_name": "-demo"},
            "registry.mesh_name: '-demo' is not a Kubernetes label value (letters, digits, '-', '_', '.'; 63 at most; "
            "a letter or digit at both ends)",
        ),
        (
            {"kind": "kubernetes", "mesh_name": "my mesh"},
            "registry.mesh_name: 'my mesh' is not a Kubernetes label value",
        ),
        ({"kind": "kubernetes", "mesh_name": "m" * 64}, "registry.mesh_name: 'mmmm"),
        (
            {"kind": "kubernetes", "mesh_name": "demo", "kubeconfig": "k", "in_cluster": True},
            "registry: give either kubeconfig: FILE or in_cluster: true (the pod's service account)",
        ),
        (
            {"kind": "kubernetes", "mesh_name": "demo", "in_cluster": False},
            "registry: give either kubeconfig: FILE or in_cluster: true",
        ),
        (
            {"kind": "kubernetes", "mesh_name": "demo", "in_cluster": "yes"},
            "registry.in_cluster: 'yes' is not true or false",
        ),
        (
            {"kind": "kubernetes", "mesh_name": "demo", "timeout": "0s"},
            "registry.timeout: '0s' is not a positive duration",
        ),
        ({"kind": "kubernetes", "mesh": "demo"}, "registry.mesh: unknown key (did you mean 'mesh_name'?)"),
    ],
)
def test_errors_name_the_key(registry: Any, message: str) -> None:
    with pytest.raises(ConfigError) as caught:
        config(registry)
    assert str(caught.value).startswith(message)


def test_a_mesh_file_and_a_registry_exclude_each_other() -> None:
    with pytest.raises(ConfigError, match=r"^registry: give either mesh_file or registry, not both"):
        config({"kind": "kubernetes", "mesh_name": "demo"}, mesh_file="mesh.yaml")


def test_a_kubeconfig_that_cannot_be_used_is_a_config_error(tmp_path: Path) -> None:
    missing = RegistryConfig(MESH, tmp_path / "nowhere")
    with pytest.raises(ConfigError, match=r"^registry\.kubeconfig: no kubeconfig file at .*nowhere$"):
        connect(missing)
    (tmp_path / "bad").write_text("clusters: [oops\n")
    with pytest.raises(ConfigError, match=r"^registry\.kubeconfig: .*bad is not a usable kubeconfig: "):
        connect(RegistryConfig(MESH, tmp_path / "bad"))
    with pytest.raises(ConfigError, match=r"^registry\.in_cluster: cannot use the pod's service account: "):
        connect(RegistryConfig(MESH), environ={}, service_account_dir=tmp_path)


def test_in_cluster_the_pods_service_account_is_used(cluster: Cluster, tmp_path: Path) -> None:
    cluster.namespace("shop")
    environ = cluster.server.write_in_cluster_files(tmp_path / "sa")
    client = connect(RegistryConfig(MESH), environ=environ, service_account_dir=tmp_path / "sa")
    try:
        listing = client.list(NAMESPACES, "mesh-identity.io/monitored-by=demo")
        assert [n["metadata"]["name"] for n in listing.items] == ["shop"]
        assert client.source == f"the in-cluster service account ({tmp_path / 'sa'})"
    finally:
        client.close()
    assert any(r.user and r.resource == "namespaces" and r.code == 200 for r in cluster.server.requests)


def test_the_composition_root_builds_the_kubernetes_registry(cluster: Cluster, tmp_path: Path) -> None:
    path = cluster.server.write_kubeconfig(tmp_path / "kubeconfig")
    registry = registry_for(config({"kind": "kubernetes", "mesh_name": MESH, "kubeconfig": str(path)}))
    assert isinstance(registry, KubernetesRegistry)
    assert registry.describe() == (
        f"Kubernetes API at {cluster.server.url} (kubeconfig {path}), namespaces labelled "
        "mesh-identity.io/monitored-by=demo"
    )
    registry.client.close()
