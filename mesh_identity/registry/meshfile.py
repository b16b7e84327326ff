"""The mesh file as a workload registry: read at start, read again on :meth:`MeshFileRegistry.reload` (SIGHUP).

A file that does not validate at start is an error (ConfigError naming the key path); on a reload it is logged
and the last good set stays in force, on every proxy.
"""

from __future__ import annotations

import logging
from pathlib import Path

from mesh_identity.errors import MeshIdentityError
from mesh_identity.mesh.model import Mesh, load_mesh
from mesh_identity.registry.base import PublishedRegistry, validate_workloads
from mesh_identity.spiffe import TrustDomain

log = logging.getLogger(__name__)


def load_mesh_file(path: Path, trust_domain: TrustDomain) -> Mesh:
    """The mesh file at ``path``, validated as a registry publishes it (ConfigError naming the key path)."""
    mesh = load_mesh(path, trust_domain)
    validate_workloads(mesh, trust_domain)
    return mesh


class MeshFileRegistry(PublishedRegistry):
    """See the module docstring."""

    def __init__(self, path: Path, trust_domain: TrustDomain) -> None:
        super().__init__(load_mesh_file(path, trust_domain))
        self.path = path

    def reload(self) -> bool:
        """Read the file again and publish it; on an error log it and keep the last good set."""
        try:
            workloads = self._publication.publish(load_mesh_file(self.path, self.trust_domain))
        except (MeshIdentityError, ValueError) as err:
            log.error("reloading %s failed, keeping the last good mesh: %s", self.path, err)
            return False
        log.info("reloaded %s: %s (version %d)", self.path, workloads.describe(), workloads.version)
        return True

    def describe(self) -> str:
        return f"mesh file {self.path} (SIGHUP reloads it)"
