"""The SPIFFE Workload API for an injected pod's app containers, on request.

A pod annotated ``mesh-identity.io/workload-api: "true"`` gets, in each of its own containers, the agent's sockets
volume mounted read-only at the agent's socket directory (connecting to a Unix socket needs no write access to
the mount) and ``SPIFFE_ENDPOINT_SOCKET=unix://<the Workload API socket>``, the variable the SPIFFE client
libraries read. The agent serves the pod's identity to the users the pod names (``runAsUser`` of the container,
else of the pod; see :func:`mesh_identity.inject.patch.workload`): a container that names none runs as its
image's user, which the webhook cannot know, so it gets a warning and no identity. Without the annotation (or
with ``"false"``) the app containers get nothing and the agent serves Envoy alone.

Every function here reads the pod as the review parsed it and never raises for a malformed container (the
patch's checks name those); :func:`requested` raises :class:`ValueError` for an annotation value that is not
``"true"`` or ``"false"``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

JsonObj = dict[str, Any]

WORKLOAD_API = "mesh-identity.io/workload-api"  # "true": the app containers get the Workload API socket
ENDPOINT_ENV = "SPIFFE_ENDPOINT_SOCKET"


def requested(annotations: Mapping[str, Any]) -> bool:
    """Whether the pod's annotations ask for the Workload API; ValueError naming the annotation otherwise."""
    value = annotations.get(WORKLOAD_API, "false")
    if value not in ("true", "false"):
        raise ValueError(f'metadata.annotations[{WORKLOAD_API!r}]: {_shown(value)} is not "true" or "false"')
    return bool(value == "true")


def _shown(value: Any) -> str:
    """``value`` as an error message shows it: quoted, at most 80 characters."""
    shown = repr(value) if isinstance(value, str) else type(value).__name__
    return shown if len(shown) <= 80 else shown[:77] + "..."


def _containers(spec: Mapping[str, Any]) -> list[tuple[int, Mapping[str, Any]]]:
    found = spec.get("containers")
    items = found if isinstance(found, list) else []
    return [(i, c) for i, c in enumerate(items) if isinstance(c, Mapping)]


def _list(container: Mapping[str, Any], key: str) -> list[Mapping[str, Any]]:
    found = container.get(key)
    return [item for item in found if isinstance(item, Mapping)] if isinstance(found, list) else []


def conflicts(spec: Mapping[str, Any], socket_dir: str, socket: str) -> str | None:
    """Why the app containers cannot take the Workload API (a mount at ``socket_dir``, or ``SPIFFE_ENDPOINT_SOCKET``
    set to another socket), naming the field; None when they can."""
    wanted = endpoint(socket)
    for index, container in _containers(spec):
        where = f"spec.containers[{index}]"
        for key in ("volumeMounts", "env"):
            if container.get(key) is not None and not isinstance(container.get(key), list):
                return f"{where}.{key}: {_shown(container.get(key))} is not a list"
        for number, mount in enumerate(_list(container, "volumeMounts")):
            if str(mount.get("mountPath", "")).rstrip("/") == socket_dir:
                return f"{where}.volumeMounts[{number}].mountPath: {socket_dir} is where the agent's sockets go"
        for number, env in enumerate(_list(container, "env")):
            if env.get("name") == ENDPOINT_ENV and env.get("value") != wanted:
                return (
                    f"{where}.env[{number}]: {ENDPOINT_ENV} is already set, to {_shown(env.get('value'))}; the agent's "
                    f"Workload API is {wanted}"
                )
    return None


def additions(container: Mapping[str, Any], volume: str, socket_dir: str, socket: str) -> dict[str, list[JsonObj]]:
    """What a container of the pod gets, by list (``volumeMounts``, ``env``): the read-only mount of ``volume`` at
    ``socket_dir`` and ``SPIFFE_ENDPOINT_SOCKET``, unless it sets that already (to ``socket``: :func:`conflicts`
    refuses any other). Empty for a container that is not an object (the patch's checks name it)."""
    if not isinstance(container, Mapping):
        return {}
    found: dict[str, list[JsonObj]] = {"volumeMounts": [{"name": volume, "mountPath": socket_dir, "readOnly": True}]}
    if not any(e.get("name") == ENDPOINT_ENV for e in _list(container, "env")):
        found["env"] = [{"name": ENDPOINT_ENV, "value": endpoint(socket)}]
    return found


def run_as_user(spec: Mapping[str, Any], container: Mapping[str, Any]) -> int | None:
    """The user ``container`` of the pod ``spec`` runs as, as the kubelet resolves it: its own
    ``securityContext.runAsUser``, else the pod's; None when neither names a user id (0 to 2**31 - 1)."""
    pod_context = spec.get("securityContext")
    user = pod_context.get("runAsUser") if isinstance(pod_context, Mapping) else None
    context = container.get("securityContext")
    if isinstance(context, Mapping):
        user = context.get("runAsUser", user)
    if isinstance(user, int) and not isinstance(user, bool) and 0 <= user < 2**31:
        return user
    return None


def user_warnings(spec: Mapping[str, Any]) -> tuple[str, ...]:
    """A warning for each of ``spec``'s containers that names no ``runAsUser`` (nor does the pod): the agent tells
    its callers apart by user id, so that container gets no identity from the Workload API."""
    found = []
    for index, container in _containers(spec):
        if run_as_user(spec, container) is None:
            found.append(
                f"mesh-identity: spec.containers[{index}] ({container.get('name')!r}) names no runAsUser, so the "
                "Workload API serves it no identity (the agent knows callers by user id); set "
                "securityContext.runAsUser"
            )
    return tuple(found)


def endpoint(socket: str) -> str:
    """The value of ``SPIFFE_ENDPOINT_SOCKET`` for the Workload API socket at ``socket``."""
    return f"unix://{socket}"
