"""``token create`` and ``token list``: one-time join tokens for node agents (:mod:`mesh_identity.jointokens`).

``token create --node HOST`` prints the token, and nothing else, on stdout (``mesh-identity token create --node
h > join-token``); only its hash is stored. ``token list`` shows each token's host, expiry, whether it was used,
and a prefix of its hash (what the audit log names it by): never the token.
"""

from __future__ import annotations

import argparse

from mesh_identity.cli.common import config_of
from mesh_identity.clock import utcnow
from mesh_identity.durations import parse_duration
from mesh_identity.errors import ConfigError
from mesh_identity.jointokens import JoinTokens

DEFAULT_TTL = "15m"


def _tokens(args: argparse.Namespace) -> JoinTokens:
    config = config_of(args)
    if config.signing is None:
        raise ConfigError(
            "signing: not configured; join tokens are redeemed by the signing API (signing.listen, "
            "signing.attest_listen)"
        )
    return JoinTokens(config.state_dir)


def cmd_token_create(args: argparse.Namespace) -> int:
    try:
        ttl = parse_duration(args.ttl)
    except ValueError as err:
        raise ConfigError(f"--ttl: {err}") from None
    tokens = _tokens(args)
    print(tokens.create(args.node, ttl))
    return 0


def cmd_token_list(args: argparse.Namespace) -> int:
    tokens = _tokens(args).list()
    if not tokens:
        print("no join tokens")
        return 0
    now = utcnow()
    rows = [("HOST", "EXPIRES", "STATE", "USED", "SHA256")]
    for token in tokens:
        used = f"{token.used:%Y-%m-%dT%H:%M:%SZ}" if token.used is not None else "-"
        rows.append((token.host, f"{token.expires:%Y-%m-%dT%H:%M:%SZ}", token.state(now), used, token.hash_prefix))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    for row in rows:
        print("  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip())
    return 0


def add_parsers(sub: argparse._SubParsersAction[argparse.ArgumentParser], common: argparse.ArgumentParser) -> None:
    token = sub.add_parser("token", help="one-time join tokens that node agents attest with")
    token_sub = token.add_subparsers(dest="token_command", required=True, metavar="COMMAND")
    create = token_sub.add_parser(
        "create", parents=[common], help="make a join token for a node's agent and print it (only its hash is kept)"
    )
    create.add_argument("--node", required=True, metavar="HOST", help="the host (the mesh file's instances[].host)")
    create.add_argument("--ttl", default=DEFAULT_TTL, help=f"how long it may wait to be used (default {DEFAULT_TTL})")
    create.set_defaults(func=cmd_token_create)
    listing = token_sub.add_parser("list", parents=[common], help="the join tokens: host, expiry, used, hash prefix")
    listing.set_defaults(func=cmd_token_list)
