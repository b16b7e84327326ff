"""A TCP relay for tests: a loopback port that forwards every connection to a target, and can be cut.

:meth:`Relay.stop` closes the listening socket and every connection through it (both ends see them close, as
on a network cut); :meth:`Relay.start` opens the same port again. A sidecar whose bootstrap names the relay as
its xDS server is cut off from the control plane while the relay is stopped, and nothing else about it changes.
"""

from __future__ import annotations

import contextlib
import selectors
import socket
import threading

from mesh_identity.mesh.model import Address
from tests.e2e.harness import free_port


class Relay:
    def __init__(self, target: Address, host: str = "127.0.0.1") -> None:
        self.target = target
        self.address = Address(host, free_port(host))
        self._listener: socket.socket | None = None
        self._sockets: set[socket.socket] = set()
        self._threads: list[threading.Thread] = []
        self._lock = threading.Lock()
        self.connections = 0

    def start(self) -> Relay:
        listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind((self.address.host, self.address.port))
        listener.listen(64)
        self._listener = listener
        thread = threading.Thread(target=self._accept, args=(listener,), name="relay-accept", daemon=True)
        thread.start()
        self._threads.append(thread)
        return self

    def _accept(self, listener: socket.socket) -> None:
        while True:
            try:
                client, _ = listener.accept()
            except OSError:
                return  # closed by stop()
            try:
                upstream = socket.create_connection((self.target.host, self.target.port), timeout=5)
            except OSError:
                client.close()
                continue
            with self._lock:
                self._sockets.update((client, upstream))
                self.connections += 1
            thread = threading.Thread(target=self._pump, args=(client, upstream), name="relay-pump", daemon=True)
            thread.start()
            self._threads.append(thread)

    def _pump(self, a: socket.socket, b: socket.socket) -> None:
        peers = {a: b, b: a}
        with selectors.DefaultSelector() as selector:
            for sock in peers:
                sock.setblocking(True)
                selector.register(sock, selectors.EVENT_READ)
            open_ends = 2
            while open_ends:
                try:
                    events = selector.select(timeout=1.0)
                except (OSError, ValueError):
                    break
                if not events and (a.fileno() < 0 or b.fileno() < 0):
                    break
                for key, _ in events:
                    sock: socket.socket = key.fileobj  # type: ignore[assignment]
                    try:
                        data = sock.recv(65536)
                    except OSError:
                        data = b""
                    if not data:
                        open_ends = 0
                        break
                    try:
                        peers[sock].sendall(data)
                    except OSError:
                        open_ends = 0
                        break
        for sock in (a, b):
            self._close(sock)

    def _close(self, sock: socket.socket) -> None:
        with contextlib.suppress(OSError):
            sock.shutdown(socket.SHUT_RDWR)
        with contextlib.suppress(OSError):
            sock.close()
        with self._lock:
            self._sockets.discard(sock)

    def stop(self) -> None:
        listener, self._listener = self._listener, None
        if listener is not None:
            with contextlib.suppress(OSError):
                listener.shutdown(socket.SHUT_RDWR)
            listener.close()
        with self._lock:
            sockets = list(self._sockets)
        for sock in sockets:
            self._close(sock)
        for thread in self._threads:
            thread.join(10)
        self._threads = [t for t in self._threads if t.is_alive()]

    @property
    def running(self) -> bool:
        return self._listener is not None
