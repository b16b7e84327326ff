"""One consistent picture of the server: identities, CA chain, root rotation, provider health, readiness.

The ``/status`` endpoint (and so ``mesh-identity status``) and the Prometheus collector are both built from a
:class:`Snapshot`, so they always agree.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from mesh_identity.authority import Authority
from mesh_identity.keys import KeyType, generate_key
from mesh_identity.provider import Health, Mode
from mesh_identity.rotation.engine import RotationEngine, RotationState
from mesh_identity.rotation.roots import RootEvidence, RootRotation
from mesh_identity.spiffe import SpiffeId
from mesh_identity.svid import TrustBundle
from mesh_identity.verify import chain_problem

PROBE_PATH = "/mesh-identity/readyz"


@dataclass(frozen=True, slots=True)
class Snapshot:
    at: datetime
    trust_domain: str
    provider: str
    mode: Mode
    health: Health | None
    ready_problem: str | None
    identities: tuple[RotationState, ...]
    intermediate: RotationState | None
    evidence: RootEvidence

    @property
    def ready(self) -> bool:
        return self.ready_problem is None

    @property
    def outage_budget(self) -> timedelta | None:
        """Time until the first certificate in use (a workload's or the intermediate) expires if no renewal
        succeeds from now on; None when none is in use."""
        ends = [s.not_after for s in (*self.identities, self.intermediate) if s is not None and s.not_after]
        return min(ends) - self.at if ends else None

    def to_json(self) -> dict[str, Any]:
        budget = self.outage_budget
        health = self.health
        return {
            "generated_at": _iso(self.at),
            "trust_domain": self.trust_domain,
            "provider": {
                "name": self.provider,
                "mode": self.mode.value,
                "healthy": health.healthy if health else None,
                "detail": health.detail if health else "not checked yet",
                "checked_at": _iso(health.checked_at) if health else None,
            },
            "ready": self.ready,
            "ready_detail": self.ready_problem or "the authority can sign",
            "outage_budget_seconds": budget.total_seconds() if budget is not None else None,
            "ca": {
                "phase": self.evidence.phase,
                "next_step": self.evidence.next_step,
                "roots": [
                    {
                        "serial": root.serial,
                        "fingerprint": root.fingerprint,
                        "not_before": _iso(root.not_before),
                        "not_after": _iso(root.not_after),
                        "seconds_left": (root.not_after - self.at).total_seconds(),
                        "signing": root.signing,
                        "new": root.fingerprint == self.evidence.new_root,
                        "leaves": root.leaves,
                    }
                    for root in self.evidence.roots
                ],
                "intermediate": self._state_json(self.intermediate) if self.intermediate else None,
                "leaves_outside_bundle": len(self.evidence.leaves_by_root.get("", ())),
                "proxies_missing_bundle": _list(self.evidence.proxies_missing_bundle),
                "proxies_on_old_roots": _list(self.evidence.proxies_on_old_roots),
            },
            "identities": [self._state_json(state) for state in self.identities],
        }

    def _state_json(self, state: RotationState) -> dict[str, Any]:
        return {
            "subject": state.subject,
            "serial": state.serial,
            "not_after": _iso(state.not_after) if state.not_after else None,
            "seconds_left": (state.not_after - self.at).total_seconds() if state.not_after else None,
            "next_rotation": _iso(state.next_rotation) if state.next_rotation else None,
            "provider": state.provider,
            "failures": state.failures,
            "last_error": state.last_error,
        }


def snapshot(engine: RotationEngine, roots: RootRotation, now: datetime) -> Snapshot:
    authority = engine.authority
    return Snapshot(
        at=now,
        trust_domain=authority.trust_domain.name,
        provider=authority.provider.name,
        mode=authority.settings.mode,
        health=engine.health(),
        ready_problem=signing_problem(engine, now),
        identities=tuple(sorted(engine.states(), key=lambda s: s.subject)),
        intermediate=engine.intermediate_state(),
        evidence=roots.evidence(),
    )


def signing_problem(engine: RotationEngine, now: datetime) -> str | None:
    """Why the authority cannot sign now, or None. In intermediate mode a throwaway leaf is really signed and
    verified against the bundle being served; in per-workload mode the provider's last health check decides
    (signing upstream on every probe would flood the CA)."""
    if not engine.running:
        return "the rotation engine is not running"
    bundle = engine.bundles.current()
    if bundle is None:
        return "no trust bundle is being served yet"
    if engine.intermediate_mode:
        return _probe(engine.authority, bundle, now)
    health = engine.health()
    if health is None:
        return "the provider has not been checked yet"
    return None if health.healthy else f"provider {engine.provider_name!r} is unhealthy: {health.detail}"


def _probe(authority: Authority, bundle: TrustBundle, now: datetime) -> str | None:
    signing = authority.signing_ca
    if signing is None:
        return "no signing intermediate yet"
    left = signing.certificate.not_valid_after_utc - now
    if left <= timedelta(0):
        return f"the signing intermediate {signing.serial} has expired"
    probe = SpiffeId(authority.trust_domain, PROBE_PATH)
    key = generate_key(KeyType.ECDSA_P256)
    try:
        leaf = signing.signer.sign(key.public_key(), probe, min(left / 2, timedelta(minutes=1)), now)
    except Exception as err:
        return f"signing a probe certificate failed: {err}"
    problem = chain_problem(leaf, (signing.certificate, *signing.chain), bundle, now)
    return None if problem is None else f"a probe certificate does not verify against the served bundle: {problem}"


def _iso(value: datetime) -> str:
    return value.isoformat().replace("+00:00", "Z")


def _list(values: tuple[str, ...] | None) -> list[str] | None:
    return list(values) if values is not None else None
