"""SMI custom resources as policy: the same parser and checks as the mesh file's ``policies``, and the last good
version of each object kept when a new one does not validate. Pure functions.

The objects of the monitored namespaces are handed to :func:`mesh_identity.mesh.smi.parse_policy` as the mesh
file's documents (kind, ``metadata.name`` and ``namespace``, ``spec``), with a TrafficSplit's services named as
the registry names mesh services (``<name>.<namespace>``: a split's root and backends are Services of its own
namespace), and the mesh they make is checked whole (:func:`~mesh_identity.registry.base.validate_workloads`).

When that fails, the error names the document (``policies[i]``), and :func:`settle` takes that object back:

* to its last good version (the one in the previous accepted policy) when it has changed since;
* a TrafficTarget that has not changed but no longer validates because an HTTPRouteGroup or TCPRoute it uses was
  changed or deleted keeps the last good version of those instead;
* otherwise it is left out. A TrafficTarget left out this way does not open its destination to the whole mesh
  (what no TrafficTarget at all would mean): it is replaced by one that admits no caller (:func:`closed_target`)
  until it is fixed. Fail closed: the author of a bad TrafficTarget meant to restrict, not to open.

Then it tries again, until the mesh validates (a bounded number of rounds: each object can only be taken back
so often). Every object taken back is a :class:`~mesh_identity.registry.kube.objects.Refusal` with a message
that names it (``TrafficSplit shop/canary: spec.backends: the weights add up to 90, not 100; ...``).
"""

from __future__ import annotations

import copy
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

from mesh_identity.errors import ConfigError, InvalidSpiffeIdError
from mesh_identity.mesh.model import Mesh, Protocol, Service
from mesh_identity.mesh.policy import HttpRule, TcpRule, TrafficTarget
from mesh_identity.registry.kube.objects import JsonObj, ObjectRef, Refusal, field, items, text
from mesh_identity.registry.kube.resources import SMI, TRAFFIC_SPLITS, TRAFFIC_TARGETS, Resource
from mesh_identity.spiffe import SpiffeId, TrustDomain

REFUSED = "InvalidPolicy"  # the reason of the Event on a refused SMI object
DocKey = tuple[str, str, str]  # (kind, namespace, name)
RESOURCES: Mapping[str, Resource] = {r.kind: r for r in SMI}
_POLICY = re.compile(r"policies\[(\d+)\]")
_SERVICE = re.compile(r"'([a-z0-9]([a-z0-9-]*[a-z0-9])?)\.([a-z0-9]([a-z0-9-]*[a-z0-9])?)'")

Build = Callable[[Sequence[JsonObj], Mapping[DocKey, SpiffeId | None]], Mesh]
"""Makes the mesh of these SMI objects (in this order: the ``policies[i]`` of its errors), with these refused
TrafficTargets' destinations closed; ConfigError when it does not validate."""


def mesh_service_name(name: str, namespace: str) -> str:
    """The name of the mesh service of Kubernetes Service ``namespace/name``."""
    return f"{name}.{namespace}"


def describe(key: DocKey) -> str:
    kind, namespace, name = key
    return f"{kind} {namespace}/{name}"


def parser_document(obj: JsonObj, kind: str) -> JsonObj:
    """``obj`` as a mesh-file policy document (what :func:`~mesh_identity.mesh.smi.parse_policy` reads)."""
    metadata = {k: v for k in ("name", "namespace") if (v := field(obj, "metadata", k)) is not None}
    spec = copy.deepcopy(obj.get("spec")) if "spec" in obj else None
    namespace = text(obj, "metadata", "namespace")
    if kind == TRAFFIC_SPLITS.kind and isinstance(spec, dict):
        if isinstance(spec.get("service"), str) and spec["service"]:
            spec["service"] = mesh_service_name(spec["service"], namespace)
        for backend in items(spec, "backends"):
            if isinstance(backend, dict) and isinstance(backend.get("service"), str) and backend["service"]:
                backend["service"] = mesh_service_name(backend["service"], namespace)
    document: JsonObj = {"apiVersion": RESOURCES[kind].api_version, "kind": kind, "metadata": metadata}
    if spec is not None:
        document["spec"] = spec
    return document


def _same(a: JsonObj, b: JsonObj) -> bool:
    return a.get("spec") == b.get("spec")


def _dependencies(key: DocKey, obj: JsonObj) -> list[DocKey]:
    """The HTTPRouteGroups and TCPRoutes a TrafficTarget's rules name (in its namespace)."""
    found = []
    for rule in items(obj, "spec", "rules"):
        kind, name = text(rule, "kind"), text(rule, "name")
        if kind in ("HTTPRouteGroup", "TCPRoute") and name:
            found.append((kind, key[1], name))
    return found


def destination(key: DocKey, obj: JsonObj, trust_domain: TrustDomain) -> SpiffeId | None:
    """The identity a TrafficTarget is about, read leniently (None when it cannot be read)."""
    section = field(obj, "spec", "destination")
    try:
        if text(section, "kind", default="ServiceAccount") == "SpiffeId":
            return SpiffeId.parse(text(section, "id"))
        return SpiffeId.for_kubernetes(trust_domain, text(section, "namespace", default=key[1]), text(section, "name"))
    except (InvalidSpiffeIdError, ValueError):
        return None


def closed_target(key: DocKey, identity: SpiffeId, services: Mapping[str, Service]) -> TrafficTarget | None:
    """A TrafficTarget that names ``identity`` as its destination and admits no caller: a rule of no HTTP
    match, or of no TCP port (port 0, which no app has); None when ``identity`` serves no service of the mesh,
    or serves both protocols."""
    protocols = {s.protocol for s in services.values() if s.identity == identity}
    if len(protocols) != 1:
        return None
    rule = HttpRule("refused", ()) if protocols == {Protocol.HTTP} else TcpRule("refused", (0,))
    _, namespace, name = key
    origin = f"{describe(key)} (refused: admits no caller)"
    return TrafficTarget(name, namespace, identity, (identity,), (rule,), origin=origin)


def _detail(message: str, order: Sequence[DocKey]) -> tuple[int, str] | None:
    """The index of the document an error names first, and the error with every document named as an object
    and every mesh service as a Service; None when it names none."""
    match = _POLICY.match(message)
    if match is None or int(match.group(1)) >= len(order):
        return None
    rest = message[match.end() :].lstrip(".")

    def named(found: re.Match[str]) -> str:
        index = int(found.group(1))
        return describe(order[index]) if index < len(order) else found.group(0)

    rest = _POLICY.sub(named, rest)
    rest = _SERVICE.sub(lambda m: f"Service {m.group(3)}/{m.group(1)}", rest)
    rest = rest.replace(
        "is not a service of this mesh", "is not in the mesh (no such Service, no ready pods, or refused)"
    )
    return int(match.group(1)), rest


@dataclass(frozen=True, slots=True)
class Settled:
    mesh: Mesh
    accepted: Mapping[DocKey, JsonObj]  # the objects of the mesh's policy: the last good versions next time
    refusals: tuple[Refusal, ...]


def settle(
    candidates: Mapping[DocKey, JsonObj], previous: Mapping[DocKey, JsonObj], build: Build, trust_domain: TrustDomain
) -> Settled:
    """The mesh of ``candidates`` (the SMI objects now), taking back what does not validate (see the module
    docstring); ``previous`` is the last accepted set. ConfigError when the mesh fails for a reason that is no
    SMI object's (the caller keeps its last good mesh)."""
    docs = dict(candidates)
    closed: dict[DocKey, SpiffeId | None] = {}
    refusals: list[Refusal] = []
    for _ in range(3 * len(docs) + 3):
        order = sorted(docs)
        try:
            mesh = build([docs[k] for k in order], closed)
        except ConfigError as err:
            found = _detail(str(err), order)
            if found is None:
                raise
            index, detail = found
            key = order[index]
            current = docs[key]
            ref = ObjectRef.of(RESOURCES[key[0]], candidates.get(key, current))
            message = f"{describe(key)}: {detail}"
            before = previous.get(key)
            if before is not None and not _same(before, current):
                docs[key] = before
                refusals.append(Refusal(ref, REFUSED, f"{message}; its last good version stays in force"))
                continue
            if key[0] == TRAFFIC_TARGETS.kind:
                changed = [
                    d
                    for d in _dependencies(key, current)
                    if d in previous and (d not in docs or not _same(docs[d], previous[d]))
                ]
                for dependency in changed:
                    docs[dependency] = previous[dependency]
                    gone = dependency not in candidates
                    on = ref if gone else ObjectRef.of(RESOURCES[dependency[0]], candidates[dependency])
                    what = "was deleted" if gone else "was changed"
                    refusals.append(
                        Refusal(
                            on,
                            REFUSED,
                            f"{describe(dependency)} {what}, and {describe(key)} does not validate without its last "
                            f"good version ({detail}); that version stays in force for it",
                        )
                    )
                if changed:
                    continue
            del docs[key]
            if key[0] == TRAFFIC_TARGETS.kind:
                closed[key] = destination(key, current, trust_domain)
                refusals.append(Refusal(ref, REFUSED, f"{message}; its destination admits no caller until it is fixed"))
            else:
                refusals.append(Refusal(ref, REFUSED, f"{message}; it is left out"))
            continue
        return Settled(mesh, {k: docs[k] for k in order}, tuple(refusals))
    raise ConfigError("the SMI objects could not be settled into a valid policy")
