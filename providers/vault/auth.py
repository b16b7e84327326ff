"""Logging in to Vault and keeping the token alive.

Three methods: a token (read from a file or an environment variable, looked up on start), AppRole (role ID,
secret ID from a file) and Kubernetes (service-account JWT from a file, role, mount). Secret material is read
from its source at each login, so a rotated file is picked up.

:class:`TokenKeeper` holds the current token. A background thread renews it at two thirds of its lease, and logs
in again (AppRole, Kubernetes) before the token reaches its max TTL or when it cannot be renewed. Failures back
off (1 s doubling to 60 s, never past the lease). Before each request :meth:`TokenKeeper.ensure` logs in again if
the token expired while nothing renewed it (a suspended machine, an outage longer than the lease).
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

from mesh_identity.errors import ProviderError, ProviderRejectedError
from providers.vault.connection import NAME, Connection, Grant
from providers.vault.errors import (
    VaultAnswerError,
    VaultLoginError,
    VaultPermissionDeniedError,
    VaultRequestError,
    VaultTokenExpiredError,
)
from providers.vault.options import VaultSettings

log = logging.getLogger(__name__)
RENEW_AT = 2 / 3  # renew when two thirds of the lease have passed (Vault agent does the same)
MAX_BACKOFF = 60.0


@dataclass(frozen=True, slots=True)
class Lease:
    """A token and what Vault said about it. Times are ``time.monotonic()`` seconds; ``expires`` None means
    the token never expires (a root or periodic token without TTL)."""

    token: str
    renewable: bool
    ttl: float  # the lease Vault granted at login (what a renewal asks for again)
    obtained: float  # when this lease (login or last renewal) started
    expires: float | None
    policies: tuple[str, ...] = ()
    can_extend: bool = True  # False once a renewal was capped: only a new login extends it

    @property
    def renew_at(self) -> float | None:
        if self.expires is None:
            return None
        return self.obtained + (self.expires - self.obtained) * RENEW_AT

    def remaining(self, now: float) -> float | None:
        return None if self.expires is None else self.expires - now


def token_expired(source: str, settings: VaultSettings) -> VaultTokenExpiredError:
    return VaultTokenExpiredError(
        NAME,
        f"the Vault token from {source} is expired, revoked or not valid{settings.namespace_label}; give a new "
        "token (token_file is re-read), or use approle or kubernetes auth, which log in again (a valid token also "
        "needs the default policy, for auth/token/lookup-self)",
    )


def _says(err: VaultRequestError | VaultPermissionDeniedError) -> str:
    return "; ".join(err.errors) or "permission denied"


def _read_secret(path: Path, what: str) -> str:
    try:
        text = path.read_text().strip()
    except OSError as err:
        raise VaultLoginError(NAME, f"cannot read the {what} from {path}: {err.strerror}") from None
    if not text:
        raise VaultLoginError(NAME, f"the {what} file {path} is empty")
    return text


class AuthMethod:
    """How to obtain a token. ``login`` returns a :class:`Lease`; it may call Vault through ``connection``."""

    name = ""
    relogin: bool = True  # whether logging in again is worth trying (it re-reads the credentials)
    fresh_on_login: bool = True  # whether a login always yields a new token with a full lease

    def login(self, connection: Connection, now: float) -> Lease:
        raise NotImplementedError

    @staticmethod
    def lease_from_grant(grant: Grant, now: float) -> Lease:
        ttl = grant.lease_duration
        return Lease(
            token=grant.token,
            renewable=grant.renewable,
            ttl=ttl,
            obtained=now,
            expires=now + ttl if ttl > 0 else None,
            policies=grant.policies,
        )

    def log_in(
        self,
        connection: Connection,
        now: float,
        what: str,
        request: Callable[[str], Grant],
        hint: Callable[[str], str],
    ) -> Lease:
        """Log in with ``request(what)`` (a login method of the connection), use the token it returns and return
        its lease; a refusal raises :class:`VaultLoginError` with what Vault said and ``hint(what Vault said)``."""
        try:
            grant = request(what)
        except (VaultRequestError, VaultPermissionDeniedError) as err:
            says = _says(err)
            raise VaultLoginError(NAME, f"{what} refused: {says}; {hint(says)}") from err
        lease = self.lease_from_grant(grant, now)
        connection.use_token(lease.token)
        return lease


class TokenAuth(AuthMethod):
    """A token given to us: from ``token_file`` (re-read at each login) or the ``token_env`` variable."""

    name = "token"

    def __init__(self, settings: VaultSettings) -> None:
        self.file = settings.token_file
        self.env = settings.token_env
        self.relogin = self.file is not None  # a re-read file may hold a fresh token (Vault agent's sink)
        self.fresh_on_login = False

    @property
    def source(self) -> str:
        return f"token_file {self.file}" if self.file else f"environment variable {self.env}"

    def read(self) -> str:
        if self.file is not None:
            return _read_secret(self.file, "Vault token")
        token = os.environ.get(self.env, "").strip()
        if not token:
            raise VaultLoginError(NAME, f"no Vault token: set the environment variable {self.env} or token_file")
        return token

    def login(self, connection: Connection, now: float) -> Lease:
        token = self.read()
        connection.use_token(token)
        try:
            info = connection.lookup_token()
        except VaultPermissionDeniedError:
            raise token_expired(self.source, connection.settings) from None
        ttl = info.ttl
        return Lease(
            token=token,
            renewable=info.renewable,
            ttl=info.creation_ttl or ttl,
            obtained=now,
            expires=now + ttl if ttl > 0 else None,
            policies=info.policies,
        )


class AppRoleAuth(AuthMethod):
    name = "approle"

    def __init__(self, settings: VaultSettings) -> None:
        assert settings.approle_role_id is not None
        assert settings.approle_secret_id_file is not None
        self.role_id = settings.approle_role_id
        self.secret_id_file = settings.approle_secret_id_file
        self.mount = settings.approle_mount

    def login(self, connection: Connection, now: float) -> Lease:
        secret_id = _read_secret(self.secret_id_file, "AppRole secret ID")
        return self.log_in(
            connection,
            now,
            f"AppRole login at auth/{self.mount}",
            lambda what: connection.login_approle(what, self.role_id, secret_id, self.mount),
            lambda says: (
                f"check approle_role_id and the secret ID in {self.secret_id_file} "
                "(it may have expired or been used up)"
            ),
        )


class KubernetesAuth(AuthMethod):
    name = "kubernetes"

    def __init__(self, settings: VaultSettings) -> None:
        assert settings.kubernetes_role is not None
        self.role = settings.kubernetes_role
        self.jwt_file = settings.kubernetes_jwt_file
        self.mount = settings.kubernetes_mount

    def login(self, connection: Connection, now: float) -> Lease:
        jwt = _read_secret(self.jwt_file, "service-account token")
        return self.log_in(
            connection,
            now,
            f"Kubernetes login at auth/{self.mount} as role {self.role!r}",
            lambda what: connection.login_kubernetes(what, self.role, jwt, self.mount),
            lambda says: (
                "create that role or fix kubernetes_role"
                if "invalid role name" in says
                else "the role's bound_service_account_names and bound_service_account_namespaces must include "
                f"the service account whose token is {self.jwt_file}"
            ),
        )


def auth_method(settings: VaultSettings) -> AuthMethod:
    if settings.auth_method == "approle":
        return AppRoleAuth(settings)
    if settings.auth_method == "kubernetes":
        return KubernetesAuth(settings)
    return TokenAuth(settings)


class TokenKeeper:
    """The current Vault token: logged in on first use, renewed and re-obtained in the background."""

    def __init__(self, connection: Connection, method: AuthMethod, clock: Callable[[], float] = time.monotonic) -> None:
        self.connection = connection
        self.method = method
        self.clock = clock
        self.lease: Lease | None = None
        self.last_error: ProviderError | None = None
        self.logins = 0
        self.renewals = 0
        self._lock = threading.RLock()
        self._stop = threading.Event()
        self._wake = threading.Event()
        self._thread: threading.Thread | None = None

    # -- on demand ------------------------------------------------------------------------------------------

    def ensure(self) -> Lease:
        """A token that has not expired by our clock: the current one, or a new login."""
        with self._lock:
            lease = self.lease
            if lease is None or (lease.expires is not None and self.clock() >= lease.expires):
                lease = self.login()
            return lease

    def login(self) -> Lease:
        with self._lock:
            lease = self.method.login(self.connection, self.clock())
            self.lease = lease
            self.logins += 1
            self.last_error = None
        self._wake.set()
        log.info(
            "vault: logged in with %s auth; token lease %ss, renewable=%s", self.method.name, lease.ttl, lease.renewable
        )
        self._start_thread()
        return lease

    def token_is_valid(self) -> bool:
        """Ask Vault (lookup-self) whether the current token still works."""
        try:
            self.connection.lookup_token()
        except VaultPermissionDeniedError:
            return False
        return True

    def recover_from_denied(self, token: str | None = None) -> bool:
        """After a 403 with ``token``: True when the token had expired and a new login succeeded (so retry once);
        False when the token is valid (a real permission problem); VaultTokenExpiredError when it cannot log in
        again. Many threads denied at once log in only once: the first one does, the others see the new token."""
        with self._lock:
            if token is not None and self.lease is not None and self.lease.token != token:
                return True
            if self.token_is_valid():
                return False
            if not self.method.relogin:
                raise self._expired_error()
            self.login()
            return True

    def _expired_error(self) -> VaultTokenExpiredError:
        source = self.method.source if isinstance(self.method, TokenAuth) else f"{self.method.name} login"
        return token_expired(source, self.connection.settings)

    # -- in the background ----------------------------------------------------------------------------------

    def refresh(self) -> None:
        """Renew the token, or log in again when renewing cannot extend it enough."""
        with self._lock:
            lease = self.lease
            if lease is None:
                return
            now = self.clock()
            if lease.renewable and lease.can_extend:
                self._renew(lease, now)
            elif self.method.fresh_on_login:
                self.login()
            elif lease.expires is not None and now >= lease.expires:
                if not self.method.relogin:
                    raise self._expired_error()
                self.login()  # re-reads token_file; VaultTokenExpiredError while it holds the old token
            else:
                # nothing extends this token: look again once it has expired
                self.lease = replace(lease, can_extend=False)

    def _renew(self, lease: Lease, now: float) -> None:
        increment = max(1, round(lease.ttl))
        try:
            granted = self.connection.renew_token(increment)
        except VaultPermissionDeniedError:
            if not self.method.relogin:
                raise self._expired_error() from None
            self.login()
            return
        except VaultAnswerError:
            raise  # a malformed answer says nothing about the lease: try again (with backoff), and say so
        except ProviderRejectedError:
            # "lease is not renewable" or "past the max TTL, cannot renew"
            if self.method.fresh_on_login:
                self.login()
            else:
                self.lease = replace(lease, can_extend=False)
            return
        self.renewals += 1
        capped = granted < lease.ttl * RENEW_AT
        self.lease = replace(lease, obtained=now, expires=now + granted if granted > 0 else None, can_extend=not capped)
        log.info("vault: renewed the token for %ss%s", granted, " (capped by its max TTL)" if capped else "")
        if capped and self.method.fresh_on_login:
            self.login()  # near its max TTL: a fresh login now, while the old token still works

    def _start_thread(self) -> None:
        if self._thread is not None or self._stop.is_set():
            return
        self._thread = threading.Thread(target=self._run, name="vault-token-keeper", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        backoff = 1.0
        while not self._stop.is_set():
            lease = self.lease
            due = lease.renew_at if lease is not None else None
            if lease is None or due is None:
                self._sleep(30.0)
                continue
            if not lease.can_extend and not self.method.fresh_on_login:
                due = lease.expires if lease.expires is not None else due
            if self.clock() < due:
                self._sleep(due - self.clock())
                continue
            try:
                self.refresh()
                backoff = 1.0
            except ProviderError as err:
                self.last_error = err
                log.warning("vault: keeping the token alive failed: %s", err)
                remaining = lease.remaining(self.clock())
                wait = backoff if remaining is None or remaining <= 0 else min(backoff, max(0.5, remaining / 3))
                backoff = min(backoff * 2, MAX_BACKOFF)
                self._sleep(wait)

    def _sleep(self, seconds: float) -> None:
        self._wake.wait(max(0.0, seconds))
        self._wake.clear()

    def close(self) -> None:
        self._stop.set()
        self._wake.set()
        thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout=5)
