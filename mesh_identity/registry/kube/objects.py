"""Reading Kubernetes objects as the API returned them (JSON), trusting no field: every reader returns the value
when it has the expected type, else the default. And :class:`ObjectRef`, :class:`Refusal`: which object the
registry refused, and why (the registry logs it and writes a Kubernetes Event on it)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from mesh_identity.registry.kube.resources import Resource

JsonObj = dict[str, Any]


def field(obj: Any, *path: str) -> Any:
    """``obj[path[0]][path[1]]...``, or None where a step is missing or not a mapping."""
    for part in path:
        if not isinstance(obj, dict):
            return None
        obj = obj.get(part)
    return obj


def text(obj: Any, *path: str, default: str = "") -> str:
    value = field(obj, *path)
    return value if isinstance(value, str) else default


def items(obj: Any, *path: str) -> list[Any]:
    value = field(obj, *path)
    return value if isinstance(value, list) else []


def labels(obj: Any) -> Mapping[str, str]:
    value = field(obj, "metadata", "labels")
    if not isinstance(value, dict):
        return {}
    return {k: v for k, v in value.items() if isinstance(k, str) and isinstance(v, str)}


@dataclass(frozen=True, slots=True)
class ObjectRef:
    """An object an Event can be about (``involvedObject``)."""

    kind: str
    api_version: str
    namespace: str
    name: str
    uid: str = ""
    resource_version: str = ""

    @classmethod
    def of(cls, resource: Resource, obj: JsonObj) -> ObjectRef:
        return cls(
            resource.kind,
            resource.api_version,
            text(obj, "metadata", "namespace"),
            text(obj, "metadata", "name"),
            text(obj, "metadata", "uid"),
            text(obj, "metadata", "resourceVersion"),
        )

    def __str__(self) -> str:
        return f"{self.kind} {self.namespace}/{self.name}" if self.namespace else f"{self.kind} {self.name}"


@dataclass(frozen=True, slots=True)
class Refusal:
    """An object the registry did not take as it is: ``reason`` is the Event's (CamelCase), ``message`` names
    the object, what is wrong, and what the registry does instead."""

    object: ObjectRef
    reason: str
    message: str
