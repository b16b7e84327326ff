"""``status``, ``ca status`` and ``ca rotate-root``: what a running server says, and root rotation steps.

They talk to the server over its endpoint (:mod:`mesh_identity.server.client`); the offline part of
``ca status`` reads the CA state through the provider when no server answers.
"""

from __future__ import annotations

import argparse
import json
from datetime import datetime, timedelta

from mesh_identity.cli.common import build_for, config_of
from mesh_identity.clock import utcnow
from mesh_identity.compose import Stage
from mesh_identity.durations import format_duration
from mesh_identity.errors import ConfigError
from mesh_identity.rotation.roots import RootStep, StepOverride
from mesh_identity.server.client import ServerError, fetch_status, root_step
from mesh_identity.server.document import CaStatus, iso_time
from mesh_identity.svid import fingerprint_of, serial_of


def cmd_status(args: argparse.Namespace) -> int:
    document = fetch_status(config_of(args))
    if args.json:
        print(json.dumps(document.to_json(), indent=2))
        return 0
    provider = document.provider
    health = {True: "healthy", False: "UNHEALTHY", None: "not checked"}[provider.healthy]
    budget = document.outage_budget_seconds
    print(
        f"trust domain {document.trust_domain}; provider {provider.name} ({provider.mode} mode) {health}; "
        f"{'ready' if document.ready else 'NOT READY: ' + document.ready_detail}"
        + (f"; outage budget {_seconds(budget)}" if budget is not None else "")
    )
    _print_ca(document.ca)
    header = ("IDENTITY", "SERIAL", "NOT AFTER", "LEFT", "NEXT ROTATION", "PROVIDER", "LAST ERROR")
    rows: list[tuple[str, ...]] = [header]
    for ident in document.identities:
        rows.append(
            (
                ident.subject,
                ident.serial or "-",
                iso_time(ident.not_after) if ident.not_after is not None else "-",
                _seconds(ident.seconds_left) if ident.seconds_left is not None else "-",
                _to_second(ident.next_rotation) if ident.next_rotation is not None else "-",
                ident.provider,
                f"[{ident.failures} failed] {ident.last_error or ''}" if ident.failures else "-",
            )
        )
    print()
    _print_table(rows)
    return 0


def _print_ca(ca: CaStatus) -> None:
    print(f"root rotation: {ca.phase} ({ca.next_step})")
    for root in ca.roots:
        notes = [*(["signing"] if root.signing else []), *(["new"] if root.new else []), f"{root.leaves} leaves"]
        print(
            f"  root          {root.serial}  expires {iso_time(root.not_after)} ({_seconds(root.seconds_left)})  "
            + ", ".join(notes)
        )
    inter = ca.intermediate
    if inter is not None:
        not_after = iso_time(inter.not_after) if inter.not_after is not None else "-"
        line = f"  intermediate  {inter.serial or '-'}  expires {not_after}"
        if inter.seconds_left is not None:
            line += f" ({_seconds(inter.seconds_left)})"
        if inter.next_rotation is not None:
            line += f"  next rotation {_to_second(inter.next_rotation)}"
        if inter.failures:
            line += f"  [{inter.failures} failed] {inter.last_error}"
        print(line)
    if ca.leaves_outside_bundle:
        print(f"  {ca.leaves_outside_bundle} leaves chain to no root of the bundle")
    for proxies, label in (
        (ca.proxies_missing_bundle, "without the new bundle"),
        (ca.proxies_on_old_roots, "on old roots"),
    ):
        if proxies:
            print(f"  proxies {label}: {', '.join(proxies)}")
    for line in ca.proxies_lagging or ():
        print(f"  proxy lagging: {line}")


def _print_table(rows: list[tuple[str, ...]]) -> None:
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    for row in rows:
        print("  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip())


def _seconds(value: float) -> str:
    return format_duration(timedelta(seconds=value)) if value >= 0 else "expired"


def _to_second(value: datetime) -> str:
    """``value`` as the document writes it, cut to the second (``2024-05-01T12:00:00Z``)."""
    return iso_time(value)[:19] + "Z"


def cmd_ca_status(args: argparse.Namespace) -> int:
    config = config_of(args)
    try:
        document = fetch_status(config)
    except ServerError as err:
        print(f"{err}; showing the CA state on disk (leaves and proxies are known to the running server only)")
        with build_for(args, Stage.PROVIDER, create=False, config=config) as system:
            provider = system.provider
            now = utcnow()
            print(f"root rotation: {provider.root_phase()}")
            for root in provider.trust_bundle().authorities:
                left = format_duration(root.not_valid_after_utc - now)
                print(
                    f"  root  {serial_of(root)}  expires {root.not_valid_after_utc:%Y-%m-%dT%H:%M:%SZ} ({left})  "
                    f"sha256 {fingerprint_of(root)}"
                )
            # the provider's own checks of its CA state (the built-in CA: retired root keys, key encryption)
            for check in provider.doctor(config.ca.workload_ttl, config.ca.intermediate_ttl):
                print(f"  {'ok    ' if check.ok else 'FAILED'} {check.name}: {check.detail}")
        return 0
    _print_ca(document.ca)
    return 0


def cmd_rotate_root(args: argparse.Namespace) -> int:
    override = StepOverride(exclude=frozenset(args.exclude or ()), force=args.force)
    if args.force is not None and not args.force.strip():
        raise ConfigError("--force: give the reason for going ahead without the proxies' evidence")
    print(root_step(config_of(args), RootStep(args.step), override if not override.empty else None))
    return 0


def add_parsers(sub: argparse._SubParsersAction[argparse.ArgumentParser], common: argparse.ArgumentParser) -> None:
    p = sub.add_parser("status", parents=[common], help="every identity, the CA chain and rotation, from the server")
    p.add_argument("--json", action="store_true", help="print the server's /status document")
    p.set_defaults(func=cmd_status)


def add_ca_parsers(
    ca_sub: argparse._SubParsersAction[argparse.ArgumentParser], common: argparse.ArgumentParser
) -> None:
    """Register ``ca status`` and ``ca rotate-root`` on the ``ca`` command's sub-parsers."""
    p = ca_sub.add_parser("status", parents=[common], help="roots, intermediate, rotation phase and its evidence")
    p.set_defaults(func=cmd_ca_status)
    p = ca_sub.add_parser(
        "rotate-root", parents=[common], help="advance a root rotation (the server refuses a step taken too early)"
    )
    p.add_argument("step", choices=[step.value for step in RootStep], help="prepare, then activate, then retire")
    p.add_argument(
        "--exclude",
        action="append",
        metavar="NODE",
        help="go ahead without this proxy's acknowledgement (repeatable; audited; the others still gate the step)",
    )
    p.add_argument(
        "--force",
        metavar="REASON",
        help="go ahead whatever the proxies say, for this reason (audited); identities and the intermediate "
        "still gate the step",
    )
    p.set_defaults(func=cmd_rotate_root)
