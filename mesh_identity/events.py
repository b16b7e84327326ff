"""Lifecycle events the core emits; monitoring and audit plugins receive them through hooks.

Events carry identities, serials, fingerprints and times: never key material or tokens.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from datetime import datetime
from typing import Protocol


class CertKind(enum.StrEnum):
    WORKLOAD = "workload"
    INTERMEDIATE = "intermediate"
    ROOT = "root"
    SERVING = "serving"  # a TLS serving certificate of the control plane's own (the injector's webhook)


class Severity(enum.StrEnum):
    WARNING = "warning"
    ERROR = "error"


@dataclass(frozen=True, slots=True)
class CertificateIssued:
    """A certificate was issued. ``subject`` is a SPIFFE ID for workloads, a CA name for CAs."""

    subject: str
    kind: CertKind
    serial: str
    fingerprint: str
    not_after: datetime
    provider: str
    requested_by: str
    at: datetime


@dataclass(frozen=True, slots=True)
class CertificateRotated:
    """A certificate was replaced by a new one (with a new key)."""

    subject: str
    kind: CertKind
    old_serial: str
    new_serial: str
    not_after: datetime
    provider: str
    at: datetime


@dataclass(frozen=True, slots=True)
class RotationFailed:
    """A renewal failed. ``severity`` is ERROR once the current certificate is close to expiry."""

    subject: str
    kind: CertKind
    error: str
    attempt: int
    next_attempt: datetime | None
    expires: datetime | None
    severity: Severity
    provider: str
    at: datetime


@dataclass(frozen=True, slots=True)
class CaRotated:
    """A CA change: a new intermediate, or a root rotation phase (prepare, activate, retire)."""

    kind: CertKind
    phase: str
    old_fingerprint: str | None
    new_fingerprint: str
    provider: str
    at: datetime
    excluded: tuple[str, ...] = ()  # proxies whose evidence the operator gave up on for this step
    forced: str | None = None  # the operator's reason for taking the step whatever the proxies said


@dataclass(frozen=True, slots=True)
class AccessDenied:
    """A peer asked for something its identity is not entitled to (e.g. another proxy's secret).

    One event per refused request: when it named several resources the peer may not have, ``resource`` and
    ``reason`` are the first of them with how many more, ``resources`` lists the first few (bounded), ``count``
    says how many were refused. Text the peer chose (names, node ids) comes with control characters escaped
    and its length bounded."""

    peer: str
    resource: str
    reason: str
    at: datetime
    resources: tuple[str, ...] = ()  # the refused resources, the first few of them ("Secret spiffe://...")
    count: int = 1  # how many resources the request was refused


@dataclass(frozen=True, slots=True)
class SigningDecision:
    """The signing API granted or refused a request (one event per call of Attest, SignX509, SignJwt, FetchBundle).

    ``caller`` is who the server authenticated: the SPIFFE ID of the peer's SVID, ``node <host>`` for a join
    token, ``serviceaccount <ns>/<sa>`` for a reviewed Kubernetes token; or, when it authenticated nobody, what it
    saw (``join token <hash prefix>``, ``kubernetes token``, ``anonymous``). ``credential`` is ``svid``,
    ``join-token``, ``kubernetes-token`` or ``none``. ``spiffe_id`` is the identity asked for or decided (empty
    when there was none), ``code`` the gRPC status name (``OK`` for a grant), ``reason`` why it was refused,
    ``serial`` the issued certificate's serial (X.509 grants), ``peer`` the caller's network address. Never a
    token, a key or a CSR: a join token is named by a prefix of its SHA-256 only."""

    rpc: str
    caller: str
    credential: str
    spiffe_id: str
    granted: bool
    code: str
    reason: str
    peer: str
    at: datetime
    serial: str = ""


Event = CertificateIssued | CertificateRotated | RotationFailed | CaRotated | AccessDenied | SigningDecision


class EventSink(Protocol):
    """Where the core sends events (the plugin manager facade implements it)."""

    def emit(self, event: Event) -> None: ...


class NullSink:
    def emit(self, event: Event) -> None:
        return None


class ListSink:
    """Collects events in memory (for tests)."""

    def __init__(self) -> None:
        self.events: list[Event] = []

    def emit(self, event: Event) -> None:
        self.events.append(event)
