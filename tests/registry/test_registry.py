"""The registry seam in the core: versioned sets, validation before publication, ordered subscribers, the mesh
file's reload keeping the last good set, and the membership that turns sets into issued identities."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from pathlib import Path
from types import MappingProxyType

import pytest
import yaml

from mesh_identity.errors import ConfigError
from mesh_identity.mesh.model import Address, Instance, Mesh, Service
from mesh_identity.mesh.model import Protocol as AppProtocol
from mesh_identity.registry.base import Publication, StaticRegistry, Workloads, control_plane_identity
from mesh_identity.registry.meshfile import MeshFileRegistry
from mesh_identity.rotation.engine import RotationEngine
from mesh_identity.rotation.membership import Membership
from mesh_identity.spiffe import SpiffeId, TrustDomain
from tests.rotation.helpers import paused_engine

TD = TrustDomain("example.org")


def service(name: str, port: int, identity: SpiffeId | None = None) -> Service:
    identity = identity or SpiffeId.parse(f"spiffe://example.org/ns/shop/sa/{name}")
    instance = Instance(f"{name}-1", Address("127.0.0.1", port), Address("127.0.0.1", port + 1))
    return Service(name, identity, AppProtocol.HTTP, (instance,), ())


def mesh(*services: Service, trust_domain: TrustDomain = TD) -> Mesh:
    return Mesh(trust_domain, MappingProxyType({s.name: s for s in services}))


WEB, API = service("web", 21000), service("api", 21010)


def test_a_publication_numbers_its_sets_and_tells_subscribers_in_order() -> None:
    publication = Publication(mesh(WEB))
    seen: list[tuple[str, int]] = []
    publication.subscribe(lambda w: seen.append(("first", w.version)))
    cancel = publication.subscribe(lambda w: seen.append(("second", w.version)))
    assert publication.current().version == 1

    second = publication.publish(mesh(WEB, API))
    assert second.version == 2 and second.identities == {WEB.identity, API.identity}
    cancel()
    publication.publish(mesh(API))
    assert seen == [("first", 2), ("second", 2), ("first", 3)]
    assert publication.current().describe() == "1 service, 1 sidecar"


@pytest.mark.parametrize(
    ("bad", "message"),
    [
        (
            mesh(WEB, trust_domain=TrustDomain("other.org")),
            "the workloads are in trust domain other.org, not the mesh's example.org",
        ),
        (
            mesh(service("xds", 21020, control_plane_identity(TD))),
            "services.xds.identity: spiffe://example.org/mesh-identity/xds is under /mesh-identity/, the control plane's own identities (its xDS server's and the node agents')",
        ),
        (
            mesh(WEB, service("api", 21000)),
            "services.api.instances[0].app: 127.0.0.1:21000 is already used by services.web.instances[0].app",
        ),
    ],
)
def test_a_set_that_does_not_validate_is_refused_and_changes_nothing(bad: Mesh, message: str) -> None:
    publication = Publication(mesh(WEB))
    seen: list[Workloads] = []
    publication.subscribe(seen.append)
    with pytest.raises(ConfigError) as err:
        publication.publish(bad)
    assert str(err.value) == message
    assert publication.current().version == 1 and publication.current().identities == {WEB.identity}
    assert seen == []


def test_a_failing_subscriber_does_not_stop_the_others(caplog: pytest.LogCaptureFixture) -> None:
    registry = StaticRegistry(mesh(WEB))
    seen: list[int] = []

    def broken(workloads: Workloads) -> None:
        raise RuntimeError("boom")

    registry.subscribe(broken)
    registry.subscribe(lambda w: seen.append(w.version))
    with caplog.at_level(logging.ERROR):
        registry.replace(mesh(API))
    assert seen == [2]
    assert "a registry subscriber failed on version 2" in caplog.text
    assert registry.reload() is False  # nothing to read again


def write_mesh(path: Path, *names: str, port: int = 22000) -> None:
    services = {
        name: {
            "identity": {"namespace": "shop", "service_account": name},
            "instances": [
                {"node": f"{name}-1", "app": f"127.0.0.1:{port + 10 * i}", "inbound": f"127.0.0.1:{port + 10 * i + 1}"}
            ],
        }
        for i, name in enumerate(names)
    }
    path.write_text(yaml.safe_dump({"services": services}))


def test_the_mesh_file_reload_publishes_a_good_file_and_keeps_the_last_good_one(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "mesh.yaml"
    write_mesh(path, "web")
    registry = MeshFileRegistry(path, TD)
    versions: list[int] = []
    registry.subscribe(lambda w: versions.append(w.version))
    assert registry.describe() == f"mesh file {path} (SIGHUP reloads it)"

    write_mesh(path, "web", "api")
    assert registry.reload() is True
    assert set(registry.current().mesh.services) == {"web", "api"}

    path.write_text("services: {web: {identity: 3}}\n")
    with caplog.at_level(logging.ERROR):
        assert registry.reload() is False
    assert "keeping the last good mesh" in caplog.text
    assert registry.current().version == 2 and set(registry.current().mesh.services) == {"web", "api"}
    assert versions == [2]


def test_a_bad_mesh_file_at_start_is_an_error_naming_the_key(tmp_path: Path) -> None:
    path = tmp_path / "mesh.yaml"
    path.write_text("services: {web: {identity: 3}}\n")
    with pytest.raises(ConfigError, match=r"^services\.web\.instances: required$"):
        MeshFileRegistry(path, TD)


@pytest.fixture
def engine(tmp_path: Path) -> Iterator[RotationEngine]:
    with paused_engine(tmp_path) as engine:
        yield engine


def test_membership_keeps_the_registrys_identities_and_the_kept_ones_issued(engine: RotationEngine) -> None:
    kept = SpiffeId.parse("spiffe://example.org/batch")
    registry = StaticRegistry(mesh(WEB))
    membership = Membership(engine, registry, keep=[kept])
    membership.start()
    assert set(engine.identities()) == {kept, WEB.identity}
    assert engine.source(WEB.identity).current() is not None

    issued_before_the_next_subscriber: list[bool] = []
    registry.subscribe(
        lambda w: issued_before_the_next_subscriber.append(engine.source(API.identity).current() is not None)
    )
    web_source = engine.source(WEB.identity)
    registry.replace(mesh(API, service("batch", 21030, kept)))
    assert set(engine.identities()) == {kept, API.identity}
    assert issued_before_the_next_subscriber == [True]
    assert web_source.closed

    registry.replace(mesh())  # the kept identity stays even when the registry drops it
    assert set(engine.identities()) == {kept}
    membership.stop()
    registry.replace(mesh(WEB))
    assert set(engine.identities()) == {kept}  # no longer subscribed
