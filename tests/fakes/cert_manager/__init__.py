"""cert-manager for tests, on the Kubernetes fake (:mod:`tests.fakes.kube`).

* :mod:`~tests.fakes.cert_manager.crds`: cert-manager's kinds (``CertificateRequest``, ``Issuer``,
  ``ClusterIssuer``) with its webhook's validation, and :func:`install_crds` to serve them on a
  :class:`~tests.fakes.kube.KubeServer`;
* :mod:`~tests.fakes.cert_manager.issuer`: how a CA issuer signs a request;
* :mod:`~tests.fakes.cert_manager.signer`: :class:`CertManagerSigner`, the approver and CA issuer controllers
  as a thread talking to the API server (it installs the CRDs on the server it is given), and the
  ``cert_manager_signer`` fixture.
"""

from tests.fakes.cert_manager.crds import (
    CERTIFICATE_REQUEST,
    CLUSTER_ISSUER,
    CRDS,
    GROUP,
    ISSUER,
    VERSION,
    install_crds,
)
from tests.fakes.cert_manager.issuer import parse_go_duration, sign
from tests.fakes.cert_manager.signer import (
    SIGNER_TOKEN,
    SIGNER_USER,
    Behaviour,
    CertManagerSigner,
    IssuerSettings,
    Outcome,
    cert_manager_signer,
)

__all__ = [
    "CERTIFICATE_REQUEST",
    "CLUSTER_ISSUER",
    "CRDS",
    "GROUP",
    "ISSUER",
    "SIGNER_TOKEN",
    "SIGNER_USER",
    "VERSION",
    "Behaviour",
    "CertManagerSigner",
    "IssuerSettings",
    "Outcome",
    "cert_manager_signer",
    "install_crds",
    "parse_go_duration",
    "sign",
]
