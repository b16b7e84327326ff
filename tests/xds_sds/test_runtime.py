"""``XdsComponent``: the xDS server fed by a registry and a real rotation engine (built-in CA), its bootstrap
renewals and mesh changes (the registry's membership decides which identities the engine keeps).

No Envoy here: what the sidecars would receive is read from the server's snapshot cache and the bootstrap files.
"""

from __future__ import annotations

import base64
import json
from collections.abc import Iterator
from pathlib import Path

import pytest
from envoy.extensions.transport_sockets.tls.v3 import secret_pb2

from mesh_identity.errors import ConfigError
from mesh_identity.mesh.model import Address, Instance, Mesh, Service, Upstream
from mesh_identity.mesh.model import Protocol as AppProtocol
from mesh_identity.registry.base import StaticRegistry
from mesh_identity.rotation.engine import RotationEngine
from mesh_identity.rotation.membership import Membership
from mesh_identity.spiffe import SpiffeId
from mesh_identity.svid import load_certs_pem
from tests.rotation.helpers import paused_engine
from xds_sds.mesh.component import XDS_ADDR, XdsComponent, server_identity
from xds_sds.mesh.sidecars import SidecarDirs
from xds_sds.protocol.typeurls import SECRET


def service(name: str, port: int, upstreams: tuple[Upstream, ...] = ()) -> Service:
    identity = SpiffeId.parse(f"spiffe://example.org/ns/shop/sa/{name}")
    instance = Instance(f"{name}-1", Address("127.0.0.1", port), Address("127.0.0.1", port + 1))
    return Service(name, identity, AppProtocol.HTTP, (instance,), upstreams)


FRONTEND = service("frontend", 20010, (Upstream("backend", Address("127.0.0.1", 20012)),))
BACKEND = service("backend", 20020)
RATINGS = service("ratings", 20030)
CONFIG_ONLY = SpiffeId.parse("spiffe://example.org/batch")


def mesh(*services: Service) -> Mesh:
    first = next(iter(services))
    return Mesh(first.identity.trust_domain, {s.name: s for s in services})


@pytest.fixture
def engine(tmp_path: Path) -> Iterator[RotationEngine]:
    with paused_engine(tmp_path) as engine:
        yield engine


@pytest.fixture
def xds(engine: RotationEngine, tmp_path: Path) -> Iterator[XdsComponent]:
    first = mesh(FRONTEND, BACKEND)
    registry = StaticRegistry(first)
    membership = Membership(engine, registry, keep=[server_identity(first.trust_domain), CONFIG_ONLY])
    membership.start()
    component = XdsComponent(
        engine, registry, address=Address("127.0.0.1", 0), sidecars=SidecarDirs(tmp_path / "state"),
        addr_file=tmp_path / XDS_ADDR,
    )  # fmt: skip
    component.start()
    try:
        yield component
    finally:
        component.stop()
        membership.stop()


def served_serial(component: XdsComponent, node: str, identity: SpiffeId) -> int:
    assert component.xds is not None
    resource = component.xds.cache.get(node, SECRET).resources[str(identity)]
    secret = secret_pb2.Secret()
    assert resource.body.Unpack(secret)
    return load_certs_pem(secret.tls_certificate.certificate_chain.inline_bytes)[0].serial_number


def bootstrap_serial(directory: Path) -> int:
    secret = json.loads((directory / "sds" / "xds-cert.json").read_text())["resources"][0]
    return load_certs_pem(base64.b64decode(secret["tlsCertificate"]["certificateChain"]["inlineBytes"]))[
        0
    ].serial_number


def test_a_rotation_reaches_the_sidecars_secret_and_its_registered_bootstrap(
    xds: XdsComponent, engine, tmp_path
) -> None:
    assert (tmp_path / XDS_ADDR).read_text() == f"127.0.0.1:{xds.xds.port}\n"  # type: ignore[union-attr]
    assert xds.sidecars is not None
    first = engine.source(BACKEND.identity).svid()
    files = xds.sidecars.write(
        first, node="backend-1", cluster="backend", xds=xds.address, server_identity=xds.server_identity,
        out_dir=tmp_path / "elsewhere",
    )  # fmt: skip
    assert (tmp_path / "state" / "sidecars" / "backend-1").resolve() == files.directory
    assert served_serial(xds, "backend-1", BACKEND.identity) == first.leaf.serial_number

    assert engine.rotate(BACKEND.identity)
    renewed = engine.source(BACKEND.identity).svid()
    assert renewed.serial != first.serial
    assert served_serial(xds, "backend-1", BACKEND.identity) == renewed.leaf.serial_number
    assert bootstrap_serial(files.directory) == renewed.leaf.serial_number

    files.bootstrap.unlink()  # no longer a bootstrap directory: skipped, not an error
    assert engine.rotate(BACKEND.identity)
    assert bootstrap_serial(files.directory) == renewed.leaf.serial_number


def test_a_mesh_change_adds_and_removes_identities_and_a_bad_one_changes_nothing(xds: XdsComponent, engine) -> None:
    calls_ratings = service("frontend", 20010, (Upstream("ratings", Address("127.0.0.1", 20012)),))
    xds.registry.replace(mesh(calls_ratings, RATINGS))  # type: ignore[attr-defined]
    managed = set(engine.identities())
    assert RATINGS.identity in managed and BACKEND.identity not in managed
    assert {CONFIG_ONLY, server_identity(xds.mesh.trust_domain)} <= managed  # kept whatever the mesh says
    assert (
        served_serial(xds, "ratings-1", RATINGS.identity) == engine.source(RATINGS.identity).svid().leaf.serial_number
    )

    broken = service("frontend", 20010, (Upstream("billing", Address("127.0.0.1", 20012)),))
    with pytest.raises(ConfigError) as err:
        xds.registry.replace(mesh(broken, BACKEND))  # type: ignore[attr-defined]
    assert str(err.value) == "services.frontend.upstreams[0].service: 'billing' is not a service of this mesh"
    assert set(engine.identities()) == managed
    assert xds.mesh.services.keys() == {"frontend", "ratings"}


def test_stop_removes_the_address_file(xds: XdsComponent, tmp_path) -> None:
    xds.stop()
    assert not (tmp_path / XDS_ADDR).exists()
    assert xds.proxies_missing_bundle(frozenset({"x"})) == ()
