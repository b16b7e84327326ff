"""The state-of-the-world variant of the xDS protocol, for one stream (ADS or a single-type service).

Per type URL the stream keeps what it last sent. The rules, after Envoy's xDS protocol document:

* A request whose ``response_nonce`` is not the last nonce sent for its type is stale and ignored entirely.
* A request carrying the last nonce is an ACK, or a NACK when ``error_detail`` is set. A NACK changes
  nothing on the server: the proxy keeps its last good config, the server logs and counts it, and does not
  send the rejected version again (only a newer one).
* At most one response per type is in flight: the next is sent after the ACK or NACK of the previous one.
* LDS and CDS subscriptions with no names (or ``*``) are wildcards; other types get the names asked for.
* A response is sent for the first request of a type, when the subscribed names change, and when a
  subscribed resource changes. A non-wildcard subscription with nothing to send waits instead of sending an
  empty response (Envoy's SDS would reject that). A type this server does not serve gets an empty answer.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from envoy.service.discovery.v3 import discovery_pb2

from xds_sds.protocol.cache import Resource
from xds_sds.protocol.session import Session
from xds_sds.protocol.typeurls import WILDCARD, WILDCARD_TYPES, in_push_order


@dataclass
class _TypeState:
    names: frozenset[str] | None = None  # None: wildcard
    nonce: str = ""
    in_flight: bool = False
    sent: dict[str, Resource] = field(default_factory=dict)
    sent_version: str | None = None
    rejected_version: str | None = None
    must_respond: bool = True


class SotwStream:
    """State-of-the-world protocol state of one stream."""

    def __init__(self, session: Session) -> None:
        self.session = session
        self._types: dict[str, _TypeState] = {}

    def on_request(self, request: discovery_pb2.DiscoveryRequest) -> None:
        """Apply one request (raises :class:`~xds_sds.protocol.session.RequestError` to end the stream)."""
        s = self.session
        s.bind_node(request.node.id)
        type_url = s.check_type(request.type_url)
        s.check_names(type_url, request.resource_names)
        state = self._types.get(type_url)
        nonce = request.response_nonce
        if state is None:
            if nonce:
                s.stale(type_url, nonce)
                return
            state = self._types[type_url] = _TypeState()
            if not s.is_served(type_url):
                s.unknown_type(type_url)
        elif nonce and nonce != state.nonce:
            s.stale(type_url, nonce)
            return
        elif nonce:
            state.in_flight = False
            if request.HasField("error_detail"):
                state.rejected_version = state.sent_version
                s.nack(type_url, nonce, state.sent, request.error_detail.message)
            else:
                state.rejected_version = None
                s.ack(type_url, state.sent, complete=state.names is None)
        else:  # a fresh request on a type already known: answer it again, whatever was in flight
            state.in_flight = False
            state.must_respond = True
        names = self._names(type_url, request.resource_names)
        if names != state.names or not nonce:
            state.must_respond = True
        state.names = names
        if names is not None:
            s.audit_requested(type_url, names)

    def responses(self) -> list[discovery_pb2.DiscoveryResponse]:
        """The responses to send now, in push order (at most one per type)."""
        return in_push_order(self._types, self._respond)

    def subscribed_types(self) -> frozenset[str]:
        return frozenset(self._types)

    def _names(self, type_url: str, requested: list[str]) -> frozenset[str] | None:
        if type_url in WILDCARD_TYPES and (not requested or WILDCARD in requested):
            return None
        if not self.session.is_served(type_url) and not requested:
            return None
        return frozenset(requested)

    def _respond(self, type_url: str, state: _TypeState) -> discovery_pb2.DiscoveryResponse | None:
        s = self.session
        if state.in_flight:
            return None
        if s.is_served(type_url):
            snap = s.snapshot(type_url)
            selected = s.select(type_url, snap, state.names)
            version = snap.version
        else:
            selected, version = {}, ""
        changed = {n: r.version for n, r in selected.items()} != {n: r.version for n, r in state.sent.items()}
        if not (state.must_respond or changed):
            return None
        if version == state.rejected_version and not state.must_respond:
            return None
        if not selected and state.names is not None and s.is_served(type_url):
            return None
        state.must_respond = False
        state.in_flight = True
        state.sent = selected
        state.sent_version = version
        state.nonce = s.next_nonce()
        s.sent(type_url)
        return discovery_pb2.DiscoveryResponse(
            version_info=version,
            resources=[r.body for r in selected.values()],
            type_url=type_url,
            nonce=state.nonce,
        )
