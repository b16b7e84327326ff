"""Real TLS handshakes on loopback between two SVIDs, each side reading the other's SPIFFE ID."""

from __future__ import annotations

import socket
import ssl
import threading
from collections.abc import Callable
from pathlib import Path

import pytest
from cryptography import x509

from mesh_identity.authority import Authority
from mesh_identity.spiffe import SpiffeId, TrustDomain
from mesh_identity.svid import X509Svid, spiffe_id_of


def _files(svid: X509Svid, directory: Path, bundle: bytes | None = None) -> tuple[Path, Path, Path]:
    directory.mkdir(parents=True, exist_ok=True)
    chain, key, ca = directory / "svid.pem", directory / "key.pem", directory / "bundle.pem"
    chain.write_bytes(svid.cert_chain_pem())
    key.write_bytes(svid.key_pem())
    ca.write_bytes(bundle if bundle is not None else svid.bundle.pem())
    return chain, key, ca


def _context(purpose: ssl.Purpose, files: tuple[Path, Path, Path]) -> ssl.SSLContext:
    chain, key, ca = files
    ctx = ssl.create_default_context(purpose, cafile=str(ca))
    ctx.load_cert_chain(str(chain), str(key))
    ctx.check_hostname = False  # SPIFFE: the peer is authenticated by its URI SAN, checked below
    ctx.verify_mode = ssl.CERT_REQUIRED
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    return ctx


def _peer_id(sock: ssl.SSLSocket) -> SpiffeId:
    der = sock.getpeercert(binary_form=True)
    assert der is not None
    return spiffe_id_of(x509.load_der_x509_certificate(der))


def _serve_once(server_ctx: ssl.SSLContext) -> tuple[int, dict[str, object], threading.Thread]:
    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]
    seen: dict[str, object] = {}

    def run() -> None:
        with listener:
            conn, _ = listener.accept()
            try:
                with server_ctx.wrap_socket(conn, server_side=True) as tls:
                    seen["peer"] = _peer_id(tls)
                    tls.sendall(tls.recv(100).upper())
            except (ssl.SSLError, OSError) as err:
                seen["error"] = err

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return port, seen, thread


def test_mutual_tls_between_two_svids(authority: Authority, tmp_path: Path) -> None:
    server_id = SpiffeId.for_kubernetes(authority.trust_domain, "default", "server")
    client_id = SpiffeId.for_kubernetes(authority.trust_domain, "default", "client")
    server = _files(authority.issue(server_id), tmp_path / "server")
    client = _files(authority.issue(client_id), tmp_path / "client")
    port, seen, thread = _serve_once(_context(ssl.Purpose.CLIENT_AUTH, server))
    with socket.create_connection(("127.0.0.1", port)) as raw:
        with _context(ssl.Purpose.SERVER_AUTH, client).wrap_socket(raw) as tls:
            assert _peer_id(tls) == server_id
            tls.sendall(b"ping")
            assert tls.recv(100) == b"PING"
    thread.join(5)
    assert seen == {"peer": client_id}


def test_foreign_ca_client_is_refused(
    authority: Authority, make_authority: Callable[..., Authority], tmp_path: Path
) -> None:
    foreign = make_authority(state_dir=tmp_path / "foreign-state")  # same trust domain name, other root
    server = _files(authority.issue(SpiffeId.parse("spiffe://example.org/server")), tmp_path / "server")
    # The foreign client trusts our root (so only the server side can refuse), but presents a foreign SVID.
    intruder = _files(
        foreign.issue(SpiffeId.parse("spiffe://example.org/client")),
        tmp_path / "intruder",
        bundle=authority.bundle().pem(),
    )
    port, seen, thread = _serve_once(_context(ssl.Purpose.CLIENT_AUTH, server))
    with socket.create_connection(("127.0.0.1", port)) as raw:
        with pytest.raises((ssl.SSLError, ConnectionResetError, BrokenPipeError)):
            with _context(ssl.Purpose.SERVER_AUTH, intruder).wrap_socket(raw) as tls:
                tls.sendall(b"ping")
                tls.recv(100)
    thread.join(5)
    assert "peer" not in seen
    assert "certificate verify failed" in str(seen["error"])


def test_client_without_certificate_is_refused(authority: Authority, tmp_path: Path) -> None:
    server = _files(authority.issue(SpiffeId.parse("spiffe://example.org/server")), tmp_path / "server")
    port, seen, thread = _serve_once(_context(ssl.Purpose.CLIENT_AUTH, server))
    ctx = ssl.create_default_context(cafile=str(server[2]))
    ctx.check_hostname = False
    with socket.create_connection(("127.0.0.1", port)) as raw:
        with pytest.raises((ssl.SSLError, ConnectionResetError, BrokenPipeError)):
            with ctx.wrap_socket(raw) as tls:
                tls.sendall(b"ping")
                tls.recv(100)
    thread.join(5)
    assert "peer" not in seen
    assert "peer did not return a certificate" in str(seen["error"])


def test_trust_domain_of_peer_is_checked_by_the_caller(authority: Authority) -> None:
    svid = authority.issue(SpiffeId.parse("spiffe://example.org/x"))
    assert spiffe_id_of(svid.leaf).member_of(TrustDomain("example.org"))
    assert not spiffe_id_of(svid.leaf).member_of(TrustDomain("other.org"))
