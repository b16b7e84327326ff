"""The xDS server's own TLS material, reloadable while the server runs.

gRPC asks :meth:`ServerTls.credentials`' fetcher on every new handshake whether the certificate changed, so a
rotated server certificate (or a trust bundle with a new root) applies to the next connection without a
restart. Client certificates are always required: there is no way to build credentials without them.

New roots only reach new handshakes, so the roots are also kept parsed (:attr:`ServerTls.client_roots`) for the
discovery server to check every new stream against, and :meth:`ServerTls.on_roots_changed` tells it when they
change (root rotation retires a root): it then ends the streams whose peer no longer chains to them.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import cast

import grpc
from cryptography import x509

from mesh_identity.svid import X509Svid, load_certs_pem

RootsListener = Callable[[tuple[x509.Certificate, ...]], None]


class ServerTls:
    """The server's certificate chain and key, and the roots client certificates must chain to."""

    def __init__(self, cert_chain_pem: bytes, key_pem: bytes, client_roots_pem: bytes) -> None:
        self._lock = threading.Lock()
        self._generation = 0
        self._served = -1
        self._material = (cert_chain_pem, key_pem, client_roots_pem)
        self._roots = load_certs_pem(client_roots_pem, "the client roots")
        self._listeners: dict[int, RootsListener] = {}
        self._next_listener = 0

    @classmethod
    def from_svid(cls, svid: X509Svid) -> ServerTls:
        """From the server's own SVID; client certificates must chain to the SVID's bundle."""
        return cls(svid.cert_chain_pem(), svid.key_pem(), svid.bundle.pem())

    def update(self, cert_chain_pem: bytes, key_pem: bytes, client_roots_pem: bytes | None = None) -> None:
        """Use a new certificate (and optionally new client roots) for the next handshakes."""
        self._replace(cert_chain_pem, key_pem, client_roots_pem)

    def update_svid(self, svid: X509Svid) -> None:
        self.update(svid.cert_chain_pem(), svid.key_pem(), svid.bundle.pem())

    def update_roots(self, client_roots_pem: bytes) -> None:
        """Trust a new set of roots for client certificates (root rotation): next handshakes use them, and the
        :meth:`on_roots_changed` listeners are told (in this thread) when they differ from the previous ones."""
        self._replace(None, None, client_roots_pem)

    def _replace(self, chain: bytes | None, key: bytes | None, roots_pem: bytes | None) -> None:
        parsed = None if roots_pem is None else load_certs_pem(roots_pem, "the client roots")
        with self._lock:
            old_chain, old_key, old_roots = self._material
            self._material = (
                old_chain if chain is None else chain,
                old_key if key is None else key,
                old_roots if roots_pem is None else roots_pem,
            )
            self._generation += 1
            changed = parsed is not None and parsed != self._roots
            if parsed is not None:
                self._roots = parsed
            listeners = list(self._listeners.values()) if changed else []
        for listener in listeners:
            listener(parsed or ())

    @property
    def client_roots(self) -> tuple[x509.Certificate, ...]:
        """The roots client certificates must chain to now."""
        with self._lock:
            return self._roots

    def on_roots_changed(self, listener: RootsListener) -> Callable[[], None]:
        """Call ``listener`` with the new roots after each change of them; returns an unsubscribe."""
        with self._lock:
            key = self._next_listener
            self._next_listener += 1
            self._listeners[key] = listener

        def cancel() -> None:
            with self._lock:
                self._listeners.pop(key, None)

        return cancel

    @property
    def generation(self) -> int:
        """How many times the material changed; :meth:`served_generation` tells which one is in use."""
        with self._lock:
            return self._generation

    @property
    def served_generation(self) -> int:
        """The generation the last handshake used (-1 before the first handshake)."""
        with self._lock:
            return self._served

    def credentials(self) -> grpc.ServerCredentials:
        """Dynamic gRPC server credentials that require and verify a client certificate."""
        with self._lock:
            initial = self._configuration()
            self._served = self._generation
        fetch = cast(Callable[[], grpc.ServerCertificateConfiguration], self._fetch)  # None: keep the current one
        return grpc.dynamic_ssl_server_credentials(initial, fetch, require_client_authentication=True)

    def _configuration(self) -> grpc.ServerCertificateConfiguration:
        chain, key, roots = self._material
        return grpc.ssl_server_certificate_configuration([(key, chain)], root_certificates=roots)

    def _fetch(self) -> grpc.ServerCertificateConfiguration | None:
        with self._lock:
            if self._served == self._generation:
                return None
            self._served = self._generation
            return self._configuration()
