"""The cert-manager provider against a real cluster (``-m integration``; runs only when ``KUBECONFIG`` is set).

Setup, once, on a cluster with cert-manager installed (``kubectl apply -f cert-manager.yaml``)::

    kubectl create namespace mesh-identity-test
    # a CA issuer: a self-signed root, kept in a Secret, signing through a ClusterIssuer
    kubectl apply -f - <<'EOF'
    apiVersion: cert-manager.io/v1
    kind: ClusterIssuer
    metadata: {name: selfsigned}
    spec: {selfSigned: {}}
    ---
    apiVersion: cert-manager.io/v1
    kind: Certificate
    metadata: {name: mesh-root, namespace: cert-manager}
    spec:
      isCA: true
      commonName: mesh-identity test root
      secretName: mesh-root
      privateKey: {algorithm: ECDSA, size: 256}
      issuerRef: {name: selfsigned, kind: ClusterIssuer}
    ---
    apiVersion: cert-manager.io/v1
    kind: ClusterIssuer
    metadata: {name: mesh-ca}
    spec: {ca: {secretName: mesh-root}}
    EOF

Then run::

    KUBECONFIG=~/.kube/config MESH_IDENTITY_CM_ISSUER=mesh-ca \\
        .venv/bin/python -m pytest -m integration tests/providers/cert_manager

Variables: ``MESH_IDENTITY_CM_ISSUER`` (required), ``MESH_IDENTITY_CM_ISSUER_KIND`` (default ClusterIssuer),
``MESH_IDENTITY_CM_NAMESPACE`` (default mesh-identity-test), ``MESH_IDENTITY_CM_CONTEXT`` (default: the current
context). The user needs create/get/list/watch/delete on ``certificaterequests.cert-manager.io`` in that
namespace, and cert-manager's approver must approve requests for the issuer (it does for its own kinds).
"""

from __future__ import annotations

import os
import subprocess
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from mesh_identity.authority import Authority, AuthoritySettings
from mesh_identity.keys import KeyType
from mesh_identity.provider import Mode, ProviderContext
from mesh_identity.spiffe import SpiffeId, TrustDomain
from mesh_identity.svid import cert_pem, certs_pem
from providers.cert_manager.provider import SPEC, CertManagerProvider
from providers.cert_manager.request import LABEL_INSTANCE

pytestmark = pytest.mark.integration

TD = TrustDomain("mesh-identity-test.example")
WEB = SpiffeId.for_kubernetes(TD, "shop", "web")


@pytest.fixture
def provider(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[CertManagerProvider]:
    issuer = os.environ.get("MESH_IDENTITY_CM_ISSUER")
    if not issuer:
        pytest.fail(
            "KUBECONFIG is set, so the cert-manager integration tier runs: set MESH_IDENTITY_CM_ISSUER to "
            "the issuer to test against (see this module's docstring)"
        )
    mode = request.param if hasattr(request, "param") else Mode.PER_WORKLOAD
    options = {
        "issuer_name": issuer,
        "issuer_kind": os.environ.get("MESH_IDENTITY_CM_ISSUER_KIND", "ClusterIssuer"),
        "namespace": os.environ.get("MESH_IDENTITY_CM_NAMESPACE", "mesh-identity-test"),
        "context": os.environ.get("MESH_IDENTITY_CM_CONTEXT"),
        "timeout": "2m",
    }
    context = ProviderContext(TD, tmp_path / "state", KeyType.ECDSA_P256, mode, lambda: datetime.now(UTC))
    made = CertManagerProvider(context, SPEC.validate_options({k: v for k, v in options.items() if v}))
    yield made
    left = made.api.list_requests(made.namespace, f"{LABEL_INSTANCE}={made.instance}")
    made.close()
    assert left == [], "the provider left CertificateRequests behind"


@pytest.mark.parametrize("provider", list(Mode), indirect=True)
def test_issues_svids_that_openssl_verifies(provider: CertManagerProvider, tmp_path: Path) -> None:
    mode = provider.context.mode
    authority = Authority(
        provider, AuthoritySettings(TD, mode, workload_ttl=timedelta(hours=1), intermediate_ttl=timedelta(hours=4))
    )
    authority.start()
    svid = authority.issue(WEB)
    (tmp_path / "leaf.pem").write_bytes(cert_pem(svid.leaf))
    (tmp_path / "roots.pem").write_bytes(svid.bundle.pem())
    args = ["openssl", "verify", "-CAfile", str(tmp_path / "roots.pem")]
    if svid.chain:
        (tmp_path / "chain.pem").write_bytes(certs_pem(svid.chain))
        args += ["-untrusted", str(tmp_path / "chain.pem")]
    result = subprocess.run([*args, str(tmp_path / "leaf.pem")], capture_output=True, text=True, check=False)
    assert result.stdout.strip() == f"{tmp_path}/leaf.pem: OK", result.stderr


def test_health(provider: CertManagerProvider) -> None:
    health = provider.health()
    assert health.healthy, health.detail
