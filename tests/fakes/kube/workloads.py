"""Workload kinds of the Kubernetes fake: ServiceAccount, Pod, Service and Event (core/v1), EndpointSlice
(``discovery.k8s.io/v1``), with the server-side defaults the mesh relies on, checked against the official
schemas.

* Every object written (created, replaced, patched, its status set) is validated with ``kubernetes_validate``
  (strict: an unknown field is an error) against each of :data:`SCHEMA_VERSIONS` (the newest version it ships
  and one two minors older), after the server's defaults: a 422 ``Invalid`` names the field and the version. So
  a fixture a test writes, and an Event the product writes, is an object a real API server would take.
* Defaults, as the real server sets them: a Pod's ``spec.serviceAccountName`` (``default``) and its first
  status (``phase: Pending``); a Service's ``type`` (ClusterIP), a ``clusterIP`` from ``10.96.0.0/16``,
  ``sessionAffinity``, each port's ``protocol`` (TCP) and ``targetPort`` (its ``port``).
* A little of the real validation: a Pod needs containers with a name and an image, a Service's ports need
  names when there are several, an Event's ``involvedObject.namespace`` must be its own namespace.

Field selectors: Pods by ``spec.nodeName``, ``spec.serviceAccountName``, ``status.phase``, ``status.podIP``;
Events by ``involvedObject.*``, ``reason``, ``type`` (what ``kubectl describe`` asks for).

EndpointSlices are written by :class:`~tests.fakes.kube.endpointslices.EndpointSliceController`, as
kube-controller-manager writes them in a cluster.
"""

from __future__ import annotations

import ipaddress
import itertools
import threading
from collections.abc import Sequence

import kubernetes_validate

from tests.fakes.kube.errors import JsonObj
from tests.fakes.kube.kinds import Kind, Preparer, Validator

SCHEMA_VERSIONS = ("1.37", "1.35")
SERVICE_CIDR = ipaddress.ip_network("10.96.0.0/16")


def schema_errors(obj: JsonObj, versions: Sequence[str] = SCHEMA_VERSIONS) -> list[str]:
    """What the official schemas of ``versions`` (strict) find wrong with ``obj``, as 422 causes."""
    errors = []
    for version in versions:
        try:
            kubernetes_validate.validate(obj, version, strict=True)
        except kubernetes_validate.ValidationError as err:
            where = ".".join(str(p) for p in err.path) or "<root>"
            errors.append(f"{where}: Invalid value: {err.message} (schema of Kubernetes {version})")
        except (kubernetes_validate.SchemaNotFoundError, kubernetes_validate.InvalidSchemaError) as err:
            errors.append(f"<root>: Internal error: no schema of Kubernetes {version} for this kind: {err}")
    return errors


def checked(*checks: Validator, versions: Sequence[str] = SCHEMA_VERSIONS) -> Validator:
    """A kind's validator: ``checks`` (the real server's rules we reproduce), then the official schemas."""

    def validate(kind: Kind, old: JsonObj | None, new: JsonObj) -> list[str]:
        errors = [e for check in checks for e in check(kind, old, new)]
        return errors or schema_errors(new, versions)

    return validate


# ------------------------------------------------------------------------------------------------ Pods


def _prepare_pod(obj: JsonObj) -> None:
    spec = obj.setdefault("spec", {})
    if isinstance(spec, dict):
        spec.setdefault("serviceAccountName", "default")
    if "status" not in obj:  # created: the main resource never carries a status in (see the store)
        obj["status"] = {"phase": "Pending", "qosClass": "BestEffort"}


def _validate_pod(kind: Kind, old: JsonObj | None, new: JsonObj) -> list[str]:
    spec = new.get("spec") if isinstance(new.get("spec"), dict) else {}
    containers = spec.get("containers")
    if not isinstance(containers, list) or not containers:
        return ["spec.containers: Required value"]
    errors = []
    for i, container in enumerate(containers):
        for key in ("name", "image"):
            if not isinstance(container, dict) or not container.get(key):
                errors.append(f"spec.containers[{i}].{key}: Required value")
    if old is not None and (old.get("spec") or {}).get("serviceAccountName") != spec.get("serviceAccountName"):
        errors.append("spec: Forbidden: pod updates may not change fields other than image and tolerations")
    return errors


# -------------------------------------------------------------------------------------------- Services


class _ClusterIps:
    """The service CIDR's allocator: one address per Service, never handed out twice."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._next = itertools.count(10)

    def allocate(self) -> str:
        with self._lock:
            return str(SERVICE_CIDR[next(self._next)])


def _service_preparer(ips: _ClusterIps) -> Preparer:
    def prepare(obj: JsonObj) -> None:
        spec = obj.setdefault("spec", {})
        if not isinstance(spec, dict):
            return
        kind = spec.setdefault("type", "ClusterIP")
        if kind != "ExternalName":
            spec.setdefault("sessionAffinity", "None")
            if not spec.get("clusterIP"):
                spec["clusterIP"] = ips.allocate()
            spec.setdefault("clusterIPs", [spec["clusterIP"]])
            if spec["clusterIP"] != "None":
                spec.setdefault("ipFamilies", ["IPv4"])
                spec.setdefault("ipFamilyPolicy", "SingleStack")
            spec.setdefault("internalTrafficPolicy", "Cluster")
        for port in spec.get("ports") or []:
            if isinstance(port, dict):
                port.setdefault("protocol", "TCP")
                if "port" in port:
                    port.setdefault("targetPort", port["port"])

    return prepare


def _validate_service(kind: Kind, old: JsonObj | None, new: JsonObj) -> list[str]:
    spec = new.get("spec") if isinstance(new.get("spec"), dict) else {}
    if spec.get("type") == "ExternalName":
        return [] if spec.get("externalName") else ["spec.externalName: Required value"]
    ports = spec.get("ports")
    if not isinstance(ports, list) or not ports:
        return ["spec.ports: Required value"]
    errors = []
    names: set[str] = set()
    for i, port in enumerate(ports):
        if not isinstance(port, dict):
            continue
        name = port.get("name") or ""
        if len(ports) > 1 and not name:
            errors.append(f"spec.ports[{i}].name: Required value")
        if name in names:
            errors.append(f'spec.ports[{i}].name: Duplicate value: "{name}"')
        names.add(name)
        number = port.get("port")
        if not isinstance(number, int) or not 1 <= number <= 65535:
            errors.append(f"spec.ports[{i}].port: Invalid value: {number!r}: must be between 1 and 65535, inclusive")
    if old is not None:
        before = (old.get("spec") or {}).get("clusterIP")
        if before and spec.get("clusterIP") != before:
            errors.append("spec.clusterIP: Invalid value: field is immutable")
    return errors


# ---------------------------------------------------------------------------------------------- Events


def _validate_event(kind: Kind, old: JsonObj | None, new: JsonObj) -> list[str]:
    involved = new.get("involvedObject")
    if not isinstance(involved, dict) or not involved.get("name"):
        return ["involvedObject.name: Required value"]
    namespace = (new.get("metadata") or {}).get("namespace", "")
    errors = []
    if involved.get("namespace", namespace) != namespace:
        errors.append(
            f'involvedObject.namespace: Invalid value: "{involved.get("namespace")}": does not match event.namespace'
        )
    if new.get("type") not in ("Normal", "Warning"):
        errors.append(f'type: Unsupported value: "{new.get("type")}": supported values: "Normal", "Warning"')
    reason = new.get("reason")
    if not isinstance(reason, str) or not reason or len(reason) > 128:
        errors.append("reason: Invalid value: must be a non-empty string of at most 128 characters")
    return errors


# ------------------------------------------------------------------------------------------------ kinds


def workload_kinds(versions: Sequence[str] = SCHEMA_VERSIONS) -> tuple[Kind, ...]:
    """ServiceAccount, Pod, Service, EndpointSlice and Event, each validated against ``versions`` (none: the
    server's own rules only, for benchmarks where validation would be most of the time)."""
    ips = _ClusterIps()
    return (
        Kind("ServiceAccount", "serviceaccounts", short_names=("sa",), validate=checked(versions=versions)),
        Kind(
            "Pod",
            "pods",
            status_subresource=True,
            short_names=("po",),
            field_labels=("spec.nodeName", "spec.serviceAccountName", "status.phase", "status.podIP"),
            prepare=_prepare_pod,
            validate=checked(_validate_pod, versions=versions),
        ),
        Kind(
            "Service",
            "services",
            status_subresource=True,
            short_names=("svc",),
            field_labels=("spec.clusterIP", "spec.type"),
            prepare=_service_preparer(ips),
            validate=checked(_validate_service, versions=versions),
        ),
        Kind(
            "EndpointSlice",
            "endpointslices",
            group="discovery.k8s.io",
            validate=checked(versions=versions),
        ),
        Kind(
            "Event",
            "events",
            short_names=("ev",),
            field_labels=(
                "involvedObject.kind",
                "involvedObject.namespace",
                "involvedObject.name",
                "involvedObject.uid",
                "involvedObject.apiVersion",
                "involvedObject.resourceVersion",
                "involvedObject.fieldPath",
                "reason",
                "reportingComponent",
                "source",
                "type",
            ),
            validate=checked(_validate_event, versions=versions),
        ),
    )


def kind_named(kinds: Sequence[Kind], name: str) -> Kind:
    """The kind called ``name`` among ``kinds`` (KeyError if none)."""
    for kind in kinds:
        if kind.kind == name:
            return kind
    raise KeyError(name)
