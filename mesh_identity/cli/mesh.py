"""The mesh side of the CLI: the xDS server inside ``serve``, mesh reloads, and ``mesh-identity bootstrap``.

When the config has ``mesh_file`` (or only ``xds.listen``: an empty mesh), ``serve`` manages every identity of
the mesh plus the xDS server's own (``spiffe://<trust domain>/mesh-identity/xds``) and runs an
:class:`~xds_sds.runtime.MeshXds` as a component and the root rotation's ack source. It listens on
``xds.listen`` (default ``127.0.0.1:0``) and writes the bound address to ``<state_dir>/xds.addr``.

``bootstrap`` writes a sidecar's Envoy bootstrap with a certificate from the CA and registers its directory
under ``<state_dir>/sidecars/<node>``; from then on ``serve`` renews that certificate whenever the identity
rotates, and the trust bundle in it whenever the bundle changes (root rotation). SIGHUP makes ``serve`` read the
mesh file again; a file that does not validate is logged and the last good mesh stays in service.
"""

from __future__ import annotations

import argparse
import ipaddress
import logging
from dataclasses import dataclass
from pathlib import Path

from mesh_identity.cli.context import config_of, runtime
from mesh_identity.config import Config, ListenConfig
from mesh_identity.errors import ConfigError, MeshIdentityError
from mesh_identity.mesh import Address, Mesh, load_mesh
from mesh_identity.rotation.service import Service
from mesh_identity.spiffe import SpiffeId
from xds_sds.metrics import XdsMetrics
from xds_sds.runtime import XDS_ADDR, MeshXds, connection_age, server_identity
from xds_sds.sidecars import SidecarDirs

log = logging.getLogger(__name__)

DEFAULT_XDS_LISTEN = ListenConfig("127.0.0.1", 0)


def load_checked_mesh(path: Path, config: Config) -> Mesh:
    """The mesh file at ``path``, validated, and refused if a service claims the xDS server's identity."""
    mesh = load_mesh(path, config.trust_domain)
    reserved = server_identity(config.trust_domain)
    for name, service in mesh.services.items():
        if service.identity == reserved:
            raise ConfigError(f"services.{name}.identity: {reserved} is the xDS server's own identity")
    return mesh


def mesh_of(config: Config) -> Mesh | None:
    """The mesh ``serve`` delivers: the mesh file's; an empty one when only ``xds.listen`` is set; else None."""
    if config.mesh_file is not None:
        return load_checked_mesh(config.mesh_file, config)
    if config.xds_listen is not None:
        return Mesh(config.trust_domain)
    return None


def identities_for(config: Config, mesh: Mesh | None) -> tuple[SpiffeId, ...]:
    """What the rotation engine manages: the config's list, and with a mesh its identities and the server's."""
    if mesh is None:
        return config.identities
    found = [*config.identities, server_identity(config.trust_domain), *sorted(mesh.identities, key=str)]
    return tuple(dict.fromkeys(found))


@dataclass
class MeshControl:
    """What ``serve`` holds of the mesh: the xDS component and where the mesh came from."""

    config: Config
    xds: MeshXds

    def reload(self) -> bool:
        """Read the mesh file again and serve it; on an error log it and keep the last good mesh."""
        path = self.config.mesh_file
        if path is None:
            log.warning("reload: the config has no mesh_file; nothing to reload")
            return False
        try:
            mesh = load_checked_mesh(path, self.config)
            self.xds.set_mesh(mesh)
        except (MeshIdentityError, ValueError) as err:
            log.error("reloading %s failed, keeping the last good mesh: %s", path, err)
            return False
        log.info("reloaded %s: %s", path, describe(mesh))
        return True

    def summary(self) -> str:
        source = f"mesh file {self.config.mesh_file} (SIGHUP reloads it)" if self.config.mesh_file else "no mesh file"
        return f"xDS (ADS over mTLS) on {self.xds.address} for {describe(self.xds.mesh)}; {source}"


def describe(mesh: Mesh) -> str:
    services, nodes = len(mesh.services), len(mesh.nodes())
    return f"{services} service{'' if services == 1 else 's'}, {nodes} sidecar{'' if nodes == 1 else 's'}"


def attach(service: Service, mesh: Mesh) -> MeshControl:
    """Join the xDS server to ``service``: a component, the ack source, metrics on the service's registry."""
    config = service.config
    listen = config.xds_listen or DEFAULT_XDS_LISTEN
    component = MeshXds(
        service.engine,
        mesh,
        address=Address(listen.host, listen.port),
        sidecars=SidecarDirs(config.state_dir),
        audit=service.events,  # the plugins (audit) and the metrics, each isolated from the other's failures
        metrics=XdsMetrics(service.metrics.registry),
        max_connection_age=connection_age(config.ca.workload_ttl, config.ca.rotate_after),
        keep=config.identities,
        addr_file=config.state_dir / XDS_ADDR,
    )
    service.add_component(component)
    service.set_ack_source(component)
    return MeshControl(config, component)


# -- bootstrap -----------------------------------------------------------------------------------------------


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
    mesh = load_checked_mesh(config.mesh_file, config)
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
    service, _ = found
    if service.identity != identity:
        raise ConfigError(f"--node: {args.node!r} is a sidecar of {service.identity}, not {identity}")
    xds = xds_address(config, args.xds)
    admin = parse_address(args.admin, "--admin") if args.admin else None
    if admin is not None and not ipaddress.ip_address(admin.host).is_loopback:
        raise ConfigError(f"--admin: {args.admin!r} is not a loopback address (the Envoy admin stays local)")
    out = Path(args.out)
    rt = runtime(args, create=False)
    try:
        svid = rt.authority.issue(identity, requested_by="bootstrap")
    finally:
        rt.provider.close()
    sidecars = SidecarDirs(config.state_dir)
    try:
        files = sidecars.write(
            svid, node=args.node, cluster=service.name, xds=xds, server_identity=server_identity(config.trust_domain),
            out_dir=out, admin=admin, delta=args.delta,
        )  # fmt: skip
    except OSError as err:
        raise ConfigError(f"--out: cannot write the bootstrap to {out}: {err}") from None
    print(f"wrote the bootstrap of sidecar {args.node} ({identity}) to {files.bootstrap}")
    print(f"  xDS server {xds} over mTLS ({'delta' if args.delta else 'state of the world'} ADS)")
    print(
        f"  bootstrap certificate serial {svid.serial}, expires {svid.not_after:%Y-%m-%dT%H:%M:%SZ}; "
        f"'mesh-identity serve' renews it ({sidecars.default_dir(args.node)})"
    )
    print(f"  run: envoy -c {files.bootstrap} --admin-address-path {out / 'admin.addr'}")
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
    p.set_defaults(func=cmd_bootstrap)
