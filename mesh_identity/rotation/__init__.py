"""Rotation: keeping every identity's SVID issued and fresh.

From the bottom up: :mod:`~mesh_identity.rotation.schedule` (due times, backoff, escalation: pure functions of
``now``), :mod:`~mesh_identity.rotation.source` (the current SVID and bundle, with subscriptions),
:mod:`~mesh_identity.rotation.engine` (one APScheduler job per identity), :mod:`~mesh_identity.rotation.roots`
(root rotation: prepare, activate, retire on evidence) and :mod:`~mesh_identity.rotation.membership` (the
workload registry decides which identities the engine keeps issued).
"""

from __future__ import annotations

from mesh_identity.rotation.engine import RotationEngine, RotationSettings, RotationState, RotationSummary
from mesh_identity.rotation.roots import AckSource, RootRotation, RootStep
from mesh_identity.rotation.schedule import RetryPolicy, Validity
from mesh_identity.rotation.source import BundleSource, SvidSource

__all__ = [
    "AckSource",
    "BundleSource",
    "RetryPolicy",
    "RootRotation",
    "RootStep",
    "RotationEngine",
    "RotationSettings",
    "RotationState",
    "RotationSummary",
    "SvidSource",
    "Validity",
]
