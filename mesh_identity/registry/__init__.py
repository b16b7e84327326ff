"""The workload registry: which workloads exist, where they run, whom they call, under which policy.

A registry holds the current, versioned set of workloads (:class:`~mesh_identity.registry.base.Workloads`: the
mesh model of :mod:`mesh_identity.mesh` at a version) and tells its subscribers about every change. The core
turns it into the identities the rotation engine keeps issued (:mod:`mesh_identity.rotation.membership`); the
xDS layer subscribes to it for the sidecars' config. Implementations:

* :class:`~mesh_identity.registry.meshfile.MeshFileRegistry`: the mesh file (SIGHUP reloads it; a file that
  does not validate is logged and the last good set stays);
* :class:`~mesh_identity.registry.base.StaticRegistry`: a fixed set (an xDS server with no mesh file);
* any other source (Kubernetes) implements :class:`~mesh_identity.registry.base.WorkloadRegistry`, with
  :class:`~mesh_identity.registry.base.Publication` (or
  :class:`~mesh_identity.registry.base.PublishedRegistry`) for the versioning and the subscriptions if it likes.
"""

from __future__ import annotations

from mesh_identity.registry.base import (
    Publication,
    PublishedRegistry,
    StaticRegistry,
    WorkloadRegistry,
    Workloads,
    control_plane_identity,
    validate_workloads,
)
from mesh_identity.registry.meshfile import MeshFileRegistry

__all__ = [
    "MeshFileRegistry",
    "Publication",
    "PublishedRegistry",
    "StaticRegistry",
    "WorkloadRegistry",
    "Workloads",
    "control_plane_identity",
    "validate_workloads",
]
