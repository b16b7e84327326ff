"""Running the agent as a program: ``mesh-identity agent --config FILE`` and ``python -m xds_sds.agent --config FILE``.

Both end here. The second form loads the agent alone, not the whole ``mesh-identity`` command line (whose
``main`` imports every command, the demo included): it starts in well under half the time and holds less memory,
which matters for a process that runs on every host (or in every pod). Errors are one line on stderr (exit 2
for a bad config, 1 otherwise), as everywhere in the CLI; a traceback only with ``--debug``.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import sys
from collections.abc import Sequence
from pathlib import Path

from mesh_identity.errors import ConfigError, InvalidSpiffeIdError, MeshIdentityError
from xds_sds.agent.config import AgentConfig, load_agent_config
from xds_sds.agent.service import Agent, run

CONFIG_ENV = "MESH_IDENTITY_AGENT_CONFIG"


def describe(agent: Agent) -> None:
    """What the agent serves, on stdout, once it listens."""
    config = agent.config
    print(f"agent of host {config.host} ({config.trust_domain}), {len(config.identities)} identities", flush=True)
    if config.sds_socket is not None:
        print(f"  SDS for Envoy on {config.sds_socket}", flush=True)
    if config.workload_socket is not None:
        print(
            f"  SPIFFE Workload API on {config.workload_socket} (SPIFFE_ENDPOINT_SOCKET=unix://{config.workload_socket})"
        )
    if agent.metrics_url is not None:
        print(f"  metrics and health at {agent.metrics_url}", flush=True)


async def _serve(config: AgentConfig) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    try:
        await run(config, stop, describe)
    finally:
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(sig)


def serve(config_file: Path, *, debug: bool = False) -> int:
    """Run the agent of ``config_file`` until SIGINT or SIGTERM; 0 when it stopped on one."""
    if not debug:
        logging.getLogger("xds_sds.agent").setLevel(logging.INFO)
    asyncio.run(_serve(load_agent_config(config_file)))
    print("stopped", flush=True)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m xds_sds.agent``."""
    parser = argparse.ArgumentParser(prog="python -m xds_sds.agent", description="the mesh-identity node agent")
    parser.add_argument("--config", "-c", metavar="FILE", help=f"the agent config file (default: ${CONFIG_ENV})")
    parser.add_argument("--debug", action="store_true", help="show tracebacks and debug logs")
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.debug else logging.WARNING,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    try:
        path = args.config or config_from_env()
        return serve(Path(path), debug=args.debug)
    except KeyboardInterrupt:
        return 130
    except MeshIdentityError as err:
        if args.debug:
            raise
        print(f"mesh-identity agent: error: {err}", file=sys.stderr)
        return 2 if isinstance(err, ConfigError | InvalidSpiffeIdError) else 1


def config_from_env() -> str:
    """The agent config file named by ``$MESH_IDENTITY_AGENT_CONFIG``; ConfigError when it is not set."""
    found = os.environ.get(CONFIG_ENV)
    if not found:
        raise ConfigError(f"no agent config: pass --config FILE or set {CONFIG_ENV}")
    return found
