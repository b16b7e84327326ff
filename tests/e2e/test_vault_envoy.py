"""A real Envoy pair runs mTLS on Vault-issued SVIDs (the Vault test server, driven through hvac), in both modes.

The PKI mount holds a Vault-side intermediate under a root on another mount, so Vault's ``ca_chain`` has two
certificates: the bundle is the root, and every chain Envoy presents ends with Vault's intermediate.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from cryptography import x509

from mesh_identity.authority import Authority, AuthoritySettings
from mesh_identity.provider import Mode
from tests.e2e.provider_pair import ProviderPair, provider_pair
from tests.fakes.vault import VaultServer
from tests.providers.vault.targets import TRUST_DOMAIN, VaultTarget, set_up

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def vault() -> Iterator[VaultTarget]:
    with VaultServer() as server:
        yield set_up(server.url, server.root_token, server=server, intermediate=True)


@pytest.fixture(scope="module")
def authorities(vault: VaultTarget, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[Mode, Authority]]:
    providers = {mode: vault.provider(tmp_path_factory.mktemp(f"vault-{mode}"), mode) for mode in Mode}
    made = {mode: Authority(provider, AuthoritySettings(TRUST_DOMAIN, mode)) for mode, provider in providers.items()}
    for authority in made.values():
        authority.start()
    yield made
    for provider in providers.values():
        provider.close()


@pytest.fixture(scope="module")
def pair(authorities: dict[Mode, Authority], tmp_path_factory: pytest.TempPathFactory) -> Iterator[ProviderPair]:
    with provider_pair(authorities[Mode.INTERMEDIATE], TRUST_DOMAIN, tmp_path_factory.mktemp("pair")) as pair:
        yield pair


@pytest.mark.parametrize("mode", list(Mode), ids=str)
def test_envoy_pair_runs_mtls_on_vault_issued_svids(
    pair: ProviderPair, authorities: dict[Mode, Authority], vault: VaultTarget, mode: Mode
) -> None:
    answer = vault.admin().secrets.pki.read_ca_certificate_chain(mount_point=vault.mount)
    vault_intermediate, root = x509.load_pem_x509_certificates(answer.encode())
    assert pair.bundle.authorities == (root,)
    assert vault.server is not None
    sign_path = f"/v1/{vault.mount}/sign/{vault.role}"
    signed_before = vault.server.request_count(sign_path)

    authority = authorities[mode]
    served = pair.check_mtls(pair.switch(authority), mode)

    if mode is Mode.INTERMEDIATE:  # the leaf is ours, under the intermediate Vault signed
        assert authority.signing_ca is not None
        assert served[1:] == (authority.signing_ca.certificate, vault_intermediate)
        assert vault.server.request_count(sign_path) == signed_before
    else:  # the leaf is Vault's: one sign/<role> per sidecar
        assert served[1:] == (vault_intermediate,)
        assert vault.server.request_count(sign_path) == signed_before + 2


def test_rotation_under_traffic_fails_no_request(pair: ProviderPair, authorities: dict[Mode, Authority]) -> None:
    loop = pair.rotate_under_traffic([authorities[Mode.PER_WORKLOAD], authorities[Mode.INTERMEDIATE]])
    assert loop.failures == []
    assert loop.peers == {str(pair.running.mesh.service("frontend").identity)}
