"""Entry point of the acme_ca provider. It knows nothing of mesh-identity internals but the public contract."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from datetime import timedelta
from typing import Any

from cryptography import x509

from mesh_identity.keys import KeyType, generate_key
from mesh_identity.profile import LeafSigner, build_root, checked_public_key
from mesh_identity.provider import (
    Capabilities,
    CAProvider,
    Health,
    Mode,
    OptionSpec,
    OptionType,
    ProviderContext,
    ProviderSpec,
    SignedCertificate,
)
from mesh_identity.spiffe import SpiffeId
from mesh_identity.svid import TrustBundle
from plugins import hookimpl


class AcmeProvider(CAProvider):
    name = "acme_ca"

    def __init__(self, context: ProviderContext, options: Mapping[str, Any]) -> None:
        self.context = context
        self.key = generate_key(KeyType.ECDSA_P256)
        self.root = build_root(self.key, context.trust_domain, options["root_ttl"], context.clock(), "acme root")

    def capabilities(self) -> Capabilities:
        return Capabilities(frozenset({Mode.PER_WORKLOAD}))

    def trust_bundle(self) -> TrustBundle:
        return TrustBundle(self.context.trust_domain, (self.root,))

    def sign_workload(
        self, csr: x509.CertificateSigningRequest, spiffe_id: SpiffeId, ttl: timedelta
    ) -> SignedCertificate:
        leaf = LeafSigner(self.root, self.key).sign(checked_public_key(csr), spiffe_id, ttl, self.context.clock())
        return SignedCertificate(leaf, (), self.trust_bundle())

    def health(self) -> Health:
        return Health(True, "acme root in memory", self.context.clock())


SPEC = ProviderSpec(
    name="acme_ca",
    description="third-party test CA (per-workload, in memory)",
    capabilities=Capabilities(frozenset({Mode.PER_WORKLOAD})),
    factory=AcmeProvider,
    options=(OptionSpec("root_ttl", OptionType.DURATION, "root lifetime", default=timedelta(days=1)),),
)


@hookimpl
def mesh_identity_providers() -> Sequence[ProviderSpec]:
    return [SPEC]


@hookimpl
def mesh_identity_validate_provider_options(provider: str, options: Mapping[str, Any]) -> Sequence[str]:
    if provider == "acme_ca" and options["root_ttl"] > timedelta(days=30):
        return ["ca.provider_options.root_ttl: acme_ca roots live at most 30d"]
    return []
