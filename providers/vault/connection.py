"""The hvac client with our TLS settings and redirect rule (same origin only), the translation of hvac and
requests errors into ours, and the non-PKI calls (health, token lookup and renewal, logins) as typed methods.

This module and :mod:`providers.vault.pki` are the only places that touch hvac; nothing hvac-shaped (its
exceptions, its untyped dicts) leaves them: answers are read with :mod:`providers.vault.answers`, and what hvac
itself raises on an answer it cannot read becomes a :class:`~providers.vault.errors.VaultAnswerError`.
"""

from __future__ import annotations

import json
import os
import threading
import traceback
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, NoReturn, TypeVar
from urllib.parse import urlsplit

import hvac
import hvac.adapters
import hvac.exceptions
import hvac.utils
import requests
import requests.adapters

from mesh_identity.errors import ProviderError, ProviderRejectedError
from providers.vault.answers import Fields, answer_of, data_of
from providers.vault.errors import (
    VaultAnswerError,
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


def _error_texts(errors: object) -> list[str] | None:
    """Vault's ``errors`` as a list of strings (None when there is none to read)."""
    if errors is None:
        return None
    if isinstance(errors, str):
        return [errors]
    items = errors if isinstance(errors, list) else [errors]
    return [item if isinstance(item, str) else json.dumps(item) for item in items if item is not None]


class VaultAdapter(hvac.adapters.JSONAdapter):  # type: ignore[misc]  # hvac is untyped
    """hvac's JSON adapter, raising the status's hvac exception for an error answer of any shape. hvac's own
    ``_raise_for_error`` calls ``.get`` on whatever JSON came (AttributeError for a body of ``null`` or a list)
    and joins ``errors`` as strings (TypeError for numbers or objects, and one string is joined letter by
    letter), so a 403 with an odd body was no :class:`hvac.exceptions.Forbidden`, and its token not checked."""

    def _raise_for_error(self, method: str, url: str, response: requests.Response) -> NoReturn:
        try:
            text: str | None = response.text
        except Exception:  # as hvac does: no text is still the status's error
            text = None
        document: object = None
        if response.headers.get("Content-Type") == "application/json":  # as hvac decides it
            try:
                document = response.json()
            except (ValueError, RecursionError):
                document = None
        errors = _error_texts(document.get("errors")) if isinstance(document, Mapping) else None
        hvac.utils.raise_for_error(
            method, url, response.status_code, text if errors is None else None, errors=errors, text=text, json=document
        )
        raise AssertionError("hvac.utils.raise_for_error returned")  # pragma: no cover (it always raises)


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
        adapter=VaultAdapter,
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
    def from_auth(cls, auth: Fields) -> Grant:
        """From the ``auth`` object of a login answer."""
        return cls(
            token=auth.string("client_token", nonempty=True),
            lease_duration=auth.seconds("lease_duration", 0.0),
            renewable=auth.boolean("renewable", False),
            policies=auth.strings("policies"),
        )


_HVAC = os.path.dirname(hvac.__file__) + os.sep
_HERE = os.path.dirname(__file__) + os.sep


def _raised_by_hvac(err: BaseException) -> bool:
    """``err`` came out of hvac's code (or below it), not out of ours (our lambda, or what hvac calls back)."""
    frames = traceback.extract_tb(err.__traceback__)
    return (
        bool(frames)
        and not frames[-1].filename.startswith(_HERE)
        and any(frame.filename.startswith(_HVAC) for frame in frames)
    )


class Connection:
    """Runs hvac calls and turns their failures into provider errors that say what to do."""

    def __init__(self, settings: VaultSettings) -> None:
        self.settings = settings
        self.client = build_client(settings)
        self._answers = threading.local()  # the last answer this thread received: (method, url, status, type)
        self.client.adapter.session.hooks["response"].append(self._received)

    def _received(self, response: requests.Response, *args: Any, **kwargs: Any) -> None:
        request = response.request
        self._answers.last = (
            request.method if request is not None else None,
            response.url,
            response.status_code,
            response.headers.get("Content-Type"),
        )

    def where(self, path: str) -> str:
        """``pki/sign/web`` with the namespace label: how an API path is named in messages."""
        return f"{path}{self.settings.namespace_label}"

    def call(self, what: str, function: Callable[[], T]) -> T:
        """Run ``function`` (an hvac call); ``what`` names the operation in error messages."""
        self._answers.last = None
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
        except (TypeError, AttributeError, ValueError, KeyError, RecursionError) as err:
            # hvac reading an answer it did not expect (json.loads nesting too deep: RecursionError)
            answer = self._answers.last
            if answer is None or not _raised_by_hvac(err):
                raise  # not about an answer: before any came, or a bug of ours
            method, url, status, content_type = answer
            path = self.where(api_path(url))
            raise VaultAnswerError(
                NAME,
                f"{path}: hvac could not read the answer ({(method or '?').upper()}, HTTP {status}, "
                f"{content_type or 'no content type'}: {type(err).__name__})",
                path=path,
            ) from err

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
        path = self.where("sys/health")
        answer: object = self.call(
            "check Vault's health", lambda: self.client.sys.read_health_status(method="GET", standby_ok=True)
        )
        if isinstance(answer, requests.Response) and answer.status_code != 200:
            # hvac returns the document itself only for a 200; another status says enough without a body
            ok, status = False, answer.status_code
            try:
                document = answer.json()
            except (ValueError, RecursionError):
                document = None
            body = answer_of(document, path) if isinstance(document, Mapping) else Fields(path, "", {})
        else:
            ok, status, body = True, 200, answer_of(answer, path)
        return ServerHealth(
            ok=ok,
            status=status,
            version=body.string("version", "?"),
            initialized=body.boolean("initialized", None),
            sealed=body.boolean("sealed", False),
        )

    def use_token(self, token: str) -> None:
        """Send ``token`` with every later request."""
        self.client.token = token

    def lookup_token(self) -> TokenInfo:
        """``auth/token/lookup-self`` for the token in use."""
        answer = self.call("look up the Vault token", self.client.auth.token.lookup_self)
        info = data_of(answer, self.where("auth/token/lookup-self"))
        return TokenInfo(
            ttl=info.seconds("ttl", 0.0),
            creation_ttl=info.seconds("creation_ttl", 0.0),
            renewable=info.boolean("renewable", False),
            policies=info.strings("policies"),
        )

    def renew_token(self, increment: int) -> float:
        """``auth/token/renew-self`` asking for ``increment`` seconds; the lease Vault granted, in seconds."""
        answer = self.call(
            "renew the Vault token", lambda: self.client.auth.token.renew_self(increment=f"{increment}s")
        )
        return answer_of(answer, self.where("auth/token/renew-self")).fields("auth").seconds("lease_duration", 0.0)

    def login_approle(self, what: str, role_id: str, secret_id: str, mount: str) -> Grant:
        """An AppRole login at ``auth/<mount>``; ``what`` names it in error messages. The token is not used yet."""
        answer = self.call(
            what, lambda: self.client.auth.approle.login(role_id, secret_id, use_token=False, mount_point=mount)
        )
        return Grant.from_auth(answer_of(answer, self.where(f"auth/{mount}/login")).fields("auth"))

    def login_kubernetes(self, what: str, role: str, jwt: str, mount: str) -> Grant:
        """A Kubernetes login at ``auth/<mount>``; ``what`` names it in error messages. The token is not used yet."""
        answer = self.call(
            what, lambda: self.client.auth.kubernetes.login(role, jwt, use_token=False, mount_point=mount)
        )
        return Grant.from_auth(answer_of(answer, self.where(f"auth/{mount}/login")).fields("auth"))

    def close(self) -> None:
        self.client.adapter.close()
