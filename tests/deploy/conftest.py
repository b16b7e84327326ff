"""The deployment artefacts (``deploy/``, ``Containerfile``): where they are, how they are read, the Kubernetes API
test server that serves every kind ``deploy/`` holds, the real ``kubectl`` against it, and the real-cluster tier.

Tests of ``test_deploy_kubectl.py`` need the real ``kubectl``: where it is not on the PATH they are deselected,
with the reason in pytest's header (as ``tests/registry/kube``'s). ``test_real_cluster.py`` (marked
``integration``) talks to the cluster ``KUBECONFIG`` names: without the variable (or without kubectl) it is
deselected, the reason in the header too.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.fakes.kube import CONFIG_MAP, LEASE, NAMESPACE, SECRET, KubeServer
from tests.fakes.kube.customresources import install_crds
from tests.fakes.kube.deploykinds import deploy_kinds, schema_checked
from tests.fakes.kube.kubectl import KUBECTL, Kubectl, kubectl_for
from tests.fakes.kube.workloads import workload_kinds

HERE = Path(__file__).parent
ROOT = HERE.parents[1]
DEPLOY = ROOT / "deploy"
CRDS = DEPLOY / "crds"
EXAMPLES = DEPLOY / "examples"
CONTAINERFILE = ROOT / "Containerfile"
NAMESPACE_NAME = "mesh-identity-system"
ACCOUNT = "mesh-identity"
USER = f"system:serviceaccount:{NAMESPACE_NAME}:{ACCOUNT}"  # how the API server names the control plane
ADMIN = "kubernetes-admin"
ADMIN_TOKEN = "deploy-test-admin-token"
CONTROL_PLANE_TOKEN = "deploy-test-control-plane-token"

Document = dict[str, Any]


def read_documents(path: Path) -> list[Document]:
    """The YAML documents of ``path`` (empty ones left out)."""
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


def manifest_files() -> list[Path]:
    """Every Kubernetes manifest under ``deploy/``: the YAML files that are not kustomizations."""
    return sorted(p for p in DEPLOY.rglob("*.yaml") if p.name != "kustomization.yaml")


def base_files() -> list[Path]:
    """The files ``deploy/kustomization.yaml`` lists, in its order."""
    kustomization = read_documents(DEPLOY / "kustomization.yaml")[0]
    return [DEPLOY / name for name in kustomization["resources"]]


def base_documents() -> list[Document]:
    """The base's objects, as ``kubectl kustomize deploy/`` renders them (the base has no transformers)."""
    return [d for path in base_files() for d in read_documents(path)]


def only(documents: list[Document], kind: str, name: str | None = None) -> Document:
    """The one document of ``kind`` (named ``name``) in ``documents``."""
    found = [d for d in documents if d["kind"] == kind and (name is None or d["metadata"]["name"] == name)]
    assert len(found) == 1, f"{len(found)} {kind} documents named {name}"
    return found[0]


# -- the Kubernetes API test server, serving every kind of deploy/ (and the workloads and CRDs)


@pytest.fixture
def api_server() -> Iterator[KubeServer]:
    """The test API server with the kinds of ``deploy/`` registered (Namespace and ConfigMap checked against the
    official schemas too), CustomResourceDefinitions served and no CRD installed; two users: an admin (who
    applies) and the control plane's service account."""
    kinds = (
        SECRET,
        LEASE,
        schema_checked(CONFIG_MAP),
        schema_checked(NAMESPACE),
        *workload_kinds(),
        *deploy_kinds(),
    )
    server = KubeServer(kinds=kinds, tokens={ADMIN_TOKEN: ADMIN, CONTROL_PLANE_TOKEN: USER})
    install_crds(server, [])
    with server:
        yield server


# -- the real kubectl

KUBECTL_TESTS = ("test_deploy_kubectl.py", "test_real_cluster.py")
REAL_CLUSTER = os.environ.get("KUBECONFIG", "")
REAL_CLUSTER_TESTS = "test_real_cluster.py"


@pytest.fixture
def kubectl(api_server: KubeServer, tmp_path: Path) -> Kubectl:
    """The real kubectl against :func:`api_server`, as its admin."""
    return kubectl_for(api_server, tmp_path, token=ADMIN_TOKEN)


def pytest_report_header(config: pytest.Config) -> list[str]:
    lines = []
    if KUBECTL is None:
        lines.append(f"kubectl: not on the PATH; tests/deploy/{', tests/deploy/'.join(KUBECTL_TESTS)} deselected")
    if not REAL_CLUSTER:
        lines.append(f"KUBECONFIG: not set; the real-cluster tier tests/deploy/{REAL_CLUSTER_TESTS} is deselected")
    return lines


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    def deselected(item: pytest.Item) -> bool:
        path = Path(str(item.path))
        if path.parent != HERE:
            return False
        if KUBECTL is None and path.name in KUBECTL_TESTS:
            return True
        return not REAL_CLUSTER and item.get_closest_marker("integration") is not None

    mine = [i for i in items if deselected(i)]
    if mine:
        config.hook.pytest_deselected(items=mine)
        items[:] = [i for i in items if i not in mine]
