"""Entry point: argument parsing and error reporting (one line, exit 1; 2 for usage and config errors)."""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence

from mesh_identity.cli import agent, bootstrap, certs, doctor, serve, status, token, top, trust
from mesh_identity.demo import command as demo
from mesh_identity.errors import ConfigError, InvalidSpiffeIdError, MeshIdentityError

USAGE_ERRORS = (ConfigError, InvalidSpiffeIdError)


def build_parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--config", "-c", metavar="FILE", default=argparse.SUPPRESS, help="config file (default: $MESH_IDENTITY_CONFIG)"
    )
    parser = argparse.ArgumentParser(prog="mesh-identity", description="SPIFFE workload identities for Envoy meshes")
    parser.add_argument("--config", "-c", metavar="FILE", help="config file (default: $MESH_IDENTITY_CONFIG)")
    parser.add_argument("--debug", action="store_true", help="show tracebacks and debug logs")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for module in (certs, serve, status, doctor, bootstrap, token, agent, top, demo):
        module.add_parsers(sub, common)
    ca = sub.add_parser("ca", help="the CA: status, root rotation and trusted roots")
    ca_sub = ca.add_subparsers(dest="ca_command", required=True, metavar="COMMAND")
    status.add_ca_parsers(ca_sub, common)
    trust.add_ca_parsers(ca_sub, common)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.debug else logging.WARNING,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    try:
        return int(args.func(args))
    except KeyboardInterrupt:
        return 130
    except MeshIdentityError as err:
        if args.debug:
            raise
        print(f"mesh-identity: error: {err}", file=sys.stderr)
        return 2 if isinstance(err, USAGE_ERRORS) else 1


if __name__ == "__main__":
    sys.exit(main())
