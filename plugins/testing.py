"""A shared test suite every CA provider must pass, for provider authors (like ``tox.pytest``).

Use it from a test module of your provider package::

    from plugins.testing import ProviderContract

    class TestMyProvider(ProviderContract):
        @pytest.fixture
        def provider(self, tmp_path):         # a ready CAProvider for trust domain ``example.org``
            return my_spec.factory(context, options)

The built-in, Vault and cert-manager providers run it too. Tests for a mode the provider does not offer
(per its ``capabilities()``) are deselected by ``pytest.skip`` with that reason, which is the truth, not a hidden
failure.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest
from cryptography import x509

from mesh_identity.authority import Authority, AuthoritySettings, workload_csr
from mesh_identity.errors import ProviderRejectedError
from mesh_identity.keys import KeyType, generate_key
from mesh_identity.profile import build_root, ca_csr, is_ca
from mesh_identity.provider import CAProvider, Health, Mode
from mesh_identity.spiffe import SpiffeId, TrustDomain
from mesh_identity.svid import fingerprint_of
from mesh_identity.verify import chain_problem

TRUST_DOMAIN = TrustDomain("example.org")
WORKLOAD = SpiffeId.for_kubernetes(TRUST_DOMAIN, "default", "contract")


class ProviderContract:
    """Subclass it and define a ``provider`` fixture returning a provider for ``example.org``."""

    trust_domain = TRUST_DOMAIN

    def _needs(self, provider: CAProvider, mode: Mode) -> None:
        if mode not in provider.capabilities().modes:
            pytest.skip(f"provider {provider.name!r} does not offer {mode} mode")

    def test_has_a_name(self, provider: CAProvider) -> None:
        assert provider.name
        assert provider.capabilities().modes

    def test_trust_bundle_is_ca_certificates_of_the_trust_domain(self, provider: CAProvider) -> None:
        bundle = provider.trust_bundle()
        assert bundle.trust_domain == self.trust_domain
        assert bundle.authorities
        assert all(is_ca(cert) for cert in bundle.authorities)

    def test_health_reports_healthy(self, provider: CAProvider) -> None:
        health = provider.health()
        assert isinstance(health, Health)
        assert health.healthy, health.detail

    def test_signs_an_intermediate_that_chains_to_the_bundle(self, provider: CAProvider) -> None:
        self._needs(provider, Mode.INTERMEDIATE)
        key = generate_key(KeyType.ECDSA_P256)
        signed = provider.sign_intermediate(ca_csr(key, self.trust_domain, "contract"), timedelta(hours=2))
        assert is_ca(signed.certificate)
        assert chain_problem(signed.certificate, signed.chain, signed.bundle, datetime.now(UTC)) is None

    def test_signs_a_workload_with_only_its_spiffe_id(self, provider: CAProvider) -> None:
        self._needs(provider, Mode.PER_WORKLOAD)
        key = generate_key(KeyType.ECDSA_P256)
        signed = provider.sign_workload(workload_csr(key, WORKLOAD), WORKLOAD, timedelta(minutes=30))
        san = signed.certificate.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        assert san.get_values_for_type(x509.UniformResourceIdentifier) == [str(WORKLOAD)]
        assert not is_ca(signed.certificate)
        assert chain_problem(signed.certificate, signed.chain, signed.bundle, datetime.now(UTC)) is None

    @pytest.mark.parametrize("mode", list(Mode))
    def test_authority_issues_through_it(self, provider: CAProvider, mode: Mode) -> None:
        self._needs(provider, mode)
        authority = Authority(
            provider,
            AuthoritySettings(
                self.trust_domain, mode=mode, workload_ttl=timedelta(minutes=10), intermediate_ttl=timedelta(hours=1)
            ),
        )
        authority.start()
        svid = authority.issue(WORKLOAD)
        assert svid.spiffe_id == WORKLOAD
        assert chain_problem(svid.leaf, svid.chain, authority.bundle(), datetime.now(UTC)) is None
        # Expiry is read from the certificate, and never later than asked.
        assert svid.not_after == svid.leaf.not_valid_after_utc
        assert svid.not_after <= datetime.now(UTC) + timedelta(minutes=10, seconds=5)

    def test_trust_roots_adds_a_root_or_says_there_is_no_trust_store(self, provider: CAProvider) -> None:
        """``mesh-identity ca trust``: a provider with a local trust store adds the root (once) and serves it in
        its bundle; any other refuses with a ProviderRejectedError and its bundle is unchanged."""
        before = provider.trust_bundle().fingerprints
        root = build_root(generate_key(KeyType.ECDSA_P256), self.trust_domain, timedelta(days=1), datetime.now(UTC))
        refused: ProviderRejectedError | None = None
        try:
            added = provider.trust_roots([root])
        except ProviderRejectedError as err:
            refused = err
        if refused is not None:
            assert str(refused).startswith(f"{provider.name}: ")
            assert provider.trust_bundle().fingerprints == before
            return
        assert added == [root]
        assert provider.trust_bundle().fingerprints == before | {fingerprint_of(root)}
        assert provider.trust_roots([root]) == []
