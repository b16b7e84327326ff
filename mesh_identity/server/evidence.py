"""What one replica tells the leader about a root rotation: its evidence, published in its own Lease.

Each replica serves its own proxies, so only it knows whether they have acknowledged the new trust bundle, or
still present a certificate chaining to an old root. It publishes a digest of its
:class:`~mesh_identity.rotation.roots.RootEvidence` as JSON in the annotation
``mesh-identity.io/root-evidence`` of its Lease ``mesh-identity-replica-<identity>``
(:class:`~mesh_identity.registry.kube.lease.ReplicaLease`), renewed every retry period::

    {"version": 1, "replica": "mesh-identity-7d9f-abcde", "heartbeat": "2026-12-02T10:00:00.000000Z",
     "phase": "prepared", "new_root": "<sha-256 hex>", "signing_root": "<sha-256 hex>",
     "bundle": ["<sha-256 hex>", ...], "bundle_acknowledged": true, "proxies_missing_bundle": 0,
     "proxies_on_old_roots": 0, "leaves_on_old_roots": 0, "next_step": "ready: ..."}

The leader reads it back with :func:`parse_evidence`, which checks every field (an annotation that does not
read is a replica that is not ready, named in the reason), and asks :func:`not_ready` whether that replica
allows the next step of the rotation the provider's phase says is in progress.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from mesh_identity.document import shown
from mesh_identity.rotation.roots import RootEvidence, RootStep
from mesh_identity.svid import TrustBundle

ANNOTATION = "mesh-identity.io/root-evidence"
VERSION = 1
_FINGERPRINT = re.compile(r"[0-9a-f]{64}")
_PHASES = ("steady", "prepared", "activated")
_MAX_BYTES = 64 * 1024


@dataclass(frozen=True, slots=True)
class ReplicaEvidence:
    """One replica's view of the rotation (see the module docstring). Counts are of this replica's proxies."""

    replica: str
    heartbeat: str
    phase: str
    new_root: str | None
    signing_root: str | None
    bundle: frozenset[str]
    bundle_acknowledged: bool
    proxies_missing_bundle: int
    proxies_on_old_roots: int
    leaves_on_old_roots: int
    next_step: str

    def to_json(self) -> str:
        return json.dumps(
            {
                "version": VERSION,
                "replica": self.replica,
                "heartbeat": self.heartbeat,
                "phase": self.phase,
                "new_root": self.new_root,
                "signing_root": self.signing_root,
                "bundle": sorted(self.bundle),
                "bundle_acknowledged": self.bundle_acknowledged,
                "proxies_missing_bundle": self.proxies_missing_bundle,
                "proxies_on_old_roots": self.proxies_on_old_roots,
                "leaves_on_old_roots": self.leaves_on_old_roots,
                "next_step": self.next_step,
            },
            sort_keys=True,
        )


def evidence_of(evidence: RootEvidence, served: TrustBundle | None, replica: str, heartbeat: str) -> ReplicaEvidence:
    """The digest of this replica's ``evidence``, with the bundle it ``served``."""
    old = {info.fingerprint for info in evidence.roots if info.fingerprint != evidence.new_root}
    missing = evidence.proxies_missing_bundle or ()
    return ReplicaEvidence(
        replica=replica,
        heartbeat=heartbeat,
        phase=evidence.phase,
        new_root=evidence.new_root,
        signing_root=evidence.signing_root,
        bundle=served.fingerprints if served is not None else frozenset(),
        bundle_acknowledged=not missing,
        proxies_missing_bundle=len(missing),
        proxies_on_old_roots=len(evidence.proxies_on_old_roots or ()),
        leaves_on_old_roots=sum(len(ids) for root, ids in evidence.leaves_by_root.items() if root in old)
        if evidence.new_root is not None
        else 0,
        next_step=evidence.next_step,
    )


def _field(raw: Mapping[str, Any], key: str, kind: type | tuple[type, ...]) -> Any:
    value = raw.get(key)
    if not isinstance(value, kind) or (isinstance(value, bool) and kind is int):
        raise ValueError(f"{key}: {shown(value)} is not {_KINDS.get(kind, 'valid')}")
    return value


_KINDS: dict[type | tuple[type, ...], str] = {str: "a string", bool: "true or false", int: "a count", list: "a list"}


def _fingerprint(value: Any, key: str, optional: bool = True) -> str | None:
    if value is None and optional:
        return None
    if not isinstance(value, str) or not _FINGERPRINT.fullmatch(value):
        raise ValueError(f"{key}: {shown(value)} is not a SHA-256 fingerprint (64 lowercase hex digits)")
    return value


def parse_evidence(text: str) -> ReplicaEvidence:
    """The evidence in an annotation; ValueError naming the field that is wrong."""
    if len(text) > _MAX_BYTES:
        raise ValueError(f"longer than {_MAX_BYTES} bytes")
    try:
        raw = json.loads(text)
    except ValueError as err:
        raise ValueError(f"not JSON: {err}") from None
    if not isinstance(raw, dict):
        raise ValueError(f"{shown(raw)} is not a JSON object")
    if raw.get("version") != VERSION:
        raise ValueError(f"version: {shown(raw.get('version'))} is not {VERSION}")
    unknown = sorted(set(raw) - {*ReplicaEvidence.__slots__, "version"})
    if unknown:
        raise ValueError(f"unknown field {unknown[0]!r}")
    phase = _field(raw, "phase", str)
    if phase not in _PHASES:
        raise ValueError(f"phase: {shown(phase)} is not one of {', '.join(_PHASES)}")
    heartbeat = _field(raw, "heartbeat", str)
    try:
        datetime.fromisoformat(heartbeat.replace("Z", "+00:00"))
    except ValueError:
        raise ValueError(f"heartbeat: {shown(heartbeat)} is not an RFC 3339 time") from None
    bundle = _field(raw, "bundle", list)
    counts = {}
    for key in ("proxies_missing_bundle", "proxies_on_old_roots", "leaves_on_old_roots"):
        counts[key] = _field(raw, key, int)
        if counts[key] < 0:
            raise ValueError(f"{key}: {counts[key]} is negative")
    return ReplicaEvidence(
        replica=_field(raw, "replica", str),
        heartbeat=heartbeat,
        phase=phase,
        new_root=_fingerprint(raw.get("new_root"), "new_root"),
        signing_root=_fingerprint(raw.get("signing_root"), "signing_root"),
        bundle=frozenset(str(_fingerprint(fp, "bundle[]", optional=False)) for fp in bundle),
        bundle_acknowledged=_field(raw, "bundle_acknowledged", bool),
        next_step=_field(raw, "next_step", str),
        **counts,
    )


def not_ready(evidence: ReplicaEvidence, step: RootStep, bundle: TrustBundle, new_root: str | None) -> str | None:
    """Why the replica of ``evidence`` does not allow ``step`` of the rotation to ``new_root`` whose bundle is
    ``bundle`` (None: it allows it). The text completes "replica <name> ..."."""
    wanted = {RootStep.ACTIVATE: "prepared", RootStep.RETIRE: "activated"}.get(step)
    if wanted is None:
        return None
    if evidence.phase != wanted:
        return f"has not applied the {wanted} phase yet (it is in phase {evidence.phase!r})"
    if evidence.new_root != new_root:
        return f"sees another new root ({evidence.new_root}, not {new_root})"
    if step is RootStep.ACTIVATE:
        if not bundle.fingerprints <= evidence.bundle:
            return "does not serve the trust bundle with the new root yet"
        if evidence.proxies_missing_bundle:
            return f"has {evidence.proxies_missing_bundle} proxies that have not acknowledged the new trust bundle"
        return None
    if evidence.signing_root != new_root:
        return "still signs from an old root (its new intermediate has not been obtained yet)"
    if evidence.leaves_on_old_roots:
        return f"has {evidence.leaves_on_old_roots} identities whose certificates chain to an old root"
    if evidence.proxies_on_old_roots:
        return f"has {evidence.proxies_on_old_roots} proxies presenting certificates that chain to an old root"
    return None
