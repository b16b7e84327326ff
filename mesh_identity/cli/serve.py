"""``serve``: the server of :func:`mesh_identity.compose.build` until SIGINT/SIGTERM; SIGHUP reloads the mesh.

The server: the rotation engine keeping every identity issued (the config's, and the workload registry's with a
mesh), the metrics/status/admin endpoint, and with a mesh the xDS server. Its URL goes to
``<state_dir>/admin.addr``, its admin token to ``<state_dir>/admin.token``, the xDS address to
``<state_dir>/xds.addr``.
"""

from __future__ import annotations

import argparse
import logging
import queue
import signal
from types import FrameType

from mesh_identity.cli.common import build_for
from mesh_identity.compose import Stage
from mesh_identity.server.service import ADMIN_TOKEN


def cmd_serve(args: argparse.Namespace) -> int:
    if not args.debug:
        logging.getLogger("mesh_identity").setLevel(logging.INFO)
    system = build_for(args, Stage.SERVER, create=True)
    service = system.service
    assert service is not None  # built at Stage.SERVER
    signals: queue.SimpleQueue[int] = queue.SimpleQueue()

    def on_signal(signum: int, frame: FrameType | None) -> None:
        signals.put(signum)  # SimpleQueue.put is safe in a signal handler

    handled = [signal.SIGINT, signal.SIGTERM, *([signal.SIGHUP] if system.registry is not None else [])]
    previous = {sig: signal.signal(sig, on_signal) for sig in handled}
    try:
        try:
            service.start()
        except BaseException:
            service.stop()
            raise
        try:
            state = service.config.state_dir
            if service.provider.created:
                print(f"created CA state in {state}")
            count = len(service.engine)
            print(
                f"serving {count} identit{'y' if count == 1 else 'ies'} of {service.config.trust_domain} "
                f"(provider {service.provider.name}, {service.config.ca.mode.value} mode)"
            )
            print(f"  metrics, health and status at {service.url} (admin token in {state / ADMIN_TOKEN})", flush=True)
            if system.xds is not None:
                print(f"  {system.xds.summary()}", flush=True)
            while signals.get() == signal.SIGHUP:
                service.reload()
        finally:
            service.stop()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    print("stopped")
    return 0


def add_parsers(sub: argparse._SubParsersAction[argparse.ArgumentParser], common: argparse.ArgumentParser) -> None:
    p = sub.add_parser(
        "serve",
        parents=[common],
        help="run the authority, rotation engine, metrics/status endpoint and (with a mesh file) the xDS server",
    )
    p.set_defaults(func=cmd_serve)
