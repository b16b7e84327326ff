"""Chaos: while real Envoys carry traffic over mTLS, the xDS server gets malformed, oversized and abandoned
streams, handshakes without a certificate and silent connections, and the metrics/admin endpoint 500 half-open
HTTP connections at once. No request fails, and the next rotation still reaches every Envoy.
"""

from __future__ import annotations

import contextlib
import random
import socket
import ssl
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType

import grpc
import pytest

from mesh_identity.compose import Stage, System, build
from mesh_identity.config import parse_config
from mesh_identity.demo.apps import DemoApp, get_json
from mesh_identity.mesh.model import Address, Instance, Mesh, Service, Upstream
from mesh_identity.mesh.model import Protocol as AppProtocol
from mesh_identity.registry.base import StaticRegistry
from mesh_identity.spiffe import SpiffeId, TrustDomain
from mesh_identity.svid import X509Svid
from tests.e2e.harness import Envoy, free_address
from tests.waiting import wait_until
from tests.xds_sds.client import connect, sotw
from xds_sds.protocol.typeurls import CLUSTER, SECRET

pytestmark = pytest.mark.e2e

TD = TrustDomain("chaos.mesh")
FRONTEND = SpiffeId.parse("spiffe://chaos.mesh/ns/shop/sa/frontend")
BACKEND = SpiffeId.parse("spiffe://chaos.mesh/ns/shop/sa/backend")
ADS = "/envoy.service.discovery.v3.AggregatedDiscoveryService/StreamAggregatedResources"
HALF_OPEN = 500


@dataclass
class Mesh2:
    system: System
    envoys: dict[str, Envoy]
    upstream: Address
    failures: list[str] = field(default_factory=list)
    ok: int = 0


def two_services() -> Mesh:
    upstream = free_address()
    frontend = Service(
        "frontend", FRONTEND, AppProtocol.HTTP, (Instance("frontend-1", free_address(), free_address()),),
        (Upstream("backend", upstream),),
    )  # fmt: skip
    backend = Service("backend", BACKEND, AppProtocol.HTTP, (Instance("backend-1", free_address(), free_address()),))
    return Mesh(TD, MappingProxyType({"frontend": frontend, "backend": backend}))


@pytest.fixture
def mesh(tmp_path: Path) -> Iterator[Mesh2]:
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
    model = two_services()
    system = build(config, Stage.SERVER, create=True, registry=StaticRegistry(model))
    assert system.service is not None and system.xds is not None
    with contextlib.ExitStack() as stack:
        system.service.start()
        stack.callback(system.service.stop)
        for svc in model.services.values():
            upstreams = {u.service: u.listen for u in svc.upstreams}
            app = DemoApp(svc.name, svc.instances[0].app, upstreams).start()
            stack.callback(app.stop)
        envoys = {}
        for svc in model.services.values():
            node = svc.instances[0].node
            files = system.xds.sidecars.write(  # type: ignore[union-attr]
                system.service.engine.source(svc.identity).svid(), node=node, cluster=svc.name,
                xds=system.xds.address, server_identity=system.xds.server_identity,
            )  # fmt: skip
            envoy = Envoy(files.bootstrap, files.directory, name=node)
            stack.callback(envoy.stop)
            envoys[node] = envoy.start()
        upstream = model.service("frontend").upstreams[0].listen
        wait_until(lambda: _get(upstream) == 200, "a first request through the mesh")
        yield Mesh2(system, envoys, upstream)


def _get(address: Address) -> int | None:
    try:
        return get_json(address, "/")[0]
    except (OSError, ValueError):
        return None


@contextlib.contextmanager
def traffic(mesh: Mesh2) -> Iterator[None]:
    stop = threading.Event()

    def run() -> None:
        while not stop.is_set():
            try:
                status, _ = get_json(mesh.upstream, "/")
            except (OSError, ValueError) as err:
                mesh.failures.append(f"{type(err).__name__}: {err}")
                continue
            if status == 200:
                mesh.ok += 1
            else:
                mesh.failures.append(f"HTTP {status}")

    thread = threading.Thread(target=run, name="traffic", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join(30)


def _xds_abuse(mesh: Mesh2, svid: X509Svid, roots: bytes) -> None:
    """Malformed, oversized and abandoned streams, raw garbage on the gRPC stream, bad handshakes."""
    target = mesh.system.xds.address  # type: ignore[union-attr]
    host, port = target.host, target.port
    rng = random.Random(7)
    client = connect(f"{host}:{port}", roots, svid)
    try:
        # oversized: far too many names; foreign node; unknown type; malformed nonce
        for request in (
            sotw(SECRET, [f"spiffe://chaos.mesh/n{i}" for i in range(20_000)], node="frontend-1"),
            sotw(SECRET, [str(BACKEND)], node="backend-1"),  # another identity's node
            sotw("type.googleapis.com/not.a.Type", ["x"], node="frontend-1"),
            sotw(CLUSTER, [], node="frontend-1", nonce="\x00\n" * 100, version="v" * 10_000),
            sotw(SECRET, ["\n".join(["forged"] * 50)], node="frontend-1\nforged"),
        ):
            stream = client.ads()
            with contextlib.suppress(Exception):
                stream.exchange(request, timeout=5)
            stream.cancel()
        # abandoned: opened, one request, never read, never closed (until the client goes)
        for _ in range(50):
            client.ads().send(sotw(SECRET, [str(FRONTEND)], node="frontend-1"))
        # raw bytes on the stream
        raw = client.channel.stream_stream(ADS, request_serializer=None, response_deserializer=None)
        for _ in range(20):
            garbage = bytes(rng.getrandbits(8) for _ in range(rng.randrange(1, 4096)))
            with contextlib.suppress(grpc.RpcError):
                for _reply in raw(iter([garbage]), timeout=5):
                    pass
    finally:
        client.close()
    # TLS without a client certificate, and TCP connections that say nothing
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    silent = []
    for _ in range(50):
        with contextlib.suppress(OSError):
            with socket.create_connection((host, port), timeout=5) as raw_socket:
                with context.wrap_socket(raw_socket) as tls:
                    tls.sendall(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + b"\x00" * 64)
                    tls.recv(1)
        silent.append(socket.create_connection((host, port), timeout=5))
    time.sleep(1)
    for sock in silent:
        sock.close()


def _half_open(address: tuple[str, int], count: int) -> list[socket.socket]:
    held = []
    for i in range(count):
        sock = socket.create_connection(address, timeout=5)
        sock.sendall(b"GET /metrics HTTP/1.1\r\nHost: x\r\n" if i % 2 else b"POST /admin/root/prepare HTTP/1.1\r\n")
        held.append(sock)
    return held


def _healthz(address: tuple[str, int]) -> int | None:
    try:
        with socket.create_connection(address, timeout=5) as sock:
            sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            return int(sock.recv(64).split(b" ")[1])
    except (OSError, ValueError, IndexError):
        return None


def test_abuse_of_both_listeners_fails_no_request_and_the_next_rotation_reaches_every_envoy(mesh: Mesh2) -> None:
    service = mesh.system.service
    assert service is not None
    engine = service.engine
    svid = engine.source(FRONTEND).svid()
    roots = svid.bundle.pem()
    url = service.url.removeprefix("http://")
    host, _, port = url.rpartition(":")
    endpoint = (host, int(port))

    with traffic(mesh):
        wait_until(lambda: mesh.ok >= 20, "traffic to flow")
        held = _half_open(endpoint, HALF_OPEN)
        try:
            _xds_abuse(mesh, svid, roots)
            before = mesh.ok
            wait_until(lambda: mesh.ok >= before + 50 or mesh.failures, "traffic to go on during the abuse")
            wait_until(lambda: _healthz(endpoint) == 200, "the endpoint to answer beside 500 half-open connections")
        finally:
            for sock in held:
                sock.close()

        renewed = {identity: engine.source(identity).current() for identity in (FRONTEND, BACKEND)}
        for identity in renewed:
            assert engine.rotate(identity, requested_by="chaos test")
            renewed[identity] = engine.source(identity).svid()
        for node, identity in (("frontend-1", FRONTEND), ("backend-1", BACKEND)):
            serial = renewed[identity].leaf.serial_number  # type: ignore[union-attr]
            wait_until(lambda e=mesh.envoys[node], s=serial, i=identity: s in e.cert_serials(i), f"{node} to rotate")
        before = mesh.ok
        wait_until(lambda: mesh.ok >= before + 20 or mesh.failures, "traffic after the rotation")
    assert mesh.failures == []
    assert all(envoy.exit_code() is None for envoy in mesh.envoys.values())
