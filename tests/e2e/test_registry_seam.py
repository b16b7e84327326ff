"""The workload-registry seam: a second registry, written here and kept in memory, drives the core and the xDS
server through the composition root, with real Envoy sidecars.

Nothing here is specific to the mesh file: what this registry can do, the Kubernetes one will do the same way.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType

import pytest

from mesh_identity.compose import Stage, System, build
from mesh_identity.config import parse_config
from mesh_identity.mesh.model import Instance, Mesh, Service
from mesh_identity.mesh.model import Protocol as AppProtocol
from mesh_identity.registry.base import Workloads, validate_workloads
from mesh_identity.spiffe import SpiffeId, TrustDomain
from tests.e2e.harness import Envoy, free_address
from tests.waiting import wait_until
from xds_sds.protocol.typeurls import CLUSTER, SECRET
from xds_sds.resources.bootstrap import write_bootstrap
from xds_sds.resources.names import inbound, local_app

pytestmark = pytest.mark.e2e

TD = TrustDomain("seam.mesh")
WEB = SpiffeId.parse("spiffe://seam.mesh/ns/shop/sa/web")
API = SpiffeId.parse("spiffe://seam.mesh/ns/shop/sa/api")
NODE = "node-1"


class MemoryRegistry:
    """A :class:`~mesh_identity.registry.base.WorkloadRegistry` held in memory: services are set in code."""

    def __init__(self, trust_domain: TrustDomain) -> None:
        self.trust_domain = trust_domain
        self._current = Workloads(1, Mesh(trust_domain))
        self._subscribers: list[Callable[[Workloads], None]] = []
        self._lock = threading.Lock()
        self.started = False

    def current(self) -> Workloads:
        return self._current

    def subscribe(self, callback: Callable[[Workloads], None]) -> Callable[[], None]:
        self._subscribers.append(callback)
        return lambda: self._subscribers.remove(callback)

    def set(self, *services: Service) -> Workloads:
        mesh = Mesh(self.trust_domain, MappingProxyType({s.name: s for s in services}))
        validate_workloads(mesh, self.trust_domain)
        with self._lock:
            self._current = Workloads(self._current.version + 1, mesh)
            for callback in list(self._subscribers):
                callback(self._current)
        return self._current

    def reload(self) -> bool:
        return False

    def describe(self) -> str:
        return "in memory"

    def start(self) -> None:
        self.started = True

    def stop(self) -> None:
        self.started = False


def workload(name: str, identity: SpiffeId, node: str = NODE) -> Service:
    instance = Instance(node, free_address(), free_address())
    return Service(name, identity, AppProtocol.HTTP, (instance,), ())


@dataclass
class Running:
    system: System
    registry: MemoryRegistry
    directory: Path

    @property
    def engine(self):  # type: ignore[no-untyped-def]
        assert self.system.service is not None
        return self.system.service.engine

    @property
    def xds(self):  # type: ignore[no-untyped-def]
        assert self.system.xds is not None and self.system.xds.xds is not None
        return self.system.xds.xds

    def sidecar(self, identity: SpiffeId, name: str) -> Envoy:
        """A real Envoy for ``NODE`` with a bootstrap certificate of ``identity`` (not registered for renewal)."""
        component = self.system.xds
        assert component is not None
        svid = self.system.authority.issue(identity, requested_by="test")  # type: ignore[union-attr]
        files = write_bootstrap(
            svid, self.directory / name, node=NODE, xds=component.address, server_identity=component.server_identity
        )
        return Envoy(files.bootstrap, self.directory / name, name=name)


@pytest.fixture
def running(tmp_path: Path) -> Iterator[Running]:
    config = parse_config(
        {
            "trust_domain": TD.name,
            "state_dir": "state",
            "metrics": {"listen": "127.0.0.1:0"},
            "xds": {"listen": "127.0.0.1:0"},
            "plugins": {"audit": {"enabled": False}},
        },
        tmp_path,
    )
    registry = MemoryRegistry(TD)
    system = build(config, Stage.SERVER, create=True, registry=registry)
    assert system.service is not None and system.registry is registry
    system.service.start()
    try:
        yield Running(system, registry, tmp_path)
    finally:
        system.service.stop()
    assert not registry.started


def connected(envoy: Envoy) -> int | None:
    return envoy.stats("control_plane.connected_state").get("control_plane.connected_state")


def test_adding_a_workload_issues_its_svid_and_serves_it_to_its_sidecar(running: Running) -> None:
    assert running.registry.started
    assert WEB not in running.engine.identities()  # the registry is empty: nothing issued for workloads

    running.registry.set(workload("web", WEB))
    svid = running.engine.source(WEB).current()
    assert svid is not None  # issued before the xDS layer heard of the change

    with running.sidecar(WEB, "web") as envoy:
        wait_until(lambda: svid.leaf.serial_number in envoy.cert_serials(WEB), "web's SVID in its sidecar")
        assert connected(envoy) == 1


def test_removing_it_stops_its_rotation_and_closes_its_sidecars_streams(running: Running) -> None:
    running.registry.set(workload("web", WEB))
    with running.sidecar(WEB, "web") as envoy:
        wait_until(lambda: running.xds.connected_nodes() == {NODE}, "the sidecar's stream")
        source = running.engine.source(WEB)

        running.registry.set()

        assert WEB not in running.engine.identities()
        assert str(WEB) not in running.engine.job_times()  # its renewal job is gone
        assert source.closed
        wait_until(lambda: connected(envoy) == 0, "the sidecar's xDS stream to be closed")
        wait_until(lambda: running.xds.connected_nodes() == frozenset(), "the server to forget the stream")
        assert running.xds.cache.get(NODE, SECRET).resources == {}


def test_a_node_rebound_to_another_identity_gets_only_the_new_identitys_resources(running: Running) -> None:
    running.registry.set(workload("web", WEB))
    with running.sidecar(WEB, "web") as old:
        web_serial = running.engine.source(WEB).svid().leaf.serial_number
        wait_until(lambda: web_serial in old.cert_serials(WEB), "web's SVID in the old sidecar")

        running.registry.set(workload("api", API))  # the same node id, now a sidecar of api

        wait_until(lambda: connected(old) == 0, "the old stream (web's certificate) to be closed")
        api_serial = running.engine.source(API).svid().leaf.serial_number
        with running.sidecar(API, "api") as new:
            wait_until(lambda: api_serial in new.cert_serials(API), "api's SVID in the new sidecar")
            assert new.cert_serials(WEB) == set()
            clusters = {c["cluster"]["name"] for c in new.config_dump("dynamic_active_clusters")["configs"]}
            assert local_app("api") in clusters and local_app("web") not in clusters
            served = running.xds.cache.get(NODE, SECRET).resources
            assert str(API) in served and str(WEB) not in served
            assert set(running.xds.cache.get(NODE, CLUSTER).resources) == clusters
            assert inbound("api") in new.listeners()
        # the old sidecar, holding web's certificate, is refused on every reconnect
        assert connected(old) == 0 and old.cert_serials(API) == set()
