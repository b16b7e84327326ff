"""The mesh file: which services there are, who they are, where they listen and whom they call.

The embedded default describes its mesh in YAML; the Kubernetes source will later fill the same model.
Every service has one identity and one or more instances; every instance is one app with one Envoy sidecar::

    services:
      backend:
        identity: {namespace: shop, service_account: backend}   # or a SPIFFE ID string
        protocol: http                                           # http (default) or tcp
        instances:
          - node: backend-1            # the sidecar's Envoy node id
            app: 127.0.0.1:8081        # where the app listens (plaintext, loopback)
            inbound: 127.0.0.1:15081   # the sidecar's mTLS port: the service's endpoint in the mesh
            host: host-a               # optional: the host whose node agent may obtain this identity
            stats: 127.0.0.1:15090     # optional: the sidecar's Prometheus endpoint (GET /stats/prometheus)
            access_log: stdout         # optional: JSON access logs to stdout or an absolute file path
      frontend:
        identity: spiffe://example.org/ns/shop/sa/frontend
        instances:
          - {node: frontend-1, app: 127.0.0.1:8080, inbound: 127.0.0.1:15080}
        upstreams:
          - service: backend
            listen: 127.0.0.1:16081    # on every frontend sidecar: the app calls backend here, in plaintext
      batch:
        instances:
          - {node: batch-1, inbound: 127.0.0.2:15003}   # no app: a client-only sidecar (no inbound listener)
          - {node: batch-2, inbound: 127.0.0.3:15003}
        upstreams:
          - service: backend
            port: 8081                 # on each sidecar's own inbound IP: batch-1 at 127.0.0.2:8081, ...

An upstream's ``listen`` is one address for every sidecar of the service, so it allows one instance only;
``port`` binds the listener on each sidecar's own inbound IP (the Kubernetes registry's choice: every pod has its
own IP). An instance without ``app`` serves nothing: its sidecar has no inbound listener, it only calls out.

An identity omitted defaults to ``{namespace: default, service_account: <service name>}``. Errors name the key
path: ``services.frontend.upstreams[0].service: 'billing' is not a service of this mesh``.

Access control and traffic splits sit beside ``services`` as SMI documents (``policies``, and ``permissive``:
see :mod:`mesh_identity.mesh.smi` and :mod:`mesh_identity.mesh.policy`). A service with ``instances: []`` is allowed
only as the root of a TrafficSplit: its callers reach its backends.
"""

from __future__ import annotations

import enum
import ipaddress
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any

from mesh_identity.config import Egress
from mesh_identity.document import keys as _keys
from mesh_identity.document import mapping as _mapping
from mesh_identity.document import read_yaml, shown, workload_id
from mesh_identity.document import sequence as _list
from mesh_identity.document import string as _string
from mesh_identity.errors import ConfigError, InvalidSpiffeIdError
from mesh_identity.mesh.policy import Policy, check_policy
from mesh_identity.mesh.smi import parse_policy
from mesh_identity.spiffe import SpiffeId, TrustDomain

MAX_MESH_BYTES = 4 * 1024 * 1024
_NAME = re.compile(r"^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$")
_NODE = re.compile(r"^[A-Za-z0-9]([A-Za-z0-9._-]{0,126}[A-Za-z0-9])?$")


class Protocol(enum.StrEnum):
    HTTP = "http"
    TCP = "tcp"


@dataclass(frozen=True, slots=True, order=True)
class Address:
    host: str
    port: int

    def __str__(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


@dataclass(frozen=True, slots=True)
class Instance:
    """One app and its sidecar (``app`` None: a client-only sidecar, nothing listens on ``inbound``)."""

    node: str
    app: Address | None
    inbound: Address
    host: str | None = None  # the host (node agent) it runs on; only that host's agent may obtain its identity
    stats: Address | None = None  # the sidecar's Prometheus endpoint (see xds_sds.resources.stats)
    access_log: str | None = None  # JSON access logs: "stdout" or an absolute file path; None: none
    captured: bool = False  # the pod's traffic is redirected to the sidecar (an injected pod): it gets the
    # outbound capture listener (xds_sds.resources.capture) instead of a listener per upstream


@dataclass(frozen=True, slots=True)
class Upstream:
    """A service this one calls, through a plaintext listener on its own sidecar: at ``listen`` (one address for
    the service's one instance) or at ``port`` on each sidecar's own inbound IP. Exactly one of them is set."""

    service: str
    listen: Address | None = None
    port: int | None = None
    capture_only: bool = False  # for captured sidecars only (their capture listener routes it; no listener): a
    # destination the policy does not let this service call, so that its own sidecar answers 403 (Kubernetes)

    def __post_init__(self) -> None:
        if (self.listen is None) == (self.port is None):
            raise ValueError(f"upstream {self.service!r}: give exactly one of listen and port")

    def address_for(self, instance: Instance) -> Address:
        """Where the sidecar of ``instance`` listens for this upstream."""
        return self.listen if self.listen is not None else Address(instance.inbound.host, self.port or 0)


@dataclass(frozen=True, slots=True)
class Service:
    name: str
    identity: SpiffeId
    protocol: Protocol
    instances: tuple[Instance, ...]
    upstreams: tuple[Upstream, ...] = ()
    cluster_ip: Address | None = None  # the Kubernetes Service's ClusterIP and port; where captured traffic goes

    @property
    def endpoints(self) -> tuple[Address, ...]:
        """Where the mesh reaches this service: its sidecars' inbound ports (client-only sidecars serve nothing)."""
        return tuple(i.inbound for i in self.instances if i.app is not None)


@dataclass(frozen=True, slots=True)
class Mesh:
    trust_domain: TrustDomain
    services: Mapping[str, Service] = field(default_factory=lambda: MappingProxyType({}))
    policy: Policy = field(default_factory=Policy)
    egress: Egress = Egress.DENY  # for captured sidecars only

    def service(self, name: str) -> Service:
        try:
            return self.services[name]
        except KeyError:
            raise KeyError(f"no service {name!r} in the mesh") from None

    def instance(self, node: str) -> tuple[Service, Instance] | None:
        """The service and instance of a sidecar node id, or None."""
        for service in self.services.values():
            for instance in service.instances:
                if instance.node == node:
                    return service, instance
        return None

    def node_identity(self, node: str) -> SpiffeId | None:
        """The identity a sidecar node id belongs to (what the xDS server ties its stream to)."""
        found = self.instance(node)
        return None if found is None else found[0].identity

    def identities_on_host(self, host: str) -> frozenset[SpiffeId]:
        """The identities of the instances placed on ``host``: what that host's node agent may obtain."""
        return frozenset(s.identity for s in self.services.values() for i in s.instances if i.host == host)

    def nodes(self) -> tuple[str, ...]:
        return tuple(i.node for s in self.services.values() for i in s.instances)

    def nodes_of(self, identity: SpiffeId) -> tuple[str, ...]:
        return tuple(i.node for s in self.services.values() if s.identity == identity for i in s.instances)

    @property
    def identities(self) -> frozenset[SpiffeId]:
        return frozenset(s.identity for s in self.services.values())

    def callers_of(self, name: str) -> tuple[Service, ...]:
        """The services that list ``name`` as an upstream."""
        return tuple(s for s in self.services.values() if any(u.service == name for u in s.upstreams))


# -- parsing -----------------------------------------------------------------------------------------------

Parser = Callable[[Any, str], Any]


def _address(value: Any, path: str) -> Address:
    text = _string(value, path) if not isinstance(value, int) else str(value)
    host, sep, port = text.rpartition(":")
    host = host[1:-1] if host.startswith("[") and host.endswith("]") else host
    if not sep or not host or not port.isdigit():
        raise ConfigError(f"{path}: {shown(value)} is not HOST:PORT (e.g. 127.0.0.1:8080)")
    number = int(port)
    if not 1 <= number <= 65535:
        raise ConfigError(f"{path}: port {number} is out of range (1-65535)")
    try:
        ipaddress.ip_address(host)
    except ValueError:
        raise ConfigError(f"{path}: host {host!r} is not an IP address (sidecars bind and connect by IP)") from None
    return Address(host, number)


def _identity(value: Any, path: str, name: str, trust_domain: TrustDomain) -> SpiffeId:
    if value is None:
        return SpiffeId.for_kubernetes(trust_domain, "default", name)
    try:
        if isinstance(value, str):
            identity = SpiffeId.parse(value)
        else:
            section = _mapping(value, path)
            _keys(section, ("namespace", "service_account"), ("namespace", "service_account"), path)
            identity = SpiffeId.for_kubernetes(
                trust_domain,
                _string(section["namespace"], f"{path}.namespace"),
                _string(section["service_account"], f"{path}.service_account"),
            )
    except InvalidSpiffeIdError as err:
        raise ConfigError(f"{path}: {err}") from None
    return workload_id(identity, trust_domain, path)


def _instance(value: Any, path: str) -> Instance:
    section = _mapping(value, path)
    _keys(section, ("node", "app", "inbound", "host", "stats", "access_log"), ("node", "inbound"), path)
    node = _string(section["node"], f"{path}.node")
    if not _NODE.match(node):
        raise ConfigError(f"{path}.node: {node!r} is not a node id (letters, digits, '.', '_', '-'; 128 at most)")
    host = None
    if "host" in section:
        host = _string(section["host"], f"{path}.host")
        if not _NODE.match(host):
            raise ConfigError(f"{path}.host: {host!r} is not a host name (letters, digits, '.', '_', '-'; 128 at most)")
    app = _address(section["app"], f"{path}.app") if "app" in section else None
    inbound = _address(section["inbound"], f"{path}.inbound")
    stats = _address(section["stats"], f"{path}.stats") if "stats" in section else None
    access_log = _access_log(section["access_log"], f"{path}.access_log") if "access_log" in section else None
    return Instance(node, app, inbound, host, stats, access_log)


def _access_log(value: Any, path: str) -> str:
    text = _string(value, path)
    if text != "stdout" and (not text.startswith("/") or "\0" in text or len(text) > 4096):
        raise ConfigError(f"{path}: {shown(value)} is neither 'stdout' nor an absolute file path")
    return text


def _upstream(value: Any, path: str) -> Upstream:
    section = _mapping(value, path)
    _keys(section, ("service", "listen", "port"), ("service",), path)
    service = _string(section["service"], f"{path}.service")
    if ("listen" in section) == ("port" in section):
        raise ConfigError(f"{path}: give exactly one of listen (HOST:PORT) and port (on each sidecar's own IP)")
    if "listen" in section:
        return Upstream(service, listen=_address(section["listen"], f"{path}.listen"))
    port = section["port"]
    if not isinstance(port, int) or isinstance(port, bool) or not 1 <= port <= 65535:
        raise ConfigError(f"{path}.port: {shown(port)} is not a port (1-65535)")
    return Upstream(service, port=port)


_SERVICE_KEYS = ("identity", "protocol", "instances", "upstreams")


def _service(name: str, value: Any, path: str, trust_domain: TrustDomain) -> Service:
    if not _NAME.match(name):
        raise ConfigError(f"{path}: service name {name!r} is not a DNS label (a-z, 0-9, '-'; 63 at most)")
    section = _mapping(value, path)
    _keys(section, _SERVICE_KEYS, ("instances",), path)
    protocol_text = section.get("protocol", "http")
    try:
        protocol = Protocol(protocol_text)
    except ValueError:
        raise ConfigError(f"{path}.protocol: {protocol_text!r} is not one of http, tcp") from None
    instances = tuple(
        _instance(item, f"{path}.instances[{i}]")
        for i, item in enumerate(_list(section["instances"], f"{path}.instances"))
    )  # none only for the root of a TrafficSplit (checked with the policies)
    upstreams = tuple(
        _upstream(item, f"{path}.upstreams[{i}]")
        for i, item in enumerate(_list(section.get("upstreams", []), f"{path}.upstreams"))
    )
    identity = _identity(section.get("identity"), f"{path}.identity", name, trust_domain)
    return Service(name, identity, protocol, instances, upstreams)


def _check_references(mesh: Mesh) -> None:
    nodes: dict[str, str] = {}
    binds: dict[Address, str] = {}
    for name, service in mesh.services.items():
        for i, instance in enumerate(service.instances):
            path = f"services.{name}.instances[{i}]"
            if instance.node in nodes:
                raise ConfigError(f"{path}.node: {instance.node!r} is already the node of {nodes[instance.node]}")
            nodes[instance.node] = path
            for key, address in (("app", instance.app), ("inbound", instance.inbound), ("stats", instance.stats)):
                if address is None:
                    continue
                if address in binds:
                    raise ConfigError(f"{path}.{key}: {address} is already used by {binds[address]}")
                binds[address] = f"{path}.{key}"
    for name, service in mesh.services.items():
        seen: set[str] = set()
        for i, upstream in enumerate(service.upstreams):
            path = f"services.{name}.upstreams[{i}]"
            if upstream.service not in mesh.services:
                raise ConfigError(f"{path}.service: {upstream.service!r} is not a service of this mesh")
            if upstream.service == name:
                raise ConfigError(f"{path}.service: a service does not call itself through the mesh")
            if upstream.service in seen:
                raise ConfigError(f"{path}.service: {upstream.service!r} is listed twice")
            seen.add(upstream.service)
            if upstream.listen is not None and len(service.instances) > 1:
                raise ConfigError(
                    f"{path}.listen: {name} has several instances; they cannot share one upstream listener "
                    "address (give a port instead: each sidecar listens on its own IP)"
                )
            if upstream.capture_only:
                continue  # no listener anywhere: captured sidecars reach it by its ClusterIP
            if upstream.listen is not None:
                if upstream.listen in binds:
                    raise ConfigError(f"{path}.listen: {upstream.listen} is already used by {binds[upstream.listen]}")
                binds[upstream.listen] = f"{path}.listen"
                continue
            for j, instance in enumerate(service.instances):
                if instance.captured:
                    continue  # a captured sidecar has no listener per upstream
                address = upstream.address_for(instance)
                if address in binds:
                    raise ConfigError(
                        f"{path}.port: {address} (on the sidecar of services.{name}.instances[{j}]) is already used "
                        f"by {binds[address]}"
                    )
                binds[address] = f"{path}.port (on the sidecar of services.{name}.instances[{j}])"


def check_mesh(mesh: Mesh) -> None:
    """Check a mesh model's cross-references and its policy against its services (ConfigError naming the key).

    :func:`parse_mesh` does this; the xDS server does it again for a model built in code before serving it.
    """
    _check_references(mesh)
    check_policy(mesh.policy, mesh.services, mesh.trust_domain)


def parse_mesh(data: Any, trust_domain: TrustDomain) -> Mesh:
    """Validate a parsed mesh document (see the module docstring for its shape)."""
    if data is None:
        data = {}
    document = _mapping(data, "mesh")
    _keys(document, ("services", "permissive", "policies"), (), "mesh")
    raw = document.get("services")
    raw_services = _mapping({} if raw is None else raw, "services")
    services = {name: _service(name, value, f"services.{name}", trust_domain) for name, value in raw_services.items()}
    policy = parse_policy(document.get("permissive"), document.get("policies"), trust_domain)
    mesh = Mesh(trust_domain, MappingProxyType(services), policy)
    check_mesh(mesh)
    return mesh


def load_mesh(path: Path, trust_domain: TrustDomain) -> Mesh:
    """Read and validate a mesh file; ConfigError naming the file or the key path."""
    return parse_mesh(read_yaml(path, "mesh_file", MAX_MESH_BYTES), trust_domain)
