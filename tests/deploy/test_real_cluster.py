"""The real-cluster tier (``-m integration``): the shipped CRDs and the example SMI objects applied with kubectl
to the cluster ``KUBECONFIG`` names, in a temporary namespace, got back, then deleted. Deselected (the reason in
pytest's header) without ``KUBECONFIG`` or without kubectl.

    KUBECONFIG=~/.kube/config tests/run.sh -m integration tests/deploy

The user needs: create/get/delete of CustomResourceDefinitions (or the CRDs installed already: ``kubectl apply``
leaves them as they are), of namespaces, and of the four SMI kinds. The CRDs stay installed (other workloads
may use them); the namespace and everything in it are deleted.
"""

from __future__ import annotations

import json
import os
import secrets
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.deploy.conftest import CRDS, EXAMPLES, read_documents
from tests.fakes.kube.kubectl import Kubectl, kubectl_runner

pytestmark = pytest.mark.integration

SMI_KINDS = ("TrafficTarget", "HTTPRouteGroup", "TCPRoute", "TrafficSplit")


@pytest.fixture
def cluster_kubectl(tmp_path: Path) -> Kubectl:
    environ = {"PATH": os.environ.get("PATH", ""), "KUBECONFIG": os.environ["KUBECONFIG"]}
    environ["HOME"] = os.environ.get("HOME", str(tmp_path))
    return kubectl_runner(environ)


@pytest.fixture
def namespace(cluster_kubectl: Kubectl) -> Iterator[str]:
    name = f"mesh-identity-test-{secrets.token_hex(4)}"
    cluster_kubectl("create", "namespace", name)
    try:
        yield name
    finally:
        cluster_kubectl("delete", "namespace", name, "--wait=true", "--timeout=120s", check=False)


def smi_examples(namespace: str) -> list[dict[str, Any]]:
    """The example SMI objects, moved into ``namespace`` (their references to namespace ``shop`` too)."""
    documents = [d for p in sorted(EXAMPLES.glob("*.yaml")) for d in read_documents(p) if d["kind"] in SMI_KINDS]
    text = yaml.safe_dump_all(documents).replace("namespace: shop", f"namespace: {namespace}")
    return [d for d in yaml.safe_load_all(text) if d]


def test_the_crds_and_example_smi_objects_apply_and_come_back(
    cluster_kubectl: Kubectl, namespace: str, tmp_path: Path
) -> None:
    cluster_kubectl("apply", "-f", str(CRDS))
    for crd in read_documents_of(CRDS):
        cluster_kubectl("wait", "--for=condition=Established", "--timeout=60s", f"crd/{crd}")
    objects = smi_examples(namespace)
    manifest = tmp_path / "smi.yaml"
    manifest.write_text(yaml.safe_dump_all(objects))
    cluster_kubectl("apply", "-f", str(manifest))
    try:
        got = json.loads(cluster_kubectl("get", "-f", str(manifest), "-o", "json").stdout)["items"]
        assert sorted(map(_key, got)) == sorted(map(_key, objects))
        for obj, back in zip(sorted(objects, key=_key), sorted(got, key=_key), strict=True):
            assert back["spec"] == obj["spec"], _key(back)
    finally:
        cluster_kubectl("delete", "-f", str(manifest), "--wait=true", check=False)


def _key(document: dict[str, Any]) -> tuple[str, str]:
    return str(document["kind"]), str(document["metadata"]["name"])


def read_documents_of(directory: Path) -> list[str]:
    """The names of the CRDs in ``directory``."""
    return [d["metadata"]["name"] for p in sorted(directory.glob("*.yaml")) for d in read_documents(p)]
