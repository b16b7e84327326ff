"""The lifecycle the demo's apps share: a ``socketserver`` server run from a daemon thread."""

from __future__ import annotations

import socketserver
import threading
from typing import Self

from mesh_identity.mesh.model import Address


class ThreadedApp:
    """Serves ``server`` from a daemon thread named ``thread_name``: :meth:`start`, :meth:`stop`, or ``with``."""

    def __init__(self, server: socketserver.TCPServer, thread_name: str) -> None:
        self._server = server
        self._thread_name = thread_name
        self._thread: threading.Thread | None = None

    @property
    def address(self) -> Address:
        host, port = self._server.server_address[:2]
        return Address(str(host), int(port))

    def start(self) -> Self:
        self._thread = threading.Thread(target=self._server.serve_forever, name=self._thread_name, daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        if self._thread is not None:
            self._thread.join()

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
