"""The config file ``deploy/config.yaml`` ships (a ConfigMap's ``config.yaml``) is parsed by the product's own loader
and its provider options by the installed provider's schema, as ``serve`` does, so it cannot drift from the code;
and every path and port it names is the one the Deployment mounts and opens and the Service exposes."""

from __future__ import annotations

from pathlib import Path, PurePosixPath
from typing import Any

import yaml

from mesh_identity.config import Config, SecretSource, parse_config
from plugins.manager import Plugins
from tests.deploy.conftest import EXAMPLES, NAMESPACE_NAME, base_documents, only, read_documents

MONITORED = "mesh-identity.io/monitored-by"


def container() -> dict[str, Any]:
    (found,) = only(base_documents(), "Deployment")["spec"]["template"]["spec"]["containers"]
    assert isinstance(found, dict)
    return found


def config_path() -> PurePosixPath:
    args = container()["args"]
    return PurePosixPath(args[args.index("--config") + 1])


def shipped_config() -> Config:
    """``deploy/config.yaml``'s file, loaded as ``mesh-identity serve --config`` loads it in the pod."""
    data = only(base_documents(), "ConfigMap", "mesh-identity-config")["data"]
    return parse_config(yaml.safe_load(data[config_path().name]), Path(config_path().parent), Path(config_path()))


def mounts() -> dict[str, dict[str, Any]]:
    return {m["name"]: m for m in container()["volumeMounts"]}


def test_the_config_loads_with_the_products_loader() -> None:
    config = shipped_config()
    assert config.registry is not None and config.registry.kind == "kubernetes"
    assert config.registry.kubeconfig is None  # in_cluster: the pod's service account
    assert config.registry.namespace == NAMESPACE_NAME  # where the Role grants the Leases
    assert config.mesh_file is None
    assert config.xds_secrets is SecretSource.AGENT
    assert config.signing is not None and config.signing.kubernetes is not None
    assert config.signing.kubernetes.kubeconfig is None
    assert config.ca.provider == "builtin"


def test_the_provider_options_pass_the_installed_providers_schema(tmp_path: Path) -> None:
    config = shipped_config()
    plugins = Plugins.load()
    plugins.configure({"trust_domain": config.trust_domain.name, "state_dir": tmp_path, "plugins": config.plugins})
    options = plugins.validate_provider_options(config.ca.provider, config.ca.provider_options)
    assert options["store"] == "kubernetes"
    assert options["secret_namespace"] == NAMESPACE_NAME
    assert options["secret_name"] == "mesh-identity-ca"


def test_the_mesh_name_is_the_example_meshs() -> None:
    labels = {
        d["metadata"]["labels"][MONITORED]
        for d in read_documents(EXAMPLES / "namespace.yaml")
        if d["kind"] == "Namespace"
    }
    assert shipped_config().registry is not None
    assert labels == {shipped_config().registry.mesh_name}  # type: ignore[union-attr]


def test_the_files_it_names_are_the_ones_the_deployment_mounts() -> None:
    config = shipped_config()
    volumes = {v["name"]: v for v in only(base_documents(), "Deployment")["spec"]["template"]["spec"]["volumes"]}
    found = mounts()
    assert PurePosixPath(found["config"]["mountPath"]) == config_path()
    assert volumes[found["config"]["name"]]["configMap"]["name"] == "mesh-identity-config"
    assert PurePosixPath(found["state"]["mountPath"]) == PurePosixPath(config.state_dir)
    assert "emptyDir" in volumes["state"]
    key_file = PurePosixPath(config.ca.provider_options["key_encryption_file"])
    assert key_file.parent == PurePosixPath(found["ca-key"]["mountPath"])
    assert found["ca-key"]["readOnly"] is True
    assert "items" not in volumes["ca-key"]["secret"]  # every key of the Secret is a file: passphrase among them
    assert key_file.name == "passphrase"


def test_the_ports_it_listens_on_are_the_containers_and_the_services() -> None:
    config = shipped_config()
    assert config.xds_listen is not None and config.metrics_listen is not None and config.signing is not None
    listens = {
        "xds": config.xds_listen,
        "signing": config.signing.listen,
        "attest": config.signing.attest_listen,
        "metrics": config.metrics_listen,
        "webhook": config.inject.listen if config.inject is not None else None,
    }
    assert all(listen is not None and listen.host == "0.0.0.0" for listen in listens.values())
    assert {p["name"]: p["containerPort"] for p in container()["ports"]} == {
        k: v.port for k, v in listens.items() if v is not None
    }
