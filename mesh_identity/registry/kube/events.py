"""The Kubernetes Events the registry writes about objects it refused (``core/v1`` Event, ``type: Warning``).

:func:`event_for` is pure: the refusal, the time and the reporting instance in, the Event body out, in the
form ``kubectl describe`` shows under "Events" (``involvedObject``, ``reason``, ``message``, ``source``,
``firstTimestamp``/``lastTimestamp``, ``count``; ``reportingComponent`` and ``reportingInstance``).
"""

from __future__ import annotations

from datetime import datetime

from mesh_identity.registry.kube.objects import JsonObj, Refusal
from mesh_identity.registry.kube.resources import COMPONENT

MAX_MESSAGE = 1024  # what events.k8s.io allows in a note; core/v1 keeps more, but no reader wants it


def event_for(refusal: Refusal, now: datetime, instance: str, suffix: str) -> JsonObj:
    """The Event about ``refusal``; its name is ``<object name>.<suffix>`` (unique per Event, as client-go's)."""
    ref = refusal.object
    involved: JsonObj = {"apiVersion": ref.api_version, "kind": ref.kind, "name": ref.name}
    if ref.namespace:
        involved["namespace"] = ref.namespace
    if ref.uid:
        involved["uid"] = ref.uid
    if ref.resource_version:
        involved["resourceVersion"] = ref.resource_version
    stamp = now.strftime("%Y-%m-%dT%H:%M:%SZ")
    message = refusal.message if len(refusal.message) <= MAX_MESSAGE else refusal.message[: MAX_MESSAGE - 3] + "..."
    return {
        "apiVersion": "v1",
        "kind": "Event",
        "metadata": {"name": f"{ref.name[: 252 - len(suffix)]}.{suffix}", "namespace": ref.namespace or "default"},
        "involvedObject": involved,
        "reason": refusal.reason,
        "message": message,
        "type": "Warning",
        "source": {"component": COMPONENT},
        "reportingComponent": COMPONENT,
        "reportingInstance": instance[:128],
        "firstTimestamp": stamp,
        "lastTimestamp": stamp,
        "count": 1,
    }
