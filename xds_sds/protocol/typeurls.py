"""The xDS type URLs this server knows, and the order in which changes are pushed.

Envoy's "eventual consistency" rules: clusters (CDS) before their endpoints (EDS), both before the listeners
(LDS) that use them, and routes (RDS) last. Secrets (SDS) go before listeners so that a new listener's
certificate is already known when it warms.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import TypeVar

_State = TypeVar("_State")
_Response = TypeVar("_Response")

PREFIX = "type.googleapis.com/"

LISTENER = PREFIX + "envoy.config.listener.v3.Listener"
CLUSTER = PREFIX + "envoy.config.cluster.v3.Cluster"
ROUTE = PREFIX + "envoy.config.route.v3.RouteConfiguration"
ENDPOINT = PREFIX + "envoy.config.endpoint.v3.ClusterLoadAssignment"
SECRET = PREFIX + "envoy.extensions.transport_sockets.tls.v3.Secret"

KNOWN = frozenset({LISTENER, CLUSTER, ROUTE, ENDPOINT, SECRET})

# Types whose subscription may be a wildcard (all resources of the proxy): an empty name list or "*".
WILDCARD_TYPES = frozenset({LISTENER, CLUSTER})
WILDCARD = "*"

PUSH_ORDER = (CLUSTER, ENDPOINT, SECRET, LISTENER, ROUTE)


def push_rank(type_url: str) -> int:
    """Position of a type in the push order; unknown types after all known ones."""
    try:
        return PUSH_ORDER.index(type_url)
    except ValueError:
        return len(PUSH_ORDER)


def in_push_order(states: Mapping[str, _State], respond: Callable[[str, _State], _Response | None]) -> list[_Response]:
    """``respond(type_url, state)`` for each type in push order, the Nones left out (a stream's responses now)."""
    out = []
    for type_url in sorted(states, key=push_rank):
        response = respond(type_url, states[type_url])
        if response is not None:
            out.append(response)
    return out


def short_name(type_url: str) -> str:
    """``Secret`` for ``type.googleapis.com/envoy.extensions...Secret``: for logs and metric labels."""
    return type_url.rsplit(".", 1)[-1] if type_url.startswith(PREFIX) else type_url
