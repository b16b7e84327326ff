"""Plugins: the hook specifications, the plugin manager facade, and bundled plugins (audit)."""

from __future__ import annotations

import pluggy

NAME = "mesh_identity"
hookspec = pluggy.HookspecMarker(NAME)
hookimpl = pluggy.HookimplMarker(NAME)

__all__ = ["NAME", "hookimpl", "hookspec"]
