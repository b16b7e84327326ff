"""The mesh file model: parsing, defaults, lookups, and errors that name the key path."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from mesh_identity.errors import ConfigError
from mesh_identity.mesh.model import Address, Protocol, load_mesh, parse_mesh
from mesh_identity.spiffe import SpiffeId, TrustDomain

TD = TrustDomain("example.org")

EXAMPLE = """
services:
  backend:
    identity: {namespace: shop, service_account: backend}
    instances:
      - {node: backend-1, app: "127.0.0.1:8081", inbound: "127.0.0.1:15081"}
  ledger:
    identity: spiffe://example.org/ledger
    protocol: tcp
    instances:
      - {node: ledger-1, app: "127.0.0.1:8082", inbound: "127.0.0.1:15082"}
  frontend:
    instances:
      - {node: frontend-1, app: "127.0.0.1:8080", inbound: "127.0.0.1:15080"}
    upstreams:
      - {service: backend, listen: "127.0.0.1:16081"}
      - {service: ledger, listen: "127.0.0.1:16082"}
"""


def test_load_a_mesh_file(tmp_path: Path) -> None:
    path = tmp_path / "mesh.yaml"
    path.write_text(EXAMPLE)
    mesh = load_mesh(path, TD)
    assert list(mesh.services) == ["backend", "ledger", "frontend"]
    assert mesh.service("backend").identity == SpiffeId.parse("spiffe://example.org/ns/shop/sa/backend")
    assert mesh.service("ledger").identity == SpiffeId.parse("spiffe://example.org/ledger")
    assert mesh.service("ledger").protocol is Protocol.TCP
    assert mesh.service("frontend").identity == SpiffeId.parse("spiffe://example.org/ns/default/sa/frontend")
    assert mesh.service("backend").endpoints == (Address("127.0.0.1", 15081),)
    assert mesh.node_identity("frontend-1") == mesh.service("frontend").identity
    assert mesh.node_identity("nobody") is None
    assert mesh.nodes() == ("backend-1", "ledger-1", "frontend-1")
    assert mesh.nodes_of(mesh.service("backend").identity) == ("backend-1",)
    assert [s.name for s in mesh.callers_of("ledger")] == ["frontend"]
    assert [u.listen for u in mesh.service("frontend").upstreams] == [
        Address("127.0.0.1", 16081),
        Address("127.0.0.1", 16082),
    ]


def test_an_empty_document_is_an_empty_mesh() -> None:
    assert dict(parse_mesh(None, TD).services) == {}


def _one(service: dict[str, Any], name: str = "web") -> dict[str, Any]:
    return {"services": {name: service}}


INSTANCE = {"node": "web-1", "app": "127.0.0.1:8080", "inbound": "127.0.0.1:15080"}


def _with(**instance: Any) -> dict[str, Any]:
    return _one({"instances": [{**INSTANCE, **instance}]})


TWO = {
    "services": {
        "a": {"instances": [{"node": "a-1", "app": "127.0.0.1:1001", "inbound": "127.0.0.1:2001"}]},
        "b": {"instances": [{"node": "b-1", "app": "127.0.0.1:1002", "inbound": "127.0.0.1:2002"}]},
    }
}


def _two(**changes: Any) -> dict[str, Any]:
    a = {**TWO["services"]["a"], **changes}
    return {"services": {"a": a, "b": TWO["services"]["b"]}}


@pytest.mark.parametrize(
    ("document", "message"),
    [
        ([], "mesh: [] is not a mapping"),
        ({"servces": {}}, "mesh.servces: unknown key (known: services, permissive, policies)"),
        ({"services": []}, "services: [] is not a mapping"),
        (
            _one({"instances": []}, name="Web"),
            "services.Web: service name 'Web' is not a DNS label (a-z, 0-9, '-'; 63 at most)",
        ),
        (_one({}), "services.web.instances: required"),
        (
            _one({"instances": [], "port": 80}),
            "services.web.port: unknown key (known: identity, protocol, instances, upstreams)",
        ),
        (_one({"instances": []}), "services.web.instances: a service needs at least one instance"),
        (_one({"instances": {}}), "services.web.instances: {} is not a list"),
        (_one({"instances": [INSTANCE], "protocol": "grpc"}), "services.web.protocol: 'grpc' is not one of http, tcp"),
        (
            _with(node="web 1"),
            "services.web.instances[0].node: 'web 1' is not a node id (letters, digits, '.', '_', '-'; 128 at most)",
        ),
        (_with(app="8080"), "services.web.instances[0].app: '8080' is not HOST:PORT (e.g. 127.0.0.1:8080)"),
        (_with(app="127.0.0.1:0"), "services.web.instances[0].app: port 0 is out of range (1-65535)"),
        (_with(app="127.0.0.1:65536"), "services.web.instances[0].app: port 65536 is out of range (1-65535)"),
        (
            _with(inbound="localhost:15080"),
            "services.web.instances[0].inbound: host 'localhost' is not an IP address (sidecars bind and connect by IP)",
        ),
        (
            _with(inbound="127.0.0.1:8080"),
            "services.web.instances[0].inbound: 127.0.0.1:8080 is already used by services.web.instances[0].app",
        ),
        (
            {"services": {"web": {"instances": [{"node": "web-1", "app": "127.0.0.1:1"}]}}},
            "services.web.instances[0].inbound: required",
        ),
        (
            _one({"instances": [INSTANCE], "identity": "spiffe://other.org/ns/x/sa/y"}),
            "services.web.identity: spiffe://other.org/ns/x/sa/y is not in trust domain example.org",
        ),
        (
            _one({"instances": [INSTANCE], "identity": "spiffe://example.org/a/../b"}),
            "services.web.identity: Invalid SPIFFE ID 'spiffe://example.org/a/../b': path segment '..' is not allowed",
        ),
        (
            _one({"instances": [INSTANCE], "identity": "spiffe://example.org"}),
            "services.web.identity: spiffe://example.org has no path: a workload identity needs one",
        ),
        (
            _one({"instances": [INSTANCE], "identity": {"namespace": "shop"}}),
            "services.web.identity.service_account: required",
        ),
        (
            _one({"instances": [INSTANCE], "identity": {"namespace": "shop", "service_account": "a/b"}}),
            "services.web.identity: Invalid SPIFFE ID for 'shop'/'a/b': service account character '/' is not allowed",
        ),
        (
            _two(upstreams=[{"service": "c", "listen": "127.0.0.1:3001"}]),
            "services.a.upstreams[0].service: 'c' is not a service of this mesh",
        ),
        (
            _two(upstreams=[{"service": "a", "listen": "127.0.0.1:3001"}]),
            "services.a.upstreams[0].service: a service does not call itself through the mesh",
        ),
        (
            _two(
                upstreams=[{"service": "b", "listen": "127.0.0.1:3001"}, {"service": "b", "listen": "127.0.0.1:3002"}]
            ),
            "services.a.upstreams[1].service: 'b' is listed twice",
        ),
        (
            _two(upstreams=[{"service": "b", "listen": "127.0.0.1:2002"}]),
            "services.a.upstreams[0].listen: 127.0.0.1:2002 is already used by services.b.instances[0].inbound",
        ),
        (
            _two(upstreams=[{"service": "b"}]),
            "services.a.upstreams[0]: give exactly one of listen (HOST:PORT) and port (on each sidecar's own IP)",
        ),
        (
            _two(upstreams=[{"service": "b", "listen": "127.0.0.1:3001", "port": 3001}]),
            "services.a.upstreams[0]: give exactly one of listen (HOST:PORT) and port (on each sidecar's own IP)",
        ),
        (_two(upstreams=[{"service": "b", "port": 0}]), "services.a.upstreams[0].port: 0 is not a port (1-65535)"),
        (
            _two(upstreams=[{"service": "b", "port": "80"}]),
            "services.a.upstreams[0].port: '80' is not a port (1-65535)",
        ),
        (
            _two(upstreams=[{"service": "b", "port": True}]),
            "services.a.upstreams[0].port: True is not a port (1-65535)",
        ),
        (
            _two(upstreams=[{"service": "b", "port": 1001}]),
            "services.a.upstreams[0].port: 127.0.0.1:1001 (on the sidecar of services.a.instances[0]) is already used "
            "by services.a.instances[0].app",
        ),
        (
            _two(
                instances=[
                    {"node": "a-1", "app": "127.0.0.1:1001", "inbound": "127.0.0.1:2001"},
                    {"node": "a-2", "app": "127.0.0.1:1003", "inbound": "127.0.0.1:2003"},
                ],
                upstreams=[{"service": "b", "port": 3001}],
            ),
            "services.a.upstreams[0].port: 127.0.0.1:3001 (on the sidecar of services.a.instances[1]) is already used "
            "by services.a.upstreams[0].port (on the sidecar of services.a.instances[0])",
        ),
        (
            _two(
                instances=[
                    {"node": "a-1", "app": "127.0.0.1:1001", "inbound": "127.0.0.1:2001"},
                    {"node": "a-2", "app": "127.0.0.1:1003", "inbound": "127.0.0.1:2003"},
                ],
                upstreams=[{"service": "b", "listen": "127.0.0.1:3001"}],
            ),
            "services.a.upstreams[0].listen: a has several instances; they cannot share one upstream listener "
            "address (give a port instead: each sidecar listens on its own IP)",
        ),
        (
            {
                "services": {
                    "a": TWO["services"]["a"],
                    "b": {"instances": [{"node": "a-1", "app": "127.0.0.1:1002", "inbound": "127.0.0.1:2002"}]},
                }
            },
            "services.b.instances[0].node: 'a-1' is already the node of services.a.instances[0]",
        ),
    ],
)
def test_errors_name_the_key_path(document: Any, message: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse_mesh(document, TD)
    assert str(info.value) == message


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (b"services: [\n", "is not valid YAML"),
    ],
)
def test_file_errors_name_the_file(tmp_path: Path, content: bytes, message: str) -> None:
    path = tmp_path / "mesh.yaml"
    path.write_bytes(content)
    with pytest.raises(ConfigError, match=f"^mesh_file: {path} {message}"):
        load_mesh(path, TD)
    with pytest.raises(ConfigError) as info:
        load_mesh(tmp_path / "missing.yaml", TD)
    assert str(info.value) == f"mesh_file: cannot read {tmp_path / 'missing.yaml'}: No such file or directory"


def test_upstream_by_port_listens_on_each_sidecars_own_ip() -> None:
    document = _two(
        instances=[
            {"node": "a-1", "app": "127.0.0.11:1001", "inbound": "127.0.0.11:2001"},
            {"node": "a-2", "inbound": "127.0.0.12:2001"},
        ],
        upstreams=[{"service": "b", "port": 3001}],
    )
    mesh = parse_mesh(document, TD)
    a = mesh.service("a")
    upstream = a.upstreams[0]
    assert (upstream.listen, upstream.port) == (None, 3001)
    assert [str(upstream.address_for(i)) for i in a.instances] == ["127.0.0.11:3001", "127.0.0.12:3001"]
    assert a.instances[1].app is None
    assert a.endpoints == (Address("127.0.0.11", 2001),)  # a client-only sidecar serves nothing
