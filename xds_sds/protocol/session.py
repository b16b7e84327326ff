"""What every discovery stream shares: the server's parts, the peer, the node, request checks and audit.

The stream protocols (:mod:`xds_sds.protocol.sotw`, :mod:`xds_sds.protocol.delta`) are plain state machines: they take
requests and cache changes, and say which responses to send. :mod:`xds_sds.protocol.server` does the gRPC I/O.

A request names at most :data:`MAX_RESOURCE_NAMES` resources (``Env.max_names``; more is ``INVALID_ARGUMENT``).
The names of one request (or one response) that the peer may not have are audited together: one
:class:`~mesh_identity.events.AccessDenied` and one log line listing the first :data:`AUDIT_NAMES` of them and
how many there were, whatever their number; each name once per stream. Peer text in log lines is escaped
(:func:`~xds_sds.protocol.text.escaped`).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime

import grpc

from mesh_identity.events import AccessDenied, EventSink, NullSink
from mesh_identity.spiffe import SpiffeId
from xds_sds.protocol.acks import AckTracker
from xds_sds.protocol.auth import Authorizer
from xds_sds.protocol.cache import Resource, SnapshotCache, TypeSnapshot
from xds_sds.protocol.metrics import XdsMetrics, type_label
from xds_sds.protocol.text import escaped
from xds_sds.protocol.typeurls import KNOWN, PREFIX, short_name

log = logging.getLogger("xds_sds")

MAX_RESOURCE_NAMES = 1_000  # resource names one request may carry (delta: subscribe + unsubscribe + initial)
AUDIT_NAMES = 32  # names listed in one aggregated AccessDenied event
_EVENT_TEXT = 2_048  # characters of an event's resource or reason (each name in it: text.LIMIT)
_REMEMBERED_DENIALS = 10_000  # per stream: names already audited (beyond that, the memory starts again)


class RequestError(Exception):
    """A request the server refuses; the stream ends with ``code`` and this message. ``routine``: an expected
    end (a stream or a retry on an old connection whose certificate is no longer valid after a rotation, a
    stream ended by a workload change), logged at INFO; every other refusal is a warning. Both are audited."""

    def __init__(self, code: grpc.StatusCode, message: str, *, routine: bool = False) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.routine = routine


@dataclass
class Env:
    """The server parts a stream uses."""

    cache: SnapshotCache
    acks: AckTracker
    authorizer: Authorizer
    audit: EventSink = field(default_factory=NullSink)
    metrics: XdsMetrics = field(default_factory=XdsMetrics)
    served_types: frozenset[str] = KNOWN
    clock: Callable[[], datetime] = lambda: datetime.now(UTC)
    max_names: int = MAX_RESOURCE_NAMES


class Session:
    """One stream's peer and node, with the checks and bookkeeping common to both protocol variants."""

    def __init__(
        self, env: Env, identity: SpiffeId, peer: str, fixed_type: str | None = None, serial: str = ""
    ) -> None:
        self.env = env
        self.identity = identity
        self.peer = peer
        self.serial = serial
        self.fixed_type = fixed_type
        self.node_id: str | None = None
        self._nonce = 0
        self._denied: set[tuple[str, str]] = set()
        self._refusals: list[tuple[str, str, str]] = []  # (type URL, name, reason) not audited yet

    def bind_node(self, node_id: str) -> bool:
        """Check the node id of a request; True when this is the stream's first (the node is now known)."""
        if self.node_id is None:
            if not node_id:
                raise RequestError(grpc.StatusCode.INVALID_ARGUMENT, "the first request must carry node.id")
            reason = self.env.authorizer.node_denied(self.identity, node_id)
            if reason is not None:
                self.deny(f"node {node_id}", "node", reason)
                raise RequestError(grpc.StatusCode.PERMISSION_DENIED, reason)
            self.node_id = node_id
            return True
        if node_id and node_id != self.node_id:
            raise RequestError(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"node.id changed on the stream from {self.node_id!r} to {node_id!r}",
            )
        return False

    def check_type(self, type_url: str) -> str:
        """The request's type URL, validated (the SDS service defaults an empty one to Secret)."""
        if self.fixed_type is not None:
            if type_url in ("", self.fixed_type):
                return self.fixed_type
            raise RequestError(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"type_url {type_url!r} is not served here (only {self.fixed_type})",
            )
        if not type_url:
            raise RequestError(grpc.StatusCode.INVALID_ARGUMENT, "type_url is required on an aggregated stream")
        if not type_url.startswith(PREFIX) or len(type_url) == len(PREFIX):
            raise RequestError(
                grpc.StatusCode.INVALID_ARGUMENT, f"type_url {type_url!r} is not of the form {PREFIX}<message>"
            )
        return type_url

    def check_names(self, type_url: str, names: Sequence[str]) -> None:
        """No empty name, and no more than ``Env.max_names`` of them."""
        if len(names) > self.env.max_names:
            raise RequestError(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"a {short_name(type_url)} request may name at most {self.env.max_names} resources; "
                f"this one names {len(names)}",
            )
        if any(name == "" for name in names):
            raise RequestError(
                grpc.StatusCode.INVALID_ARGUMENT, f"empty resource name in a {short_name(type_url)} request"
            )

    def is_served(self, type_url: str) -> bool:
        return type_url in self.env.served_types

    def next_nonce(self) -> str:
        self._nonce += 1
        return str(self._nonce)

    @property
    def node(self) -> str:
        if self.node_id is None:  # pragma: no cover - only called after bind_node
            raise RuntimeError("node not bound yet")
        return self.node_id

    def snapshot(self, type_url: str) -> TypeSnapshot:
        return self.env.cache.get(self.node, type_url)

    def allowed(self, type_url: str, name: str) -> bool:
        """Ask the authorizer; a refusal is audited once per stream and name."""
        ok = self._allowed(type_url, name)
        self._report_refusals()
        return ok

    def _allowed(self, type_url: str, name: str) -> bool:
        reason = self.env.authorizer.resource_denied(self.identity, self.node, type_url, name)
        if reason is None:
            return True
        if (type_url, name) not in self._denied:
            if len(self._denied) >= _REMEMBERED_DENIALS:
                self._denied.clear()
            self._denied.add((type_url, name))
            self._refusals.append((type_url, name, reason))
        return False

    def select(self, type_url: str, snap: TypeSnapshot, names: frozenset[str] | None) -> dict[str, Resource]:
        """The resources of ``snap`` that the stream subscribes to (all when ``names`` is None) and may have."""
        if names is None:
            candidates = list(snap.resources.values())
        else:
            candidates = [snap.resources[n] for n in sorted(names) if n in snap.resources]
        selected = {r.name: r for r in candidates if self._allowed(type_url, r.name)}
        self._report_refusals()
        return selected

    def audit_requested(self, type_url: str, names: Iterable[str]) -> None:
        """Run the authorizer over names as they are requested, so refusals are audited even when absent: one
        event for all the names refused."""
        for name in sorted(names):
            self._allowed(type_url, name)
        self._report_refusals()

    def _report_refusals(self) -> None:
        """One event, one log line for the refusals collected (per type URL: a request has one)."""
        refusals, self._refusals = self._refusals, []
        by_type: dict[str, list[tuple[str, str]]] = {}
        for type_url, name, reason in refusals:
            by_type.setdefault(type_url, []).append((name, reason))
        for type_url, found in by_type.items():
            kind = short_name(type_url)
            listed = tuple(f"{kind} {escaped(name)}" for name, _ in found[:AUDIT_NAMES])
            more = len(found) - 1
            resource = listed[0] if not more else f"{listed[0]} and {more} more"
            reason = found[0][1] if not more else f"{found[0][1]} (and {more} more refusals)"
            self.deny(resource, type_label(type_url), reason, listed, len(found))

    def deny(
        self, resource: str, label: str, reason: str, resources: tuple[str, ...] | None = None, count: int = 1
    ) -> None:
        """Audit, log and count one refusal (of ``count`` names, the first of them ``resources``). Peer text is
        escaped and bounded in the event as in the log line."""
        self.env.metrics.denied.labels(label).inc(count)
        resource, reason = escaped(resource, limit=_EVENT_TEXT), escaped(reason, limit=_EVENT_TEXT)
        log.warning("access denied to %s for %s (%s): %s", resource, self.identity, self.peer, reason)
        listed = (resource,) if resources is None else resources
        self.env.audit.emit(AccessDenied(str(self.identity), resource, reason, self.env.clock(), listed, count))

    def ack(
        self,
        type_url: str,
        sent: dict[str, Resource],
        removed: Iterable[str] = (),
        *,
        complete: bool = False,
    ) -> None:
        self.env.metrics.acks.labels(type_label(type_url)).inc()
        self.env.acks.record_ack(self.node, type_url, sent.values(), removed, complete=complete)

    def nack(self, type_url: str, nonce: str, sent: dict[str, Resource], error: str) -> None:
        self.env.metrics.nacks.labels(type_label(type_url)).inc()
        log.warning(
            "NACK from node %s (%s) for %s nonce %s: %s",
            escaped(self.node),
            self.identity,
            escaped(short_name(type_url)),
            escaped(nonce),
            escaped(error, limit=4 * 1024),
        )
        self.env.acks.record_nack(self.node, type_url, nonce, sent.values(), error)

    def stale(self, type_url: str, nonce: str) -> None:
        self.env.metrics.stale_nonces.labels(type_label(type_url)).inc()
        log.debug(
            "node %s: ignoring %s request with stale nonce %s",
            escaped(self.node),
            escaped(short_name(type_url)),
            escaped(nonce),
        )

    def unknown_type(self, type_url: str) -> None:
        self.env.metrics.unknown_types.inc()
        log.info("node %s asked for type %s, which this server does not serve", escaped(self.node), escaped(type_url))

    def sent(self, type_url: str) -> None:
        self.env.metrics.responses.labels(type_label(type_url)).inc()
