"""The Authority refuses provider-returned leaves whose SANs are more than the requested SPIFFE ID.

The provider here is a real plugin (registered with a real plugin manager, built through the assembly like any
provider) whose CA signs per-workload leaves for the CSR's key with the SANs the test asks for: an X.509-SVID
has exactly one URI SAN, the requested ID, and no other SAN types, whatever the upstream CA added.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from mesh_identity.assembly import build_authority
from mesh_identity.authority import Authority
from mesh_identity.errors import ProviderRejectedError
from mesh_identity.provider import (
    Capabilities,
    CAProvider,
    Health,
    Limits,
    Mode,
    ProviderContext,
    ProviderSpec,
    SignedCertificate,
)
from mesh_identity.spiffe import SpiffeId
from mesh_identity.svid import TrustBundle
from plugins import hookimpl
from tests.pki import TestCa
from tests.rotation.helpers import TD, make_config, provider_for

WEB = SpiffeId.for_kubernetes(TD, "default", "web")


class SansProvider(CAProvider):
    """A CA of the trust domain that signs each workload CSR with ``plugin.sans(spiffe_id)`` as its SANs."""

    name = "sans"

    def __init__(self, context: ProviderContext, plugin: SansPlugin) -> None:
        self.context = context
        self.plugin = plugin

    def capabilities(self) -> Capabilities:
        return self.plugin.spec.capabilities

    def trust_bundle(self) -> TrustBundle:
        return self.plugin.ca.bundle

    def sign_intermediate(self, csr: x509.CertificateSigningRequest, ttl: timedelta) -> SignedCertificate:
        raise AssertionError("per-workload only")

    def sign_workload(
        self, csr: x509.CertificateSigningRequest, spiffe_id: SpiffeId, ttl: timedelta
    ) -> SignedCertificate:
        ca = self.plugin.ca
        now = datetime.now(UTC)
        builder = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "upstream")]))
            .issuer_name(ca.certificate.subject)
            .public_key(csr.public_key())  # type: ignore[arg-type]
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - timedelta(minutes=1))
            .not_valid_after(now + ttl)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.KeyUsage(True, False, False, False, False, False, False, False, False), critical=True)
            .add_extension(
                x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]),
                critical=False,
            )
        )
        names = self.plugin.sans(spiffe_id)
        if names:
            builder = builder.add_extension(x509.SubjectAlternativeName(names), critical=False)
        leaf = builder.sign(ca.key, hashes.SHA256())
        self.plugin.signed.append(leaf)
        return SignedCertificate(leaf, (), ca.bundle)

    def health(self) -> Health:
        return Health(True, "ok", self.context.clock())

    def limits(self) -> Limits:
        return Limits(timedelta(days=1), None, self.plugin.ca.certificate.not_valid_after_utc)


class SansPlugin:
    """A plugin object offering the ``sans`` provider; ``extra`` are the SANs added beside the SPIFFE ID."""

    def __init__(self, extra: Sequence[x509.GeneralName] = (), *, with_id: bool = True) -> None:
        self.ca = TestCa.for_trust_domain(TD.name, "upstream")
        self.extra = list(extra)
        self.with_id = with_id
        self.signed: list[x509.Certificate] = []
        self.spec = ProviderSpec(
            name="sans",
            description="a CA that adds SANs",
            capabilities=Capabilities(frozenset({Mode.PER_WORKLOAD})),
            factory=self._factory,
        )

    def _factory(self, context: ProviderContext, options: Mapping[str, Any]) -> CAProvider:
        return SansProvider(context, self)

    def sans(self, spiffe_id: SpiffeId) -> list[x509.GeneralName]:
        own: list[x509.GeneralName] = [x509.UniformResourceIdentifier(str(spiffe_id))] if self.with_id else []
        return [*own, *self.extra]

    @hookimpl
    def mesh_identity_providers(self) -> Sequence[ProviderSpec]:
        return [self.spec]


def _authority(tmp_path: Path, plugin: SansPlugin) -> Authority:
    config = make_config(tmp_path, provider="sans", mode="per-workload")
    authority = build_authority(config, provider_for(config, plugin))
    authority.start()
    return authority


def test_a_leaf_with_only_the_spiffe_id_is_accepted(tmp_path: Path) -> None:
    svid = _authority(tmp_path, SansPlugin()).issue(WEB)
    assert svid.leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value == (
        x509.SubjectAlternativeName([x509.UniformResourceIdentifier(str(WEB))])
    )


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        pytest.param(
            [x509.UniformResourceIdentifier("https://web.example.org/")],
            "URI SANs [spiffe://example.org/ns/default/sa/web, https://web.example.org/]",
            id="https-uri",
        ),
        pytest.param([x509.DNSName("web.default.svc")], "DNS SAN web.default.svc", id="dns"),
        pytest.param([x509.DNSName("*.example.org")], "DNS SAN *.example.org", id="wildcard"),
        pytest.param([x509.IPAddress(ipaddress.ip_address("10.0.0.7"))], "IP SAN 10.0.0.7", id="ip"),
        pytest.param([x509.RFC822Name("web@example.org")], "email SAN web@example.org", id="email"),
        pytest.param(
            [x509.UniformResourceIdentifier(str(SpiffeId.for_kubernetes(TD, "default", "db")))],
            "URI SANs [spiffe://example.org/ns/default/sa/web, spiffe://example.org/ns/default/sa/db]",
            id="second-spiffe-id",
        ),
    ],
)
def test_a_leaf_with_more_sans_is_refused(tmp_path: Path, extra: list[x509.GeneralName], message: str) -> None:
    plugin = SansPlugin(extra)
    authority = _authority(tmp_path, plugin)
    with pytest.raises(ProviderRejectedError) as info:
        authority.issue(WEB)
    assert plugin.signed, "the provider signed a leaf, the authority refused it"
    text = str(info.value)
    assert text.startswith("sans: returned a certificate for spiffe://example.org/ns/default/sa/web with "), text
    assert message in text
    assert "an X.509-SVID has exactly one SAN, the URI spiffe://example.org/ns/default/sa/web" in text


def test_a_leaf_with_the_id_only_as_a_dns_name_is_refused(tmp_path: Path) -> None:
    plugin = SansPlugin([x509.DNSName("web.default.svc")], with_id=False)
    with pytest.raises(ProviderRejectedError, match=r"no URI SAN; DNS SAN web\.default\.svc"):
        _authority(tmp_path, plugin).issue(WEB)


def test_a_leaf_without_san_is_refused(tmp_path: Path) -> None:
    plugin = SansPlugin(with_id=False)
    with pytest.raises(ProviderRejectedError, match="with no subjectAltName"):
        _authority(tmp_path, plugin).issue(WEB)
