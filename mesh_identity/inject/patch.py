"""The JSONPatch that injects a Pod: the capture init container, the Envoy sidecar and the node agent.

What an injected Pod gains (``spec`` paths; every name begins with ``mesh-identity``)::

    initContainers[0]  mesh-identity-capture   sh -c '<the iptables rules of mesh_identity.inject.rules>'
                                               root, not privileged, capabilities NET_ADMIN and NET_RAW only
    containers[-]      mesh-identity-envoy     envoy -c <CONFIG_DIR>/envoy.json; UID 1337, no privilege
                                               escalation, no capabilities, resource requests
    containers[-]      mesh-identity-agent     mesh-identity agent --config <CONFIG_DIR>/agent.yaml; UID 1338;
                                               authenticates with the projected service-account token
    volumes[-]         mesh-identity-sockets   emptyDir, medium Memory: the agent's SDS and Workload API sockets
                       mesh-identity-agent     emptyDir, medium Memory: the agent's state (its own SVID)
                       mesh-identity-token     projected serviceAccountToken, audience mesh-identity, 1 hour
                       mesh-identity-config    downwardAPI: the two annotations below as files
                       mesh-identity-ca        the trust bundle ConfigMap mesh-identity-root-ca (ca.crt)

and, for a pod annotated ``mesh-identity.io/workload-api: "true"``, in each of its own containers the sockets volume
read-only and ``SPIFFE_ENDPOINT_SOCKET`` (:mod:`.workloadapi`); and annotations ``mesh-identity.io/injected:
"true"`` (the marker that makes injection idempotent),
``mesh-identity.io/envoy-bootstrap`` and ``mesh-identity.io/agent-config`` (the two documents, made by the
composition root's :attr:`InjectSettings.documents`, since this package does not speak Envoy's protos).

Nothing in the Pod holds a private key or a long-lived credential: no Secret volume, no environment from a Secret;
the token expires within the hour (kubelet renews it) and the keys are made by the agent, in memory volumes.

:func:`pod_patch` validates the pod and its annotations and builds the whole patch, or raises
:class:`InjectError` naming the field: never a partial patch.
"""

from __future__ import annotations

import copy
import enum
import ipaddress
import json
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from mesh_identity.errors import InvalidSpiffeIdError, MeshIdentityError
from mesh_identity.inject import workloadapi
from mesh_identity.inject.rules import (
    AGENT_UID,
    CaptureSettings,
    capture_rules,
    shell_command,
)
from mesh_identity.mesh.ports import ADMIN_PORT, STATS_PORT
from mesh_identity.registry.kube.bundles import NAME as BUNDLE_CONFIG_MAP
from mesh_identity.registry.kube.resources import INJECTED as RESOURCES_INJECTED
from mesh_identity.spiffe import SpiffeId, TrustDomain

JsonObj = dict[str, Any]

PREFIX = "mesh-identity.io/"
INJECT = PREFIX + "inject"  # "false": the pod is not injected
INJECTED = RESOURCES_INJECTED  # "true": the marker of an injected pod (the registry reads it too)
EXCLUDE_OUTBOUND_PORTS = PREFIX + "exclude-outbound-ports"
EXCLUDE_INBOUND_PORTS = PREFIX + "exclude-inbound-ports"
EXCLUDE_OUTBOUND_IP_RANGES = PREFIX + "exclude-outbound-ip-ranges"
ENVOY_BOOTSTRAP = PREFIX + "envoy-bootstrap"
AGENT_CONFIG = PREFIX + "agent-config"

CAPTURE_CONTAINER = "mesh-identity-capture"
ENVOY_CONTAINER = "mesh-identity-envoy"
AGENT_CONTAINER = "mesh-identity-agent"
SOCKETS_VOLUME = "mesh-identity-sockets"
AGENT_STATE_VOLUME = "mesh-identity-agent"
TOKEN_VOLUME = "mesh-identity-token"  # noqa: S105 - a name, not a secret
CONFIG_VOLUME = "mesh-identity-config"
CA_VOLUME = "mesh-identity-ca"
CONTAINERS = (CAPTURE_CONTAINER, ENVOY_CONTAINER, AGENT_CONTAINER)
VOLUMES = (SOCKETS_VOLUME, AGENT_STATE_VOLUME, TOKEN_VOLUME, CONFIG_VOLUME, CA_VOLUME)

SOCKET_DIR = "/var/run/mesh-identity/sockets"
SDS_SOCKET = SOCKET_DIR + "/sds.sock"
WORKLOAD_SOCKET = SOCKET_DIR + "/workload.sock"
AGENT_STATE_DIR = "/var/run/mesh-identity/agent"
CONFIG_DIR = "/var/run/mesh-identity/config"
ENVOY_BOOTSTRAP_FILE = CONFIG_DIR + "/envoy.json"
AGENT_CONFIG_FILE = CONFIG_DIR + "/agent.yaml"
TOKEN_DIR = "/var/run/secrets/tokens"  # noqa: S105 - a name, not a secret
TOKEN_PATH = "mesh-identity"  # noqa: S105 - a name, not a secret
TOKEN_FILE = TOKEN_DIR + "/" + TOKEN_PATH
CA_DIR = "/var/run/mesh-identity/ca"

TOKEN_AUDIENCE = "mesh-identity"  # noqa: S105 - a name, not a secret
TOKEN_EXPIRATION_SECONDS = 3600
MAX_ANNOTATIONS_BYTES = 256 * 1024  # the API server's limit on all of an object's annotations together


class InjectError(MeshIdentityError, ValueError):
    """A pod that cannot be injected; the message names the field (an annotation, a container, a port)."""


class FailureMode(enum.StrEnum):
    """What the webhook answers for a pod it cannot inject."""

    DENY = "deny"  # refuse the pod, with the reason (the default: fail closed)
    ALLOW = "allow"  # admit the pod unmodified, with the reason as a warning


@dataclass(frozen=True, slots=True)
class Workload:
    """Who the injected pod is: the input of :attr:`InjectSettings.documents`."""

    namespace: str
    pod_name: str  # metadata.name, else metadata.generateName without its trailing '-'
    service_account: str
    spiffe_id: SpiffeId
    app_uids: tuple[int, ...] = ()  # with the Workload API (workloadapi.WORKLOAD_API): the app containers'
    # runAsUser, where the pod names one; the agent serves the pod's identity to them (and to Envoy)


@dataclass(frozen=True, slots=True)
class SidecarDocuments:
    """The sidecars' config files, as text: Envoy's bootstrap (JSON) and the agent's config (YAML)."""

    envoy_bootstrap: str
    agent_config: str


def _default_resources() -> Mapping[str, Mapping[str, str]]:
    return {"requests": {"cpu": "100m", "memory": "128Mi"}}


def _agent_resources() -> Mapping[str, Mapping[str, str]]:
    return {"requests": {"cpu": "50m", "memory": "64Mi"}}


@dataclass(frozen=True, slots=True)
class InjectSettings:
    """The mesh's side of injection. ``capture`` holds the mesh-wide exclusions; a pod's annotations add to them."""

    trust_domain: TrustDomain
    envoy_image: str
    agent_image: str
    capture_image: str
    documents: Callable[[Workload], SidecarDocuments]
    capture: CaptureSettings = field(default_factory=CaptureSettings)
    envoy_resources: Mapping[str, Mapping[str, str]] = field(default_factory=_default_resources)
    agent_resources: Mapping[str, Mapping[str, str]] = field(default_factory=_agent_resources)
    failure_mode: FailureMode = FailureMode.DENY

    def __post_init__(self) -> None:
        for name in ("envoy_image", "agent_image", "capture_image"):
            value = getattr(self, name)
            if not isinstance(value, str) or not value or value != value.strip():
                raise ValueError(f"{name}: {value!r} is not an image reference")
        if not isinstance(self.failure_mode, FailureMode):
            raise ValueError(f"failure_mode: {self.failure_mode!r} is not one of deny, allow")


# -- reading the pod ------------------------------------------------------------------------------------------


def pod_annotations(pod: Mapping[str, Any]) -> Mapping[str, Any]:
    metadata = pod.get("metadata")
    found = metadata.get("annotations") if isinstance(metadata, Mapping) else None
    return found if isinstance(found, Mapping) else {}


def is_injected(pod: Mapping[str, Any]) -> bool:
    """Whether ``pod`` carries the marker, or any of our containers or volumes (injected before, perhaps by
    another replica): it is then never injected again."""
    if pod_annotations(pod).get(INJECTED) == "true":
        return True
    found = pod.get("spec")
    spec: Mapping[str, Any] = found if isinstance(found, Mapping) else {}
    names = set()
    for key in ("initContainers", "containers", "volumes"):
        for item in spec.get(key) or ():
            if isinstance(item, Mapping):
                names.add(item.get("name"))
    return bool(names & {*CONTAINERS, *VOLUMES})


def _ports(pod: Mapping[str, Any], key: str) -> tuple[int, ...]:
    text = pod_annotations(pod).get(key)
    if text is None:
        return ()
    if not isinstance(text, str):
        raise InjectError(f"metadata.annotations[{key!r}]: {text!r} is not a string of comma-separated ports")
    ports: list[int] = []
    for part in (p.strip() for p in text.split(",")):
        if not part:
            continue
        if not part.isascii() or not part.isdigit() or not 1 <= int(part) <= 65535:
            raise InjectError(f"metadata.annotations[{key!r}]: {part!r} is not a port (1-65535)")
        if int(part) in ports:
            raise InjectError(f"metadata.annotations[{key!r}]: port {part} is listed twice")
        ports.append(int(part))
    return tuple(ports)


def _cidrs(pod: Mapping[str, Any], key: str) -> tuple[str, ...]:
    text = pod_annotations(pod).get(key)
    if text is None:
        return ()
    if not isinstance(text, str):
        raise InjectError(f"metadata.annotations[{key!r}]: {text!r} is not a string of comma-separated CIDRs")
    cidrs: list[str] = []
    for part in (p.strip() for p in text.split(",")):
        if not part:
            continue
        try:
            network = ipaddress.ip_network(part, strict=True)
        except ValueError as err:
            raise InjectError(f"metadata.annotations[{key!r}]: {part!r} is not a CIDR ({err})") from None
        if network.version != 4:
            raise InjectError(f"metadata.annotations[{key!r}]: {part!r} is IPv6; the capture rules are IPv4")
        if str(network) in cidrs:
            raise InjectError(f"metadata.annotations[{key!r}]: {part!r} is listed twice")
        cidrs.append(str(network))
    return tuple(cidrs)


def capture_settings(pod: Mapping[str, Any], mesh: CaptureSettings) -> CaptureSettings:
    """The mesh's capture settings plus the pod's exclusion annotations; InjectError naming the annotation for a
    malformed or conflicting one (excluding the sidecar's own capture ports)."""
    inbound = _ports(pod, EXCLUDE_INBOUND_PORTS)
    outbound = _ports(pod, EXCLUDE_OUTBOUND_PORTS)
    cidrs = _cidrs(pod, EXCLUDE_OUTBOUND_IP_RANGES)
    for key, ports in ((EXCLUDE_INBOUND_PORTS, inbound), (EXCLUDE_OUTBOUND_PORTS, outbound)):
        for port in ports:
            if port in (mesh.inbound_port, mesh.outbound_port):
                raise InjectError(
                    f"metadata.annotations[{key!r}]: port {port} is the sidecar's own capture port; excluding it "
                    "would bypass the mesh"
                )
    try:
        return CaptureSettings(
            proxy_uid=mesh.proxy_uid,
            inbound_port=mesh.inbound_port,
            outbound_port=mesh.outbound_port,
            exclude_inbound_ports=tuple(dict.fromkeys((*mesh.exclude_inbound_ports, *inbound))),
            exclude_outbound_ports=tuple(dict.fromkeys((*mesh.exclude_outbound_ports, *outbound))),
            exclude_outbound_cidrs=tuple(dict.fromkeys((*mesh.exclude_outbound_cidrs, *cidrs))),
        )
    except ValueError as err:
        raise InjectError(f"metadata.annotations: {err}") from None


def _sidecar_ports(capture: CaptureSettings) -> dict[int, str]:
    return {
        capture.inbound_port: "mi-inbound",
        capture.outbound_port: "mi-outbound",
        ADMIN_PORT: "mi-admin",
        STATS_PORT: "mi-stats",
    }


def _member(parent: Mapping[str, Any], key: str) -> Mapping[str, Any]:
    found = parent.get(key)
    return found if isinstance(found, Mapping) else {}


def _check_pod(pod: Mapping[str, Any], capture: CaptureSettings) -> None:
    spec = pod["spec"]
    reserved = _sidecar_ports(capture)
    for key in ("initContainers", "containers"):
        for index, container in enumerate(spec.get(key) or ()):
            where = f"spec.{key}[{index}]"
            if not isinstance(container, Mapping):
                raise InjectError(f"{where}: {container!r} is not a container")
            user = workloadapi.run_as_user(spec, container)
            if key == "containers" and user in (capture.proxy_uid, AGENT_UID):
                raise InjectError(
                    f"{where}.securityContext.runAsUser: {user} is the sidecar's user; the app's traffic would "
                    "escape capture"
                )
            for number, port in enumerate(container.get("ports") or ()):
                if not isinstance(port, Mapping):
                    continue
                if port.get("containerPort") in reserved:
                    raise InjectError(
                        f"{where}.ports[{number}].containerPort: {port.get('containerPort')} is a port of the "
                        "sidecar (15000, 15001, 15003, 15090 are reserved)"
                    )
                if port.get("name") in reserved.values():
                    raise InjectError(f"{where}.ports[{number}].name: {port.get('name')!r} is a sidecar port's name")


def probe_warnings(pod: Mapping[str, Any], excluded: Collection[int] = ()) -> tuple[str, ...]:
    """Warnings for the app's network probes: kubelet's connection from the node is captured like any inbound
    connection, reaches the sidecar's mTLS listener and fails, unless its port is in ``excluded`` (the inbound
    ports left alone) or the probe runs a command."""
    found: list[str] = []
    for index, container in enumerate(pod["spec"].get("containers") or ()):
        if not isinstance(container, Mapping):
            continue
        named = {
            port.get("name"): port.get("containerPort")
            for port in container.get("ports") or ()
            if isinstance(port, Mapping) and port.get("name")
        }
        for probe in ("livenessProbe", "readinessProbe", "startupProbe"):
            spec = container.get(probe)
            if not isinstance(spec, Mapping):
                continue
            for action in ("httpGet", "tcpSocket", "grpc"):
                if isinstance(spec.get(action), Mapping):
                    port = spec[action].get("port")
                    if named.get(port, port) in excluded:
                        continue
                    found.append(
                        f"mesh-identity: spec.containers[{index}].{probe}.{action} (port {port}) goes through the "
                        f"sidecar's mTLS listener and fails; exclude its port with {EXCLUDE_INBOUND_PORTS} or use "
                        "an exec probe"
                    )
    return tuple(found)


def workload(pod: Mapping[str, Any], namespace: str, trust_domain: TrustDomain, *, apps: bool = False) -> Workload:
    found = pod.get("metadata")
    metadata: Mapping[str, Any] = found if isinstance(found, Mapping) else {}
    name = metadata.get("name") or str(metadata.get("generateName") or "").rstrip("-")
    if not isinstance(name, str) or not name:
        raise InjectError("metadata.name: required (or metadata.generateName)")
    account = pod["spec"].get("serviceAccountName") or "default"
    if not isinstance(account, str):
        raise InjectError(f"spec.serviceAccountName: {account!r} is not a name")
    try:
        identity = SpiffeId.for_kubernetes(trust_domain, namespace, account)
    except InvalidSpiffeIdError as err:
        raise InjectError(f"spec.serviceAccountName: {err}") from None
    spec = pod["spec"]
    containers = (spec.get("containers") or ()) if apps else ()
    users = {workloadapi.run_as_user(spec, c) for c in containers if isinstance(c, Mapping)}
    uids = tuple(sorted(u for u in users if u is not None))
    return Workload(namespace, name, account, identity, uids)


# -- what is added ---------------------------------------------------------------------------------------------


def _restricted(uid: int) -> JsonObj:
    return {
        "runAsUser": uid,
        "runAsGroup": uid,
        "runAsNonRoot": True,
        "allowPrivilegeEscalation": False,
        "privileged": False,
        "readOnlyRootFilesystem": True,
        "capabilities": {"drop": ["ALL"]},
        "seccompProfile": {"type": "RuntimeDefault"},
    }


def _containers(settings: InjectSettings, capture: CaptureSettings) -> tuple[JsonObj, JsonObj, JsonObj]:
    init = {
        "name": CAPTURE_CONTAINER,
        "image": settings.capture_image,
        "command": ["sh", "-c", shell_command(capture_rules(capture))],
        "securityContext": {
            "runAsUser": 0,
            "runAsNonRoot": False,
            "privileged": False,
            "allowPrivilegeEscalation": False,
            "capabilities": {"add": ["NET_ADMIN", "NET_RAW"], "drop": ["ALL"]},
        },
        "resources": {"requests": {"cpu": "10m", "memory": "16Mi"}},
    }
    envoy = {
        "name": ENVOY_CONTAINER,
        "image": settings.envoy_image,
        # the node id is the registry's <pod>.<namespace>, known only once the pod has its name (a pod made from
        # generateName gets it after admission): Envoy takes it from the command line, expanded by the kubelet
        "command": ["envoy", "-c", ENVOY_BOOTSTRAP_FILE, "--service-node", "$(POD_NAME).$(POD_NAMESPACE)"],
        "env": [
            _field_env("POD_NAME", "metadata.name"),
            _field_env("POD_NAMESPACE", "metadata.namespace"),
        ],
        "ports": [
            {"name": "mi-inbound", "containerPort": capture.inbound_port, "protocol": "TCP"},
            {"name": "mi-stats", "containerPort": STATS_PORT, "protocol": "TCP"},
        ],
        "securityContext": _restricted(capture.proxy_uid),
        "resources": _copy(settings.envoy_resources),
        "volumeMounts": [
            {"name": SOCKETS_VOLUME, "mountPath": SOCKET_DIR},
            {"name": CONFIG_VOLUME, "mountPath": CONFIG_DIR, "readOnly": True},
        ],
    }
    agent = {
        "name": AGENT_CONTAINER,
        "image": settings.agent_image,
        "command": ["mesh-identity", "agent", "--config", AGENT_CONFIG_FILE],
        "env": [{"name": "TMPDIR", "value": AGENT_STATE_DIR}],  # its private sockets: the root filesystem is read-only
        "securityContext": _restricted(AGENT_UID),
        "resources": _copy(settings.agent_resources),
        "volumeMounts": [
            {"name": SOCKETS_VOLUME, "mountPath": SOCKET_DIR},
            {"name": AGENT_STATE_VOLUME, "mountPath": AGENT_STATE_DIR},
            {"name": TOKEN_VOLUME, "mountPath": TOKEN_DIR, "readOnly": True},
            {"name": CONFIG_VOLUME, "mountPath": CONFIG_DIR, "readOnly": True},
            {"name": CA_VOLUME, "mountPath": CA_DIR, "readOnly": True},
        ],
    }
    return init, envoy, agent


def _field_env(name: str, path: str) -> JsonObj:
    return {"name": name, "valueFrom": {"fieldRef": {"apiVersion": "v1", "fieldPath": path}}}


def _copy(value: Mapping[str, Mapping[str, str]]) -> JsonObj:
    return {key: dict(inner) for key, inner in value.items()}


def _volumes() -> list[JsonObj]:
    def annotation(key: str, path: str) -> JsonObj:
        return {"path": path, "fieldRef": {"apiVersion": "v1", "fieldPath": f"metadata.annotations['{key}']"}}

    return [
        {"name": SOCKETS_VOLUME, "emptyDir": {"medium": "Memory", "sizeLimit": "1Mi"}},
        {"name": AGENT_STATE_VOLUME, "emptyDir": {"medium": "Memory", "sizeLimit": "1Mi"}},
        {
            "name": TOKEN_VOLUME,
            "projected": {
                "sources": [
                    {
                        "serviceAccountToken": {
                            "audience": TOKEN_AUDIENCE,
                            "expirationSeconds": TOKEN_EXPIRATION_SECONDS,
                            "path": TOKEN_PATH,
                        }
                    }
                ]
            },
        },
        {
            "name": CONFIG_VOLUME,
            "downwardAPI": {
                "items": [
                    annotation(ENVOY_BOOTSTRAP, ENVOY_BOOTSTRAP_FILE.rsplit("/", 1)[1]),
                    annotation(AGENT_CONFIG, AGENT_CONFIG_FILE.rsplit("/", 1)[1]),
                ]
            },
        },
        {"name": CA_VOLUME, "configMap": {"name": BUNDLE_CONFIG_MAP, "items": [{"key": "ca.crt", "path": "ca.crt"}]}},
    ]


def _pointer(*parts: str) -> str:
    return "".join("/" + part.replace("~", "~0").replace("/", "~1") for part in parts)


def _append(
    parent: Mapping[str, Any], key: str, items: Sequence[JsonObj], *, first: bool = False, at: Sequence[str] = ("spec",)
) -> list[JsonObj]:
    """``add`` operations putting ``items`` at the end (``first``: the start) of the list ``key`` of ``parent``,
    the object at the path ``at``; the list is created when ``parent`` has none."""
    if not parent.get(key):
        return [{"op": "add", "path": _pointer(*at, key), "value": list(items)}]
    if first:
        return [{"op": "add", "path": _pointer(*at, key, str(i)), "value": item} for i, item in enumerate(items)]
    return [{"op": "add", "path": _pointer(*at, key, "-"), "value": item} for item in items]


def pod_patch(pod: Mapping[str, Any], namespace: str, settings: InjectSettings) -> list[JsonObj]:
    """The JSONPatch (RFC 6902, ``add`` operations only) that injects ``pod``; InjectError naming the field for a
    pod that cannot be injected. ``pod`` is a Pod whose ``spec.containers`` is a non-empty list (the review
    checked it) and that is not injected yet (:func:`is_injected`)."""
    spec = pod["spec"]
    capture = capture_settings(pod, settings.capture)
    _check_pod(pod, capture)
    apps = _workload_api(pod)
    who = workload(pod, namespace, settings.trust_domain, apps=apps)
    documents = settings.documents(who)
    added = {INJECTED: "true", ENVOY_BOOTSTRAP: documents.envoy_bootstrap, AGENT_CONFIG: documents.agent_config}
    existing = {**pod_annotations(pod), **added}
    size = sum(len(str(k).encode()) + len(str(v).encode()) for k, v in existing.items())
    if size > MAX_ANNOTATIONS_BYTES:
        raise InjectError(
            f"metadata.annotations: {size} bytes with the sidecars' config, more than the {MAX_ANNOTATIONS_BYTES} "
            "Kubernetes allows"
        )
    init, envoy, agent = _containers(settings, capture)
    ops: list[JsonObj] = []
    metadata = pod.get("metadata")
    if not isinstance(metadata, Mapping):
        ops.append({"op": "add", "path": "/metadata", "value": {"annotations": added}})
    elif not isinstance(metadata.get("annotations"), Mapping):
        ops.append({"op": "add", "path": "/metadata/annotations", "value": added})
    else:
        ops.extend({"op": "add", "path": _pointer("metadata", "annotations", k), "value": v} for k, v in added.items())
    ops.extend(_append(spec, "initContainers", [init], first=True))
    for index, container in enumerate(spec["containers"] if apps else ()):  # the pod's own, before ours
        at = ("spec", "containers", str(index))
        for key, items in workloadapi.additions(container, SOCKETS_VOLUME, SOCKET_DIR, WORKLOAD_SOCKET).items():
            ops.extend(_append(container, key, items, at=at))
    ops.extend(_append(spec, "containers", [envoy, agent]))
    ops.extend(_append(spec, "volumes", _volumes()))
    return ops


def _workload_api(pod: Mapping[str, Any]) -> bool:
    """Whether the pod asks for the Workload API in its app containers (see :mod:`.workloadapi`); InjectError
    for a bad annotation or a container that cannot take it."""
    try:
        wanted = workloadapi.requested(pod_annotations(pod))
    except ValueError as err:
        raise InjectError(str(err)) from None
    problem = workloadapi.conflicts(pod["spec"], SOCKET_DIR, WORKLOAD_SOCKET) if wanted else None
    if problem is not None:
        raise InjectError(problem)
    return wanted


def admission_warnings(pod: Mapping[str, Any], capture: CaptureSettings) -> tuple[str, ...]:
    """The warnings that come with the patch of an injectable ``pod``: its network probes that would fail
    (:func:`probe_warnings`) and, with the Workload API, its containers that name no user."""
    found = probe_warnings(pod, capture_settings(pod, capture).exclude_inbound_ports)
    if workloadapi.requested(pod_annotations(pod)):
        found += workloadapi.user_warnings(pod["spec"])
    return found


# -- applying a patch (what the API server does with it; the tests' fake API server uses it too) -------------


def apply_patch(document: Mapping[str, Any], ops: Sequence[Mapping[str, Any]]) -> JsonObj:
    """``document`` with the ``add`` operations ``ops`` applied (RFC 6902 semantics for ``add``: a new member,
    a replaced member, an insertion at an index or ``-``); ValueError for anything else."""
    result: JsonObj = copy.deepcopy(dict(document))
    for op in ops:
        if op.get("op") != "add" or not isinstance(op.get("path"), str) or "value" not in op:
            raise ValueError(f"unsupported patch operation {json.dumps(op)[:200]}")
        parts = [p.replace("~1", "/").replace("~0", "~") for p in op["path"].split("/")[1:]]
        if not parts:
            raise ValueError("a patch operation on the whole document")
        target: Any = result
        for part in parts[:-1]:
            target = target[int(part)] if isinstance(target, list) else target[part]
        last, value = parts[-1], copy.deepcopy(op["value"])
        if isinstance(target, list):
            index = len(target) if last == "-" else int(last)
            if not 0 <= index <= len(target):
                raise ValueError(f"{op['path']}: index out of range")
            target.insert(index, value)
        elif isinstance(target, dict):
            target[last] = value
        else:
            raise ValueError(f"{op['path']}: the parent is not an object or an array")
    return result
