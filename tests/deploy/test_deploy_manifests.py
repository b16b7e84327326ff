"""Every manifest under ``deploy/`` is an object a real API server takes: built-in kinds against the official
schemas (strict, the two versions the test server checks), CRDs as CustomResourceDefinitions, custom resources
against the shipped CRDs' ``openAPIV3Schema``. The kustomize base lists each of its files once and leaves
none out, and the Deployment is what the issue asks for (2 replicas, probes, a locked-down container)."""

from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest

from tests.deploy.conftest import (
    ACCOUNT,
    CRDS,
    DEPLOY,
    EXAMPLES,
    NAMESPACE_NAME,
    ROOT,
    base_documents,
    base_files,
    manifest_files,
    only,
    read_documents,
)
from tests.deploy.test_deploy_config import shipped_config
from tests.fakes.kube.customresources import read_crds, schema_validator
from tests.fakes.kube.workloads import SCHEMA_VERSIONS

CUSTOM_GROUPS = {c["spec"]["group"] for c in read_crds([CRDS])}


def crd_schema(api_version: str, kind: str) -> dict[str, Any]:
    group, version = api_version.split("/")
    for crd in read_crds([CRDS]):
        if crd["spec"]["group"] == group and crd["spec"]["names"]["kind"] == kind:
            for served in crd["spec"]["versions"]:
                if served["name"] == version:
                    schema: dict[str, Any] = served["schema"]["openAPIV3Schema"]
                    return schema
    raise AssertionError(f"no shipped CRD serves {kind} in {api_version}")


@pytest.mark.parametrize("version", SCHEMA_VERSIONS)
@pytest.mark.parametrize("path", manifest_files(), ids=lambda p: str(Path(p).relative_to(DEPLOY)))
def test_every_manifest_is_valid(path: Path, version: str) -> None:
    documents = read_documents(path)
    assert documents, f"{path} holds no object"
    for document in documents:
        name = f"{path.name}: {document.get('kind')} {document.get('metadata', {}).get('name')}"
        if document["apiVersion"].split("/")[0] in CUSTOM_GROUPS:
            validator = schema_validator(crd_schema(document["apiVersion"], document["kind"]))
            assert [e.message for e in validator.iter_errors(document)] == [], name
        else:
            kubernetes_validate.validate(document, version, strict=True)


def test_the_base_lists_every_file_under_deploy_once_and_nothing_else() -> None:
    listed = [p.relative_to(DEPLOY) for p in base_files()]
    assert len(listed) == len(set(listed)), "a file is listed twice"
    assert all((DEPLOY / p).is_file() for p in listed), "a listed file does not exist"
    examples = EXAMPLES.relative_to(DEPLOY)
    expected = {p.relative_to(DEPLOY) for p in manifest_files() if examples not in p.relative_to(DEPLOY).parents}
    assert set(listed) == expected
    kinds = {d["kind"] for d in base_documents()}
    assert kinds == {
        "Namespace",
        "CustomResourceDefinition",
        "ServiceAccount",
        "ClusterRole",
        "ClusterRoleBinding",
        "Role",
        "RoleBinding",
        "ConfigMap",
        "Deployment",
        "PodDisruptionBudget",
        "Service",
    }


def test_every_namespaced_object_of_the_base_is_in_its_namespace() -> None:
    (namespace,) = [d for d in base_documents() if d["kind"] == "Namespace"]
    assert namespace["metadata"]["name"] == NAMESPACE_NAME
    assert "mesh-identity.io/monitored-by" not in namespace["metadata"].get("labels", {})
    cluster_scoped = {"Namespace", "CustomResourceDefinition", "ClusterRole", "ClusterRoleBinding"}
    for document in base_documents():
        metadata = document["metadata"]
        if document["kind"] in cluster_scoped:
            assert "namespace" not in metadata, metadata["name"]
        else:
            assert metadata.get("namespace") == NAMESPACE_NAME, f"{document['kind']} {metadata['name']}"


def test_the_deployment_runs_two_locked_down_replicas() -> None:
    deployment = only(base_documents(), "Deployment")
    spec = deployment["spec"]
    pod = spec["template"]["spec"]
    assert spec["replicas"] == 2
    assert spec["selector"]["matchLabels"].items() <= spec["template"]["metadata"]["labels"].items()
    assert pod["serviceAccountName"] == ACCOUNT
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["runAsUser"] != 0
    assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    assert not pod.get("hostNetwork") and not pod.get("hostPID") and not pod.get("hostIPC")
    spread = pod["topologySpreadConstraints"][0]
    assert spread["topologyKey"] == "kubernetes.io/hostname"
    assert spread["labelSelector"] == spec["selector"]
    (container,) = pod["containers"]
    context = container["securityContext"]
    assert context["allowPrivilegeEscalation"] is False
    assert context["readOnlyRootFilesystem"] is True
    assert context["capabilities"] == {"drop": ["ALL"]}
    assert not context.get("privileged")
    assert set(container["resources"]["requests"]) == {"cpu", "memory"}
    assert "memory" in container["resources"]["limits"]
    assert container["args"][:1] == ["serve"]
    env = {e["name"]: e["valueFrom"]["fieldRef"]["fieldPath"] for e in container["env"]}
    assert env == {"POD_NAME": "metadata.name", "POD_NAMESPACE": "metadata.namespace"}
    assert container["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "metrics"}
    assert container["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "metrics"}
    volumes = {v["name"]: v for v in pod["volumes"]}
    key = volumes["ca-key"]["secret"]
    assert key["secretName"] == "mesh-identity-ca-key" and key["optional"] is False


def test_the_pdb_keeps_one_replica_and_selects_the_deployments_pods() -> None:
    documents = base_documents()
    pdb = only(documents, "PodDisruptionBudget")
    assert pdb["spec"]["minAvailable"] == 1
    assert pdb["spec"]["selector"] == only(documents, "Deployment")["spec"]["selector"]


def test_the_service_is_a_clusterip_for_the_xds_and_signing_ports() -> None:
    documents = base_documents()
    service = only(documents, "Service", "mesh-identity")
    deployment = only(documents, "Deployment")
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert service["spec"]["type"] == "ClusterIP"
    assert service["spec"]["selector"] == deployment["spec"]["selector"]["matchLabels"]
    targets = {p["targetPort"]: p["port"] for p in service["spec"]["ports"]}
    assert targets == {"xds": ports["xds"], "signing": ports["signing"], "attest": ports["attest"]}


def test_the_injector_service_sends_port_443_to_the_webhook_the_config_names() -> None:
    documents = base_documents()
    service = only(documents, "Service", "mesh-identity-injector")
    deployment = only(documents, "Deployment")
    assert service["spec"]["selector"] == deployment["spec"]["selector"]["matchLabels"]
    assert [(p["port"], p["targetPort"]) for p in service["spec"]["ports"]] == [(443, "webhook")]
    config = shipped_config()
    assert config.inject is not None and config.inject.service is not None
    assert (config.inject.service.namespace, config.inject.service.name, config.inject.service.port) == (
        service["metadata"]["namespace"], service["metadata"]["name"], 443,
    )  # fmt: skip


def test_the_image_is_the_projects_version() -> None:
    version = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]
    (container,) = only(base_documents(), "Deployment")["spec"]["template"]["spec"]["containers"]
    assert container["image"] == f"ghcr.io/mesh-identity/mesh-identity:{version}"
