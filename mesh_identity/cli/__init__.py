"""The ``mesh-identity`` command line.

Each command module parses its arguments, calls the composition root (:func:`mesh_identity.compose.build`,
through :mod:`mesh_identity.cli.common`) and prints; none imports another command module.
"""

from __future__ import annotations

from mesh_identity.cli.main import main

__all__ = ["main"]
