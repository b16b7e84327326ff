"""Errors of the node agent that stop it from starting (the CLI prints them as one line)."""

from __future__ import annotations

from mesh_identity.errors import MeshIdentityError


class AgentError(MeshIdentityError):
    """The agent cannot start: a socket path in use or not a socket, a directory it may not use."""
