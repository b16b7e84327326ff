"""The demo's mesh: the shipped file on free ports, ``--keep-ports``, the routes, and a config the TTL check accepts."""

from __future__ import annotations

import socket
from datetime import timedelta
from pathlib import Path

import pytest
import yaml

from mesh_identity.clock import utcnow
from mesh_identity.config import parse_config
from mesh_identity.demo.mesh import Route, check_ports_free, demo_config, routes, with_free_ports
from mesh_identity.errors import ConfigError
from mesh_identity.mesh.model import parse_mesh
from mesh_identity.spiffe import TrustDomain
from mesh_identity.ttlcheck import TtlChain, check_ttl_chain

DEMO_MESH = Path(__file__).resolve().parents[2] / "examples" / "demo-mesh.yaml"
TD = TrustDomain("demo.mesh")


def test_the_shipped_demo_mesh_on_free_ports() -> None:
    document = yaml.safe_load(DEMO_MESH.read_text())
    freed = with_free_ports(document)
    mesh = parse_mesh(freed, TD)
    old = {str(a) for s in parse_mesh(document, TD).services.values() for i in s.instances for a in (i.app, i.inbound)}
    new = [a for s in mesh.services.values() for i in s.instances for a in (i.app, i.inbound)]
    new += [u.listen for s in mesh.services.values() for u in s.upstreams]
    assert len(set(new)) == len(new) == 13
    assert not old & {str(a) for a in new}
    assert [(r.name, r.path, r.refused) for r in routes(mesh)] == [
        ("frontend -> backend", "/call/backend", False),
        ("frontend -> backend -> ratings", "/call/backend/call/ratings", False),
        ("batch -> backend", "/call/backend", True),  # backend admits only frontend; the route ends there
    ]
    split = mesh.policy.split_of("ratings")
    assert split is not None
    assert [(b.service, b.weight) for b in split.backends] == [("ratings", 80), ("ratings-v2", 20)]


def test_an_address_used_twice_gets_the_same_free_port() -> None:
    document = {"a": ["127.0.0.1:18080", {"b": "127.0.0.1:18080", "c": "127.0.0.1:18081"}], "d": "not:an address"}
    freed = with_free_ports(document)
    assert freed["a"][0] == freed["a"][1]["b"] != freed["a"][1]["c"]
    assert freed["d"] == "not:an address"


def test_keep_ports_names_the_first_busy_address() -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        document = {"services": {"a": {"instances": [{"app": f"127.0.0.1:{port}"}]}}}
        with pytest.raises(ConfigError) as err:
            check_ports_free(document)
    assert str(err.value) == (
        f"services.a.instances[0].app: 127.0.0.1:{port} is busy (Address already in use); "
        "run the demo without --keep-ports to use free ports"
    )


def test_routes_follow_upstreams_from_the_services_no_one_calls() -> None:
    def service(upstreams: list[str]) -> dict[str, object]:
        node = f"n{len(seen)}"
        seen.append(node)
        ports = [f"127.0.0.1:{20000 + 10 * len(seen) + i}" for i in range(3)]
        return {
            "instances": [{"node": node, "app": ports[0], "inbound": ports[1]}],
            "upstreams": [
                {"service": u, "listen": f"127.0.0.1:{21000 + 10 * len(seen) + i}"} for i, u in enumerate(upstreams)
            ],
        }

    seen: list[str] = []
    mesh = parse_mesh({"services": {"web": service(["api", "db"]), "api": service(["db"]), "db": service([])}}, TD)
    assert routes(mesh) == [Route(("web", "api")), Route(("web", "api", "db")), Route(("web", "db"))]


def test_the_demo_config_is_valid_and_its_ttl_chain_sound(tmp_path: Path) -> None:
    config = parse_config(demo_config("mesh.yaml", timedelta(seconds=30)), tmp_path)
    assert (config.ca.workload_ttl, config.ca.intermediate_ttl) == (timedelta(seconds=30), timedelta(minutes=2))
    assert config.mesh_file == tmp_path / "mesh.yaml"
    chain = TtlChain(
        config.ca.mode, config.ca.workload_ttl, config.ca.intermediate_ttl, config.ca.rotate_after, config.ca.jitter
    )
    report = check_ttl_chain(chain, utcnow())
    assert (report.errors, report.warnings) == ([], [])
    assert report.renewal_window == timedelta(seconds=15)
