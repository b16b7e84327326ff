"""Real Envoys in agent mode: SDS from the node agent's Unix socket, ADS from the control plane.

The mesh is the demo's (``demo-mesh.yaml`` on free ports, every instance on host ``demo``); the control plane is
what ``serve`` runs (``xds.secrets: agent``, a signing API), in this process so that a tap decodes every xDS
response it sends; the join token comes from ``mesh-identity token create``, each sidecar's bootstrap from
``mesh-identity bootstrap --agent SOCKET``, and one ``mesh-identity agent`` process makes every key. Certificates
live 30 seconds; the agent renews at a quarter of that (its renewal interval: 7.5 s).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import timedelta
from importlib import resources
from pathlib import Path
from typing import Any

import pytest
import yaml

from mesh_identity.clock import utcnow
from mesh_identity.compose import Stage, System, build
from mesh_identity.config import load_config
from mesh_identity.demo.agent import AgentProcess, agent_document, envoy_selectors, read_address
from mesh_identity.demo.apps import DemoApp, get_json
from mesh_identity.demo.mesh import demo_config, routes, with_free_ports
from mesh_identity.demo.view import Traffic
from mesh_identity.mesh.model import Address, Mesh
from mesh_identity.registry.meshfile import load_mesh_file
from mesh_identity.spiffe import SpiffeId, TrustDomain
from tests.e2e.harness import ENVOY, Envoy, RequestLoop, free_address
from tests.waiting import wait_until
from xds_sds.mesh.component import XdsComponent
from xds_sds.mesh.keyscan import KeyWatch
from xds_sds.resources.bootstrap import write_agent_bootstrap
from xds_sds.signing.component import ATTEST_ADDR, SIGNING_ADDR

pytestmark = pytest.mark.e2e

TTL = timedelta(seconds=30)
AGENT_ROTATE_AFTER = 0.25
RENEWAL_INTERVAL = TTL * AGENT_ROTATE_AFTER
HOST = "demo"


def cli(*args: str) -> str:
    """``mesh-identity ARGS`` in a subprocess; its stdout (AssertionError with its output when it fails)."""
    result = subprocess.run(
        [sys.executable, "-m", "mesh_identity", *args],
        capture_output=True, text=True, timeout=60, check=False, env={**os.environ, "MESH_IDENTITY_CONFIG": ""},
    )  # fmt: skip
    assert result.returncode == 0, f"mesh-identity {' '.join(args)}: {result.stdout}{result.stderr}"
    return result.stdout


@dataclass
class AgentMesh:
    """The control plane, the agent, the apps and the sidecars of the demo mesh in agent mode."""

    directory: Path
    config: Path
    mesh: Mesh
    keys: KeyWatch = field(default_factory=KeyWatch)
    system: System | None = None
    agent: AgentProcess | None = None
    sidecars: dict[str, Envoy] = field(default_factory=dict)

    @property
    def xds(self) -> XdsComponent:
        assert self.system is not None and self.system.xds is not None
        return self.system.xds

    def start_control_plane(self, *, create: bool) -> None:
        """What ``serve`` builds from the config (the same state, addresses and CA when started again)."""
        system = build(load_config(self.config), Stage.SERVER, create=create)
        assert system.service is not None and system.xds is not None
        system.xds.add_tap(self.keys)
        system.service.start()
        self.system = system

    def stop_control_plane(self) -> None:
        if self.system is not None and self.system.service is not None:
            self.system.service.stop()
        self.system = None

    def sidecar(self, service: str) -> Envoy:
        return self.sidecars[self.mesh.service(service).instances[0].node]

    def request(self, client: str, upstream: str, path: str = "/") -> tuple[int, Any]:
        """As ``client``'s app would: to its sidecar's outbound listener for ``upstream`` (for RequestLoop)."""
        [listen] = [u.listen for u in self.mesh.service(client).upstreams if u.service == upstream]
        return get_json(listen, path)

    def serials(self, service: str) -> set[int]:
        return self.sidecar(service).cert_serials(self.mesh.service(service).identity)

    def pids(self) -> dict[str, int | None]:
        return {node: envoy.pid for node, envoy in self.sidecars.items()}


def _sockets_dir() -> Path:
    """A short directory for the agent's Unix sockets (pytest's tmp_path can be longer than a socket path)."""
    return Path(tempfile.mkdtemp(prefix="mi-agent-", dir="/tmp"))


@pytest.fixture
def agent_mesh(tmp_path: Path) -> Iterator[AgentMesh]:
    text = resources.files("mesh_identity.demo").joinpath("demo-mesh.yaml").read_text(encoding="utf-8")
    (tmp_path / "mesh.yaml").write_text(yaml.safe_dump(with_free_ports(yaml.safe_load(text)), sort_keys=False))
    document = demo_config("mesh.yaml", TTL, agent=True)
    document["xds"]["listen"] = str(free_address())  # fixed: the sidecars reconnect to it after a restart
    document["signing"] = {"listen": str(free_address()), "attest_listen": str(free_address())}
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump(document, sort_keys=False))
    trust_domain = TrustDomain(document["trust_domain"])
    mesh = load_mesh_file(tmp_path / "mesh.yaml", trust_domain)
    sockets = _sockets_dir()
    running = AgentMesh(tmp_path, config, mesh)
    with contextlib.ExitStack() as stack:
        stack.callback(shutil.rmtree, sockets, ignore_errors=True)
        stack.callback(running.stop_control_plane)
        running.start_control_plane(create=True)
        state = load_config(config).state_dir

        agent_dir = tmp_path / "agent"
        agent_dir.mkdir(mode=0o700)
        token = agent_dir / "join-token"
        token.write_text(cli("token", "create", "--node", HOST, "--ttl", "5m", "-c", str(config)).strip())
        token.chmod(0o600)
        assert running.system is not None and running.system.service is not None
        bundle = running.system.service.engine.bundles.current()
        assert bundle is not None
        (agent_dir / "bundle.pem").write_bytes(bundle.pem())
        sds = sockets / "sds.sock"
        agent_config = agent_dir / "agent.yaml"
        agent = agent_document(
            trust_domain=trust_domain, host=HOST, state_dir=agent_dir / "state",
            signing=read_address(state / SIGNING_ADDR), attest=read_address(state / ATTEST_ADDR),
            bundle=agent_dir / "bundle.pem", join_token_file=token, sds_socket=sds,
            identities=mesh.identities_on_host(HOST), selectors=envoy_selectors(ENVOY),
            rotate_after=AGENT_ROTATE_AFTER, jitter=0.1,
        )  # fmt: skip
        agent_config.write_text(yaml.safe_dump(agent))
        running.agent = AgentProcess(agent_config, sds, agent_dir / "agent.log").start()
        stack.callback(running.agent.stop)
        running.agent.wait_serving(60)

        for svc in mesh.services.values():
            upstreams = {u.service: u.listen for u in svc.upstreams}
            stack.callback(DemoApp(svc.name, svc.instances[0].app, upstreams).start().stop)
        for svc in mesh.services.values():
            node = svc.instances[0].node
            out = tmp_path / "sidecars" / node
            cli(
                "bootstrap", "-c", str(config), "--identity", str(svc.identity), "--node", node, "--out", str(out),
                "--agent", str(sds),
            )  # fmt: skip
            envoy = Envoy(out / "envoy.json", out, name=node)
            stack.callback(envoy.stop)
            running.sidecars[node] = envoy.start()
        traffic = Traffic(mesh, routes(mesh), get_json)
        for route in routes(mesh):
            wait_until(lambda r=route: traffic.probe(r)[1] is None, f"a first good answer along {route.name}")
        yield running


def test_mtls_along_every_route_with_certificates_from_the_agent_and_no_key_over_xds(agent_mesh: AgentMesh) -> None:
    mesh = agent_mesh.mesh
    traffic = Traffic(mesh, routes(mesh), get_json)
    for route in routes(mesh):  # every hop saw its caller's SPIFFE ID; batch -> backend is refused by policy
        hops, error = traffic.probe(route)
        assert error is None, f"{route.name}: {error}"
        assert hops
    publisher = agent_mesh.xds.xds
    assert publisher is not None
    loaded: dict[str, set[int]] = {node: set() for node in agent_mesh.sidecars}

    def on_agent_certificates() -> bool:
        """Each sidecar's xDS stream is authenticated with a certificate its Envoy loaded from the agent (a
        stream opened just before a rotation catches up when its connection is recycled)."""
        streams = {s.node_id: s for s in publisher.server.streams()}
        for node, envoy in agent_mesh.sidecars.items():
            loaded[node] |= envoy.cert_serials(mesh.node_identity(node))
        return all(
            node in streams and streams[node].identity == str(mesh.node_identity(node))
            and int(streams[node].serial, 16) in loaded[node]
            for node in agent_mesh.sidecars
        )  # fmt: skip

    wait_until(on_agent_certificates, "every xDS stream on a certificate from the agent")
    # the bundle still comes over ADS: root rotation keeps its evidence (every sidecar acknowledged it)
    assert agent_mesh.system is not None and agent_mesh.system.service is not None
    bundle = agent_mesh.system.service.engine.bundles.current()
    assert bundle is not None
    wait_until(
        lambda: (
            publisher.proxies_missing_bundle(frozenset(bundle.fingerprints)) == []
            and publisher.connected_nodes() == set(agent_mesh.sidecars)
        ),
        "every sidecar to acknowledge the trust bundle over ADS",
    )
    figures = agent_mesh.keys.figures()
    assert figures.responses >= 5 * 4  # listeners, clusters, endpoints, routes and the bundle, per sidecar
    assert (figures.with_keys, figures.first) == (0, None)


def test_leaf_rotation_under_traffic_with_no_failed_request_and_no_restart(agent_mesh: AgentMesh) -> None:
    pids = agent_mesh.pids()
    first = {service: agent_mesh.serials(service) for service in ("frontend", "backend")}
    seen = {service: set(serials) for service, serials in first.items()}

    def rotated(service: str) -> int:
        """How many certificates the sidecar has loaded since the start (it shows only what it holds now)."""
        seen[service] |= agent_mesh.serials(service)
        return len(seen[service] - first[service])

    with RequestLoop(agent_mesh, "frontend", "backend") as loop:  # type: ignore[arg-type]
        loop.wait_for(20)
        for service in ("frontend", "backend"):  # two rotations each, loaded by Envoy from the agent
            wait_until(
                lambda s=service: rotated(s) >= 2 or loop.failures,
                f"{service}'s sidecar to load two rotated certificates",
                timeout=4 * RENEWAL_INTERVAL.total_seconds() + 30,
            )
        # on the wire: the frontend's client certificate (XFCC hash at the backend) changed, twice
        wait_until(lambda: len(set(loop.hashes)) >= 3 or loop.failures, "two rotated client certificates in use")
        loop.wait_for(20)
    assert loop.failures == []
    assert agent_mesh.pids() == pids and all(e.exit_code() is None for e in agent_mesh.sidecars.values())
    assert agent_mesh.keys.figures().with_keys == 0


def test_a_control_plane_outage_of_two_renewal_intervals_keeps_traffic_flowing_and_rotation_resumes(
    agent_mesh: AgentMesh,
) -> None:
    pids = agent_mesh.pids()
    with RequestLoop(agent_mesh, "frontend", "backend") as loop:  # type: ignore[arg-type]
        loop.wait_for(20)
        agent_mesh.stop_control_plane()
        outage = 2 * RENEWAL_INTERVAL.total_seconds()
        stopped, ok_before = time.monotonic(), loop.ok
        wait_until(
            lambda: time.monotonic() - stopped >= outage or loop.failures,
            f"the control plane to be down {outage:.0f}s",
            timeout=outage + 30,
        )
        assert loop.failures == [], "requests failed while the control plane was down"
        assert loop.ok > ok_before  # traffic kept flowing
        now = utcnow()
        for service in ("frontend", "backend"):  # on certificates that are still valid
            identity = str(agent_mesh.mesh.service(service).identity)
            valid = [c for c in agent_mesh.sidecar(service).leaf_certs() if identity in c.uris and c.expires > now]
            assert valid, f"{service}'s sidecar holds no valid certificate after the outage"

        held = {service: agent_mesh.serials(service) for service in ("frontend", "backend")}
        agent_mesh.start_control_plane(create=False)
        for service in ("frontend", "backend"):  # rotation resumes: a certificate signed after the restart
            wait_until(
                lambda s=service: agent_mesh.serials(s) - held[s] or loop.failures,
                f"{service}'s sidecar to load a certificate renewed after the restart",
                timeout=2 * RENEWAL_INTERVAL.total_seconds() + 60,
            )
        wait_until(
            lambda: agent_mesh.xds.xds is not None and agent_mesh.xds.xds.connected_nodes() >= set(agent_mesh.sidecars),
            "every sidecar to reconnect to the restarted control plane",
            timeout=60,
        )
        loop.wait_for(20)
    assert loop.failures == []
    assert agent_mesh.pids() == pids
    assert agent_mesh.keys.figures().with_keys == 0


def test_envoy_validates_the_agent_bootstrap(tmp_path: Path) -> None:
    td = TrustDomain("e2e.mesh")
    path = write_agent_bootstrap(
        tmp_path / "web-1", node="web-1", identity=SpiffeId.for_kubernetes(td, "e2e", "web"),
        xds=Address("127.0.0.1", 1), server_identity=SpiffeId(td, "/mesh-identity/xds"),
        agent_socket=Path("/tmp/mi-agent-validate/sds.sock"),
    )  # fmt: skip
    result = subprocess.run(
        [str(ENVOY), "--mode", "validate", "-c", str(path), "--disable-hot-restart"],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr
