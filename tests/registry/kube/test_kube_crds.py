"""The shipped CRDs (``deploy/crds``) and example objects (``deploy/examples``): valid against the official
schemas, structural, and the examples valid against the CRDs and taken by the registry without a refusal."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

from mesh_identity.spiffe import SpiffeId
from tests.fakes.kube.customresources import read_crds, schema_validator
from tests.fakes.kube.workloads import SCHEMA_VERSIONS
from tests.registry.kube.conftest import CRDS, EXAMPLES, TD, Cluster, Start

KINDS = {"TrafficTarget", "HTTPRouteGroup", "TCPRoute", "TrafficSplit"}


def examples() -> list[dict[str, Any]]:
    documents: list[dict[str, Any]] = []
    for path in sorted(EXAMPLES.glob("*.yaml")):
        documents.extend(d for d in yaml.safe_load_all(path.read_text()) if d)
    return documents


def crd_for(kind: str) -> dict[str, Any]:
    return next(c for c in read_crds([CRDS]) if c["spec"]["names"]["kind"] == kind)


@pytest.mark.parametrize("version", SCHEMA_VERSIONS)
@pytest.mark.parametrize("path", sorted(CRDS.glob("*.yaml")), ids=lambda p: Path(p).name)
def test_each_crd_is_a_valid_customresourcedefinition(path: Path, version: str) -> None:
    (crd,) = read_crds([path])
    kubernetes_validate.validate(crd, version, strict=True)
    assert crd["metadata"]["name"] == f"{crd['spec']['names']['plural']}.{crd['spec']['group']}"


def test_the_crds_are_the_four_smi_kinds_at_the_versions_the_registry_reads() -> None:
    served = {
        (c["spec"]["names"]["kind"], c["spec"]["group"], v["name"])
        for c in read_crds([CRDS])
        for v in c["spec"]["versions"]
    }
    assert served == {
        ("TrafficTarget", "access.smi-spec.io", "v1alpha3"),
        ("HTTPRouteGroup", "specs.smi-spec.io", "v1alpha4"),
        ("TCPRoute", "specs.smi-spec.io", "v1alpha4"),
        ("TrafficSplit", "split.smi-spec.io", "v1alpha4"),
    }


def untyped(schema: Any, path: str = "") -> list[str]:
    """The nodes of a schema without a ``type`` (a structural schema has one everywhere)."""
    if not isinstance(schema, dict):
        return []
    found = [] if "type" in schema or "x-kubernetes-preserve-unknown-fields" in schema else [path or "<root>"]
    for name, sub in (schema.get("properties") or {}).items():
        found += untyped(sub, f"{path}.{name}")
    if isinstance(schema.get("items"), dict):
        found += untyped(schema["items"], f"{path}[]")
    if isinstance(schema.get("additionalProperties"), dict):
        found += untyped(schema["additionalProperties"], f"{path}{{}}")
    return found


@pytest.mark.parametrize("kind", sorted(KINDS))
def test_each_crd_schema_is_structural(kind: str) -> None:
    for version in crd_for(kind)["spec"]["versions"]:
        assert untyped(version["schema"]["openAPIV3Schema"]) == []


def test_the_examples_are_valid_against_the_official_schemas_and_the_crds() -> None:
    documents = examples()
    assert {d["kind"] for d in documents} == KINDS | {"Namespace"}
    for document in documents:
        if document["kind"] in KINDS:
            (version,) = crd_for(document["kind"])["spec"]["versions"]
            assert document["apiVersion"].endswith("/" + version["name"])
            errors = [e.message for e in schema_validator(version["schema"]["openAPIV3Schema"]).iter_errors(document)]
            assert errors == [], document["metadata"]["name"]
        else:
            for schema_version in SCHEMA_VERSIONS:
                kubernetes_validate.validate(document, schema_version, strict=True)


def test_the_registry_takes_the_examples_without_a_refusal(cluster: Cluster, start_registry: Start) -> None:
    for document in examples():
        if document["kind"] == "Namespace":
            cluster.core.create_namespace(document)
        else:
            cluster.smi(document)
    for account in ("frontend", "backend", "ops", "db"):
        cluster.service_account("shop", account)
    cluster.pod("shop", "frontend-0", "frontend", {"app": "frontend"})
    cluster.pod("shop", "backend-v1-0", "backend", {"app": "backend", "version": "v1"})
    cluster.pod("shop", "backend-v2-0", "backend", {"app": "backend", "version": "v2"})
    cluster.pod("shop", "db-0", "db", {"app": "db"}, port=5432)
    cluster.service("shop", "frontend", {"app": "frontend"})
    cluster.service("shop", "backend", {"app": "backend"})
    cluster.service("shop", "backend-v1", {"app": "backend", "version": "v1"})
    cluster.service("shop", "backend-v2", {"app": "backend", "version": "v2"})
    cluster.service("shop", "db", {"app": "db"}, port=5432, target=5432, port_name="tcp-postgres")

    registry = start_registry()
    assert not registry.refusals and not cluster.events()
    policy = registry.current().mesh.policy
    backend = SpiffeId.for_kubernetes(TD, "shop", "backend")
    assert sorted(t.name for t in policy.access_to(backend) or ()) == [
        "frontend-reads-backend",
        "ops-administers-backend",
    ]
    assert [t.name for t in policy.access_to(SpiffeId.for_kubernetes(TD, "shop", "db")) or ()] == ["backend-uses-db"]
    split = policy.split_of("backend.shop")
    assert split is not None and [(b.service, b.weight) for b in split.backends] == [
        ("backend-v1.shop", 90),
        ("backend-v2.shop", 10),
    ]
