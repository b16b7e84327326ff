"""Rotation: scheduling (pure functions of ``now``), the engine on APScheduler, SVID sources, root rotation,
the status snapshot and the running service.

The modules, from the bottom up: :mod:`~mesh_identity.rotation.schedule` (due times, backoff, escalation),
:mod:`~mesh_identity.rotation.source` (current SVID and bundle with subscriptions),
:mod:`~mesh_identity.rotation.engine` (one job per identity), :mod:`~mesh_identity.rotation.roots` (prepare,
activate, retire on evidence), :mod:`~mesh_identity.rotation.status` (one snapshot for ``/status`` and the
metrics), :mod:`~mesh_identity.rotation.endpoint` (the HTTP listener) and
:mod:`~mesh_identity.rotation.service` (everything together, for ``mesh-identity serve``).
"""

from __future__ import annotations

from mesh_identity.rotation.engine import RotationEngine, RotationSettings, RotationState, RotationSummary
from mesh_identity.rotation.roots import AckSource, RootRotation
from mesh_identity.rotation.schedule import RetryPolicy, Validity
from mesh_identity.rotation.source import BundleSource, SvidSource

__all__ = [
    "AckSource",
    "BundleSource",
    "RetryPolicy",
    "RootRotation",
    "RotationEngine",
    "RotationSettings",
    "RotationState",
    "RotationSummary",
    "SvidSource",
    "Validity",
]
