"""Errors raised by mesh-identity.

Every error the project raises on purpose derives from :class:`MeshIdentityError`::

    MeshIdentityError
    ├── InvalidSpiffeIdError        a SPIFFE ID or trust domain that breaks the SPIFFE ID spec
    ├── ConfigError                 a config file or option with a bad key or value (names the key path)
    ├── CsrError                    a CSR that is malformed, oversized, badly signed or asks for other names
    ├── IssuanceError               the authority cannot issue what was asked (TTL, key type, identity)
    ├── StateError                  a state directory that is missing, corrupt or locked by a wrong passphrase
    ├── PluginError                 a plugin or provider that cannot be found or loaded
    ├── RotationError               a rotation step refused (e.g. retiring a root still in use)
    └── ProviderError               a CA provider failed; ``retryable`` says whether backing off may help
        ├── ProviderUnavailableError    the upstream CA cannot be reached, is sealed or overloaded
        ├── ProviderAuthError           credentials refused or expired
        └── ProviderRejectedError       the upstream CA refused this request (role, TTL, denied)

Library errors (hvac, kubernetes, grpc) become one of these at the module boundary, with ``raise ... from``.
"""

from __future__ import annotations


class MeshIdentityError(Exception):
    """Root of every error mesh-identity raises on purpose."""


class InvalidSpiffeIdError(MeshIdentityError, ValueError):
    """A SPIFFE ID or trust domain that breaks the SPIFFE ID specification."""


class ConfigError(MeshIdentityError, ValueError):
    """A configuration key or value that is wrong; the message names the key path."""


class CsrError(MeshIdentityError, ValueError):
    """A certificate signing request that cannot be honoured."""


class IssuanceError(MeshIdentityError):
    """The authority cannot issue the certificate asked for."""


class StateError(MeshIdentityError):
    """A CA state directory that is missing, corrupt, or cannot be decrypted."""


class PluginError(MeshIdentityError):
    """A plugin or CA provider that cannot be found or loaded."""


class RotationError(MeshIdentityError):
    """A rotation step that is refused."""


class ProviderError(MeshIdentityError):
    """A CA provider failed.

    ``retryable`` is True when backing off and retrying may succeed (outage, sealed, overload) and False when
    only a change of configuration or credentials will help.
    """

    retryable: bool = True

    def __init__(self, provider: str, message: str) -> None:
        super().__init__(f"{provider}: {message}")
        self.provider = provider


class ProviderUnavailableError(ProviderError):
    """The upstream CA cannot be reached, is sealed, or answers 5xx."""

    retryable = True


class ProviderAuthError(ProviderError):
    """The provider's credentials were refused or have expired."""

    retryable = True


class ProviderRejectedError(ProviderError):
    """The upstream CA refused this particular request (role, TTL, policy, denial)."""

    retryable = False
