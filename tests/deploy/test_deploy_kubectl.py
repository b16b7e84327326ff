"""The real ``kubectl`` and ``deploy/``: ``kubectl kustomize deploy/`` renders the base (exactly its files'
objects), ``kubectl apply -f`` of the rendering against the test API server creates every object (each checked
by the server against the official schemas), ``kubectl get`` gives each back as applied, a second apply (``-k``)
changes nothing, and the example mesh applies on top. (Deselected, with the reason in pytest's header, where
kubectl is not installed.)

``--validate=false``: kubectl's own validation downloads the server's OpenAPI documents, which the test server
does not serve; the test server validates every object itself (see tests/registry/kube/test_kube_kubectl.py).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import yaml

from tests.deploy.conftest import DEPLOY, EXAMPLES, NAMESPACE_NAME, Kubectl, base_documents
from tests.fakes.kube import KubeServer

PLURALS = {
    "Namespace": "namespace",
    "CustomResourceDefinition": "customresourcedefinition.apiextensions.k8s.io",
    "ServiceAccount": "serviceaccount",
    "ClusterRole": "clusterrole.rbac.authorization.k8s.io",
    "ClusterRoleBinding": "clusterrolebinding.rbac.authorization.k8s.io",
    "Role": "role.rbac.authorization.k8s.io",
    "RoleBinding": "rolebinding.rbac.authorization.k8s.io",
    "ConfigMap": "configmap",
    "Deployment": "deployment.apps",
    "PodDisruptionBudget": "poddisruptionbudget.policy",
    "Service": "service",
}


def key(document: dict[str, Any]) -> tuple[str, str, str]:
    metadata = document["metadata"]
    return document["kind"], metadata.get("namespace", ""), metadata["name"]


def contains(whole: Any, part: Any, where: str = "") -> list[str]:
    """Where ``part`` is not within ``whole`` (the server adds defaults and metadata; it must keep the rest)."""
    if isinstance(part, dict):
        if not isinstance(whole, dict):
            return [where or "<root>"]
        return [m for k, v in part.items() for m in contains(whole.get(k), v, f"{where}.{k}")]
    if isinstance(part, list):
        if not isinstance(whole, list) or len(whole) != len(part):
            return [where]
        return [m for i, (w, p) in enumerate(zip(whole, part, strict=True)) for m in contains(w, p, f"{where}[{i}]")]
    return [] if whole == part else [f"{where}: {whole!r} != {part!r}"]


def render(kubectl: Kubectl, tmp_path: Path) -> Path:
    rendered = tmp_path / "rendered.yaml"
    rendered.write_text(kubectl("kustomize", str(DEPLOY)).stdout)
    return rendered


def test_kustomize_renders_exactly_the_bases_files(kubectl: Kubectl, tmp_path: Path) -> None:
    rendered = [d for d in yaml.safe_load_all(render(kubectl, tmp_path).read_text()) if d]
    assert sorted(map(key, rendered)) == sorted(map(key, base_documents()))
    assert {key(d): d for d in rendered} == {key(d): d for d in base_documents()}


def test_kubectl_applies_the_base_and_gets_every_object_back(
    kubectl: Kubectl, api_server: KubeServer, tmp_path: Path
) -> None:
    rendered = render(kubectl, tmp_path)
    created = kubectl("apply", "--validate=false", "-f", str(rendered)).stdout.splitlines()
    expected = sorted(f"{PLURALS[d['kind']]}/{d['metadata']['name']} created" for d in base_documents())
    assert sorted(created) == expected

    got = json.loads(kubectl("get", "-f", str(rendered), "-o", "json").stdout)
    back = {key(d): d for d in got["items"]}
    assert sorted(back) == sorted(map(key, base_documents()))
    for document in base_documents():
        assert contains(back[key(document)], document) == [], key(document)

    deployment = json.loads(kubectl("get", "deployment", "mesh-identity", "-n", NAMESPACE_NAME, "-o", "json").stdout)
    assert deployment["spec"]["replicas"] == 2
    names = kubectl("get", "crd", "-o", "name").stdout.split()
    assert "customresourcedefinition.apiextensions.k8s.io/trafficsplits.split.smi-spec.io" in names


def test_applying_the_base_again_changes_nothing(kubectl: Kubectl) -> None:
    kubectl("apply", "--validate=false", "-k", str(DEPLOY))
    before = json.loads(kubectl("get", "-k", str(DEPLOY), "-o", "json").stdout)["items"]
    again = kubectl("apply", "--validate=false", "-k", str(DEPLOY)).stdout.splitlines()
    # A PodDisruptionBudget's selector has the patch strategy "replace", so kubectl's patch of it is never empty
    # and it says "configured" on every apply, on a real cluster too; the object stays as it was.
    pdb = "poddisruptionbudget.policy/mesh-identity configured"
    assert pdb in again
    assert [line for line in again if line != pdb and not line.endswith(" unchanged")] == []
    after = json.loads(kubectl("get", "-k", str(DEPLOY), "-o", "json").stdout)["items"]
    assert [(d["kind"], d.get("spec"), d.get("rules"), d.get("data")) for d in after] == [
        (d["kind"], d.get("spec"), d.get("rules"), d.get("data")) for d in before
    ]


def test_the_example_mesh_applies_on_the_base(kubectl: Kubectl) -> None:
    kubectl("apply", "--validate=false", "-k", str(DEPLOY))
    applied = kubectl("apply", "--validate=false", "-f", str(EXAMPLES)).stdout
    assert "namespace/shop created" in applied
    assert "trafficsplit.split.smi-spec.io/backend-canary created" in applied
    splits = json.loads(kubectl("get", "trafficsplits", "-n", "shop", "-o", "json").stdout)["items"]
    assert [s["metadata"]["name"] for s in splits] == ["backend-canary"]


def test_a_deployment_whose_selector_misses_its_pods_is_refused(kubectl: Kubectl, tmp_path: Path) -> None:
    (deployment,) = [d for d in base_documents() if d["kind"] == "Deployment"]
    deployment["metadata"]["namespace"] = "default"
    deployment["spec"]["selector"] = {"matchLabels": {"app.kubernetes.io/name": "another"}}
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps(deployment))
    done = kubectl("apply", "--validate=false", "-f", str(bad), check=False)
    assert done.returncode == 1
    assert "`selector` does not match template `labels`" in done.stderr
