"""A signing API client for tests: real gRPC channels over TLS through the generated stub, and CSRs (good ones,
and ones with each defect the server must refuse)."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import ssl
import subprocess
import tempfile
import threading
from collections.abc import Sequence
from pathlib import Path

import grpc
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID, ObjectIdentifier

from mesh_identity.svid import X509Svid, certs_pem, spiffe_ids_of
from tests.pki import SERVER_NAME, key_pem
from xds_sds.proto import signing_pb2, signing_pb2_grpc

DER = serialization.Encoding.DER


def channel(
    target: str,
    roots_pem: bytes,
    svid: X509Svid | None = None,
    key: ec.EllipticCurvePrivateKey | None = None,
    cert_chain: Sequence[bytes] = (),
) -> grpc.Channel:
    """A TLS channel to ``target`` that checks the server against ``roots_pem`` (as ``localhost``); with a client
    certificate from ``svid`` (or from ``key`` and a DER ``cert_chain`` an Attest returned)."""
    if svid is not None:
        creds = grpc.ssl_channel_credentials(roots_pem, svid.key_pem(), svid.cert_chain_pem())
    elif key is not None:
        chain_pem = certs_pem(x509.load_der_x509_certificate(c) for c in cert_chain)
        creds = grpc.ssl_channel_credentials(roots_pem, key_pem(key), chain_pem)
    else:
        creds = grpc.ssl_channel_credentials(roots_pem)
    return grpc.secure_channel(target, creds, options=[("grpc.ssl_target_name_override", SERVER_NAME)])


def stub(ch: grpc.Channel) -> signing_pb2_grpc.SigningStub:
    return signing_pb2_grpc.SigningStub(ch)


def new_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def csr(
    key: ec.EllipticCurvePrivateKey,
    uris: Sequence[str] = (),
    dns: Sequence[str] = (),
    padding: int = 0,
) -> bytes:
    """A DER CSR signed by ``key`` with ``uris`` and ``dns`` as SANs (none: no SAN extension) and, with
    ``padding``, an unknown extension of that many bytes (an oversized but well-formed request)."""
    builder = x509.CertificateSigningRequestBuilder().subject_name(
        x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "test")])
    )
    names: list[x509.GeneralName] = [x509.UniformResourceIdentifier(u) for u in uris]
    names += [x509.DNSName(d) for d in dns]
    if names:
        builder = builder.add_extension(x509.SubjectAlternativeName(names), critical=False)
    if padding:
        oid = ObjectIdentifier("1.3.6.1.4.1.99999.1")
        builder = builder.add_extension(
            x509.UnrecognizedExtension(oid, b"\x04\x82" + padding.to_bytes(2) + b"p" * padding), critical=False
        )
    return builder.sign(key, hashes.SHA256()).public_bytes(DER)


def corrupt_signature(der: bytes) -> bytes:
    """``der`` with one byte of its signature value changed: still a well-formed CSR, no longer signed by its key.
    The ECDSA signature is the last element: ``SEQUENCE { r INTEGER, s INTEGER }``; a byte inside ``s`` flips."""
    data = bytearray(der)
    data[-3] ^= 0x01
    return bytes(data)


def attest_join(
    attest: signing_pb2_grpc.SigningStub, token: str, request: bytes, timeout: float = 30
) -> signing_pb2.X509Response:
    response: signing_pb2.X509Response = attest.Attest(
        signing_pb2.AttestRequest(join_token=token, csr=request), timeout=timeout
    )
    return response


def openssl_verify(tmp_path: Path, response: signing_pb2.X509Response, name: str = "chain") -> str:
    """``openssl verify`` of the leaf a response carries, through its intermediates, to its bundle's roots."""
    leaf, *intermediates = (x509.load_der_x509_certificate(c) for c in response.cert_chain)
    roots = [x509.load_der_x509_certificate(r) for r in response.bundle.x509_authorities]
    (tmp_path / f"{name}-leaf.pem").write_bytes(leaf.public_bytes(serialization.Encoding.PEM))
    (tmp_path / f"{name}-untrusted.pem").write_bytes(certs_pem(intermediates))
    (tmp_path / f"{name}-roots.pem").write_bytes(certs_pem(roots))
    result = subprocess.run(
        [
            "openssl",
            "verify",
            "-x509_strict",
            "-purpose",
            "sslclient",
            "-CAfile",
            str(tmp_path / f"{name}-roots.pem"),
            "-untrusted",
            str(tmp_path / f"{name}-untrusted.pem"),
            str(tmp_path / f"{name}-leaf.pem"),
        ],
        capture_output=True,
        text=True,
        check=False,
    )
    return result.stdout + result.stderr


def presented_certificate(target: str, roots_pem: bytes, svid: X509Svid | None = None) -> x509.Certificate:
    """The certificate a listener presents in a TLS handshake (checked against ``roots_pem``, without a host
    name check: the caller checks the SPIFFE ID), as a client with ``svid``'s certificate or with none."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.load_verify_locations(cadata=roots_pem.decode())
    context.set_alpn_protocols(["h2"])
    with tempfile.TemporaryDirectory() as directory:
        if svid is not None:
            chain, key = Path(directory) / "chain.pem", Path(directory) / "key.pem"
            chain.write_bytes(svid.cert_chain_pem())
            key.write_bytes(svid.key_pem())
            context.load_cert_chain(chain, key)
        host, port = target.rsplit(":", 1)
        with socket.create_connection((host, int(port)), timeout=10) as sock, context.wrap_socket(sock) as tls:
            der = tls.getpeercert(binary_form=True)
    assert der is not None
    return x509.load_der_x509_certificate(der)


class TlsRelay:
    """A loopback TCP port whose every connection is carried over TLS to ``upstream``, after the server's chain
    verified against ``roots_pem`` and its certificate proved to carry the SPIFFE ID ``expected``: how a test's
    gRPC client reaches a listener that presents only a SPIFFE ID (grpcio's client checks a host name, and has no
    hook for a SPIFFE ID). ``client`` is the client certificate to present (None: none). Connections whose server
    does not verify are closed; :attr:`errors` says why. One asyncio loop in a thread carries every connection
    (an ``ssl`` socket must not be read and written from two threads at once)."""

    def __init__(self, upstream: str, roots_pem: bytes, expected: str, client: X509Svid | None = None) -> None:
        self.upstream = upstream
        self.expected = expected
        self.errors: list[str] = []
        self._context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        self._context.check_hostname = False  # the SPIFFE ID is checked instead, below
        self._context.load_verify_locations(cadata=roots_pem.decode())
        self._context.set_alpn_protocols(["h2"])
        with tempfile.TemporaryDirectory() as directory:
            if client is not None:
                chain, key = Path(directory) / "chain.pem", Path(directory) / "key.pem"
                chain.write_bytes(client.cert_chain_pem())
                key.write_bytes(client.key_pem())
                self._context.load_cert_chain(chain, key)
        self._loop = asyncio.new_event_loop()
        self._server = self._loop.run_until_complete(asyncio.start_server(self._carry, "127.0.0.1", 0))
        self.target = f"127.0.0.1:{self._server.sockets[0].getsockname()[1]}"
        self._tasks: set[asyncio.Task[None]] = set()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._thread.start()

    async def _carry(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        host, port = self.upstream.rsplit(":", 1)
        writers = [writer]
        try:
            up_reader, up_writer = await asyncio.open_connection(host, int(port), ssl=self._context, server_hostname="")
            writers.append(up_writer)
            der = up_writer.get_extra_info("ssl_object").getpeercert(binary_form=True)
            named = [str(i) for i in spiffe_ids_of(x509.load_der_x509_certificate(der or b""))]
            if named != [self.expected]:
                self.errors.append(f"the server is {named}, not {self.expected}")
                return
            await asyncio.gather(_pump(reader, up_writer), _pump(up_reader, writer))
        except (OSError, ValueError) as err:
            self.errors.append(str(err))
        finally:
            for each in writers:
                each.transport.abort()  # at once: no TLS close_notify to wait for
            for each in writers:
                with contextlib.suppress(OSError, asyncio.CancelledError):
                    await each.wait_closed()
            self._tasks.discard(task)

    def close(self) -> None:
        async def stop() -> None:
            self._server.close()
            for task in list(self._tasks):
                task.cancel()
            await asyncio.gather(*self._tasks, return_exceptions=True)

        asyncio.run_coroutine_threadsafe(stop(), self._loop).result(timeout=30)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join()
        self._loop.close()


async def _pump(source: asyncio.StreamReader, sink: asyncio.StreamWriter) -> None:
    """Copy until the end of ``source``, then end ``sink``'s half (or close it, when it has no half-close)."""
    try:
        while data := await source.read(65536):
            sink.write(data)
            await sink.drain()
        if sink.can_write_eof():
            sink.write_eof()
        else:
            sink.close()
    except OSError:
        sink.close()
