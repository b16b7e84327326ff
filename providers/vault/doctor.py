"""``mesh-identity doctor`` for Vault: check a configuration against the live Vault.

Each check is one :class:`~mesh_identity.provider.Check` line: Vault reachable and unsealed, the login works
(and for how long the token lives), the mount has a CA (valid, ending at a root, long enough for the TTLs wanted),
the token's policies allow the signing path, and the role allows URI SANs of our trust domain, our key type and
the TTLs wanted.

Everything is read through :class:`~providers.vault.connection.Connection`, :class:`~providers.vault.pki.Pki` and
the token keeper of the provider, which passes itself (see :class:`Provider`); this module does not call hvac.
"""

from __future__ import annotations

import re
from datetime import timedelta
from typing import Any, Protocol

from cryptography import x509

from mesh_identity.durations import format_duration
from mesh_identity.errors import ProviderError
from mesh_identity.keys import KeyType
from mesh_identity.provider import Check, Mode, ProviderContext
from mesh_identity.spiffe import SpiffeId
from mesh_identity.svid import TrustBundle
from providers.vault.auth import Lease, TokenKeeper
from providers.vault.connection import Connection
from providers.vault.errors import VaultSealedError, VaultServerError
from providers.vault.options import VaultSettings
from providers.vault.pki import Pki, Role


class Provider(Protocol):
    """What the checks need of the provider (:class:`~providers.vault.provider.VaultProvider`)."""

    @property
    def settings(self) -> VaultSettings: ...

    @property
    def context(self) -> ProviderContext: ...

    @property
    def connection(self) -> Connection: ...

    @property
    def keeper(self) -> TokenKeeper: ...

    @property
    def pki(self) -> Pki: ...

    @property
    def extra_roots(self) -> tuple[x509.Certificate, ...]: ...

    @property
    def where(self) -> str: ...

    @property
    def known_ca_chain(self) -> tuple[x509.Certificate, ...]: ...

    def trust_bundle(self) -> TrustBundle: ...


def glob_allows(pattern: str, value: str) -> bool:
    """Vault's glob for ``allowed_uri_sans``: ``*`` matches any run of characters, ``/`` included."""
    if pattern == "*":
        return True
    regex = ".*".join(re.escape(part) for part in pattern.split("*"))
    return re.fullmatch(regex, value, flags=re.DOTALL) is not None


def server_state(connection: Connection) -> str:
    """``Vault 1.17.2 at <address> is active and unsealed``; a provider error when it is not usable."""
    address = connection.settings.address
    health = connection.health()
    if health.ok:
        return f"Vault {health.version} at {address} is unsealed and active"
    if health.status == 501 or health.initialized is False:
        raise VaultSealedError("vault", f"Vault at {address} is not initialized; run vault operator init")
    if health.status == 503 or health.sealed:
        raise VaultSealedError("vault", f"Vault at {address} is sealed; unseal it (vault operator unseal)")
    raise VaultServerError("vault", f"Vault at {address} answered {health.status} to sys/health")


def describe_lease(lease: Lease, now: float) -> str:
    remaining = lease.remaining(now)
    if remaining is None:
        return "token never expires"
    left = format_duration(timedelta(seconds=max(0, remaining)))
    return f"token valid for {left} ({'renewable' if lease.renewable else 'not renewable'})"


def _check(name: str, function: Any) -> Check:
    try:
        ok, detail = function()
    except ProviderError as err:
        return Check(name, False, str(err))
    return Check(name, ok, detail)


def run(
    provider: Provider, *, workload_ttl: timedelta | None = None, intermediate_ttl: timedelta | None = None
) -> list[Check]:
    settings = provider.settings
    mode = provider.context.mode
    checks = [_check("vault server", lambda: (True, server_state(provider.connection)))]
    if not checks[0].ok:
        return checks
    checks.append(_check("vault auth", lambda: _auth(provider)))
    checks.append(_check("vault CA", lambda: _ca(provider, workload_ttl, intermediate_ttl)))
    if not checks[1].ok:
        return checks
    checks.append(_check("vault policy", lambda: _policy(provider)))
    if settings.pki_role:
        checks.append(_check("vault role", lambda: _role(provider, workload_ttl)))
    if mode is Mode.INTERMEDIATE and intermediate_ttl is not None:
        checks.append(_check("vault mount TTL", lambda: _mount_ttl(provider, intermediate_ttl)))
    return checks


def _auth(provider: Provider) -> tuple[bool, str]:
    lease = provider.keeper.login()
    method = provider.keeper.method
    detail = f"{provider.settings.auth_method} auth works; {describe_lease(lease, provider.keeper.clock())}"
    if lease.policies:
        detail += f"; policies {', '.join(lease.policies)}"
    if lease.expires is not None and not lease.renewable and not method.fresh_on_login:
        return False, detail + "; it cannot be renewed, so signing stops when it expires: use approle or kubernetes"
    return True, detail


def _ca(provider: Provider, workload_ttl: timedelta | None, intermediate_ttl: timedelta | None) -> tuple[bool, str]:
    bundle = provider.trust_bundle()
    chain = provider.known_ca_chain
    issuing = chain[0]
    now = provider.context.clock()
    left = issuing.not_valid_after_utc - now
    detail = (
        f"{provider.where} issues as {issuing.subject.rfc4514_string()!r} until "
        f"{issuing.not_valid_after_utc:%Y-%m-%dT%H:%M:%SZ} ({format_duration(left)}); chain of {len(chain)}, "
        f"{len(bundle.authorities)} root(s) in the bundle"
    )
    if left <= timedelta(0):
        return False, detail + "; the CA has expired"
    wanted = intermediate_ttl if provider.context.mode is Mode.INTERMEDIATE else workload_ttl
    if wanted is not None and left < wanted:
        what = "intermediates" if provider.context.mode is Mode.INTERMEDIATE else "certificates"
        return False, detail + f"; it expires within the {format_duration(wanted)} wanted, so {what} will be cut short"
    if not any(c in bundle.authorities for c in chain) and not provider.extra_roots:
        return False, detail + "; the chain does not reach a self-signed root: set trust_bundle_file to the root"
    return True, detail


def _policy(provider: Provider) -> tuple[bool, str]:
    settings = provider.settings
    mount = settings.pki_mount
    paths = [f"{mount}/root/sign-intermediate"] if provider.context.mode is Mode.INTERMEDIATE else []
    if settings.pki_role:
        paths.append(f"{mount}/sign/{settings.pki_role}")
    capabilities = provider.pki.token_capabilities(paths)
    missing = []
    for path in paths:
        granted = capabilities[path]
        if not granted & {"root", "update", "create"} or "deny" in granted:
            missing.append(path)
    if missing:
        shown = ", ".join(f'"{p}"' for p in missing)
        return False, f'the token may not write {shown}: grant capabilities ["update"] on it in the token\'s policy'
    return True, "the token may write " + ", ".join(paths)


def _role(provider: Provider, workload_ttl: timedelta | None) -> tuple[bool, str]:
    settings = provider.settings
    assert settings.pki_role is not None
    role = provider.pki.role(settings.pki_role)
    trust_domain = provider.context.trust_domain
    probe = str(SpiffeId.for_kubernetes(trust_domain, "default", "doctor"))
    problems = []
    if not any(glob_allows(p, probe) for p in role.allowed_uri_sans):
        allowed = ", ".join(role.allowed_uri_sans) or "none"
        problems.append(f"allowed_uri_sans ({allowed}) does not allow {probe}: add spiffe://{trust_domain}/*")
    key_problem = _key_problem(role, provider.context.key_type)
    if key_problem:
        problems.append(key_problem)
    if role.require_cn and not settings.common_name:
        problems.append("require_cn is true but no common_name is set: set require_cn=false on the role")
    limit = role.max_ttl
    if workload_ttl is not None and limit is not None and limit < workload_ttl:
        problems.append(
            f"max_ttl {format_duration(limit)} is shorter than the {format_duration(workload_ttl)} wanted: Vault "
            "caps each certificate (with a warning)"
        )
    summary = (
        f"role {role.name!r}: allowed_uri_sans {', '.join(role.allowed_uri_sans) or 'none'}, key_type {role.key_type}, "
        f"max_ttl {format_duration(limit) if limit else 'the mount max'}"
    )
    if problems:
        return False, summary + "; " + "; ".join(problems)
    return True, summary


def _key_problem(role: Role, key_type: KeyType) -> str | None:
    if role.key_type == "any":
        return None
    wanted = {
        KeyType.ECDSA_P256: ("ec", 256),
        KeyType.ECDSA_P384: ("ec", 384),
        KeyType.RSA_2048: ("rsa", 2048),
        KeyType.RSA_3072: ("rsa", 3072),
    }[key_type]
    bits = role.key_bits or {"ec": 256, "rsa": 2048}.get(role.key_type, 0)
    if (
        role.key_type != wanted[0]
        or (wanted[0] == "ec" and bits != wanted[1])
        or (wanted[0] == "rsa" and bits > wanted[1])
    ):
        return f"key_type {role.key_type}/{bits} does not accept our {key_type} keys: set key_type=any on the role"
    return None


def _mount_ttl(provider: Provider, intermediate_ttl: timedelta) -> tuple[bool, str]:
    limit = provider.pki.mount_max_ttl()
    if limit is None:
        return True, f"cannot read the max_lease_ttl of {provider.where} (not allowed to read sys/mounts); not checked"
    detail = f"{provider.where} max_lease_ttl {format_duration(limit)}"
    if limit < intermediate_ttl:
        return False, detail + f" is shorter than the {format_duration(intermediate_ttl)} intermediate TTL wanted"
    return True, detail
