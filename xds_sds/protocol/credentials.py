"""The xDS server's own TLS material, reloadable while the server runs.

gRPC asks :meth:`ServerTls.credentials`' fetcher on every new handshake whether the certificate changed, so a
rotated server certificate (or a trust bundle with a new root) applies to the next connection without a
restart. Client certificates are always required: there is no way to build credentials without them.
"""

from __future__ import annotations

import threading

import grpc

from mesh_identity.svid import X509Svid


class ServerTls:
    """The server's certificate chain and key, and the roots client certificates must chain to."""

    def __init__(self, cert_chain_pem: bytes, key_pem: bytes, client_roots_pem: bytes) -> None:
        self._lock = threading.Lock()
        self._generation = 0
        self._served = -1
        self._material = (cert_chain_pem, key_pem, client_roots_pem)

    @classmethod
    def from_svid(cls, svid: X509Svid) -> ServerTls:
        """From the server's own SVID; client certificates must chain to the SVID's bundle."""
        return cls(svid.cert_chain_pem(), svid.key_pem(), svid.bundle.pem())

    def update(self, cert_chain_pem: bytes, key_pem: bytes, client_roots_pem: bytes | None = None) -> None:
        """Use a new certificate (and optionally new client roots) for the next handshakes."""
        with self._lock:
            roots = self._material[2] if client_roots_pem is None else client_roots_pem
            self._material = (cert_chain_pem, key_pem, roots)
            self._generation += 1

    def update_svid(self, svid: X509Svid) -> None:
        self.update(svid.cert_chain_pem(), svid.key_pem(), svid.bundle.pem())

    def update_roots(self, client_roots_pem: bytes) -> None:
        """Trust a new set of roots for client certificates (root rotation)."""
        with self._lock:
            self._material = (self._material[0], self._material[1], client_roots_pem)
            self._generation += 1

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
        return grpc.dynamic_ssl_server_credentials(initial, self._fetch, require_client_authentication=True)

    def _configuration(self) -> grpc.ServerCertificateConfiguration:
        chain, key, roots = self._material
        return grpc.ssl_server_certificate_configuration([(key, chain)], root_certificates=roots)

    def _fetch(self) -> grpc.ServerCertificateConfiguration | None:
        with self._lock:
            if self._served == self._generation:
                return None
            self._served = self._generation
            return self._configuration()
