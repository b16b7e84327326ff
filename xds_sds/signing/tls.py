"""The attestation listener's TLS: the control plane's own certificate, reloadable, and no client certificate.

Why this one listener takes no client certificate: its callers have none yet. A node agent on its first start
(or after its SVID expired in a long outage), and a pod's agent that holds only its projected service-account
token, have no certificate that chains to the trust bundle: what they hold is a credential *in the request* (a
one-time join token, a Kubernetes token), which the server checks itself (the join token store, TokenReview).
TLS here authenticates the server to them (they check the control plane's certificate against the bundle they
were given) and keeps the credential and the CSR confidential on the wire. The credential buys one thing, the
caller's own first SVID; everything else (renewals, workload SVIDs, JWT-SVIDs, the bundle) is served on the
signing listener, which requires a client certificate (:class:`~xds_sds.protocol.credentials.ServerTls`), and
every RPC but ``Attest`` is refused here.

Like :class:`~xds_sds.protocol.credentials.ServerTls`, gRPC asks :meth:`AttestTls.credentials`' fetcher on every
new handshake whether the certificate changed, so a rotated control-plane certificate applies to the next
connection without a restart.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import cast

import grpc

from mesh_identity.svid import X509Svid


class AttestTls:
    """The server's certificate chain and key for the attestation listener (server-authenticated TLS)."""

    def __init__(self, cert_chain_pem: bytes, key_pem: bytes) -> None:
        self._lock = threading.Lock()
        self._generation = 0
        self._served = -1
        self._material = (cert_chain_pem, key_pem)

    @classmethod
    def from_svid(cls, svid: X509Svid) -> AttestTls:
        return cls(svid.cert_chain_pem(), svid.key_pem())

    def update_svid(self, svid: X509Svid) -> None:
        """Present ``svid`` from the next handshake on."""
        with self._lock:
            self._material = (svid.cert_chain_pem(), svid.key_pem())
            self._generation += 1

    @property
    def served_generation(self) -> int:
        """The generation the last handshake used (-1 before the first); :meth:`update_svid` adds one."""
        with self._lock:
            return self._served

    def credentials(self) -> grpc.ServerCredentials:
        """Dynamic gRPC server credentials that ask for no client certificate (no client roots are given)."""
        with self._lock:
            initial = self._configuration()
            self._served = self._generation
        fetch = cast(Callable[[], grpc.ServerCertificateConfiguration], self._fetch)  # None: keep the current one
        return grpc.dynamic_ssl_server_credentials(initial, fetch, require_client_authentication=False)

    def _configuration(self) -> grpc.ServerCertificateConfiguration:
        chain, key = self._material
        return grpc.ssl_server_certificate_configuration([(key, chain)], root_certificates=None)

    def _fetch(self) -> grpc.ServerCertificateConfiguration | None:
        with self._lock:
            if self._served == self._generation:
                return None
            self._served = self._generation
            return self._configuration()
