"""The ``mesh-identity`` command line.

The CLI is the composition root: it is the one place in ``mesh_identity`` that wires the core to the plugin
manager (``plugins``) and, for ``serve``, to the xDS server (``xds_sds``).
"""

from __future__ import annotations

from mesh_identity.cli.main import main

__all__ = ["main"]
