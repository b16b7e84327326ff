"""Names of the Envoy resources built for a proxy; one place, so builders and tests agree."""

from __future__ import annotations


def inbound(service: str) -> str:
    """The inbound listener and its route configuration."""
    return f"inbound|{service}"


def local_app(service: str) -> str:
    """The cluster of the local app behind the inbound listener."""
    return f"inbound|{service}|app"


def outbound(upstream: str) -> str:
    """The outbound listener, route configuration and cluster (and its endpoints) for an upstream service."""
    return f"outbound|{upstream}"
