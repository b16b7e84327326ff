"""A TCP relay in front of the test API server that can go silent: :meth:`StallingRelay.stall` cuts the open
connections and then accepts new ones without ever answering (a server that hangs, or a network that drops
packets), :meth:`StallingRelay.resume` relays again. TLS passes through untouched (the server's certificate is
for 127.0.0.1, where the relay listens too)."""

from __future__ import annotations

import contextlib
import socket
import threading


class StallingRelay:
    def __init__(self, port: int) -> None:
        self.upstream = ("127.0.0.1", port)
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port: int = self._listener.getsockname()[1]
        self._lock = threading.Lock()
        self._sockets: set[socket.socket] = set()
        self._stalled = False
        self._closed = False
        self._thread = threading.Thread(target=self._accept, name="stalling-relay", daemon=True)

    def __enter__(self) -> StallingRelay:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._closed = True
        with contextlib.suppress(OSError):
            self._listener.shutdown(socket.SHUT_RDWR)
        self._listener.close()
        self._cut()
        self._thread.join(timeout=5)

    def stall(self) -> None:
        with self._lock:
            self._stalled = True
        self._cut()

    def resume(self) -> None:
        with self._lock:
            self._stalled = False
        self._cut()  # the held connections end: the client tries again, and is relayed

    def _cut(self) -> None:
        with self._lock:
            live, self._sockets = list(self._sockets), set()
        for sock in live:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
            sock.close()

    def _accept(self) -> None:
        while not self._closed:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            with self._lock:
                self._sockets.add(client)
                if self._stalled:
                    continue  # held open, never answered
            try:
                server = socket.create_connection(self.upstream, timeout=5)
            except OSError:
                client.close()
                continue
            server.settimeout(None)
            with self._lock:
                self._sockets.add(server)
            for source, sink in ((client, server), (server, client)):
                threading.Thread(target=self._pipe, args=(source, sink), daemon=True).start()

    @staticmethod
    def _pipe(source: socket.socket, sink: socket.socket) -> None:
        try:
            while data := source.recv(65536):
                sink.sendall(data)
        except OSError:
            pass
        finally:
            for sock in (source, sink):
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)
