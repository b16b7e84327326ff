"""Policy changes through ``MeshPublisher.update_mesh`` (no Envoy): checked first, pushed only where they matter."""

from __future__ import annotations

from typing import Any

import pytest
import yaml

from mesh_identity.errors import ConfigError
from mesh_identity.mesh.model import Mesh, parse_mesh
from mesh_identity.mesh.policy import Backend, Policy, TrafficSplit
from tests.pki import TestCa
from tests.policy.test_policy_model import MESH
from xds_sds.mesh.publisher import MeshPublisher
from xds_sds.protocol.typeurls import CLUSTER, ENDPOINT, LISTENER, ROUTE, SECRET

CA = TestCa.for_trust_domain("example.org")
TYPES = (CLUSTER, ENDPOINT, LISTENER, ROUTE, SECRET)


def document() -> dict[str, Any]:
    data: dict[str, Any] = yaml.safe_load(MESH)
    return data


def mesh_of(data: dict[str, Any]) -> Mesh:
    return parse_mesh(data, CA.trust_domain)


def versions(xds: MeshPublisher) -> dict[str, dict[str, str]]:
    return {node: {t: xds.cache.get(node, t).version for t in TYPES} for node in xds.cache.nodes()}


def changed_types(before: dict[str, dict[str, str]], after: dict[str, dict[str, str]]) -> dict[str, set[str]]:
    return {
        node: {t.rsplit(".", 1)[1] for t in TYPES if before[node][t] != after[node][t]}
        for node in before
        if before[node] != after[node]
    }


@pytest.fixture
def xds() -> MeshPublisher:
    return MeshPublisher(mesh_of(document()), CA.server_svid())


def test_a_bad_policy_changes_nothing_on_any_sidecar(xds: MeshPublisher) -> None:
    good, before = xds.mesh, versions(xds)
    bad = Mesh(
        good.trust_domain,
        good.services,
        Policy(splits=(TrafficSplit("s", "shop", "backend", (Backend("backend-v1", 50),)),)),
    )
    with pytest.raises(ConfigError) as info:
        xds.update_mesh(bad)
    assert str(info.value) == "TrafficSplit shop/s.spec.backends: the weights add up to 50, not 100"
    assert versions(xds) == before
    assert xds.mesh is good


def test_a_new_source_reaches_only_the_destinations_sidecars(xds: MeshPublisher) -> None:
    before = versions(xds)
    data = document()
    data["policies"][2]["spec"]["sources"].append({"kind": "ServiceAccount", "name": "ledger"})
    assert xds.update_mesh(mesh_of(data)) == ("backend-v1-1", "backend-v2-1")  # both serve the backend identity
    assert changed_types(before, versions(xds)) == {
        "backend-v1-1": {"RouteConfiguration"},
        "backend-v2-1": {"RouteConfiguration"},
    }


def test_a_tcp_policy_change_replaces_the_listener(xds: MeshPublisher) -> None:
    before = versions(xds)
    data = document()
    data["policies"][3]["spec"]["sources"] = [{"kind": "ServiceAccount", "name": "backend"}]
    assert xds.update_mesh(mesh_of(data)) == ("ledger-1",)
    assert changed_types(before, versions(xds)) == {"ledger-1": {"Listener"}}


def test_a_weight_change_reaches_only_the_callers_route(xds: MeshPublisher) -> None:
    before = versions(xds)
    data = document()
    data["policies"][4]["spec"]["backends"] = [
        {"service": "backend-v1", "weight": 50},
        {"service": "backend-v2", "weight": 50},
    ]
    assert xds.update_mesh(mesh_of(data)) == ("frontend-1",)
    assert changed_types(before, versions(xds)) == {"frontend-1": {"RouteConfiguration"}}
    assert xds.update_mesh(mesh_of(data)) == ()  # the same again: nothing to do


def test_incremental_updates_end_where_a_fresh_server_starts(xds: MeshPublisher) -> None:
    """Skipping sidecars whose view did not change loses nothing: after a series of changes every sidecar
    holds exactly what a server started on the last mesh holds."""
    steps = []
    data = document()
    data["policies"][4]["spec"]["backends"][0]["weight"] = 0
    data["policies"][4]["spec"]["backends"][1]["weight"] = 100
    steps.append(data)
    data = document() | {"permissive": True}
    steps.append(data)
    data = document()
    del data["policies"][2:4]
    data["services"]["ledger"]["instances"][0]["inbound"] = "127.0.0.1:15999"
    steps.append(data)
    data = document()
    data["services"]["frontend"]["upstreams"].pop()
    data["policies"][0]["spec"]["matches"][0]["pathRegex"] = "/things/.*"
    steps.append(data)
    for data in steps:
        xds.update_mesh(mesh_of(data))
        fresh = MeshPublisher(mesh_of(data), CA.server_svid())
        for node in fresh.cache.nodes():
            for type_url in (CLUSTER, ENDPOINT, LISTENER, ROUTE):
                assert xds.cache.get(node, type_url) == fresh.cache.get(node, type_url), (node, type_url)
        assert xds.cache.nodes() == fresh.cache.nodes()
