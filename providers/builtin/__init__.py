"""The built-in CA provider: a self-signed root (or your own CA) kept in the state directory."""

from __future__ import annotations

from providers.builtin.provider import BuiltinProvider

__all__ = ["BuiltinProvider"]
