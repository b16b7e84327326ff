"""Hook specifications of mesh-identity.

A plugin is a module (or object) with functions decorated ``@plugins.hookimpl`` and named like the specs
below; it is found through the ``mesh_identity`` entry-point group::

    [project.entry-points.mesh_identity]
    my_ca = "my_package.plugin"

Providers are plugins like any other: the built-in, Vault and cert-manager providers register this way too.
Event hooks are called synchronously, in the thread that caused the event; they must be quick and must not
raise (an exception is logged and swallowed by the facade, so a broken plugin cannot stop a rotation).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from mesh_identity.events import (
    AccessDenied,
    CaRotated,
    CertificateIssued,
    CertificateRotated,
    RotationFailed,
    SigningDecision,
)
from mesh_identity.provider import ProviderSpec
from plugins import hookspec


@hookspec
def mesh_identity_providers() -> Sequence[ProviderSpec]:
    """Register CA providers.

    :return: the :class:`~mesh_identity.provider.ProviderSpec` objects this plugin offers (may be empty).
    Called once when the plugin manager is built; results of all plugins are collected. Two providers with the
    same name are an error.
    """
    raise NotImplementedError


@hookspec
def mesh_identity_validate_provider_options(provider: str, options: Mapping[str, Any]) -> Sequence[str]:
    """Check a provider's options beyond its schema (e.g. two options that exclude each other).

    :param provider: the provider name from ``ca.provider``.
    :param options: the options after schema validation (defaults filled in, values converted).
    :return: problems, each a message naming the option key; empty when all is well.
    Called for every plugin; all problems are collected and reported together.
    """
    raise NotImplementedError


@hookspec
def mesh_identity_configure(settings: Mapping[str, Any]) -> None:
    """Receive the settings plugins may need, once at start, before any event.

    :param settings: ``{"trust_domain": str, "state_dir": pathlib.Path, "plugins": {name: {...}}}`` where
        ``plugins`` is the config file's ``plugins`` section (each plugin reads its own key).
    Called for every plugin; the return value is ignored.
    """
    raise NotImplementedError


@hookspec
def mesh_identity_certificate_issued(event: CertificateIssued) -> None:
    """A workload, intermediate or root certificate was issued.

    :param event: subject, kind, serial, fingerprint, NotAfter (from the certificate), provider, requester.
    Called for every plugin; the return value is ignored.
    """
    raise NotImplementedError


@hookspec
def mesh_identity_certificate_rotated(event: CertificateRotated) -> None:
    """A certificate was replaced by a new one (with a new key).

    :param event: subject, kind, old and new serial, the new NotAfter, provider.
    Called for every plugin, after ``certificate_issued`` for the new certificate; the return value is ignored.
    """
    raise NotImplementedError


@hookspec
def mesh_identity_rotation_failed(event: RotationFailed) -> None:
    """A renewal failed.

    :param event: subject, error, attempt number, next attempt, current expiry; ``event.severity`` is
        ``error`` once the current certificate is close to expiry, ``warning`` before.
    Called for every plugin; the return value is ignored.
    """
    raise NotImplementedError


@hookspec
def mesh_identity_ca_rotated(event: CaRotated) -> None:
    """A CA changed: a new intermediate, or a root rotation phase (prepared, activated, retired).

    :param event: kind, phase, old and new fingerprints, provider.
    Called for every plugin; the return value is ignored.
    """
    raise NotImplementedError


@hookspec
def mesh_identity_access_denied(event: AccessDenied) -> None:
    """A peer asked for something it is not entitled to (e.g. another identity's secret over SDS).

    :param event: the peer's authenticated SPIFFE ID, the resource it asked for, and why it was refused.
    Called for every plugin; the return value is ignored.
    """
    raise NotImplementedError


@hookspec
def mesh_identity_signing_decision(event: SigningDecision) -> None:
    """The signing API granted or refused a request (an SVID, a JWT-SVID or the bundle, for a node agent).

    :param event: the RPC, the authenticated caller and its kind of credential, the identity asked for or
        issued, granted or not with the gRPC status and the reason, the serial of an issued certificate. It
        carries no token, key or CSR.
    Called for every plugin, once per request, after the decision; the return value is ignored.
    """
    raise NotImplementedError
