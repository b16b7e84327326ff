"""``agent``: the node agent (:mod:`xds_sds.agent`) of the agent config ``--config FILE``, until SIGINT/SIGTERM.

It makes every private key on this host, obtains and renews the SVIDs through the control plane's signing API,
and serves SDS to local Envoys and the SPIFFE Workload API on Unix sockets (the config file is described in
:mod:`xds_sds.agent.config`). ``python -m xds_sds.agent --config FILE`` runs the same agent without loading the
rest of the command line (:mod:`xds_sds.agent.launch`).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from xds_sds.agent.launch import config_from_env, serve


def cmd_agent(args: argparse.Namespace) -> int:
    path = getattr(args, "config", None) or config_from_env()
    return serve(Path(path), debug=bool(args.debug))


def add_parsers(sub: argparse._SubParsersAction[argparse.ArgumentParser], common: argparse.ArgumentParser) -> None:
    p = sub.add_parser(
        "agent",
        help="the node agent: keys made on this host, SVIDs from the signing API, SDS and the Workload API on sockets",
    )
    p.add_argument(
        "--config",
        "-c",
        metavar="FILE",
        default=argparse.SUPPRESS,
        help="the agent config file ($MESH_IDENTITY_AGENT_CONFIG)",
    )
    p.set_defaults(func=cmd_agent)
