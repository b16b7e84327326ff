"""``bootstrap``: a sidecar's Envoy bootstrap, with a certificate from the CA, for a node of the mesh file.

The bootstrap's directory is registered under ``<state_dir>/sidecars/<node>``; from then on ``serve`` renews
that certificate whenever the identity rotates, and the trust bundle in it whenever the bundle changes (root
rotation).

In a mesh whose node agents deliver the keys (``xds.secrets: agent``), ``bootstrap --agent SOCKET`` writes
``envoy.json`` alone: the sidecar takes its certificate, and the bundle that verifies the xDS server, from the
agent's SDS socket; it needs no CA and writes no certificate. Each mode refuses the other's bootstrap.

``bootstrap --ca-dir DIR`` makes the sidecar verify the xDS server with ``DIR/ca.crt``, the trust bundle ConfigMap
(``mesh-identity-root-ca``) mounted into its pod, and follow kubelet's updates of it; ``serve`` then renews the
bootstrap certificate only (see :mod:`xds_sds.resources.bootstrap`).
"""

from __future__ import annotations

import argparse
import ipaddress
from pathlib import Path

from mesh_identity.cli.common import build_for, config_of
from mesh_identity.compose import DEFAULT_XDS_LISTEN, Stage
from mesh_identity.config import Config, SecretSource
from mesh_identity.errors import ConfigError
from mesh_identity.mesh.model import Address
from mesh_identity.registry.meshfile import load_mesh_file
from mesh_identity.spiffe import SpiffeId
from xds_sds.mesh.component import XDS_ADDR, server_identity
from xds_sds.mesh.sidecars import SidecarDirs
from xds_sds.resources.bootstrap import CA_FILE, check_agent_socket, check_ca_dir, write_agent_bootstrap


def parse_address(text: str, what: str) -> Address:
    host, sep, port = text.strip().rpartition(":")
    host = host[1:-1] if host.startswith("[") and host.endswith("]") else host
    try:
        ipaddress.ip_address(host)
        valid = bool(sep) and port.isdigit() and 0 <= int(port) <= 65535
    except ValueError:
        valid = False
    if not valid:
        raise ConfigError(f"{what}: {text.strip()!r} is not IP:PORT (e.g. 127.0.0.1:15010)")
    return Address(host, int(port))


def xds_address(config: Config, given: str | None) -> Address:
    """Where sidecars reach the xDS server: ``given``, else the running server's ``<state_dir>/xds.addr``,
    else ``xds.listen`` when its port is fixed."""
    if given:
        return parse_address(given, "--xds")
    path = config.state_dir / XDS_ADDR
    try:
        return parse_address(path.read_text(), str(path))
    except FileNotFoundError:
        pass
    listen = config.xds_listen
    if listen is None or listen.port == 0:
        raise ConfigError(
            f"the xDS server's address is unknown: xds.listen is {listen or DEFAULT_XDS_LISTEN} and no running "
            f"server wrote {path}; start 'mesh-identity serve' first, set a fixed xds.listen port, or pass --xds"
        )
    return Address(listen.host, listen.port)


def cmd_bootstrap(args: argparse.Namespace) -> int:
    config = config_of(args)
    if config.mesh_file is None:
        raise ConfigError("bootstrap: the config has no mesh_file (the sidecars and their identities are listed there)")
    mesh = load_mesh_file(config.mesh_file, config.trust_domain)
    identity = SpiffeId.parse(args.identity)
    if identity not in mesh.identities:
        known = ", ".join(sorted(str(i) for i in mesh.identities)) or "none"
        raise ConfigError(f"--identity: {identity} is not an identity of the mesh in {config.mesh_file} ({known})")
    found = mesh.instance(args.node)
    if found is None:
        nodes = ", ".join(mesh.nodes_of(identity))
        raise ConfigError(
            f"--node: {args.node!r} is not a sidecar of the mesh in {config.mesh_file} (those of {identity}: {nodes})"
        )
    service, instance = found
    if service.identity != identity:
        raise ConfigError(f"--node: {args.node!r} is a sidecar of {service.identity}, not {identity}")
    agent = _agent_socket(config, args.agent)
    xds = xds_address(config, args.xds)
    admin = parse_address(args.admin, "--admin") if args.admin else None
    if admin is not None and not ipaddress.ip_address(admin.host).is_loopback:
        raise ConfigError(f"--admin: {args.admin!r} is not a loopback address (the Envoy admin stays local)")
    out = Path(args.out)
    ca_dir = _ca_dir(args.ca_dir, agent)
    if agent is not None:
        return _agent_bootstrap(args, config, identity, service.name, xds, admin, agent, instance.stats)
    with build_for(args, Stage.AUTHORITY, create=False, config=config) as system:
        assert system.authority is not None  # built at Stage.AUTHORITY
        svid = system.authority.issue(identity, requested_by="bootstrap")
    sidecars = SidecarDirs(config.state_dir)
    try:
        files = sidecars.write(
            svid, node=args.node, cluster=service.name, xds=xds, server_identity=server_identity(config.trust_domain),
            out_dir=out, admin=admin, delta=args.delta, stats=instance.stats, ca_dir=ca_dir,
        )  # fmt: skip
    except OSError as err:
        raise ConfigError(f"--out: cannot write the bootstrap to {out}: {err}") from None
    print(f"wrote the bootstrap of sidecar {args.node} ({identity}) to {files.bootstrap}")
    print(f"  xDS server {xds} over mTLS ({'delta' if args.delta else 'state of the world'} ADS)")
    if ca_dir is not None:
        print(f"  the xDS server is verified with {ca_dir / CA_FILE} (a mounted trust bundle; Envoy follows it)")
    print(
        f"  bootstrap certificate serial {svid.serial}, expires {svid.not_after:%Y-%m-%dT%H:%M:%SZ}; "
        f"'mesh-identity serve' renews it ({sidecars.default_dir(args.node)})"
    )
    print(f"  run: envoy -c {files.bootstrap} --admin-address-path {out / 'admin.addr'}")
    return 0


def _ca_dir(given: str | None, agent: Path | None) -> Path | None:
    """The directory of ``--ca-dir`` (absolute, links kept: Envoy watches it as given), or None; ConfigError when
    it cannot verify the xDS server or the node agent delivers the bundle."""
    if given is None:
        return None
    if agent is not None:
        raise ConfigError("--ca-dir: with --agent the node agent delivers the bundle that verifies the xDS server")
    directory = Path(given).absolute()
    try:
        check_ca_dir(directory)
    except ValueError as err:
        raise ConfigError(f"--ca-dir: {err}") from None
    return directory


def _agent_socket(config: Config, given: str | None) -> Path | None:
    """The agent socket of ``--agent`` (absolute), or None; ConfigError when it does not fit the mesh's mode."""
    where = f"the config{f' {config.source}' if config.source else ''}"
    if given is None:
        if config.xds_secrets is SecretSource.AGENT:
            raise ConfigError(
                f"xds.secrets is agent in {where}: the control plane sends no keys; pass --agent SOCKET (the node "
                "agent's SDS socket)"
            )
        return None
    if config.xds_secrets is not SecretSource.AGENT:
        raise ConfigError(
            f"--agent: xds.secrets is {config.xds_secrets.value} in {where}, so the control plane delivers the "
            "certificates; set xds.secrets: agent (and the signing section) to take them from node agents"
        )
    socket = Path(given).absolute()
    try:
        check_agent_socket(socket)
    except ValueError as err:
        raise ConfigError(f"--agent: {err}") from None
    return socket


def _agent_bootstrap(
    args: argparse.Namespace,
    config: Config,
    identity: SpiffeId,
    cluster: str,
    xds: Address,
    admin: Address | None,
    socket: Path,
    stats: Address | None,
) -> int:
    # The operator named this directory: a link there is followed once, here; below it nothing is.
    out = Path(args.out).resolve()
    try:
        path = write_agent_bootstrap(
            out, node=args.node, identity=identity, xds=xds, server_identity=server_identity(config.trust_domain),
            agent_socket=socket, cluster=cluster, admin=admin, delta=args.delta, stats=stats,
        )  # fmt: skip
    except OSError as err:
        raise ConfigError(f"--out: cannot write the bootstrap to {out}: {err}") from None
    print(f"wrote the bootstrap of sidecar {args.node} ({identity}) to {path}")
    print(f"  xDS server {xds} over mTLS ({'delta' if args.delta else 'state of the world'} ADS)")
    print(f"  certificates and trust bundle from the node agent's SDS socket {socket} (no certificate files)")
    print(f"  run: envoy -c {path} --admin-address-path {out / 'admin.addr'}")
    return 0


def add_parsers(sub: argparse._SubParsersAction[argparse.ArgumentParser], common: argparse.ArgumentParser) -> None:
    p = sub.add_parser(
        "bootstrap", parents=[common], help="write a sidecar's Envoy bootstrap (ADS over mTLS to the xDS server)"
    )
    p.add_argument("--identity", required=True, metavar="SPIFFE_ID", help="the sidecar's workload identity")
    p.add_argument("--node", required=True, metavar="NODE", help="the sidecar's node id in the mesh file")
    p.add_argument("--out", required=True, metavar="DIR", help="where to write envoy.json and the certificate files")
    p.add_argument(
        "--xds", metavar="IP:PORT", help="the xDS server's address (default: the running server's, else xds.listen)"
    )
    p.add_argument("--admin", metavar="IP:PORT", help="Envoy's admin address, loopback (default: a port Envoy picks)")
    p.add_argument("--delta", action="store_true", help="use incremental (delta) xDS")
    p.add_argument(
        "--ca-dir",
        metavar="DIR",
        help=f"verify the xDS server with DIR/{CA_FILE}, the mounted trust bundle ConfigMap, following its updates",
    )
    p.add_argument(
        "--agent",
        metavar="SOCKET",
        help="the node agent's SDS socket (xds.secrets: agent): certificates come from it, no files are written",
    )
    p.set_defaults(func=cmd_bootstrap)
