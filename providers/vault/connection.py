"""The hvac client with our TLS settings, and the translation of hvac and requests errors into ours.

This module and :mod:`providers.vault.auth` are the only places that touch hvac; nothing hvac-shaped (its
exceptions, its untyped dicts) leaves the provider package.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar
from urllib.parse import urlsplit

import hvac
import hvac.exceptions
import requests
import requests.adapters

from mesh_identity.errors import ProviderError
from providers.vault.errors import (
    VaultPermissionDeniedError,
    VaultRequestError,
    VaultSealedError,
    VaultServerError,
    VaultTlsError,
    VaultUnreachableError,
)
from providers.vault.options import VaultSettings

NAME = "vault"
T = TypeVar("T")


class ServerNameAdapter(requests.adapters.HTTPAdapter):
    """Verify Vault's certificate against ``server_name`` (and send it as SNI) instead of the URL's host."""

    def __init__(self, server_name: str) -> None:
        self.server_name = server_name
        super().__init__()

    def init_poolmanager(self, *args: Any, **kwargs: Any) -> None:
        kwargs["server_hostname"] = self.server_name
        kwargs["assert_hostname"] = self.server_name
        super().init_poolmanager(*args, **kwargs)


def build_client(settings: VaultSettings) -> hvac.Client:
    """An hvac client for ``settings``: verification always on (the system CAs unless ``ca_cert``)."""
    session = requests.Session()
    session.verify = str(settings.ca_cert) if settings.ca_cert else True
    if settings.client_cert and settings.client_key:
        session.cert = (str(settings.client_cert), str(settings.client_key))
    if settings.tls_server_name:
        session.mount("https://", ServerNameAdapter(settings.tls_server_name))
    return hvac.Client(
        url=settings.address,
        namespace=settings.namespace,
        session=session,
        timeout=settings.request_timeout.total_seconds(),
    )


def api_path(url: str | None) -> str:
    """``pki/sign/web`` from ``http://vault:8200/v1/pki/sign/web``."""
    path = urlsplit(url or "").path
    return path.split("/v1/", 1)[1] if "/v1/" in path else path.lstrip("/")


def _reason(err: BaseException) -> str:
    """A short cause of a connection failure, found in the exception chain."""
    seen: list[BaseException] = []
    current: BaseException | None = err
    while current is not None and current not in seen:
        seen.append(current)
        current = current.__cause__ or current.__context__
    text = " ".join(str(e) for e in seen) + " " + " ".join(str(a) for e in seen for a in e.args)
    for needle, reason in (
        ("mismatch", "certificate name mismatch"),
        ("doesn't match", "certificate name mismatch"),
        ("CERTIFICATE_VERIFY_FAILED", "certificate verify failed"),
        ("certificate required", "a client certificate is required"),
        ("Connection refused", "connection refused"),
        ("Name or service not known", "name not resolved"),
        ("Failed to resolve", "name not resolved"),
        ("timed out", "timed out"),
        ("Connection reset", "connection reset"),
        ("RemoteDisconnected", "connection closed without an answer"),
        ("Connection aborted", "connection closed without an answer"),
    ):
        if needle in text:
            return reason
    return type(err).__name__


class Connection:
    """Runs hvac calls and turns their failures into provider errors that say what to do."""

    def __init__(self, settings: VaultSettings) -> None:
        self.settings = settings
        self.client = build_client(settings)

    def call(self, what: str, function: Callable[[], T]) -> T:
        """Run ``function`` (an hvac call); ``what`` names the operation in error messages."""
        try:
            return function()
        except hvac.exceptions.VaultError as err:
            raise self.translate(what, err) from err
        except requests.exceptions.SSLError as err:
            raise VaultTlsError(
                NAME,
                f"{what}: TLS with Vault at {self.settings.address} failed ({_reason(err)}); check ca_cert (the CA "
                "that signed Vault's certificate), tls_server_name, and client_cert/client_key if Vault asks for one",
            ) from err
        except (requests.exceptions.ConnectionError, requests.exceptions.Timeout) as err:
            raise VaultUnreachableError(
                NAME,
                f"{what}: cannot reach Vault at {self.settings.address} ({_reason(err)}); check the address and "
                "that Vault is up (issued certificates stay in use; retrying with backoff)",
            ) from err
        except requests.exceptions.RequestException as err:
            raise VaultUnreachableError(NAME, f"{what}: request to Vault failed: {err}") from err

    def translate(self, what: str, err: hvac.exceptions.VaultError) -> ProviderError:
        """The provider error for an hvac error; :mod:`providers.vault.pki` refines 400s and 404s."""
        errors = "; ".join(str(e) for e in err.errors or []) or "no error text"
        path = api_path(err.url)
        where = f"{(err.method or '').upper()} {path}{self.settings.namespace_label}"
        if isinstance(err, hvac.exceptions.VaultDown):
            return VaultSealedError(
                NAME,
                f"{what}: Vault at {self.settings.address} is sealed ({errors}); unseal it (vault operator unseal) "
                "(issued certificates stay in use; retrying with backoff)",
            )
        if isinstance(err, hvac.exceptions.VaultNotInitialized):
            return VaultSealedError(
                NAME, f"{what}: Vault at {self.settings.address} is not initialized; run vault operator init"
            )
        if isinstance(err, hvac.exceptions.Forbidden):
            capability = "read" if (err.method or "").lower() == "get" else "update"
            denied = VaultPermissionDeniedError(
                NAME,
                f"{what}: permission denied on {where}; the token's policies must grant {capability!r} on "
                f'path "{path}"',
            )
            denied.errors = tuple(str(e) for e in err.errors or ())
            return denied
        if isinstance(err, hvac.exceptions.RateLimitExceeded):
            return VaultServerError(NAME, f"{what}: Vault is rate limiting requests (429 on {where}); backing off")
        status = {
            hvac.exceptions.InternalServerError: 500,
            hvac.exceptions.BadGateway: 502,
        }.get(type(err))
        if status is not None or isinstance(err, hvac.exceptions.UnexpectedError):
            shown = status or "an unexpected status"
            return VaultServerError(NAME, f"{what}: Vault answered {shown} to {where}: {errors}; retrying with backoff")
        status = {
            hvac.exceptions.InvalidRequest: 400,
            hvac.exceptions.InvalidPath: 404,
            hvac.exceptions.UnsupportedOperation: 405,
            hvac.exceptions.PreconditionFailed: 412,
            hvac.exceptions.Unauthorized: 401,
        }.get(type(err), 400)
        return VaultRequestError(
            NAME,
            f"{what}: Vault refused {where} ({status}): {errors}",
            status=status,
            errors=tuple(str(e) for e in err.errors or ()),
            what=what,
        )

    def close(self) -> None:
        self.client.adapter.close()
