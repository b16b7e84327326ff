"""``top``: a live table of every route of the mesh (requests/s, error %, p50, p99) from the sidecars' stats.

The sidecars are those of the Prometheus targets file the control plane keeps (``--targets FILE``, default
``<state_dir>/prometheus/sidecars.json`` of the config; see :mod:`xds_sds.mesh.targets`). Each refresh reads
every sidecar's ``/stats/prometheus`` and shows the traffic since the previous one (:mod:`xds_sds.mesh.figures`);
``--once`` reads twice, ``--interval`` apart, prints one table and exits (1 when no sidecar could be read).
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from mesh_identity.cli.common import config_of
from mesh_identity.errors import ConfigError, MeshIdentityError
from mesh_identity.mesh.model import Address
from xds_sds.mesh.figures import RouteCounts, RouteKey, figures, merge, read_stats, route_counts, table
from xds_sds.mesh.targets import read_targets, targets_path


class TopError(MeshIdentityError):
    """No sidecar's stats could be read."""


def _address(target: str) -> Address:
    host, _, port = target.rpartition(":")
    return Address(host.strip("[]"), int(port))


def read_all(targets: list[tuple[str, dict[str, str]]]) -> tuple[dict[RouteKey, RouteCounts], list[str]]:
    """The routes of every target together, and one line for each target that could not be read."""

    def one(target: tuple[str, dict[str, str]]) -> dict[RouteKey, RouteCounts] | str:
        where, labels = target
        try:
            return route_counts(read_stats(_address(where)))
        except (OSError, ValueError) as err:
            return f"{labels.get('node', where)} ({where}): {err}"

    with ThreadPoolExecutor(max_workers=max(1, min(8, len(targets)))) as pool:
        results = list(pool.map(one, targets))
    problems = [r for r in results if isinstance(r, str)]
    return merge(r for r in results if not isinstance(r, str)), problems


def render(
    before: Mapping[RouteKey, RouteCounts], after: Mapping[RouteKey, RouteCounts], seconds: float, problems: list[str]
) -> str:
    rows = figures(before, after, seconds)
    lines = [f"mesh-identity top  {time.strftime('%H:%M:%S')}  over {seconds:.1f}s, {len(rows)} routes"]
    lines += table(rows) if rows else ["no routes yet (sidecars report outbound traffic once they have upstreams)"]
    lines += [f"unreachable: {problem}" for problem in problems]
    return "\n".join(lines)


def cmd_top(args: argparse.Namespace) -> int:
    if args.interval <= 0:
        raise ConfigError(f"--interval: {args.interval} is not a positive number of seconds")
    path = Path(args.targets) if args.targets else targets_path(config_of(args).state_dir)
    try:
        targets = read_targets(path)
    except ValueError as err:
        raise ConfigError(f"--targets: {err}") from None
    if not targets:
        raise ConfigError(f"--targets: {path} lists no sidecar (give instances a 'stats' address in the mesh file)")
    before, problems = read_all(targets)
    started = time.monotonic()
    tty = sys.stdout.isatty() and not args.once
    while True:
        time.sleep(args.interval)
        after, problems = read_all(targets)
        now = time.monotonic()
        if len(problems) == len(targets) and args.once:
            raise TopError("no sidecar's stats could be read: " + "; ".join(problems))
        text = render(before, after, now - started, problems)
        print(("\x1b[H\x1b[J" if tty else "") + text, flush=True)
        if args.once:
            return 0
        before, started = after, now


def add_parsers(sub: argparse._SubParsersAction[argparse.ArgumentParser], common: argparse.ArgumentParser) -> None:
    p = sub.add_parser("top", parents=[common], help="live table of every route: requests/s, error %%, p50, p99")
    p.add_argument(
        "--targets", metavar="FILE", help="Prometheus file SD of the sidecars (default: <state_dir>/prometheus/...)"
    )
    p.add_argument("--interval", type=float, default=2.0, metavar="SECONDS", help="refresh every SECONDS (2)")
    p.add_argument("--once", action="store_true", help="print one table (over one interval) and exit")
    p.set_defaults(func=cmd_top)
