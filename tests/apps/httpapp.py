"""The demo HTTP app as a container's process, for the pod runner: ``python -m tests.apps.httpapp NAME HOST:PORT``.

It answers every GET with JSON naming itself and the caller's SPIFFE ID from ``x-forwarded-client-cert``
(:class:`mesh_identity.demo.apps.DemoApp`), prints ``listening on HOST:PORT`` once it does, and exits on SIGTERM.
An unmodified app: it knows nothing of the mesh, its sidecar or TLS.
"""

from __future__ import annotations

import signal
import sys
import threading

from mesh_identity.demo.apps import DemoApp
from mesh_identity.mesh.model import Address


def main(argv: list[str]) -> int:
    if len(argv) != 2 or ":" not in argv[1]:
        print("usage: python -m tests.apps.httpapp NAME HOST:PORT", file=sys.stderr)
        return 2
    host, _, port = argv[1].rpartition(":")
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    with DemoApp(argv[0], Address(host, int(port))) as app:
        print(f"listening on {app.address}", flush=True)
        stop.wait()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
