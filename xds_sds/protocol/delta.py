"""The incremental ("delta") variant of the xDS protocol, for one stream.

Per type URL the stream keeps the client's subscriptions (explicit names, and a wildcard flag for LDS/CDS)
and the version of every resource the client is known to hold. A response carries only the resources whose
version differs from the client's, and the names of resources the client holds that are gone.

* The first request of a type may list ``initial_resource_versions`` (a reconnecting client's state): what
  it already holds at those versions is not sent again.
* ``*`` subscribes to (or, unsubscribed, leaves) the wildcard; an LDS/CDS stream whose first request names
  nothing is a wildcard, as in the protocol's legacy rule.
* A request whose ``response_nonce`` is the one in flight is its ACK (or NACK with ``error_detail``); any
  other non-empty nonce is stale: its ACK/NACK part is ignored, its subscription changes still apply.
* A NACK keeps what the client held; the rejected versions are not sent again, only newer ones.
* A type this server does not serve is answered with an empty response.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from envoy.service.discovery.v3 import discovery_pb2

from xds_sds.protocol.cache import Resource
from xds_sds.protocol.session import Session
from xds_sds.protocol.typeurls import WILDCARD, WILDCARD_TYPES, in_push_order


@dataclass
class _TypeState:
    wildcard: bool = False
    names: set[str] = field(default_factory=set)
    known: dict[str, str] = field(default_factory=dict)  # name -> version the client holds
    rejected: dict[str, str] = field(default_factory=dict)  # name -> version it refused
    nonce: str = ""
    in_flight: bool = False
    sent: dict[str, Resource] = field(default_factory=dict)
    sent_removed: frozenset[str] = frozenset()
    must_respond: bool = True


class DeltaStream:
    """Incremental protocol state of one stream."""

    def __init__(self, session: Session) -> None:
        self.session = session
        self._types: dict[str, _TypeState] = {}

    def on_request(self, request: discovery_pb2.DeltaDiscoveryRequest) -> None:
        """Apply one request (raises :class:`~xds_sds.protocol.session.RequestError` to end the stream)."""
        s = self.session
        s.bind_node(request.node.id)
        type_url = s.check_type(request.type_url)
        subscribe = list(request.resource_names_subscribe)
        unsubscribe = list(request.resource_names_unsubscribe)
        s.check_names(type_url, [*subscribe, *unsubscribe, *request.initial_resource_versions])
        state = self._types.get(type_url)
        if state is None:
            state = self._types[type_url] = _TypeState()
            state.wildcard = WILDCARD in subscribe or (not subscribe and type_url in WILDCARD_TYPES)
            state.known = dict(request.initial_resource_versions)
            if not s.is_served(type_url):
                s.unknown_type(type_url)
        nonce = request.response_nonce
        if nonce and (nonce != state.nonce or not state.in_flight):
            s.stale(type_url, nonce)
        elif nonce:
            state.in_flight = False
            if request.HasField("error_detail"):
                state.rejected.update((n, r.version) for n, r in state.sent.items())
                s.nack(type_url, nonce, state.sent, request.error_detail.message)
            else:
                state.known.update((n, r.version) for n, r in state.sent.items())
                for name in state.sent_removed:
                    state.known.pop(name, None)
                for name in state.sent:
                    state.rejected.pop(name, None)
                s.ack(type_url, state.sent, state.sent_removed)
            state.sent, state.sent_removed = {}, frozenset()
        if WILDCARD in subscribe:
            state.wildcard = True
        if WILDCARD in unsubscribe:
            state.wildcard = False
        added = {n for n in subscribe if n != WILDCARD} - state.names
        for name in unsubscribe:
            state.names.discard(name)
            state.known.pop(name, None)  # so that subscribing again sends it again
        state.names |= added
        s.audit_requested(type_url, added)
        if added or not nonce:
            state.must_respond = True

    def responses(self) -> list[discovery_pb2.DeltaDiscoveryResponse]:
        """The responses to send now, in push order (at most one per type)."""
        return in_push_order(self._types, self._respond)

    def _respond(self, type_url: str, state: _TypeState) -> discovery_pb2.DeltaDiscoveryResponse | None:
        s = self.session
        if state.in_flight:
            return None
        if not s.is_served(type_url):
            if not state.must_respond:
                return None
            selected: dict[str, Resource] = {}
            version = ""
        else:
            snap = s.snapshot(type_url)
            version = snap.version
            selected = s.select(type_url, snap, None if state.wildcard else frozenset(state.names))
            if state.wildcard and state.names:
                selected.update(s.select(type_url, snap, frozenset(state.names)))
        upserts = {
            n: r for n, r in selected.items() if state.known.get(n) != r.version and state.rejected.get(n) != r.version
        }
        removed = frozenset(n for n in state.known if n not in selected)
        if not upserts and not removed:
            empty_answer = state.wildcard or not s.is_served(type_url)
            if not (state.must_respond and empty_answer):
                return None
        state.must_respond = False
        state.in_flight = True
        state.sent, state.sent_removed = upserts, removed
        state.nonce = s.next_nonce()
        s.sent(type_url)
        return discovery_pb2.DeltaDiscoveryResponse(
            system_version_info=version,
            resources=[
                discovery_pb2.Resource(name=r.name, version=r.version, resource=r.body) for r in upserts.values()
            ],
            removed_resources=sorted(removed),
            type_url=type_url,
            nonce=state.nonce,
        )
