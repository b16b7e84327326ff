"""``mesh-identity inspect --connect HOST:PORT``: the chain a live endpoint presents, shown and verified.

The endpoints are real: a Python ``ssl`` server on loopback presenting an SVID chain from the built-in CA (the
command runs as users run it, a subprocess), and a real Envoy sidecar's inbound listener (``e2e``).
"""

from __future__ import annotations

import socket
import ssl
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import yaml

from mesh_identity.spiffe import SpiffeId
from tests.mesh_identity.test_cli import run

SERVER_ID = "spiffe://example.org/ns/default/sa/api"
CLIENT_ID = "spiffe://example.org/ns/default/sa/web"


@dataclass
class TlsServer:
    """Accepts TLS connections on loopback until closed, presenting ``chain`` (PEM: leaf first) with ``key``;
    ``client_ca`` set: asks for a client certificate and requires one that chains to it."""

    chain: Path
    key: Path
    client_ca: Path | None = None
    clients: list[bytes | None] = field(default_factory=list)

    def __post_init__(self) -> None:
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        context.load_cert_chain(self.chain, self.key)
        if self.client_ca is not None:
            context.load_verify_locations(self.client_ca)
            context.verify_mode = ssl.CERT_REQUIRED
        self.context = context
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.listener.getsockname()[1]}"

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.listener.accept()
            except OSError:
                return
            try:
                with self.context.wrap_socket(conn, server_side=True) as tls:
                    self.clients.append(tls.getpeercert(binary_form=True))
                    tls.recv(1)
            except (ssl.SSLError, OSError):
                continue

    def close(self) -> None:
        self.listener.close()


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A built-in CA (``init``), an SVID for the server and one for the client (``issue``), and a second CA."""
    work = tmp_path_factory.mktemp("inspect-connect")
    for name in ("c", "other"):
        (work / f"{name}.yaml").write_text(
            yaml.safe_dump({"trust_domain": "example.org", "state_dir": f"{name}-state"})
        )
        run("-c", f"{name}.yaml", "init", cwd=work)
    run("-c", "c.yaml", "issue", SERVER_ID, "--out", "api", cwd=work)
    run("-c", "c.yaml", "issue", CLIENT_ID, "--out", "web", cwd=work)
    run("-c", "other.yaml", "issue", CLIENT_ID, "--out", "other", cwd=work)
    return work


@pytest.fixture
def server(pki: Path) -> Iterator[TlsServer]:
    tls = TlsServer(pki / "api" / "svid.pem", pki / "api" / "key.pem", client_ca=pki / "web" / "bundle.pem")
    yield tls
    tls.close()


def test_shows_the_presented_chain_and_verifies_it(pki: Path, server: TlsServer) -> None:
    out = run(
        "inspect", "--connect", server.address, "--cert", "web/svid.pem", "--key", "web/key.pem",
        "--bundle", "api/bundle.pem", cwd=pki,
    ).stdout  # fmt: skip
    assert f"endpoint:    {server.address} (TLSv1.3)" in out
    assert "presented:   2 certificate(s)" in out
    leaf, intermediate = out.split("certificate 1 of 2")[1].split("certificate 2 of 2")
    assert f"SPIFFE ID:   {SERVER_ID}" in leaf
    assert "subject:     O=mesh-identity" in leaf
    assert "serial:      " in leaf and "not after:   " in leaf and "left)" in leaf
    assert "SPIFFE ID:   spiffe://example.org (CA)" in intermediate
    assert "intermediate" in intermediate
    assert out.rstrip().endswith("verify:      OK against api/bundle.pem")
    assert server.clients and server.clients[-1] is not None  # the client certificate was presented


def test_the_bundle_defaults_to_the_one_beside_the_client_certificate(pki: Path, server: TlsServer) -> None:
    out = run("inspect", "--connect", server.address, "--cert", "web/svid.pem", "--key", "web/key.pem", cwd=pki).stdout
    assert out.rstrip().endswith("verify:      OK against web/bundle.pem")


def test_a_chain_from_another_ca_does_not_verify(pki: Path, server: TlsServer) -> None:
    proc = run(
        "inspect", "--connect", server.address, "--cert", "web/svid.pem", "--key", "web/key.pem",
        "--bundle", "other/bundle.pem", cwd=pki, ok=False,
    )  # fmt: skip
    assert proc.returncode == 1, proc.stderr
    assert "presented:   2 certificate(s)" in proc.stdout
    assert "verify:      FAILED: " in proc.stdout
    assert "does not chain to any authority of the example.org bundle" in proc.stdout


def test_a_server_that_presents_only_its_leaf_does_not_verify(pki: Path) -> None:
    """What the endpoint sends is what is checked, not what a client could fill in from elsewhere."""
    svid = (pki / "api" / "svid.pem").read_text()
    leaf_only = pki / "api-leaf.pem"
    leaf_only.write_text(svid[: svid.index("-----END CERTIFICATE-----") + len("-----END CERTIFICATE-----\n")])
    tls = TlsServer(leaf_only, pki / "api" / "key.pem")
    try:
        proc = run("inspect", "--connect", tls.address, "--bundle", "api/bundle.pem", cwd=pki, ok=False)
    finally:
        tls.close()
    assert proc.returncode == 1, proc.stderr
    assert "presented:   1 certificate(s)" in proc.stdout
    assert "verify:      FAILED: 'O=mesh-identity' does not chain to any authority" in proc.stdout


def test_without_a_client_certificate_the_chain_is_still_shown(pki: Path) -> None:
    tls = TlsServer(pki / "api" / "svid.pem", pki / "api" / "key.pem")
    address = tls.address
    try:
        out = run("inspect", "--connect", address, "--bundle", "api/bundle.pem", "--server-name", "api", cwd=pki)
    finally:
        tls.close()
    assert f"endpoint:    {address} (TLSv1.3, server name api)" in out.stdout
    assert "verify:      OK against api/bundle.pem" in out.stdout


def test_an_unreachable_endpoint_is_one_line_and_exit_1(pki: Path) -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    proc = run("inspect", "--connect", f"127.0.0.1:{port}", "--bundle", "api/bundle.pem", cwd=pki, ok=False)
    assert proc.returncode == 1
    assert proc.stdout == ""
    assert proc.stderr == f"mesh-identity: error: cannot connect to 127.0.0.1:{port}: connection refused\n"


def test_an_endpoint_that_is_not_tls_is_one_line_and_exit_1(pki: Path) -> None:
    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]

    def answer() -> None:
        conn, _ = listener.accept()
        with conn:
            conn.recv(1024)
            conn.sendall(b"HTTP/1.1 400 Bad Request\r\n\r\n")

    thread = threading.Thread(target=answer, daemon=True)
    thread.start()
    try:
        proc = run("inspect", "--connect", f"127.0.0.1:{port}", cwd=pki, ok=False)
    finally:
        listener.close()
    assert proc.returncode == 1
    assert proc.stderr.startswith(f"mesh-identity: error: TLS handshake with 127.0.0.1:{port} failed: ")
    assert proc.stderr.count("\n") == 1


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["inspect"], "inspect: give FILE (an SVID's PEM) or --connect HOST:PORT"),
        (
            ["inspect", "web/svid.pem", "--connect", "127.0.0.1:1"],
            "inspect: give FILE or --connect HOST:PORT, not both",
        ),
        (["inspect", "--connect", "127.0.0.1"], "--connect: '127.0.0.1' is not HOST:PORT"),
        (["inspect", "--connect", "127.0.0.1:1", "--cert", "web/svid.pem"], "--cert and --key go together"),
        (["inspect", "web/svid.pem", "--server-name", "x"], "--cert, --key and --server-name go with --connect"),
    ],
)
def test_usage_errors_exit_2(pki: Path, args: list[str], message: str) -> None:
    proc = run(*args, cwd=pki, ok=False)
    assert proc.returncode == 2
    assert proc.stderr == f"mesh-identity: error: {message}\n"


@pytest.mark.e2e
def test_an_envoy_inbound_listener(tmp_path: Path) -> None:
    """A real sidecar's inbound listener presents its SVID and the intermediate; the client presents another
    identity of the mesh (the listener requires one)."""
    from tests.e2e.conftest import TRUST_DOMAIN, AuthorityIssuer, builtin_authority
    from tests.e2e.harness import loopback_mesh, start_mesh

    issuer = AuthorityIssuer(builtin_authority(tmp_path / "ca-state"))
    mesh = loopback_mesh(TRUST_DOMAIN, {"backend": []})
    client = issuer.issue(SpiffeId.for_kubernetes(TRUST_DOMAIN, "e2e", "frontend"))
    (tmp_path / "client").mkdir()
    (tmp_path / "client" / "svid.pem").write_bytes(client.cert_chain_pem())
    (tmp_path / "client" / "key.pem").write_bytes(client.key_pem())
    (tmp_path / "client" / "bundle.pem").write_bytes(issuer.bundle().pem())
    with start_mesh(issuer, mesh, tmp_path / "mesh") as running:
        inbound = running.inbound("backend")
        out = run(
            "inspect", "--connect", f"{inbound.host}:{inbound.port}", "--cert", "client/svid.pem",
            "--key", "client/key.pem", cwd=tmp_path,
        ).stdout  # fmt: skip
        served = running.svids[mesh.service("backend").identity]
    assert "presented:   2 certificate(s)" in out
    assert "SPIFFE ID:   spiffe://e2e.mesh/ns/e2e/sa/backend" in out
    assert f"serial:      {served.serial}" in out
    assert out.rstrip().endswith("verify:      OK against client/bundle.pem")
