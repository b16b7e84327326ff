"""Root rotation with no downtime: prepare -> activate -> retire, each step taken on evidence.

* **prepare**: the provider creates the next root and adds it to the trust bundle; the engine serves the new
  bundle. The current root keeps signing.
* **activate**: refused until every proxy has acknowledged a bundle holding every root (asked of an
  :class:`AckSource`, which the xDS server implements). Then the new root signs: a new intermediate from it, and
  every identity renewed at once.
* **retire**: refused while anything still needs an old root: an identity whose current leaf chains to it, the
  signing intermediate, or a proxy whose acknowledged certificate chains to it. Then the old roots leave the
  bundle.

The phase is the provider's (it persists it; a restart resumes). The new root is the newest one in the
bundle (latest NotBefore; on a tie the later in the bundle, where providers append the new root).
"""

from __future__ import annotations

import dataclasses
import enum
import logging
import threading
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Protocol

from cryptography import x509
from cryptography.exceptions import InvalidSignature

from mesh_identity.clock import Clock, utcnow
from mesh_identity.errors import RotationError
from mesh_identity.events import CaRotated, CertKind, EventSink, NullSink
from mesh_identity.provider import CAProvider
from mesh_identity.rotation.engine import RotationEngine
from mesh_identity.spiffe import SpiffeId
from mesh_identity.svid import Fingerprint, TrustBundle, fingerprint_of, serial_of

log = logging.getLogger(__name__)

PHASES = ("steady", "prepared", "activated")
DEFAULT_ACK_TIMEOUT = timedelta(minutes=1)


class RootStep(enum.StrEnum):
    """The steps of a root rotation, in order."""

    PREPARE = "prepare"
    ACTIVATE = "activate"
    RETIRE = "retire"


@dataclass(frozen=True, slots=True)
class StepOverride:
    """An operator's explicit decision to take a step without some proxies' evidence; always audited.

    ``exclude``: node ids whose missing acknowledgement is given up on (the others still gate the step);
    ``force``: a reason to take the step whatever the proxies say (the identities' and intermediate's own
    evidence still gates it).
    """

    exclude: frozenset[str] = frozenset()
    force: str | None = None

    @property
    def empty(self) -> bool:
        return not self.exclude and self.force is None


NEXT_COMMAND = {"steady": "prepare", "prepared": "activate", "activated": "retire"}
_SHOWN = 5


class AckSource(Protocol):
    """What the proxies have applied, as the xDS server knows it from their ACKs.

    Fingerprints are SHA-256 fingerprints of root certificates, lowercase hex
    (:func:`mesh_identity.svid.fingerprint_of`). Proxies are named as the xDS server knows them (node ids).
    """

    def proxies_missing_bundle(self, fingerprints: frozenset[str]) -> Sequence[str]:
        """Connected proxies whose last acknowledged trust bundle lacks one of the roots ``fingerprints``."""
        ...

    def proxies_chaining_to(self, fingerprints: frozenset[str]) -> Sequence[str]:
        """Connected proxies whose last acknowledged certificate chains to one of the roots ``fingerprints``
        (:func:`root_of` tells which root a certificate chains to)."""
        ...

    def proxies_lagging(self, older_than: timedelta) -> Sequence[str]:
        """Connected proxies that rejected (NACKed) their latest config, or have not acknowledged a change sent
        longer than ``older_than`` ago: one line each, ``node: what``."""
        ...


@dataclass(frozen=True, slots=True)
class RootInfo:
    serial: str
    fingerprint: Fingerprint
    not_before: datetime
    not_after: datetime
    signing: bool
    leaves: int


@dataclass(frozen=True, slots=True)
class RootEvidence:
    """Which root is where. ``leaves_by_root`` maps a root fingerprint to the identities whose current leaf
    chains to it (key ``""``: to no root of the bundle). The proxy lists are None without an ack source."""

    phase: str
    roots: tuple[RootInfo, ...]
    new_root: Fingerprint | None
    signing_root: str | None
    leaves_by_root: Mapping[str, tuple[SpiffeId, ...]]
    proxies_missing_bundle: tuple[str, ...] | None
    proxies_on_old_roots: tuple[str, ...] | None
    next_step: str
    proxies_lagging: tuple[str, ...] | None = None


def root_of(cert: x509.Certificate, roots: Iterable[x509.Certificate]) -> Fingerprint | None:
    """The fingerprint of the root among ``roots`` that is ``cert`` or signed it directly; None if none."""
    fingerprint = fingerprint_of(cert)
    candidates = list(roots)
    for root in candidates:
        if fingerprint_of(root) == fingerprint:
            return fingerprint
    for root in candidates:
        if root.subject != cert.issuer:
            continue
        try:
            cert.verify_directly_issued_by(root)
        except (ValueError, TypeError, InvalidSignature):
            continue
        return fingerprint_of(root)
    return None


def _top(leaf: x509.Certificate, chain: tuple[x509.Certificate, ...]) -> x509.Certificate:
    return chain[-1] if chain else leaf


class RootRotation:
    """Drives the root rotation phases of the engine's provider. One step at a time (a lock serialises them)."""

    def __init__(
        self,
        engine: RotationEngine,
        *,
        events: EventSink | None = None,
        acks: AckSource | None = None,
        clock: Clock = utcnow,
        ack_timeout: timedelta = DEFAULT_ACK_TIMEOUT,
    ) -> None:
        self.engine = engine
        self.authority = engine.authority
        self.events: EventSink = events or NullSink()
        self.acks = acks
        self.clock = clock
        self.ack_timeout = ack_timeout
        self._lock = threading.Lock()

    @property
    def provider(self) -> CAProvider:
        return self.authority.provider

    def phase(self) -> str:
        return self.provider.root_phase()

    # -- evidence ------------------------------------------------------------------------------------------

    def evidence(self) -> RootEvidence:
        phase = self.phase()
        bundle = self.engine.bundles.current() or self.authority.bundle()
        roots = bundle.authorities
        new_root = _newest(bundle) if phase != "steady" else None
        signing_root = self._signing_root(bundle, phase, new_root)
        leaves = self._leaves_by_root(roots)
        old = self._old_roots(bundle, new_root)
        missing: tuple[str, ...] | None = None
        on_old: tuple[str, ...] | None = None
        lagging: tuple[str, ...] | None = None
        if self.acks is not None:  # asked only what the next step depends on
            missing = on_old = ()
            lagging = tuple(self.acks.proxies_lagging(self.ack_timeout))
            if phase == "prepared":
                missing = tuple(self.acks.proxies_missing_bundle(frozenset(bundle.fingerprints)))
            elif phase == "activated" and old:
                on_old = tuple(self.acks.proxies_chaining_to(old))
        infos = tuple(
            RootInfo(
                serial=serial_of(root),
                fingerprint=fingerprint_of(root),
                not_before=root.not_valid_before_utc,
                not_after=root.not_valid_after_utc,
                signing=fingerprint_of(root) == signing_root,
                leaves=len(leaves.get(fingerprint_of(root), ())),
            )
            for root in roots
        )
        evidence = RootEvidence(phase, infos, new_root, signing_root, leaves, missing, on_old, "", lagging)
        return dataclasses.replace(evidence, next_step=self._next_step(evidence))

    def _signing_root(self, bundle: TrustBundle, phase: str, new_root: Fingerprint | None) -> str | None:
        signing = self.authority.signing_ca
        if signing is not None:
            return root_of(_top(signing.certificate, signing.chain), bundle.authorities)
        if phase == "activated" or len(bundle.authorities) == 1:
            return new_root or fingerprint_of(bundle.authorities[0])
        others = self._old_roots(bundle, new_root)
        return next(iter(others)) if len(others) == 1 else None

    @staticmethod
    def _old_roots(bundle: TrustBundle, new_root: Fingerprint | None) -> frozenset[str]:
        if new_root is None:
            return frozenset()
        return frozenset(fp for fp in bundle.fingerprints if fp != new_root)

    def _leaves_by_root(self, roots: tuple[x509.Certificate, ...]) -> dict[str, tuple[SpiffeId, ...]]:
        found: dict[str, list[SpiffeId]] = {}
        by_issuer: dict[tuple[bytes, bytes], str] = {}
        for source in self.engine.sources():
            svid = source.current()
            if svid is None:
                continue
            top = _top(svid.leaf, svid.chain)
            key = (top.issuer.public_bytes(), _aki(top))  # the same issuer name and key: the same root
            root = by_issuer.get(key)
            if root is None:
                root = by_issuer[key] = root_of(top, roots) or ""
            found.setdefault(root, []).append(source.spiffe_id)
        return {root: tuple(ids) for root, ids in found.items()}

    def _next_step(self, evidence: RootEvidence) -> str:
        if evidence.phase == "steady":
            return "no root rotation in progress; start one with: mesh-identity ca rotate-root prepare"
        if evidence.phase == "prepared":
            blockers = self._activate_blockers(evidence)
        else:
            blockers = self._retire_blockers(evidence)
        command = f"mesh-identity ca rotate-root {NEXT_COMMAND[evidence.phase]}"
        if blockers:
            return f"waiting: {blockers[0]}"
        return f"ready: {command}"

    # -- gates ---------------------------------------------------------------------------------------------

    def _activate_blockers(self, evidence: RootEvidence, override: StepOverride | None = None) -> list[str]:
        blockers: list[str] = []
        served = self.engine.bundles.current()
        wanted = self.authority.bundle()
        if served is None or not wanted.fingerprints <= served.fingerprints:
            blockers.append("the trust bundle with the new root is not being served yet")
        missing = _waited_for(evidence.proxies_missing_bundle, override)
        if missing:
            blockers.append(
                f"{_plural(len(missing), 'proxy has', 'proxies have')} not acknowledged the trust bundle with the "
                f"new root yet: {_names(missing)}"
            )
        return blockers

    def _retire_blockers(self, evidence: RootEvidence, override: StepOverride | None = None) -> list[str]:
        blockers: list[str] = []
        old = {info.fingerprint for info in evidence.roots if info.fingerprint != evidence.new_root}
        if self.engine.intermediate_mode and evidence.signing_root != evidence.new_root:
            blockers.append("the signing intermediate still chains to an old root (its renewal has not succeeded)")
        holders = sorted(
            (spiffe_id for root, ids in evidence.leaves_by_root.items() if root in old for spiffe_id in ids), key=str
        )
        them = "it" if len(old) == 1 else "them"
        if holders:
            blockers.append(
                _plural(len(holders), "identity still holds a leaf", "identities still hold leaves")
                + f" that chain{'s' if len(holders) == 1 else ''} to {them}: {_names(map(str, holders))}"
            )
        on_old = _waited_for(evidence.proxies_on_old_roots, override)
        if on_old:
            blockers.append(
                _plural(len(on_old), "proxy still presents a certificate", "proxies still present certificates")
                + f" that chain{'s' if len(on_old) == 1 else ''} to {them}: {_names(on_old)}"
            )
        return blockers

    def _require_phase(self, step: str, wanted: str) -> None:
        phase = self.phase()
        if phase != wanted:
            hint = f"; next step: mesh-identity ca rotate-root {NEXT_COMMAND[phase]}" if phase in NEXT_COMMAND else ""
            raise RotationError(f"cannot {step}: the root rotation is in phase {phase!r}, not {wanted!r}{hint}")

    # -- steps ---------------------------------------------------------------------------------------------

    def step(self, step: RootStep, override: StepOverride | None = None) -> str:
        """Take ``step``; RotationError when the evidence (or the phase) says it is not safe yet. ``override``
        gives up on the evidence of some proxies (see :class:`StepOverride`)."""
        override = override or StepOverride()
        match step:
            case RootStep.PREPARE:
                if not override.empty:
                    raise RotationError("prepare waits for no proxy: --exclude and --force do not apply to it")
                return self.prepare()
            case RootStep.ACTIVATE:
                return self.activate(override)
            case RootStep.RETIRE:
                return self.retire(override)

    def prepare(self) -> str:
        with self._lock:
            self._require_phase("prepare", "steady")
            old = self._signing_root(self.authority.bundle(), "steady", None)
            root = self.provider.prepare_root()
            self.authority.refresh_bundle()
            self.engine.publish_bundle()
            self._emit("prepared", old, fingerprint_of(root))
            return (
                f"prepared root {serial_of(root)}: it is in the trust bundle now, next to the current root. "
                "Next, once every proxy has the new bundle: mesh-identity ca rotate-root activate"
            )

    def activate(self, override: StepOverride | None = None) -> str:
        with self._lock:
            self._require_phase("activate", "prepared")
            evidence = self.evidence()
            override = self._check_override("activate", evidence.proxies_missing_bundle, override)
            blockers = self._activate_blockers(evidence, override)
            if blockers:
                raise RotationError(f"cannot activate: {'; '.join(blockers)}")
            given_up = self._given_up("activate", evidence.proxies_missing_bundle, override)
            root = self.provider.activate_root()
            new = fingerprint_of(root)
            notes = []
            if self.engine.intermediate_mode and not self.engine.rotate_intermediate("root-rotation"):
                state = self.engine.intermediate_state()
                error = state.last_error if state else "unknown error"
                notes.append(f"the new intermediate could not be obtained yet ({error}); it is retried with backoff")
            summary = self.engine.rotate_all("root-rotation")
            if summary.failed:
                failed = summary.failed
                notes.append(
                    f"{_plural(len(failed), 'identity', 'identities')} failed to renew and "
                    f"{'is' if len(failed) == 1 else 'are'} retried with backoff: {_names(map(str, failed))}"
                )
            self._emit("activated", evidence.signing_root, new, given_up, override)
            moved = f"{_plural(summary.rotated, 'identity', 'identities')} renewed from it"
            text = f"activated root {serial_of(root)}: {moved}"
            if given_up:
                notes.append(f"taken without the acknowledgement of {_names(given_up)} ({_why(override)})")
            if notes:
                text += "; " + "; ".join(notes)
            return text + ". Next, once nothing chains to the old root: mesh-identity ca rotate-root retire"

    def retire(self, override: StepOverride | None = None) -> str:
        with self._lock:
            self._require_phase("retire", "activated")
            evidence = self.evidence()
            override = self._check_override("retire", evidence.proxies_on_old_roots, override)
            blockers = self._retire_blockers(evidence, override)
            if blockers:
                old = [info.serial for info in evidence.roots if info.fingerprint != evidence.new_root]
                what = "root" if len(old) == 1 else "roots"
                raise RotationError(f"cannot retire {what} {', '.join(old)}: {'; '.join(blockers)}")
            given_up = self._given_up("retire", evidence.proxies_on_old_roots, override)
            retired = self.provider.retire_root()
            self.authority.refresh_bundle()
            self.engine.publish_bundle()
            kept = self.authority.bundle().authorities
            for root in retired:
                self._emit("retired", fingerprint_of(root), fingerprint_of(kept[0]), given_up, override)
            names = ", ".join(serial_of(root) for root in retired) or "none"
            text = f"retired root {names}: the trust bundle holds only root {serial_of(kept[0])} now"
            if given_up:
                text += f"; taken without {_names(given_up)}, still on the old root ({_why(override)})"
            return text

    def follow(self) -> str | None:
        """Apply a step another replica took (its provider has just been reloaded from the shared CA state):
        serve the provider's bundle and, when the root that signs is no longer the one this replica's
        certificates chain to (an activation elsewhere), obtain a new intermediate from it and renew every
        identity, as :meth:`activate` does. Each replica keeps its own intermediate. Returns what was done
        (None: nothing had changed)."""
        with self._lock:
            bundle = self.authority.refresh_bundle()
            done: list[str] = []
            if self.engine.publish_bundle():
                done.append(f"serving the trust bundle of {_plural(len(bundle.authorities), 'root', 'roots')}")
            expected = _signing_root_of(bundle, self.phase())
            if expected is None:
                return "; ".join(done) or None
            signing = self.authority.signing_ca
            top = _top(signing.certificate, signing.chain) if signing is not None else None
            if top is not None and root_of(top, bundle.authorities) != expected:
                if self.engine.rotate_intermediate("root-rotation"):
                    done.append("a new intermediate from the signing root")
                else:
                    done.append("the new intermediate could not be obtained yet (retried with backoff)")
            leaves = self._leaves_by_root(bundle.authorities)
            stale = [spiffe_id for root, ids in leaves.items() if root != expected for spiffe_id in ids]
            if stale:
                summary = self.engine.rotate_all("root-rotation")
                done.append(f"{_plural(summary.rotated, 'identity', 'identities')} renewed from the signing root")
                if summary.failed:
                    done.append(f"{_plural(len(summary.failed), 'identity', 'identities')} retried with backoff")
            return "; ".join(done) or None

    def _check_override(
        self, step: str, blocking: tuple[str, ...] | None, override: StepOverride | None
    ) -> StepOverride:
        """The override, refused when it names a proxy that is not holding the step up (a typo would
        otherwise give up on nothing while the operator believes otherwise)."""
        override = override or StepOverride()
        unknown = sorted(override.exclude - set(blocking or ()))
        if unknown:
            waiting = _names(blocking) if blocking else "none"
            raise RotationError(
                f"cannot {step}: --exclude names {_names(unknown)}, which {'is' if len(unknown) == 1 else 'are'} "
                f"not holding this step up (waiting for: {waiting})"
            )
        if override.force is not None and not override.force.strip():
            raise RotationError(f"cannot {step}: --force needs a reason")
        return override

    def _given_up(self, step: str, blocking: tuple[str, ...] | None, override: StepOverride) -> tuple[str, ...]:
        """The proxies whose evidence this step goes ahead without; logged as a warning (and audited through
        the step's event)."""
        blocking = blocking or ()
        given_up = tuple(p for p in blocking if override.force is not None or p in override.exclude)
        if given_up:
            log.warning(
                "root rotation %s taken without the evidence of %s (%s)", step, ", ".join(given_up), _why(override)
            )
        return given_up

    def _emit(
        self,
        phase: str,
        old: str | None,
        new: str,
        given_up: tuple[str, ...] = (),
        override: StepOverride | None = None,
    ) -> None:
        self.events.emit(
            CaRotated(
                kind=CertKind.ROOT,
                phase=phase,
                old_fingerprint=old,
                new_fingerprint=new,
                provider=self.provider.name,
                at=self.clock(),
                excluded=given_up,
                forced=override.force if override is not None else None,
            )
        )


def _newest(bundle: TrustBundle) -> Fingerprint:
    """The root with the latest NotBefore; on a tie (roots made within a second) the later in the bundle."""
    ranked = max(enumerate(bundle.authorities), key=lambda item: (item[1].not_valid_before_utc, item[0]))
    return fingerprint_of(ranked[1])


def _signing_root_of(bundle: TrustBundle, phase: str) -> Fingerprint | None:
    """The root the provider signs with in ``phase``: the newest once activated, the other one while prepared,
    the only one when steady; None when the bundle does not say (more roots than the phase explains)."""
    if phase == "activated":
        return _newest(bundle)
    if len(bundle.authorities) == 1:
        return fingerprint_of(bundle.authorities[0])
    if phase == "prepared" and len(bundle.authorities) == 2:
        newest = _newest(bundle)
        return next(fp for fp in map(fingerprint_of, bundle.authorities) if fp != newest)
    return None


def _aki(cert: x509.Certificate) -> bytes:
    try:
        return cert.extensions.get_extension_for_class(x509.AuthorityKeyIdentifier).value.key_identifier or b""
    except x509.ExtensionNotFound:
        return b""


def _waited_for(proxies: tuple[str, ...] | None, override: StepOverride | None) -> tuple[str, ...]:
    """The proxies a step still waits for: all of them but those the override gives up on."""
    if not proxies or (override is not None and override.force is not None):
        return ()
    excluded = override.exclude if override is not None else frozenset()
    return tuple(p for p in proxies if p not in excluded)


def _why(override: StepOverride | None) -> str:
    if override is not None and override.force is not None:
        return f"forced by the operator: {override.force}"
    return "excluded by the operator"


def _plural(count: int, one: str, many: str) -> str:
    return f"{count} {one if count == 1 else many}"


def _names(items: Iterable[str]) -> str:
    names = list(items)
    shown = ", ".join(names[:_SHOWN])
    return shown + (f" and {len(names) - _SHOWN} more" if len(names) > _SHOWN else "")
