"""A TLS server for tests that presents a chosen chain, as a sidecar's inbound listener does.

It requires a client certificate that chains to ``roots`` (as Envoy's inbound listener does), records the
SPIFFE ID each client presented, and closes each connection after the handshake. :meth:`TlsServer.serve`
swaps the chain it presents (the next handshake uses it). Real sockets, real handshakes (the stdlib ``ssl``).
"""

from __future__ import annotations

import contextlib
import socket
import ssl
import threading
from pathlib import Path

from cryptography import x509

from mesh_identity.mesh.model import Address
from mesh_identity.svid import X509Svid, certs_pem, spiffe_id_of
from tests.e2e.harness import free_address


class TlsServer:
    def __init__(self, directory: Path, roots: bytes) -> None:
        self.directory = directory
        self.roots = roots
        self.address: Address = free_address()
        self.clients: list[str] = []
        self._context: ssl.SSLContext | None = None
        self._sock: socket.socket | None = None
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()

    def serve(self, svid: X509Svid, *, chain: tuple[x509.Certificate, ...] | None = None) -> TlsServer:
        """Present ``svid``'s leaf and ``chain`` (default: its own intermediates) from the next handshake on."""
        self.directory.mkdir(parents=True, exist_ok=True)
        certs = self.directory / "chain.pem"
        key = self.directory / "key.pem"
        certs.write_bytes(certs_pem((svid.leaf, *(svid.chain if chain is None else chain))))
        key.write_bytes(svid.key_pem())
        key.chmod(0o600)
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(certs, key)
        context.verify_mode = ssl.CERT_REQUIRED
        context.load_verify_locations(cadata=self.roots.decode())
        with self._lock:
            self._context = context
        return self

    def start(self) -> TlsServer:
        sock = socket.create_server((self.address.host, self.address.port))
        self._sock = sock
        self._thread = threading.Thread(target=self._accept, args=(sock,), name="tls-server", daemon=True)
        self._thread.start()
        return self

    def _accept(self, sock: socket.socket) -> None:
        while True:
            try:
                raw, _ = sock.accept()
            except OSError:
                return
            with self._lock:
                context = self._context
            assert context is not None, "serve() a chain before the first connection"
            with raw, contextlib.suppress(OSError):
                raw.settimeout(10)
                with context.wrap_socket(raw, server_side=True) as tls:
                    der = tls.getpeercert(binary_form=True)
                    if der is not None:
                        self.clients.append(str(spiffe_id_of(x509.load_der_x509_certificate(der))))

    def stop(self) -> None:
        sock, self._sock = self._sock, None
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)  # wakes the accept() of the thread
            sock.close()
        if self._thread is not None:
            self._thread.join(10)
