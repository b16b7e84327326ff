"""Fixtures for the end-to-end tests: a built-in CA in a temporary state directory, as an ``Issuer``."""

from __future__ import annotations

import shutil
from datetime import timedelta
from pathlib import Path

import pytest

from mesh_identity.authority import Authority, AuthoritySettings
from mesh_identity.clock import utcnow
from mesh_identity.keys import KeyType
from mesh_identity.provider import Mode, ProviderContext
from mesh_identity.spiffe import SpiffeId, TrustDomain
from mesh_identity.svid import TrustBundle, X509Svid
from providers.builtin.provider import SPEC

TRUST_DOMAIN = TrustDomain("e2e.mesh")


class AuthorityIssuer:
    """The harness's ``Issuer`` on top of an :class:`Authority`."""

    def __init__(self, authority: Authority, ttl: timedelta = timedelta(hours=1)) -> None:
        self.authority = authority
        self.ttl = ttl

    def issue(self, spiffe_id: SpiffeId) -> X509Svid:
        return self.authority.issue(spiffe_id, ttl=self.ttl, requested_by="e2e")

    def bundle(self) -> TrustBundle:
        return self.authority.bundle()


def builtin_authority(state_dir: Path, trust_domain: TrustDomain = TRUST_DOMAIN) -> Authority:
    context = ProviderContext(trust_domain, state_dir, KeyType.ECDSA_P256, Mode.INTERMEDIATE, utcnow)
    provider = SPEC.factory(context, SPEC.validate_options({}))
    authority = Authority(provider, AuthoritySettings(trust_domain))
    authority.start()
    return authority


@pytest.fixture
def issuer(tmp_path: Path) -> AuthorityIssuer:
    return AuthorityIssuer(builtin_authority(tmp_path / "ca-state"))


KUBECTL_TESTS = (
    "test_kube_mesh.py",
    "test_injection.py",
    "test_inject_pod_start_bench.py",
)  # they run the real kubectl


def pytest_report_header(config: pytest.Config) -> str | None:
    if shutil.which("kubectl") is None:
        return f"kubectl: not on the PATH; tests/e2e/{', '.join(KUBECTL_TESTS)} deselected"
    return None


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if shutil.which("kubectl") is not None:
        return
    mine = [i for i in items if Path(str(i.path)).name in KUBECTL_TESTS and "e2e" in Path(str(i.path)).parts]
    if mine:
        config.hook.pytest_deselected(items=mine)
        items[:] = [i for i in items if i not in mine]
