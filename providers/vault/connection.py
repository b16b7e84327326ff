"""The hvac client with our TLS settings and redirect rule (same origin only), the translation of hvac and
requests errors into ours, and the non-PKI calls (health, token lookup and renewal, logins) as typed methods.

This module and :mod:`providers.vault.pki` are the only places that touch hvac; nothing hvac-shaped (its
exceptions, its untyped dicts) leaves them.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar
from urllib.parse import urlsplit

import hvac
import hvac.exceptions
import requests
import requests.adapters

from mesh_identity.errors import ProviderError, ProviderRejectedError
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


class VaultRedirectError(ProviderRejectedError):
    """Vault redirected to another origin, or from https to http: not followed, the token stays home.
    (A configuration problem: ``retryable`` is False.)"""

    def __init__(self, provider: str, message: str, *, target: str) -> None:
        super().__init__(provider, message)
        self.target = target


class RedirectRefused(requests.exceptions.RequestException):
    """Raised inside requests' redirect handling, before the next request is sent; :meth:`Connection.call`
    turns it into a :class:`VaultRedirectError`."""

    def __init__(self, source: str, target: str, reason: str) -> None:
        super().__init__(f"refused a redirect from {source} to {target}: {reason}")
        self.source = source
        self.target = target
        self.reason = reason


def origin(url: str) -> tuple[str, str, int | None]:
    """(scheme, host, port) of ``url``, the port made explicit: what must not change on a redirect."""
    parts = urlsplit(url)
    scheme = parts.scheme.lower()
    try:
        port = parts.port
    except ValueError:
        port = None
    return scheme, (parts.hostname or "").lower(), port or {"http": 80, "https": 443}.get(scheme)


class SameOriginSession(requests.Session):
    """A requests session that follows a redirect only within the origin of ``address`` (Vault's own
    standby forwarding to a path on the same address). Any other redirect, and any from https to http, is
    refused before the next request is prepared to go out, so neither the ``X-Vault-Token`` header nor a
    login's body (a 307 keeps both) reaches another server. requests would only drop ``Authorization``."""

    def __init__(self, address: str) -> None:
        super().__init__()
        self.address = address

    def rebuild_auth(self, prepared_request: requests.PreparedRequest, response: requests.Response) -> None:
        source, target = response.url, prepared_request.url or ""
        if origin(source)[0] == "https" and origin(target)[0] != "https":
            raise RedirectRefused(source, target, "from https to plain http")
        if origin(target) != origin(self.address) or origin(target) != origin(source):
            raise RedirectRefused(source, target, "another origin")
        super().rebuild_auth(prepared_request, response)


def build_client(settings: VaultSettings) -> hvac.Client:
    """An hvac client for ``settings``: verification always on (the system CAs unless ``ca_cert``), redirects
    followed only within Vault's address (:class:`SameOriginSession`)."""
    session = SameOriginSession(settings.address)
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


@dataclass(frozen=True, slots=True)
class ServerHealth:
    """What ``sys/health`` answered. ``ok``: Vault returned its health document (it is unsealed and active)."""

    ok: bool
    status: int
    version: str
    initialized: bool | None
    sealed: bool


@dataclass(frozen=True, slots=True)
class TokenInfo:
    """What ``auth/token/lookup-self`` says about the token in use (seconds)."""

    ttl: float
    creation_ttl: float
    renewable: bool
    policies: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class Grant:
    """The ``auth`` part of a login answer: the new token and its lease (seconds)."""

    token: str
    lease_duration: float
    renewable: bool
    policies: tuple[str, ...]

    @classmethod
    def from_auth(cls, auth: dict[str, Any]) -> Grant:
        return cls(
            token=str(auth["client_token"]),
            lease_duration=float(auth.get("lease_duration") or 0),
            renewable=bool(auth.get("renewable")),
            policies=tuple(auth.get("policies") or ()),
        )


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
        except RedirectRefused as err:
            raise VaultRedirectError(
                NAME,
                f"{what}: Vault at {self.settings.address} redirected to {err.target}, {err.reason}; refusing to "
                "follow (the token goes only to the configured address: set address to the node that answers)",
                target=err.target,
            ) from err
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

    # -- calls that are not PKI ------------------------------------------------------------------------------

    def health(self) -> ServerHealth:
        """``sys/health`` (no token needed); a standby counts as healthy."""
        answer: Any = self.call(
            "check Vault's health", lambda: self.client.sys.read_health_status(method="GET", standby_ok=True)
        )
        body: Any
        if isinstance(answer, dict):  # hvac returns the document itself only for a 200
            ok, status, body = True, 200, answer
        else:
            ok, status = False, int(answer.status_code)
            try:
                body = answer.json()
            except ValueError:
                body = {}
        initialized = body.get("initialized")
        return ServerHealth(
            ok=ok,
            status=status,
            version=str(body.get("version", "?")),
            initialized=initialized if isinstance(initialized, bool) else None,
            sealed=bool(body.get("sealed")),
        )

    def use_token(self, token: str) -> None:
        """Send ``token`` with every later request."""
        self.client.token = token

    def lookup_token(self) -> TokenInfo:
        """``auth/token/lookup-self`` for the token in use."""
        answer = self.call("look up the Vault token", self.client.auth.token.lookup_self)
        info = answer["data"]
        return TokenInfo(
            ttl=float(info.get("ttl") or 0),
            creation_ttl=float(info.get("creation_ttl") or 0),
            renewable=bool(info.get("renewable")),
            policies=tuple(info.get("policies") or ()),
        )

    def renew_token(self, increment: int) -> float:
        """``auth/token/renew-self`` asking for ``increment`` seconds; the lease Vault granted, in seconds."""
        answer = self.call(
            "renew the Vault token", lambda: self.client.auth.token.renew_self(increment=f"{increment}s")
        )
        return float(answer["auth"].get("lease_duration") or 0)

    def login_approle(self, what: str, role_id: str, secret_id: str, mount: str) -> Grant:
        """An AppRole login at ``auth/<mount>``; ``what`` names it in error messages. The token is not used yet."""
        answer = self.call(
            what, lambda: self.client.auth.approle.login(role_id, secret_id, use_token=False, mount_point=mount)
        )
        return Grant.from_auth(answer["auth"])

    def login_kubernetes(self, what: str, role: str, jwt: str, mount: str) -> Grant:
        """A Kubernetes login at ``auth/<mount>``; ``what`` names it in error messages. The token is not used yet."""
        answer = self.call(
            what, lambda: self.client.auth.kubernetes.login(role, jwt, use_token=False, mount_point=mount)
        )
        return Grant.from_auth(answer["auth"])

    def close(self) -> None:
        self.client.adapter.close()
