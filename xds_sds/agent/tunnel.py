"""TLS to the control plane, checked for its SPIFFE ID.

The control plane's listeners present the X.509-SVID of ``spiffe://<td>/mesh-identity/xds``: a URI SAN, no
host name. grpcio's client checks a host name and offers no hook to check a SPIFFE ID instead, so the agent's
gRPC channels to the control plane speak plaintext HTTP/2 to a :class:`Tunnel`: a Unix socket in the agent's
private directory (0700) whose every connection the tunnel carries over TLS (1.2 or later, ALPN ``h2``) to the
control plane, after checking that the server's chain verifies against the trust bundle and that its leaf is an
X.509-SVID leaf with exactly one URI SAN, the expected ID. Anything else closes the connection (the gRPC call
fails ``UNAVAILABLE``) and :attr:`Tunnel.last_error` says why. No byte leaves the host outside TLS.

The TLS settings come from a function asked on every new connection, so a renewed client certificate or a new
trust bundle applies to the next connection.
"""

from __future__ import annotations

import asyncio
import logging
import os
import ssl
from collections.abc import Callable
from pathlib import Path

from cryptography import x509

from mesh_identity.spiffe import SpiffeId
from xds_sds.agent.config import Address
from xds_sds.agent.relay import CHUNK, close_all, pipe, shut
from xds_sds.protocol.auth import PeerError, check_leaf_profile, identity_of

log = logging.getLogger(__name__)

HANDSHAKE_TIMEOUT = 10.0


class TunnelError(Exception):
    """The control plane could not be reached over TLS, or did not prove to be the control plane."""


def client_context(roots_pem: bytes, certificate_file: Path | None = None) -> ssl.SSLContext:
    """TLS client settings: verify the server against ``roots_pem`` (its SPIFFE ID is checked by the tunnel, not
    its host name); present the chain and key in ``certificate_file`` (PEM, both in one file) when given."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.check_hostname = False  # an X.509-SVID names no host; the SPIFFE ID is checked instead
    context.verify_mode = ssl.CERT_REQUIRED
    context.load_verify_locations(cadata=roots_pem.decode("ascii"))
    context.set_alpn_protocols(["h2"])
    if certificate_file is not None:
        context.load_cert_chain(os.fspath(certificate_file))
    return context


def check_server(der: bytes | None, expected: SpiffeId) -> None:
    """TunnelError unless ``der`` is an X.509-SVID leaf of ``expected`` (the chain was verified by TLS)."""
    if not der:
        raise TunnelError("the server presented no certificate")
    try:
        leaf = x509.load_der_x509_certificate(der)
        check_leaf_profile(leaf)
        found = identity_of(leaf)
    except (ValueError, PeerError) as err:
        raise TunnelError(f"the server's certificate is not an X.509-SVID ({err})") from None
    if found != expected:
        raise TunnelError(f"the server presented the SVID of {found}, not {expected}")


class Tunnel:
    """Connections to the Unix socket ``path`` are carried over TLS to ``target`` (see the module docstring)."""

    def __init__(
        self, name: str, path: Path, target: Address, expected: SpiffeId, tls: Callable[[], ssl.SSLContext]
    ) -> None:
        self.name = name
        self.path = path
        self.target = target
        self.expected = expected
        self._tls = tls
        self._server: asyncio.AbstractServer | None = None
        self._open: set[asyncio.Task[None]] = set()
        self.last_error: str | None = None

    @property
    def address(self) -> str:
        """The gRPC target of the local end."""
        return f"unix:{self.path}"

    async def start(self) -> None:
        self._server = await asyncio.start_unix_server(self._accepted, path=os.fspath(self.path), limit=CHUNK)

    async def stop(self) -> None:
        server, self._server = self._server, None
        await shut(server, self._open, self.path)

    async def _accepted(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._open.add(task)
        upstream: asyncio.StreamWriter | None = None
        cancelled = False
        try:
            up_reader, upstream = await self._connect()
            self.last_error = None
            await asyncio.gather(pipe(reader, upstream), pipe(up_reader, writer))
        except TunnelError as err:
            self.last_error = str(err)
            log.warning("control plane %s at %s: %s", self.name, self.target, err)
        except asyncio.CancelledError:  # stop(): the server's callback must not see the cancellation
            cancelled = True
        finally:
            self._open.discard(task)
            await close_all((writer, upstream), abort=cancelled)

    async def _connect(self) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        try:
            context = self._tls()
        except (OSError, ValueError, ssl.SSLError) as err:
            raise TunnelError(f"no TLS settings: {err}") from None
        try:
            reader, writer = await asyncio.open_connection(
                self.target.host,
                self.target.port,
                ssl=context,
                ssl_handshake_timeout=HANDSHAKE_TIMEOUT,
                limit=CHUNK,
            )
        except ssl.SSLCertVerificationError as err:
            raise TunnelError(f"the server's certificate does not verify: {err.verify_message}") from None
        except (OSError, TimeoutError) as err:
            raise TunnelError(f"cannot connect: {err.strerror or err}") from None
        ssl_object = writer.get_extra_info("ssl_object")
        try:
            check_server(ssl_object.getpeercert(binary_form=True) if ssl_object is not None else None, self.expected)
        except TunnelError:
            writer.close()
            raise
        return reader, writer
