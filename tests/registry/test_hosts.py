"""Where instances run: the mesh file's instances[].host, what a host's agent may obtain, the agent identities."""

from __future__ import annotations

import pytest

from mesh_identity.errors import ConfigError
from mesh_identity.mesh.model import parse_mesh
from mesh_identity.registry.base import agent_host, agent_identity, validate_workloads
from mesh_identity.spiffe import SpiffeId, TrustDomain

TD = TrustDomain("example.org")


def _mesh(**hosts: str | None) -> dict[str, object]:
    services = {}
    for i, (name, host) in enumerate(hosts.items()):
        instance: dict[str, object] = {
            "node": f"{name}-1",
            "app": f"127.0.0.1:{20000 + i}",
            "inbound": f"127.0.0.1:{21000 + i}",
        }
        if host is not None:
            instance["host"] = host
        services[name] = {"instances": [instance]}
    return {"services": services}


def test_identities_on_host() -> None:
    mesh = parse_mesh(_mesh(web="host-a", api="host-b", db="host-a", batch=None), TD)
    assert mesh.identities_on_host("host-a") == {
        SpiffeId.for_kubernetes(TD, "default", "web"),
        SpiffeId.for_kubernetes(TD, "default", "db"),
    }
    assert mesh.identities_on_host("host-c") == frozenset()
    assert mesh.service("batch").instances[0].host is None


@pytest.mark.parametrize(
    ("host", "message"),
    [
        ("", "services.web.instances[0].host: '' is not a non-empty string"),
        (
            "host a",
            "services.web.instances[0].host: 'host a' is not a host name (letters, digits, '.', '_', '-'; 128 at most)",
        ),
        (
            "../etc",
            "services.web.instances[0].host: '../etc' is not a host name (letters, digits, '.', '_', '-'; 128 at most)",
        ),
    ],
)
def test_bad_host_names_the_key(host: str, message: str) -> None:
    with pytest.raises(ConfigError) as err:
        parse_mesh(_mesh(web=host), TD)
    assert str(err.value) == message


def test_agent_identity_round_trip() -> None:
    agent = agent_identity(TD, "host-a")
    assert str(agent) == "spiffe://example.org/mesh-identity/agent/host-a"
    assert agent_host(agent) == "host-a"
    assert agent_host(SpiffeId.for_kubernetes(TD, "shop", "web")) is None
    assert agent_host(SpiffeId.parse("spiffe://example.org/mesh-identity/agent/a/b")) is None
    assert agent_host(SpiffeId.parse("spiffe://example.org/mesh-identity/xds")) is None


def test_no_workload_under_the_reserved_prefix() -> None:
    doc = _mesh(web="host-a")
    doc["services"]["web"]["identity"] = "spiffe://example.org/mesh-identity/agent/host-a"  # type: ignore[index]
    with pytest.raises(ConfigError) as err:
        validate_workloads(parse_mesh(doc, TD), TD)
    assert str(err.value) == (
        "services.web.identity: spiffe://example.org/mesh-identity/agent/host-a is under /mesh-identity/, the control "
        "plane's own identities (its xDS server's and the node agents')"
    )
