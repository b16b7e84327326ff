"""The CA provider contract: what a CA plugin (built-in, Vault, cert-manager, third party) provides.

A provider package registers :class:`ProviderSpec` objects through the ``mesh_identity_providers`` hook
(see ``plugins/hookspecs.py``) from a module listed in the ``mesh_identity`` entry-point group. The
:class:`~mesh_identity.authority.Authority` then calls the :class:`CAProvider` the spec's factory builds:

* ``intermediate`` mode: :meth:`CAProvider.sign_intermediate` signs a CSR for *our* intermediate CA once per
  intermediate lifetime; workload SVIDs are then signed locally.
* ``per-workload`` mode: :meth:`CAProvider.sign_workload` signs each workload CSR upstream.

Providers never see workload private keys. Everything a provider returns is checked by the authority
(key match, CA flags, SAN, chain to the bundle), and expiry is always read from the returned certificate.
Upstream library errors must be turned into :class:`~mesh_identity.errors.ProviderError` subclasses.
"""

from __future__ import annotations

import abc
import enum
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.exceptions import InvalidSignature

from mesh_identity.durations import parse_duration
from mesh_identity.errors import ConfigError, ProviderRejectedError, RotationError
from mesh_identity.keys import KeyType
from mesh_identity.profile import is_ca
from mesh_identity.spiffe import SpiffeId, TrustDomain
from mesh_identity.svid import TrustBundle


class Mode(enum.StrEnum):
    INTERMEDIATE = "intermediate"
    PER_WORKLOAD = "per-workload"


class OptionType(enum.StrEnum):
    STRING = "string"
    PATH = "path"
    DURATION = "duration"
    BOOL = "bool"
    INT = "int"
    LIST = "list"
    MAPPING = "mapping"


@dataclass(frozen=True, slots=True)
class OptionSpec:
    """One provider option (``ca.provider_options.<name>``). ``secret`` options are never printed."""

    name: str
    type: OptionType = OptionType.STRING
    help: str = ""
    required: bool = False
    default: Any = None
    choices: tuple[str, ...] = ()
    secret: bool = False

    def coerce(self, value: Any, key_path: str) -> Any:
        """Check and convert a raw config value; ConfigError naming ``key_path`` and the value."""
        shown = "<secret>" if self.secret else repr(value)
        match self.type:
            case OptionType.STRING | OptionType.PATH:
                if not isinstance(value, str) or not value:
                    raise ConfigError(f"{key_path}: {shown} is not a non-empty string")
                if self.choices and value not in self.choices:
                    raise ConfigError(f"{key_path}: {shown} is not one of {', '.join(self.choices)}")
                return Path(value).expanduser() if self.type is OptionType.PATH else value
            case OptionType.DURATION:
                if isinstance(value, int | float) and not isinstance(value, bool) and value > 0:
                    return timedelta(seconds=value)
                try:
                    return parse_duration(value)
                except ValueError as err:
                    raise ConfigError(f"{key_path}: {err}") from None
            case OptionType.BOOL:
                if not isinstance(value, bool):
                    raise ConfigError(f"{key_path}: {shown} is not true or false")
                return value
            case OptionType.INT:
                if not isinstance(value, int) or isinstance(value, bool):
                    raise ConfigError(f"{key_path}: {shown} is not an integer")
                return value
            case OptionType.LIST:
                if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
                    raise ConfigError(f"{key_path}: {shown} is not a list of strings")
                return tuple(value)
            case OptionType.MAPPING:
                if not isinstance(value, dict):
                    raise ConfigError(f"{key_path}: {shown} is not a mapping")
                return dict(value)
        raise AssertionError(self.type)  # pragma: no cover


@dataclass(frozen=True, slots=True)
class Capabilities:
    """What a provider can do. ``max_ttl`` None means "no fixed limit known before asking upstream"."""

    modes: frozenset[Mode]
    key_types: frozenset[KeyType] = frozenset(KeyType)
    max_ttl: timedelta | None = None
    root_rotation: bool = False


@dataclass(frozen=True, slots=True)
class ProviderContext:
    """What the core hands a provider factory. ``create`` False means: do not create new CA state (the CLI's
    ``issue`` on a state directory that was never ``init``-ed must fail, not mint a new root)."""

    trust_domain: TrustDomain
    state_dir: Path
    key_type: KeyType
    mode: Mode
    clock: Callable[[], datetime]
    create: bool = True


@dataclass(frozen=True, slots=True)
class SignedCertificate:
    """A certificate signed upstream.

    ``chain`` holds the certificates above ``certificate`` up to (not including) a root of ``bundle``;
    ``bundle`` is the trust bundle as the upstream CA states it (Vault's ``ca_chain``, cert-manager's
    ``status.ca``, or a configured bundle). ``warnings`` carries upstream notes (e.g. a TTL that was capped).
    """

    certificate: x509.Certificate
    chain: tuple[x509.Certificate, ...]
    bundle: TrustBundle
    warnings: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class Health:
    """A provider's health at ``checked_at``; ``detail`` says what is wrong and what to do."""

    healthy: bool
    detail: str
    checked_at: datetime


@dataclass(frozen=True, slots=True)
class Check:
    """One line of ``mesh-identity doctor``."""

    name: str
    ok: bool
    detail: str


@dataclass(frozen=True, slots=True)
class Limits:
    """Limits the provider read from its upstream, for the TTL-chain check (None where unknown)."""

    max_workload_ttl: timedelta | None = None
    max_intermediate_ttl: timedelta | None = None
    ca_not_after: datetime | None = None
    notes: tuple[str, ...] = ()


class CAProvider(abc.ABC):
    """A CA provider instance, built by :attr:`ProviderSpec.factory`. Methods may block; they are called
    from worker threads, never from an event loop."""

    name: str = ""
    #: True when opening this instance created new CA state (a new root), False when it loaded existing
    #: state, None when the provider keeps no local CA state (an upstream CA). The CLI tells the operator.
    created: bool | None = None

    @abc.abstractmethod
    def capabilities(self) -> Capabilities:
        """What this instance supports (may be narrower than the spec's, after reading upstream)."""

    @abc.abstractmethod
    def trust_bundle(self) -> TrustBundle:
        """The roots workloads must trust, as currently known."""

    def sign_intermediate(self, csr: x509.CertificateSigningRequest, ttl: timedelta) -> SignedCertificate:
        """Sign a CSR for the mesh's intermediate CA (intermediate mode)."""
        raise ProviderRejectedError(self.name, "this provider does not support intermediate mode")

    def sign_workload(
        self, csr: x509.CertificateSigningRequest, spiffe_id: SpiffeId, ttl: timedelta
    ) -> SignedCertificate:
        """Sign a workload CSR with ``spiffe_id`` as its only URI SAN (per-workload mode)."""
        raise ProviderRejectedError(self.name, "this provider does not support per-workload mode")

    @abc.abstractmethod
    def health(self) -> Health:
        """Check the upstream CA now (cheaply) and say whether it can sign."""

    def limits(self) -> Limits:
        """TTL limits and CA expiry read from upstream."""
        return Limits()

    def doctor(self, workload_ttl: timedelta | None = None, intermediate_ttl: timedelta | None = None) -> list[Check]:
        """Checks of the configuration against the live upstream, for ``mesh-identity doctor``. The TTLs are
        the ones the config asks for, so the provider can check them against its upstream's limits."""
        del workload_ttl, intermediate_ttl
        health = self.health()
        return [Check("health", health.healthy, health.detail)]

    # Root rotation, for providers whose capabilities say ``root_rotation``. The phases are
    # steady -> prepared (new root in the bundle) -> activated (new root signs) -> steady (old root retired);
    # the provider persists the phase so a restart resumes. The rotation engine gates each step on evidence.

    def root_phase(self) -> str:
        return "steady"

    def prepare_root(self) -> x509.Certificate:
        """Create the next root and add it to the bundle; the current root keeps signing."""
        raise RotationError(f"provider {self.name!r} does not rotate its root")

    def activate_root(self) -> x509.Certificate:
        """Make the prepared root the one that signs intermediates."""
        raise RotationError(f"provider {self.name!r} does not rotate its root")

    def retire_root(self) -> tuple[x509.Certificate, ...]:
        """Drop every root but the active one from the bundle; returns the retired roots."""
        raise RotationError(f"provider {self.name!r} does not rotate its root")

    # The operator's explicit step (``mesh-identity ca trust FILE``), for providers that keep a local store of
    # the upstream roots they trust (cert-manager without a pinned bundle): nothing else may add a root there.

    def trust_roots(self, roots: Sequence[x509.Certificate]) -> list[x509.Certificate]:
        """Add ``roots`` (each must pass :func:`root_problem`) to the provider's local trust store, durably and
        audited (a log line naming each fingerprint); returns those that were not trusted yet, in order. A
        provider without such a store refuses with ProviderRejectedError and changes nothing."""
        del roots
        raise ProviderRejectedError(
            self.name,
            "this provider keeps no local trust store of upstream roots (its roots come from its own CA state or "
            "from its upstream): `mesh-identity ca trust` does not apply",
        )

    def watch_state(self, changed: Callable[[], None]) -> None:
        """Call ``changed`` whenever another process changes this CA's state, e.g. another replica advanced a
        root rotation (the caller then reloads the provider's state); the default never calls it. ``changed``
        may be called from another thread, and until :meth:`close`."""
        del changed

    def reload(self) -> None:  # noqa: B027 - optional hook with a no-op default
        """Read the CA's state again (after :meth:`watch_state` reported a change another process made); a
        provider that keeps no state of its own has nothing to read."""

    def close(self) -> None:  # noqa: B027 - optional hook with a no-op default
        """Release connections and background tasks."""


def root_problem(cert: x509.Certificate, now: datetime) -> str | None:
    """Why ``cert`` cannot be added as a trusted root at ``now`` (None when it can): it must be a CA,
    self-signed (its signature verifies with its own key) and valid now. The text completes "<cert> ..."."""
    if not is_ca(cert):
        return "is not a CA (no basicConstraints CA:TRUE)"
    if cert.issuer != cert.subject:
        return f"is not self-signed (issued by {cert.issuer.rfc4514_string()!r}): give the root itself"
    try:
        cert.verify_directly_issued_by(cert)
    except (ValueError, TypeError, InvalidSignature):
        return "is not self-signed: its signature does not verify with its own key"
    if cert.not_valid_after_utc < now:
        return f"is expired (not after {cert.not_valid_after_utc:%Y-%m-%dT%H:%M:%SZ})"
    if cert.not_valid_before_utc > now:
        return f"is not valid yet (not before {cert.not_valid_before_utc:%Y-%m-%dT%H:%M:%SZ})"
    return None


ProviderFactory = Callable[[ProviderContext, Mapping[str, Any]], CAProvider]


@dataclass(frozen=True, slots=True)
class ProviderSpec:
    """A provider as a plugin registers it: name, option schema, capabilities, and a factory."""

    name: str
    description: str
    capabilities: Capabilities
    factory: ProviderFactory
    options: tuple[OptionSpec, ...] = field(default=())

    def validate_options(self, raw: Mapping[str, Any], prefix: str = "ca.provider_options") -> dict[str, Any]:
        """Apply the option schema: unknown keys, missing required keys and bad values are ConfigErrors
        that name ``<prefix>.<key>``. Returns the options with defaults filled in and values converted."""
        if not isinstance(raw, Mapping):
            raise ConfigError(f"{prefix}: {raw!r} is not a mapping")
        known = {o.name: o for o in self.options}
        for key in raw:
            if key not in known:
                hint = _closest(str(key), known)
                raise ConfigError(
                    f"{prefix}.{key}: unknown option for provider {self.name!r}"
                    + (f" (did you mean {hint!r}?)" if hint else "")
                )
        result: dict[str, Any] = {}
        for option in self.options:
            key_path = f"{prefix}.{option.name}"
            if option.name in raw and raw[option.name] is not None:
                result[option.name] = option.coerce(raw[option.name], key_path)
            elif option.required:
                raise ConfigError(f"{key_path}: required by provider {self.name!r} ({option.help})")
            else:
                result[option.name] = option.default
        return result


def _closest(word: str, choices: Mapping[str, object]) -> str | None:
    import difflib  # noqa: PLC0415 - only on the error path

    matches = difflib.get_close_matches(word, list(choices), n=1, cutoff=0.6)
    return matches[0] if matches else None
