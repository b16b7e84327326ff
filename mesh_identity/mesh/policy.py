"""Mesh policy: who may call whom, on which routes, and how a service's traffic is split.

The model follows the Service Mesh Interface (SMI) resources, resolved into what the sidecars enforce:

* :class:`TrafficTarget` (``access.smi-spec.io``): a destination identity, the source identities allowed to
  call it, and rules: the matches of an ``HTTPRouteGroup`` (path regex, methods, headers; ``specs.smi-spec.io``)
  or the ports of a ``TCPRoute``. Identities are SPIFFE IDs, checked by the destination's sidecar against the
  URI SAN of the verified client certificate, never against a header.
* :class:`TrafficSplit` (``split.smi-spec.io``): a root service and weighted backend services (percentages that
  add up to 100); callers of the root send each request (HTTP) or connection (TCP) to a backend by weight.

Access is default-deny per destination: an identity that no TrafficTarget names as its destination accepts
every identity of the mesh (the sidecars accept no certificate from outside it); once a TrafficTarget names it,
only what some TrafficTarget allows gets through. ``permissive`` turns enforcement off (OSM's permissive traffic
policy mode): TrafficTargets are kept but not enforced. Splits apply in both modes.

The mesh file writes these as SMI documents (see :mod:`mesh_identity.mesh.smi`); the Kubernetes source can feed the
same model from the SMI custom resources. :func:`check_policy` checks a policy against the mesh's services; it
also repeats the parser's checks of values (trust domains, regexes, weights) for a policy built in code.
"""

from __future__ import annotations

from collections.abc import Mapping, Sized
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Protocol

from mesh_identity.errors import ConfigError
from mesh_identity.mesh.regex import regex_problem
from mesh_identity.spiffe import SpiffeId, TrustDomain

HTTP_METHODS = ("GET", "HEAD", "POST", "PUT", "DELETE", "CONNECT", "OPTIONS", "TRACE", "PATCH")
TOTAL_WEIGHT = 100


@dataclass(frozen=True, slots=True)
class HttpMatch:
    """One named match of an HTTPRouteGroup; a request matches when every given condition holds.

    ``path_regex`` must match the whole path (without the query); ``methods`` empty means any method;
    ``headers`` are ``(lower-case name, value regex)`` pairs, each regex matching the whole value.
    """

    name: str
    path_regex: str | None = None
    methods: tuple[str, ...] = ()
    headers: tuple[tuple[str, str], ...] = ()


@dataclass(frozen=True, slots=True)
class HttpRouteGroup:
    name: str
    namespace: str
    matches: tuple[HttpMatch, ...]


@dataclass(frozen=True, slots=True)
class TcpRoute:
    """Ports of the destination's app (empty: any port)."""

    name: str
    namespace: str
    ports: tuple[int, ...] = ()


@dataclass(frozen=True, slots=True)
class HttpRule:
    """The matches a TrafficTarget selects from an HTTPRouteGroup (a request matching any is allowed)."""

    group: str
    matches: tuple[HttpMatch, ...]


@dataclass(frozen=True, slots=True)
class TcpRule:
    """A TCPRoute a TrafficTarget refers to: connections to an app on one of ``ports`` (empty: any)."""

    route: str
    ports: tuple[int, ...] = ()


Rule = HttpRule | TcpRule


@dataclass(frozen=True, slots=True)
class TrafficTarget:
    """``sources`` may call ``destination`` as far as ``rules`` allow.

    ``origin`` says where it was written (``policies[2]`` in a mesh file), for error messages; it takes no part
    in equality.
    """

    name: str
    namespace: str
    destination: SpiffeId
    sources: tuple[SpiffeId, ...]
    rules: tuple[Rule, ...]
    origin: str = field(default="", compare=False)

    @property
    def where(self) -> str:
        return self.origin or f"TrafficTarget {self.namespace}/{self.name}"


@dataclass(frozen=True, slots=True)
class Backend:
    service: str
    weight: int


@dataclass(frozen=True, slots=True)
class TrafficSplit:
    """Callers of ``service`` (the root) reach the ``backends`` by weight (percent)."""

    name: str
    namespace: str
    service: str
    backends: tuple[Backend, ...]
    origin: str = field(default="", compare=False)

    @property
    def where(self) -> str:
        return self.origin or f"TrafficSplit {self.namespace}/{self.name}"


@dataclass(frozen=True, slots=True)
class Policy:
    """Every TrafficTarget and TrafficSplit of a mesh, indexed by destination and by root service."""

    permissive: bool = False
    targets: tuple[TrafficTarget, ...] = ()
    splits: tuple[TrafficSplit, ...] = ()
    route_groups: tuple[HttpRouteGroup, ...] = ()
    tcp_routes: tuple[TcpRoute, ...] = ()
    _by_destination: Mapping[SpiffeId, tuple[TrafficTarget, ...]] = field(init=False, repr=False, compare=False)
    _by_root: Mapping[str, TrafficSplit] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        by_destination: dict[SpiffeId, list[TrafficTarget]] = {}
        for target in self.targets:
            by_destination.setdefault(target.destination, []).append(target)
        frozen = {identity: tuple(targets) for identity, targets in by_destination.items()}
        object.__setattr__(self, "_by_destination", MappingProxyType(frozen))
        object.__setattr__(self, "_by_root", MappingProxyType({s.service: s for s in self.splits}))

    def access_to(self, destination: SpiffeId) -> tuple[TrafficTarget, ...] | None:
        """The TrafficTargets that admit callers of ``destination``; None when it is open to the whole mesh."""
        if self.permissive:
            return None
        return self._by_destination.get(destination)

    def split_of(self, service: str) -> TrafficSplit | None:
        """The TrafficSplit whose root is ``service``, or None."""
        return self._by_root.get(service)


class ServiceView(Protocol):
    """What :func:`check_policy` reads of a mesh service."""

    @property
    def identity(self) -> SpiffeId: ...

    @property
    def protocol(self) -> str: ...

    @property
    def instances(self) -> Sized: ...

    @property
    def endpoints(self) -> Sized: ...  # its sidecars that serve an app (none: a client-only service)


def check_policy(policy: Policy, services: Mapping[str, ServiceView], trust_domain: TrustDomain) -> None:
    """Check ``policy`` against the mesh's services; ConfigError naming the policy and the key path."""
    protocols: dict[SpiffeId, set[str]] = {}  # what each identity serves (client-only services serve nothing)
    for service in services.values():
        served_here = protocols.setdefault(service.identity, set())
        if len(service.endpoints) > 0 or len(service.instances) == 0:  # an app behind a sidecar, or a split root
            served_here.add(str(service.protocol))
    for target in policy.targets:
        check_target(target, trust_domain)
        served = protocols.get(target.destination)
        if served is None:
            raise ConfigError(
                f"{target.where}.spec.destination: {target.destination} is not the identity of a service of this mesh"
            )
        for i, rule in enumerate(target.rules):
            kind, wanted = ("HTTPRouteGroup", "http") if isinstance(rule, HttpRule) else ("TCPRoute", "tcp")
            other = sorted(served - {wanted})
            if other:
                raise ConfigError(
                    f"{target.where}.spec.rules[{i}]: {kind} rules apply to {wanted} services; "
                    f"{target.destination} serves {other[0]}"
                )
    roots: dict[str, str] = {}
    for split in policy.splits:
        _check_split(split, services, policy, roots)
    for name, service in services.items():
        if not service.instances and name not in roots:
            raise ConfigError(f"services.{name}.instances: a service needs at least one instance")


def check_target(target: TrafficTarget, trust_domain: TrustDomain) -> None:
    """Check what ``target`` holds by itself (trust domains, sources and rules, regexes, methods), not whether its
    destination serves in the mesh; ConfigError naming the key path."""
    named = [("destination", target.destination)]
    named += [(f"sources[{i}]", source) for i, source in enumerate(target.sources)]
    for key, identity in named:
        if identity.trust_domain != trust_domain:
            raise ConfigError(f"{target.where}.spec.{key}: {identity} is not in trust domain {trust_domain}")
    if not target.sources or not target.rules:
        raise ConfigError(f"{target.where}.spec: a TrafficTarget needs at least one source and one rule")
    for i, rule in enumerate(target.rules):
        for match in rule.matches if isinstance(rule, HttpRule) else ():
            patterns = [("pathRegex", match.path_regex)] if match.path_regex is not None else []
            patterns += [(f"headers.{name}", pattern) for name, pattern in match.headers]
            for key, pattern in patterns:
                problem = regex_problem(pattern)
                if problem is not None:
                    raise ConfigError(
                        f"{target.where}.spec.rules[{i}] match {match.name!r} {key}: {pattern!r} is not a usable "
                        f"regex: {problem}"
                    )
            bad = sorted(set(match.methods) - set(HTTP_METHODS))
            if bad:
                raise ConfigError(f"{target.where}.spec.rules[{i}] match {match.name!r}: {bad[0]!r} is not a method")


def _check_split(
    split: TrafficSplit, services: Mapping[str, ServiceView], policy: Policy, roots: dict[str, str]
) -> None:
    root = services.get(split.service)
    if root is None:
        raise ConfigError(f"{split.where}.spec.service: {split.service!r} is not a service of this mesh")
    if split.service in roots:
        raise ConfigError(f"{split.where}.spec.service: {split.service!r} is already split by {roots[split.service]}")
    roots[split.service] = split.where
    if not split.backends:
        raise ConfigError(f"{split.where}.spec.backends: a TrafficSplit needs at least one backend")
    if any(not 0 <= b.weight <= TOTAL_WEIGHT for b in split.backends):
        raise ConfigError(f"{split.where}.spec.backends: a weight is not within 0-{TOTAL_WEIGHT}")
    total = sum(b.weight for b in split.backends)
    if total != TOTAL_WEIGHT:
        raise ConfigError(f"{split.where}.spec.backends: the weights add up to {total}, not {TOTAL_WEIGHT}")
    for i, backend in enumerate(split.backends):
        path = f"{split.where}.spec.backends[{i}].service"
        target = services.get(backend.service)
        if target is None:
            raise ConfigError(f"{path}: {backend.service!r} is not a service of this mesh")
        if not target.instances:
            raise ConfigError(f"{path}: {backend.service!r} has no instances to send traffic to")
        if str(target.protocol) != str(root.protocol):
            raise ConfigError(
                f"{path}: {backend.service!r} speaks {target.protocol}, the root service {split.service!r} "
                f"{root.protocol}"
            )
        nested = policy.split_of(backend.service)
        if backend.service != split.service and nested is not None:
            raise ConfigError(f"{path}: {backend.service!r} is the root of {nested.where}; splits do not nest")
