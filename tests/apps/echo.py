"""A small TCP app for TCP services in the demo mesh and the end-to-end tests: it echoes what it receives.

It listens in plaintext on loopback behind its sidecar (stdlib ``socketserver``, in a thread) and sends every
chunk it reads straight back until the client closes. :func:`echo` is the client side.
"""

from __future__ import annotations

import socket
import socketserver

from mesh_identity.demo.threaded import ThreadedApp
from mesh_identity.mesh.model import Address


def echo(address: Address, payload: bytes, timeout: float = 5.0) -> bytes:
    """Connect, send ``payload``, half-close, and return everything received until the server closes.

    A connection the far side refuses or cuts answers ``b""`` (what a denied TCP client sees), so a caller can
    tell "echoed" from "closed" by the value alone.
    """
    chunks = []
    with socket.create_connection((address.host, address.port), timeout=timeout) as connection:
        try:
            connection.sendall(payload)
            connection.shutdown(socket.SHUT_WR)
            while chunk := connection.recv(65536):
                chunks.append(chunk)
        except ConnectionResetError:
            return b""
    return b"".join(chunks)


class EchoApp(ThreadedApp):
    """The app of one TCP service."""

    def __init__(self, service: str, address: Address) -> None:
        self.service = service
        super().__init__(_Server((address.host, address.port), _Echo), f"echo-{service}")


class _Server(socketserver.ThreadingTCPServer):
    allow_reuse_address = True
    daemon_threads = True


class _Echo(socketserver.BaseRequestHandler):
    def handle(self) -> None:
        connection: socket.socket = self.request
        while chunk := connection.recv(65536):
            connection.sendall(chunk)
