"""The real ``kubectl`` against the test API server: the shipped CRDs and example SMI objects applied, read back,
applied again unchanged, a bad object refused; and the registry taking what kubectl wrote. (Deselected, with the
reason in pytest's header, where kubectl is not installed.)

``--validate=false``: kubectl's own validation downloads the server's OpenAPI documents, which the test server
does not serve; the test server validates every object itself (the official schemas, the CRDs' schemas,
unknown fields refused), as the real server's strict field validation does.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from tests.fakes.kube.kubectl import kubectl_for
from tests.registry.kube.conftest import CRDS, EXAMPLES, Cluster, Start


@pytest.fixture
def install_shipped_crds() -> bool:
    return False  # kubectl installs them


@pytest.fixture
def kubectl(cluster: Cluster, tmp_path: Path) -> Any:
    """``kubectl(*args)`` against the test server (which serves CustomResourceDefinitions, and no CRD yet)."""
    return kubectl_for(cluster.server, tmp_path)


def test_kubectl_applies_the_crds_and_examples_and_gets_them_back(kubectl: Any) -> None:
    created = kubectl("apply", "--validate=false", "-f", str(CRDS)).stdout
    assert "customresourcedefinition.apiextensions.k8s.io/trafficsplits.split.smi-spec.io created" in created
    applied = kubectl("apply", "--validate=false", "-f", str(EXAMPLES)).stdout
    assert "trafficsplit.split.smi-spec.io/backend-canary created" in applied
    assert "traffictarget.access.smi-spec.io/frontend-reads-backend created" in applied

    splits = json.loads(kubectl("get", "trafficsplits", "-n", "shop", "-o", "json").stdout)["items"]
    assert [(s["metadata"]["name"], s["spec"]["service"]) for s in splits] == [("backend-canary", "backend")]
    names = kubectl("get", "tt", "-n", "shop", "-o", "name").stdout.split()
    assert names == [
        "traffictarget.access.smi-spec.io/backend-uses-db",
        "traffictarget.access.smi-spec.io/frontend-reads-backend",
        "traffictarget.access.smi-spec.io/ops-administers-backend",
    ]
    again = kubectl("apply", "--validate=false", "-f", str(EXAMPLES)).stdout
    assert "trafficsplit.split.smi-spec.io/backend-canary unchanged" in again


def test_kubectl_gets_a_bad_object_refused(kubectl: Any, tmp_path: Path) -> None:
    kubectl("apply", "--validate=false", "-f", str(CRDS))
    kubectl("apply", "--validate=false", "-f", str(EXAMPLES / "namespace.yaml"))
    bad = tmp_path / "bad.json"
    bad.write_text(
        json.dumps(
            {
                "apiVersion": "split.smi-spec.io/v1alpha4",
                "kind": "TrafficSplit",
                "metadata": {"name": "bad", "namespace": "shop"},
                "spec": {"service": "backend", "backends": [{"service": "backend-v1", "weight": 101}]},
            }
        )
    )
    done = kubectl("apply", "--validate=false", "-f", str(bad), check=False)
    assert done.returncode == 1
    assert 'The TrafficSplit "bad" is invalid' in done.stderr
    assert "spec.backends[0].weight: Invalid value: 101 is greater than the maximum of 100" in done.stderr


def test_the_registry_takes_what_kubectl_wrote(kubectl: Any, cluster: Cluster, start_registry: Start) -> None:
    kubectl("apply", "--validate=false", "-f", str(CRDS))
    kubectl("apply", "--validate=false", "-f", str(EXAMPLES))
    for account in ("backend", "db"):
        cluster.service_account("shop", account)
    cluster.pod("shop", "backend-v1-0", "backend", {"app": "backend", "version": "v1"})
    cluster.pod("shop", "backend-v2-0", "backend", {"app": "backend", "version": "v2"})
    cluster.pod("shop", "db-0", "db", {"app": "db"}, port=5432)
    cluster.service("shop", "backend", {"app": "backend"})
    cluster.service("shop", "backend-v1", {"app": "backend", "version": "v1"})
    cluster.service("shop", "backend-v2", {"app": "backend", "version": "v2"})
    cluster.service("shop", "db", {"app": "db"}, port=5432, target=5432, port_name="tcp-postgres")
    registry = start_registry()
    policy = registry.current().mesh.policy
    assert len(policy.targets) == 3 and policy.split_of("backend.shop") is not None
    assert not registry.refusals
