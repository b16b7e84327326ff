"""From Kubernetes objects to the mesh model: :func:`translate`, a pure function of a :class:`Snapshot`.

How the objects map onto :class:`~mesh_identity.mesh.model.Mesh` (the model describes each service's sidecars by
addresses; in Kubernetes every pod has its own IP):

================================  ==============================================================================
Kubernetes                        mesh model
================================  ==============================================================================
Namespace labelled                in the mesh; every other namespace's objects are ignored (a label removed:
``mesh-identity.io/monitored-by:  its workloads leave the mesh)
<mesh name>``
ServiceAccount ``ns/sa``          the identity ``spiffe://<td>/ns/<ns>/sa/<sa>`` (issued while it has sidecars)
Pod, running (phase Running, an   a sidecar (:class:`~mesh_identity.mesh.model.Instance`) of each Service it is a
IP, not being deleted, not on     ready endpoint of: node id ``<pod>.<namespace>``, ``host`` its
the host's network), of a         ``spec.nodeName``, ``app`` ``<pod IP>:<target port>`` (the port its
ServiceAccount that exists        EndpointSlice lists for the Service's first port), ``inbound``
                                  ``<pod IP>:15003`` (:data:`INBOUND_PORT`, the sidecar's mTLS port: the
                                  service's endpoint in the mesh). A pod of a ServiceAccount that does not exist
                                  gets no identity (refused: an Event on it)
Service ``ns/name`` (its first    the mesh service ``<name>.<ns>`` with its pods' identity; ``protocol`` tcp when
port, TCP) and its EndpointSlices the port's ``appProtocol`` is ``tcp`` or its name is ``tcp`` or ``tcp-*``, else
(``discovery.k8s.io/v1``)         http. Without a ready pod it is not in the mesh, unless it is the root of a
                                  TrafficSplit (then it has no instances: its callers reach the backends). A pod
                                  serves one mesh service: the first by namespace and name that lists it.
                                  ``cluster_ip``: ``spec.clusterIP`` at the port (None when headless)
SMI objects (TrafficTarget,       the policy, parsed and checked as the mesh file's (:mod:`.smi`); a TrafficSplit
HTTPRouteGroup, TCPRoute,         names Services of its namespace. A TrafficTarget whose destination has no
TrafficSplit)                     running pod waits (a note, no refusal) and applies once one runs
================================  ==============================================================================

A running pod that no Service lists is a client-only sidecar (no app, no inbound listener) of the mesh service
``<service account>.<namespace>.serviceaccount`` (a name no Service can have: Service and namespace names hold no
dot): it has its identity and calls out, and nobody calls it.

**Upstreams** (:func:`add_upstreams`): each mesh service with sidecars gets an upstream for every other mesh service
its identity may call: the destinations of the TrafficTargets that list it as a source (the root of a TrafficSplit
when it may call one of the split's backends), roots first, then by name. The upstream's listener binds the
Service's port (``spec.ports[0].port``) on each sidecar's own pod IP, so the app of a pod calls
``http://<its pod IP>:<port>/`` in plaintext and its sidecar carries the call over mTLS. A port the pod already
uses (its app's target port, :data:`INBOUND_PORT`) or that an earlier upstream of the same service took leaves
that upstream out, with a note. The access policy is still enforced where it belongs, at the destination's
inbound RBAC; the upstreams only decide which listeners and clusters a sidecar gets. A service with an injected
(captured) pod also gets a ``capture_only`` upstream for every other mesh service with a ClusterIP (those the policy
denies it, and those whose port its pods already use): its captured sidecars route the app's connection to that
ClusterIP to the destination, whose RBAC answers 403 (a clear refusal, where the policy is), and need no listener
for it; its other sidecars ignore those upstreams.

Refused objects (a Service whose pods run as several ServiceAccounts, a Service of another protocol than the
earlier Services of its pods' account (SMI rules are per protocol: such an identity could have no valid
TrafficTarget and would be open to the whole mesh), a UDP port, a target port
that is the sidecar's inbound port; a pod of an unknown ServiceAccount; SMI objects, see :mod:`.smi`) are
:class:`~mesh_identity.registry.kube.objects.Refusal` values the registry logs and writes Events for.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from types import MappingProxyType

from mesh_identity.config import Egress
from mesh_identity.errors import InvalidSpiffeIdError
from mesh_identity.mesh.model import Address, Instance, Mesh, Protocol, Service, Upstream
from mesh_identity.mesh.policy import Policy, TrafficTarget, check_target
from mesh_identity.mesh.ports import INBOUND_PORT
from mesh_identity.mesh.smi import parse_policy
from mesh_identity.registry.base import validate_workloads
from mesh_identity.registry.kube.objects import JsonObj, ObjectRef, Refusal, field, items, labels, text
from mesh_identity.registry.kube.resources import (
    ENDPOINT_SLICES,
    INJECTED,
    MONITORED_BY,
    NAMESPACES,
    PODS,
    SERVICE_ACCOUNTS,
    SERVICE_NAME,
    SERVICES,
    SMI,
    Resource,
)
from mesh_identity.registry.kube.smi import DocKey, closed_target, mesh_service_name, parser_document, settle
from mesh_identity.spiffe import SpiffeId, TrustDomain

Key = tuple[str, str]


@dataclass(frozen=True, slots=True)
class Snapshot:
    """The objects of every watched kind at one moment, by (namespace, name)."""

    objects: Mapping[Resource, Mapping[Key, JsonObj]]

    def of(self, resource: Resource) -> Mapping[Key, JsonObj]:
        return self.objects.get(resource, {})


@dataclass(frozen=True, slots=True)
class Translation:
    mesh: Mesh
    accepted: Mapping[DocKey, JsonObj]  # the SMI objects in the policy: the last good versions next time
    refusals: tuple[Refusal, ...]
    notes: tuple[str, ...]  # what else was left out, for the log (no Event)


@dataclass(frozen=True, slots=True)
class _Pod:
    namespace: str
    name: str
    ip: str
    service_account: str
    node: str | None
    captured: bool = False  # injected (the webhook's marker annotation): its traffic is redirected to the sidecar


def monitored_namespaces(snapshot: Snapshot, mesh_name: str) -> frozenset[str]:
    return frozenset(
        name for (_, name), obj in snapshot.of(NAMESPACES).items() if labels(obj).get(MONITORED_BY) == mesh_name
    )


def _running_pods(
    snapshot: Snapshot, monitored: frozenset[str], refusals: list[Refusal], notes: list[str]
) -> dict[Key, _Pod]:
    accounts = {key for key in snapshot.of(SERVICE_ACCOUNTS) if key[0] in monitored}
    pods: dict[Key, _Pod] = {}
    for (namespace, name), obj in sorted(snapshot.of(PODS).items()):
        if namespace not in monitored or text(obj, "status", "phase") != "Running":
            continue
        ip = text(obj, "status", "podIP")
        if not ip or field(obj, "metadata", "deletionTimestamp"):
            continue
        try:
            ipaddress.ip_address(ip)
        except ValueError:
            notes.append(f"Pod {namespace}/{name}: status.podIP {ip!r} is not an IP address; left out")
            continue
        if field(obj, "spec", "hostNetwork") is True:
            notes.append(f"Pod {namespace}/{name} uses the node's network namespace: it has no sidecar of the mesh")
            continue
        account = text(obj, "spec", "serviceAccountName", default="default")
        if (namespace, account) not in accounts:
            refusals.append(
                Refusal(
                    ObjectRef.of(PODS, obj),
                    "UnknownServiceAccount",
                    f"Pod {namespace}/{name} runs as service account {account!r}, which does not exist in namespace "
                    f"{namespace}: it gets no identity and no sidecar config",
                )
            )
            continue
        captured = text(obj, "metadata", "annotations", INJECTED) == "true"
        pods[(namespace, name)] = _Pod(namespace, name, ip, account, text(obj, "spec", "nodeName") or None, captured)
    return pods


def _protocol(port: JsonObj) -> Protocol:
    name = text(port, "name").lower()
    if text(port, "appProtocol").lower() == "tcp" or name == "tcp" or name.startswith("tcp-"):
        return Protocol.TCP
    return Protocol.HTTP


def _endpoints(slices: Sequence[JsonObj], port_name: str) -> list[tuple[str, str, int]]:
    """``(pod name, address, target port)`` of the ready pod endpoints of a Service's port."""
    found = []
    for obj in slices:
        if text(obj, "addressType") not in ("IPv4", "IPv6"):
            continue
        number = next(
            (p.get("port") for p in items(obj, "ports") if isinstance(p, dict) and text(p, "name") == port_name), None
        )
        if not isinstance(number, int) or isinstance(number, bool) or not 1 <= number <= 65535:
            continue
        for endpoint in items(obj, "endpoints"):
            if field(endpoint, "conditions", "ready") is False or field(endpoint, "conditions", "terminating") is True:
                continue
            addresses = items(endpoint, "addresses")
            if text(endpoint, "targetRef", "kind") == "Pod" and addresses and isinstance(addresses[0], str):
                found.append((text(endpoint, "targetRef", "name"), addresses[0], number))
    return found


def build_services(
    snapshot: Snapshot, monitored: frozenset[str], trust_domain: TrustDomain, roots: Mapping[str, Sequence[str]]
) -> tuple[dict[str, Service], dict[str, int | None], list[Refusal], list[str]]:
    """The mesh services of the Services and pods of ``snapshot`` (without upstreams), the Service port of each
    (None for a client-only one), refusals and notes; ``roots`` maps the root of each TrafficSplit (a mesh service
    name) to its backends."""
    refusals: list[Refusal] = []
    notes: list[str] = []
    pods = _running_pods(snapshot, monitored, refusals, notes)
    slices: dict[Key, list[JsonObj]] = {}
    for (namespace, _), obj in sorted(snapshot.of(ENDPOINT_SLICES).items()):
        owner = labels(obj).get(SERVICE_NAME)
        if namespace in monitored and owner:
            slices.setdefault((namespace, owner), []).append(obj)
    services: dict[str, Service] = {}
    service_ports: dict[str, int | None] = {}
    protocol_of: dict[SpiffeId, tuple[str, Protocol]] = {}  # the first Service of each identity, and its protocol
    root_ports: dict[str, tuple[Protocol, int | None]] = {}
    root_ips: dict[str, Address | None] = {}
    owner_of: dict[Key, str] = {}
    for (namespace, name), obj in sorted(snapshot.of(SERVICES).items()):
        if namespace not in monitored or text(obj, "spec", "type") == "ExternalName":
            continue
        ports = [p for p in items(obj, "spec", "ports") if isinstance(p, dict)]
        if not ports:
            continue
        port, mesh_name = ports[0], mesh_service_name(name, namespace)
        ref = ObjectRef.of(SERVICES, obj)
        protocol = text(port, "protocol", default="TCP")
        if protocol != "TCP":
            refusals.append(
                Refusal(
                    ref,
                    "UnsupportedService",
                    f"Service {namespace}/{name}: spec.ports[0] is {protocol}; the mesh carries TCP only: it is "
                    "left out",
                )
            )
            continue
        if mesh_name in roots:
            root_ports[mesh_name] = (_protocol(port), _port_number(port))
            root_ips[mesh_name] = _cluster_ip(obj, port)
            continue
        members: list[tuple[_Pod, str, int]] = []
        for pod_name, address, number in _endpoints(slices.get((namespace, name), []), text(port, "name")):
            pod = pods.get((namespace, pod_name))
            if pod is None:
                continue
            if (namespace, pod_name) in owner_of:
                owner = owner_of[(namespace, pod_name)]
                notes.append(
                    f"Service {namespace}/{name}: pod {pod_name} is already a sidecar of {owner} (a pod serves one "
                    "mesh service); not one of this one's"
                )
                continue
            members.append((pod, address, number))
        if not members:
            continue
        accounts = sorted({pod.service_account for pod, _, _ in members})
        if len(accounts) > 1:
            refusals.append(
                Refusal(
                    ref,
                    "SeveralServiceAccounts",
                    f"Service {namespace}/{name} selects pods of the service accounts {', '.join(accounts)}; a mesh "
                    "service has one identity: it is left out",
                )
            )
            continue
        if any(number == INBOUND_PORT for _, _, number in members):
            refusals.append(
                Refusal(
                    ref,
                    "PortConflict",
                    f"Service {namespace}/{name} targets port {INBOUND_PORT}, the sidecar's inbound port: it is "
                    "left out",
                )
            )
            continue
        try:
            identity = SpiffeId.for_kubernetes(trust_domain, namespace, accounts[0])
        except InvalidSpiffeIdError as err:
            notes.append(f"Service {namespace}/{name}: {err}; left out")
            continue
        first = protocol_of.setdefault(identity, (f"Service {namespace}/{name}", _protocol(port)))
        if first[1] is not _protocol(port):
            refusals.append(
                Refusal(
                    ref,
                    "MixedProtocols",
                    f"Service {namespace}/{name} is {_protocol(port)}, but its pods' service account {accounts[0]} "
                    f"already serves {first[1]} ({first[0]}); an identity serves one protocol in the mesh (its "
                    "TrafficTargets' rules are of that protocol): it is left out",
                )
            )
            continue
        instances = []
        for pod, address, number in members:
            owner_of[(namespace, pod.name)] = f"Service {namespace}/{name}"
            node = f"{pod.name}.{namespace}"
            inbound = Address(address, INBOUND_PORT)
            instances.append(Instance(node, Address(address, number), inbound, pod.node, captured=pod.captured))
        services[mesh_name] = Service(
            mesh_name, identity, _protocol(port), tuple(instances), (), _cluster_ip(obj, port)
        )
        service_ports[mesh_name] = _port_number(port)
    for mesh_name, (protocol, root_port) in root_ports.items():
        backend = next((services[b] for b in roots[mesh_name] if b in services), None)
        if backend is not None:  # a root has no sidecar of its own; it needs an identity the mesh already has
            services[mesh_name] = Service(mesh_name, backend.identity, protocol, (), (), root_ips[mesh_name])
            service_ports[mesh_name] = root_port
    _add_client_only(pods, owner_of, services, trust_domain, notes)
    return services, service_ports, refusals, notes


def _cluster_ip(obj: JsonObj, port: JsonObj) -> Address | None:
    """``spec.clusterIP`` and ``spec.ports[0].port`` of a Service, or None (a headless Service: ``None``, or no IP)."""
    ip, number = text(obj, "spec", "clusterIP"), _port_number(port)
    if number is None or not ip or ip == "None":
        return None
    try:
        ipaddress.ip_address(ip)
    except ValueError:
        return None
    return Address(ip, number)


def _port_number(port: JsonObj) -> int | None:
    number = port.get("port")
    if isinstance(number, int) and not isinstance(number, bool) and 1 <= number <= 65535:
        return number
    return None


def client_only_name(service_account: str, namespace: str) -> str:
    """The mesh service of the pods of ``namespace/service_account`` that no Service lists."""
    return f"{service_account}.{namespace}.serviceaccount"


def _add_client_only(
    pods: Mapping[Key, _Pod], owner_of: Mapping[Key, str], services: dict[str, Service], trust_domain: TrustDomain,
    notes: list[str],
) -> None:  # fmt: skip
    """Client-only sidecars (no app) for the running pods that no Service lists, one mesh service per account."""
    grouped: dict[tuple[str, str], list[_Pod]] = {}
    for key, pod in sorted(pods.items()):
        if key not in owner_of:
            grouped.setdefault((pod.namespace, pod.service_account), []).append(pod)
    for (namespace, account), members in sorted(grouped.items()):
        try:
            identity = SpiffeId.for_kubernetes(trust_domain, namespace, account)
        except InvalidSpiffeIdError as err:
            notes.append(f"ServiceAccount {namespace}/{account}: {err}; its pods are left out")
            continue
        name = client_only_name(account, namespace)
        instances = tuple(
            Instance(f"{p.name}.{namespace}", None, Address(p.ip, INBOUND_PORT), p.node, captured=p.captured)
            for p in members
        )
        # it serves nothing, so the policy checks (one protocol per destination identity) read no protocol of it
        # and the account's TrafficTargets hold while its pods start; it takes that of the account's Services
        protocol = next((s.protocol for s in services.values() if s.identity == identity), Protocol.TCP)
        services[name] = Service(name, identity, protocol, instances)


def add_upstreams(
    services: Mapping[str, Service], ports: Mapping[str, int | None], policy: Policy
) -> tuple[dict[str, Service], list[str]]:
    """``services`` with their upstreams (see the module docstring), and notes on the upstreams left out."""
    notes: list[str] = []
    callable_by: dict[str, frozenset[SpiffeId] | None] = {}
    for name, service in services.items():
        if ports.get(name) is None:
            continue
        split = policy.split_of(name)
        if split is not None:
            destinations = [services[b.service].identity for b in split.backends if b.service in services]
        elif service.endpoints:
            destinations = [service.identity]
        else:
            continue
        callers: set[SpiffeId] = set()
        for destination in destinations:
            targets = policy.access_to(destination)
            if targets is None:
                callable_by[name] = None
                break
            callers.update(source for target in targets for source in target.sources)
        else:
            callable_by[name] = frozenset(callers)
    order = sorted(callable_by, key=lambda n: (policy.split_of(n) is None, n))
    # what each identity may call, in that order, from one pass over the policy (not every service against every
    # target: that was most of the time of a translation at 300 services, bench/kube_registry.py)
    open_to_all = [target for target in order if callable_by[target] is None]
    rank = {target: i for i, target in enumerate(order)}
    callable_of: dict[SpiffeId, list[str]] = {}
    for target in order:
        for source in callable_by[target] or ():
            callable_of.setdefault(source, []).append(target)
    out: dict[str, Service] = {}
    for name, service in services.items():
        if not service.instances:
            out[name] = service
            continue
        taken: dict[int, str] = {INBOUND_PORT: "the sidecar's inbound port"}
        for instance in service.instances:
            if instance.app is not None:
                taken[instance.app.port] = "the app's port"
        upstreams = []
        captured = any(instance.captured for instance in service.instances)
        mine = callable_of.get(service.identity, [])
        allowed = sorted([*open_to_all, *mine], key=rank.__getitem__) if open_to_all else mine
        for target in allowed:
            if target == name:
                continue
            port = ports[target]
            assert port is not None
            if port in taken:
                if captured:  # its captured sidecars need no listener; the others do not get this upstream
                    upstreams.append(Upstream(target, port=port, capture_only=True))
                notes.append(
                    f"{name}: no upstream listener for {target}: its port {port} is {taken[port]} on {name}'s sidecars"
                )
                continue
            taken[port] = f"the upstream listener of {target}"
            upstreams.append(Upstream(target, port=port))
        if captured:  # the rest, denied by the policy: reached by ClusterIP, so the destination answers 403
            listed = set(allowed)
            for target in order:
                port = ports[target]
                if target != name and target not in listed and services[target].cluster_ip is not None:
                    assert port is not None
                    upstreams.append(Upstream(target, port=port, capture_only=True))
        out[name] = Service(
            name, service.identity, service.protocol, service.instances, tuple(upstreams), service.cluster_ip
        )
    return out, notes


def translate(
    snapshot: Snapshot,
    mesh_name: str,
    trust_domain: TrustDomain,
    previous: Mapping[DocKey, JsonObj],
    egress: Egress = Egress.DENY,
) -> Translation:
    """The mesh of ``snapshot``, validated as a registry publishes it (see the module docstring); ``previous``
    holds the SMI objects of the last accepted policy. ConfigError (the caller keeps its last good mesh) only
    when the mesh fails for a reason that is no SMI object's."""
    monitored = monitored_namespaces(snapshot, mesh_name)
    candidates: dict[DocKey, JsonObj] = {}
    for resource in SMI:
        for (namespace, name), obj in snapshot.of(resource).items():
            if namespace in monitored:
                candidates[(resource.kind, namespace, name)] = obj
    found: dict[str, tuple[list[Refusal], list[str]]] = {}

    def build(documents: Sequence[JsonObj], closed: Mapping[DocKey, SpiffeId | None]) -> Mesh:
        parsed = parse_policy(False, [parser_document(d, text(d, "kind")) for d in documents], trust_domain)
        roots = {split.service: tuple(b.service for b in split.backends) for split in parsed.splits}
        services, ports, refusals, notes = build_services(snapshot, monitored, trust_domain, roots)
        targets = _applicable(parsed.targets, services, trust_domain, notes)
        placeholders = []
        for key, identity in sorted(closed.items()):
            target = closed_target(key, identity, services) if identity is not None else None
            if target is not None:
                placeholders.append(target)
        policy = Policy(False, targets + tuple(placeholders), parsed.splits, parsed.route_groups, parsed.tcp_routes)
        services, left_out = add_upstreams(services, ports, policy)
        notes.extend(left_out)
        mesh = Mesh(trust_domain, MappingProxyType(services), policy, egress)
        validate_workloads(mesh, trust_domain)
        found["last"] = (refusals, notes)
        return mesh

    settled = settle(_with_kinds(candidates), previous, build, trust_domain)
    refusals, notes = found["last"]
    return Translation(settled.mesh, settled.accepted, (*refusals, *settled.refusals), tuple(notes))


def _applicable(
    targets: Sequence[TrafficTarget], services: Mapping[str, Service], trust_domain: TrustDomain, notes: list[str]
) -> tuple[TrafficTarget, ...]:
    """The TrafficTargets whose destination identity has a running pod in the mesh. The others are checked as far
    as they can be (ConfigError naming the object) and wait, with a note: a ServiceAccount with no pod has nothing
    to enforce them on, and objects reach the API in no set order (a TrafficTarget applied before its
    destination's pods is not a mistake)."""
    identities = {s.identity for s in services.values()}
    applicable = []
    for target in targets:
        if target.destination in identities:
            applicable.append(target)
            continue
        check_target(target, trust_domain)
        notes.append(
            f"TrafficTarget {target.namespace}/{target.name}: its destination {target.destination} has no running "
            "pod in the mesh; it applies once one runs"
        )
    return tuple(applicable)


def _with_kinds(candidates: Mapping[DocKey, JsonObj]) -> dict[DocKey, JsonObj]:
    """The candidates, each with its ``kind`` (list items of some servers lack it)."""
    out = {}
    for key, obj in candidates.items():
        out[key] = obj if obj.get("kind") == key[0] else {**obj, "kind": key[0]}
    return out
