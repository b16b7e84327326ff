"""Errors of the cert-manager provider: each says what went wrong and what to do about it.

They refine the core's provider errors (``retryable`` tells the rotation engine whether backing off may help)::

    ProviderError
    ├── ProviderUnavailableError
    │   ├── KubeUnreachableError          no connection to the API server (refused, dropped, timed out)
    │   ├── KubeServerError               the API server answered 429 or 5xx
    │   ├── RequestTimeoutError           the CertificateRequest was not Ready within the timeout
    │   └── RequestFailedError            the issuer set Ready=False reason Failed (a new request may succeed)
    ├── ProviderAuthError
    │   └── KubeUnauthorizedError         401: the token is wrong or expired
    ├── ProviderRejectedError
    │   ├── KubeForbiddenError            403: RBAC does not allow the call (names the verb and resource)
    │   ├── KubeNotFoundError             404: no cert-manager CRDs, or no such namespace, Secret, ConfigMap
    │   ├── KubeInvalidError              400/409/422: the API server or cert-manager's webhook refused the object
    │   ├── IssuerNotFoundError           the issuerRef names no Issuer/ClusterIssuer
    │   ├── RequestDeniedError            an approver set Denied
    │   ├── TrustBundleError              no usable trust: status.ca empty and nothing pinned or stored, an
    │   │                                 unusable pinned bundle or store, a root the operator may not add
    │   ├── UntrustedRootError            the issuer answered with a chain to a root that is not trusted
    │   └── MalformedAnswerError          an answer that is not what the Kubernetes API promises: not JSON, or a
    │                                     key missing or of another type (names the object and the key)
    └── KubeTlsError                      the TLS handshake with the API server failed (CA, name)

``kubernetes`` and ``urllib3`` exceptions become one of these in :mod:`providers.cert_manager.kube`, with
``raise ... from``; every answer is read through :mod:`providers.cert_manager.shapes`, which raises
:class:`MalformedAnswerError` for one of the wrong shape.
"""

from __future__ import annotations

from mesh_identity.errors import ProviderAuthError, ProviderError, ProviderRejectedError, ProviderUnavailableError

NAME = "cert-manager"  # the provider's name: the first word of each of its messages


class KubeUnreachableError(ProviderUnavailableError):
    """No connection to the Kubernetes API server."""


class KubeServerError(ProviderUnavailableError):
    """The API server answered 429 (throttled) or 5xx."""


class RequestTimeoutError(ProviderUnavailableError):
    """The CertificateRequest was not Ready, Failed or Denied within the configured timeout."""


class RequestFailedError(ProviderUnavailableError):
    """The issuer marked the CertificateRequest Failed. cert-manager never retries a CertificateRequest, but a
    new one may succeed once the issuer recovers, so backing off helps."""


class KubeUnauthorizedError(ProviderAuthError):
    """The API server refused the credentials (401)."""


class KubeForbiddenError(ProviderRejectedError):
    """RBAC forbids the call (403)."""


class KubeNotFoundError(ProviderRejectedError):
    """A resource the provider needs does not exist (404): cert-manager's CRDs, the namespace, the bundle."""


class KubeInvalidError(ProviderRejectedError):
    """The API server or cert-manager's admission webhook refused the object (400, 409, 422)."""


class IssuerNotFoundError(ProviderRejectedError):
    """cert-manager reports that the referenced Issuer or ClusterIssuer does not exist."""


class RequestDeniedError(ProviderRejectedError):
    """An approver denied the CertificateRequest."""


class TrustBundleError(ProviderRejectedError):
    """No usable trust: ``status.ca`` is empty and no root is pinned or stored, the pinned bundle or the stored
    roots cannot be used, or a root given to ``mesh-identity ca trust`` cannot be added."""


class UntrustedRootError(ProviderRejectedError):
    """The issuer answered with a chain that does not end at a trusted root (the pinned bundle, or the roots
    trusted on first use or by the operator); nothing of the answer was used or kept."""


class MalformedAnswerError(ProviderRejectedError):
    """An answer of the API server (or, in a CertificateRequest's status, of the issuer) that is not what the
    Kubernetes API promises: a body that is not JSON, a value of another type than the API's (an object that is a
    list, a string that is a number), a required key missing. The message names the object (its kind, namespace
    and name, or the call it answered) and the key path; it shows the value only bounded and escaped, and never
    a value of a Secret."""


class KubeTlsError(ProviderError):
    """The TLS handshake with the API server failed: only a configuration change helps."""

    retryable = False
