"""One consistent picture of the server: identities, CA chain, root rotation, provider health, readiness.

The ``/status`` endpoint (and so ``mesh-identity status``) and the Prometheus collector are both built from a
:class:`Snapshot`, so they always agree; the endpoint serves its :class:`~mesh_identity.server.document.StatusDocument`.
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
from mesh_identity.server.document import CaStatus, CertStatus, ProviderStatus, RootStatus, StatusDocument
from mesh_identity.spiffe import SpiffeId
from mesh_identity.svid import TrustBundle
from mesh_identity.verify import chain_problem

PROBE_PATH = "/mesh-identity/readyz"


# -- the snapshot -------------------------------------------------------------------------------------------


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

    def document(self) -> StatusDocument:
        budget = self.outage_budget
        health = self.health
        evidence = self.evidence
        return StatusDocument(
            generated_at=self.at,
            trust_domain=self.trust_domain,
            provider=ProviderStatus(
                name=self.provider,
                mode=self.mode,
                healthy=health.healthy if health else None,
                detail=health.detail if health else "not checked yet",
                checked_at=health.checked_at if health else None,
            ),
            ready=self.ready,
            ready_detail=self.ready_problem or "the authority can sign",
            outage_budget_seconds=budget.total_seconds() if budget is not None else None,
            ca=CaStatus(
                phase=evidence.phase,
                next_step=evidence.next_step,
                roots=tuple(
                    RootStatus(
                        serial=root.serial,
                        fingerprint=root.fingerprint,
                        not_before=root.not_before,
                        not_after=root.not_after,
                        seconds_left=(root.not_after - self.at).total_seconds(),
                        signing=root.signing,
                        new=root.fingerprint == evidence.new_root,
                        leaves=root.leaves,
                    )
                    for root in evidence.roots
                ),
                intermediate=self._cert_status(self.intermediate) if self.intermediate else None,
                leaves_outside_bundle=len(evidence.leaves_by_root.get("", ())),
                proxies_missing_bundle=evidence.proxies_missing_bundle,
                proxies_on_old_roots=evidence.proxies_on_old_roots,
                proxies_lagging=evidence.proxies_lagging,
            ),
            identities=tuple(self._cert_status(state) for state in self.identities),
        )

    def to_json(self) -> dict[str, Any]:
        return self.document().to_json()

    def _cert_status(self, state: RotationState) -> CertStatus:
        return CertStatus(
            subject=state.subject,
            serial=state.serial,
            not_after=state.not_after,
            seconds_left=(state.not_after - self.at).total_seconds() if state.not_after else None,
            next_rotation=state.next_rotation,
            provider=state.provider,
            failures=state.failures,
            last_error=state.last_error,
        )


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
