"""A TLS handshake that returns every certificate the server presented, in the order sent.

pyOpenSSL, because it gives the whole presented chain (``get_peer_cert_chain``); the standard library gives
the leaf only. Nothing is verified here: the peer is a SPIFFE identity, not a web host name, and the caller
checks the chain against a SPIFFE bundle. The client certificate (an SVID with its key) stays in memory.
The same handshake as ``mesh-identity inspect --connect`` (:mod:`mesh_identity.cli.certs`), for callers that
hold an SVID rather than files.
"""

from __future__ import annotations

import contextlib
import select
import socket
import time

from cryptography import x509
from OpenSSL import SSL

from mesh_identity.errors import MeshIdentityError
from mesh_identity.mesh.model import Address
from mesh_identity.svid import X509Svid


class HandshakeError(MeshIdentityError):
    """The endpoint cannot be reached, or the TLS handshake with it failed."""


def presented_chain(
    address: Address, *, client: X509Svid | None = None, timeout: float = 5.0
) -> list[x509.Certificate]:
    """Connect to ``address``, present ``client`` (when given), complete the handshake and return the chain the
    server presented (leaf first); HandshakeError naming the endpoint and the reason otherwise."""
    context = SSL.Context(SSL.TLS_CLIENT_METHOD)
    context.set_min_proto_version(SSL.TLS1_2_VERSION)
    context.set_verify(SSL.VERIFY_NONE)
    if client is not None:
        if client.private_key is None:
            raise ValueError(f"the client SVID of {client.spiffe_id} has no private key")
        context.use_certificate(client.leaf)
        for cert in client.chain:
            context.add_extra_chain_cert(cert)
        context.use_privatekey(client.private_key)
        context.check_privatekey()
    try:
        sock = socket.create_connection((address.host, address.port), timeout=timeout)
    except OSError as err:
        raise HandshakeError(f"cannot connect to {address}: {os_reason(err)}") from None
    with sock:
        conn = SSL.Connection(context, sock)
        conn.set_connect_state()
        deadline = time.monotonic() + timeout
        while True:
            try:
                conn.do_handshake()
                break
            except (SSL.WantReadError, SSL.WantWriteError) as want:
                remaining = deadline - time.monotonic()
                reading = isinstance(want, SSL.WantReadError)
                ready = select.select([sock] if reading else [], [] if reading else [sock], [], max(remaining, 0))
                if remaining <= 0 or not any(ready):
                    raise HandshakeError(f"TLS handshake with {address} timed out after {timeout:g}s") from None
            except SSL.Error as err:
                raise HandshakeError(f"TLS handshake with {address} failed: {tls_reason(err)}") from None
            except OSError as err:
                raise HandshakeError(f"TLS handshake with {address} failed: {os_reason(err)}") from None
        chain = conn.get_peer_cert_chain(as_cryptography=True) or []
        with contextlib.suppress(SSL.Error, OSError):
            conn.shutdown()
    return list(chain)


def os_reason(err: OSError) -> str:
    if isinstance(err, ConnectionRefusedError):
        return "connection refused"
    if isinstance(err, TimeoutError | socket.timeout):
        return "timed out"
    if isinstance(err, socket.gaierror):
        return f"name not resolved ({err.strerror})"
    return err.strerror or str(err)


def tls_reason(err: SSL.Error) -> str:
    """OpenSSL's reasons (``[(lib, func, reason), ...]``), or the system call's error, as one short text."""
    if isinstance(err, SSL.SysCallError):
        code, text = (*err.args, None, None)[:2]
        return "the connection closed during the handshake" if code in (-1, 0) else str(text or code)
    if isinstance(err, SSL.ZeroReturnError):
        return "the connection closed during the handshake"
    reasons = [str(item[2]) for item in (err.args[0] if err.args and isinstance(err.args[0], list) else []) if item]
    return "; ".join(reasons) or type(err).__name__
