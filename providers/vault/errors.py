"""Errors of the Vault provider: each says what went wrong and what to do about it.

They refine the core's provider errors (``retryable`` tells the rotation engine whether backing off may help)::

    ProviderError
    ├── ProviderUnavailableError
    │   ├── VaultUnreachableError        no connection (refused, DNS, timeout): retryable
    │   ├── VaultSealedError             503 sealed or 501 not initialised: retryable
    │   └── VaultServerError             429 or another 5xx: retryable
    ├── ProviderAuthError
    │   ├── VaultTokenExpiredError       the token expired or was revoked and cannot log in again
    │   └── VaultLoginError              AppRole or Kubernetes login refused (credentials, role binding)
    ├── ProviderRejectedError
    │   ├── VaultRequestError            any other 4xx answer (Vault's own words in ``errors``)
    │   ├── VaultPermissionDeniedError   403 with a valid token: its policies do not allow the path
    │   ├── VaultRoleError               the PKI role does not exist or refused the request (SAN, key type, CN)
    │   ├── VaultTtlError                the TTL was refused (past the CA's expiry, not a duration)
    │   ├── VaultMountError              no PKI engine at the mount, or no CA in it
    │   └── VaultAnswerError             an answer not of the shape Vault's API documents (a field missing or of
    │                                    another type, no JSON where JSON belongs, a body hvac cannot read)
    └── VaultTlsError                    the TLS handshake with Vault failed (CA bundle, name, client cert)

hvac and requests exceptions become one of these in :mod:`providers.vault.connection`, with ``raise ... from``;
answers are read through :mod:`providers.vault.answers`, which raises :class:`VaultAnswerError`.
"""

from __future__ import annotations

from mesh_identity.errors import ProviderAuthError, ProviderError, ProviderRejectedError, ProviderUnavailableError


class VaultUnreachableError(ProviderUnavailableError):
    """No connection to Vault."""


class VaultSealedError(ProviderUnavailableError):
    """Vault is sealed or not initialised."""


class VaultServerError(ProviderUnavailableError):
    """Vault answered 429 or 5xx."""


class VaultTokenExpiredError(ProviderAuthError):
    """The Vault token expired or was revoked, and this auth method cannot log in again by itself."""

    retryable = False


class VaultLoginError(ProviderAuthError):
    """Vault refused an AppRole or Kubernetes login."""


class VaultRequestError(ProviderRejectedError):
    """Vault refused a request (4xx). ``status`` and ``errors`` are Vault's, so callers that know the context
    (a PKI role, a TTL, a mount) can say what to fix."""

    def __init__(self, provider: str, message: str, *, status: int, errors: tuple[str, ...], what: str) -> None:
        super().__init__(provider, message)
        self.status = status
        self.errors = errors
        self.what = what


class VaultPermissionDeniedError(ProviderRejectedError):
    """403: the token's policies do not allow the request (or, until checked, the token is no longer valid)."""

    errors: tuple[str, ...] = ()


class VaultRoleError(ProviderRejectedError):
    """The PKI role does not exist, or its rules refused the request."""


class VaultTtlError(ProviderRejectedError):
    """Vault refused the requested TTL."""


class VaultMountError(ProviderRejectedError):
    """No PKI secrets engine at the configured mount, or no CA in it."""


class VaultAnswerError(ProviderRejectedError):
    """Vault's answer did not have the shape its API documents: a field missing or of another type, no JSON
    object where one belongs, or a body hvac could not read. Something else answers at the address (a proxy, a
    load balancer's error page, another server), or a Vault version this provider does not know. ``path`` is
    the API path asked (with the namespace label), ``key`` the field (``data.certificate``; empty for the
    answer as a whole). The message names both and never quotes the value (an answer may carry a token)."""

    def __init__(self, provider: str, message: str, *, path: str, key: str = "") -> None:
        super().__init__(provider, message)
        self.path = path
        self.key = key


class VaultTlsError(ProviderError):
    """The TLS handshake with Vault failed: only a configuration change helps."""

    retryable = False
