"""The HashiCorp Vault CA provider.

``intermediate`` mode (the default): our intermediate's CSR is signed by ``<pki_mount>/root/sign-intermediate``
(on a root mount, or on an intermediate mount, whose default issuer then signs); workloads are signed locally.
``per-workload`` mode: every workload CSR is signed by ``<pki_mount>/sign/<pki_role>`` with the SPIFFE ID as URI
SAN. The trust bundle comes from what Vault returns (``ca_chain``), so Vault-side intermediates work; expiry is
always read from the returned certificate, and a TTL Vault shortened is reported as a warning.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Mapping
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any, TypeVar

from cryptography import x509

from mesh_identity.durations import format_duration
from mesh_identity.errors import ConfigError, ProviderError, ProviderRejectedError
from mesh_identity.keys import KeyType
from mesh_identity.provider import (
    Capabilities,
    CAProvider,
    Check,
    Health,
    Limits,
    Mode,
    ProviderContext,
    ProviderSpec,
    SignedCertificate,
)
from mesh_identity.spiffe import SpiffeId
from mesh_identity.svid import TrustBundle, load_certs_pem
from providers.vault import doctor
from providers.vault.auth import TokenKeeper, auth_method
from providers.vault.connection import NAME, Connection
from providers.vault.errors import VaultPermissionDeniedError, VaultRoleError
from providers.vault.options import OPTIONS, PREFIX, VaultSettings
from providers.vault.pki import Pki, is_self_signed

log = logging.getLogger(__name__)
T = TypeVar("T")
CAPABILITIES = Capabilities(modes=frozenset(Mode), key_types=frozenset(KeyType))
SHORTENED_SLACK = timedelta(seconds=60)


def split_chain(
    ca_chain: list[x509.Certificate] | tuple[x509.Certificate, ...],
    extra_roots: tuple[x509.Certificate, ...],
    where: str,
) -> tuple[tuple[x509.Certificate, ...], tuple[x509.Certificate, ...], tuple[str, ...]]:
    """Vault's ``ca_chain`` (issuing CA first) as (the intermediates above what it signs, the roots, notes).

    Roots are the self-signed certificates of the chain plus ``extra_roots``. When there is none (an intermediate
    mount whose parent Vault does not know), the top of the chain becomes the trust anchor, with a note."""
    intermediates = [c for c in ca_chain if not is_self_signed(c)]
    roots = [c for c in ca_chain if is_self_signed(c)]
    roots += [r for r in extra_roots if r not in roots]
    notes: tuple[str, ...] = ()
    if not roots and intermediates:
        top = intermediates.pop()
        roots = [top]
        notes = (
            f"Vault's ca_chain of {where} does not reach a self-signed root; trusting "
            f"{top.subject.rfc4514_string()!r} as the anchor (set trust_bundle_file to the root: Envoy and most TLS "
            "peers want a self-signed root)",
        )
    return tuple(intermediates), tuple(roots), notes


class VaultProvider(CAProvider):
    """Signs through Vault's PKI secrets engine (hvac). Thread-safe; the token is kept alive in the background."""

    name = NAME

    def __init__(self, context: ProviderContext, options: Mapping[str, Any]) -> None:
        self.context = context
        self.settings = VaultSettings.from_options(options)
        if context.mode is Mode.PER_WORKLOAD and not self.settings.pki_role:
            raise ConfigError(
                f"{PREFIX}.pki_role: required in per-workload mode (Vault signs at <pki_mount>/sign/<role>)"
            )
        self.extra_roots = self._load_extra_roots()
        self.connection = Connection(self.settings)
        self.keeper = TokenKeeper(self.connection, auth_method(self.settings))
        self.pki = Pki(self.connection, self.settings.pki_mount, self.run)
        self._lock = threading.Lock()
        self._ca_chain: tuple[x509.Certificate, ...] = ()  # as Vault last stated it, issuing CA first

    def _load_extra_roots(self) -> tuple[x509.Certificate, ...]:
        path = self.settings.trust_bundle_file
        if path is None:
            return ()
        try:
            return load_certs_pem(Path(path).read_bytes(), str(path))
        except OSError as err:
            raise ConfigError(f"{PREFIX}.trust_bundle_file: cannot read {path}: {err.strerror}") from None
        except ValueError as err:
            raise ConfigError(f"{PREFIX}.trust_bundle_file: {err}") from None

    @property
    def where(self) -> str:
        return f"mount {self.settings.pki_mount!r}{self.settings.namespace_label}"

    @property
    def known_ca_chain(self) -> tuple[x509.Certificate, ...]:
        """The CA chain as Vault last stated it, issuing CA first (empty before the first answer)."""
        with self._lock:
            return self._ca_chain

    # -- calls ----------------------------------------------------------------------------------------------

    def run(self, what: str, function: Callable[[], T]) -> T:
        """An authenticated call: a valid token first; after a 403 caused by an expired token, log in again and
        retry once (a real permission problem is raised as it is)."""
        lease = self.keeper.ensure()
        try:
            return self.connection.call(what, function)
        except VaultPermissionDeniedError:
            if not self.keeper.recover_from_denied(lease.token):
                raise
            return self.connection.call(what, function)

    # -- the contract ---------------------------------------------------------------------------------------

    def capabilities(self) -> Capabilities:
        return CAPABILITIES

    def trust_bundle(self) -> TrustBundle:
        """The roots of the mount's ``ca_chain``, read from Vault now (the last known ones while it is down)."""
        try:
            chain = tuple(self.pki.ca_chain())
        except ProviderError as err:
            with self._lock:
                known = self._ca_chain
            if not known:
                raise
            log.warning("vault: using the last known CA chain of %s: %s", self.where, err)
            chain = known
        with self._lock:
            self._ca_chain = chain
        _, roots, notes = split_chain(chain, self.extra_roots, self.where)
        for note in notes:
            log.warning("vault: %s", note)
        return TrustBundle(self.context.trust_domain, roots)

    def sign_intermediate(self, csr: x509.CertificateSigningRequest, ttl: timedelta) -> SignedCertificate:
        signed = self.pki.sign_intermediate(csr, ttl)
        return self._result(signed.certificate, signed.ca_chain, signed.warnings, ttl)

    def sign_workload(
        self, csr: x509.CertificateSigningRequest, spiffe_id: SpiffeId, ttl: timedelta
    ) -> SignedCertificate:
        role = self.settings.pki_role
        if not role:
            raise ProviderRejectedError(NAME, f"sign {spiffe_id}: set {PREFIX}.pki_role to sign per workload")
        signed = self.pki.sign_workload(csr, str(spiffe_id), ttl, role, self.settings.common_name or "")
        try:
            san = signed.certificate.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
            uris = san.get_values_for_type(x509.UniformResourceIdentifier)
        except x509.ExtensionNotFound:
            uris = []
        if uris != [str(spiffe_id)]:
            raise VaultRoleError(
                NAME,
                f"sign {spiffe_id}: role {role!r} on {self.where} issued a certificate with URI SANs {uris} instead "
                f"of only {spiffe_id}; a role with use_csr_sans=true (Vault's default) takes the SANs from the CSR, "
                "so send CSRs that carry the SPIFFE ID, or set use_csr_sans=false on the role",
            )
        return self._result(signed.certificate, signed.ca_chain, signed.warnings, ttl)

    def _result(
        self,
        certificate: x509.Certificate,
        ca_chain: tuple[x509.Certificate, ...],
        warnings: tuple[str, ...],
        ttl: timedelta,
    ) -> SignedCertificate:
        if ca_chain:
            with self._lock:
                self._ca_chain = ca_chain
        else:
            with self._lock:
                ca_chain = self._ca_chain
        intermediates, roots, notes = split_chain(ca_chain, self.extra_roots, self.where)
        if not roots:
            raise ProviderRejectedError(NAME, f"Vault returned no CA chain for {self.where}")
        asked_until = self.context.clock() + ttl
        not_after = certificate.not_valid_after_utc
        if not_after < asked_until - SHORTENED_SLACK:
            shortfall = format_duration(asked_until - not_after)
            warnings = (
                *warnings,
                f"Vault issued it until {not_after:%Y-%m-%dT%H:%M:%SZ}, {shortfall} short of the "
                f"{format_duration(ttl)} asked (the role's or mount's max TTL, or the CA's expiry)",
            )
        bundle = TrustBundle(self.context.trust_domain, roots)
        return SignedCertificate(certificate, intermediates, bundle, (*warnings, *notes))

    def health(self) -> Health:
        now = self.context.clock()
        try:
            detail = doctor.server_state(self.connection)
            lease = self.keeper.ensure()
            if not self.keeper.token_is_valid():
                self.keeper.recover_from_denied(lease.token)  # logs in again, or says why it cannot
            lease = self.keeper.lease or lease
        except ProviderError as err:
            return Health(False, str(err), now)
        token = doctor.describe_lease(lease, self.keeper.clock())
        ca = ""
        with self._lock:
            chain = self._ca_chain
        if chain:
            not_after = chain[0].not_valid_after_utc
            if not_after <= now:
                return Health(False, f"the CA of {self.where} expired at {not_after:%Y-%m-%dT%H:%M:%SZ}", now)
            ca = f"; CA of {self.where} valid until {not_after:%Y-%m-%dT%H:%M:%SZ}"
        return Health(True, f"{detail}; {self.settings.auth_method} auth, {token}{ca}", now)

    def limits(self) -> Limits:
        notes: list[str] = []
        role_max: timedelta | None = None
        if self.settings.pki_role:
            try:
                role_max = self.pki.role(self.settings.pki_role).max_ttl
                notes.append(
                    f"role {self.settings.pki_role!r} max_ttl "
                    + (format_duration(role_max) if role_max else "unset (the mount's max applies)")
                )
            except ProviderError as err:
                notes.append(str(err))
        mount_max: timedelta | None = None
        try:
            mount_max = self.pki.mount_max_ttl()
            notes.append(
                f"{self.where} max_lease_ttl "
                + (format_duration(mount_max) if mount_max else "unknown (the token may not read sys/mounts)")
            )
        except ProviderError as err:  # a malformed answer (not being allowed to read it is None)
            notes.append(str(err))
        ca_not_after: datetime | None = None
        try:
            self.trust_bundle()
            with self._lock:
                ca_not_after = self._ca_chain[0].not_valid_after_utc if self._ca_chain else None
        except ProviderError as err:
            notes.append(str(err))
        return Limits(
            max_workload_ttl=role_max or mount_max,
            max_intermediate_ttl=mount_max,
            ca_not_after=ca_not_after,
            notes=tuple(notes),
        )

    def doctor(self, workload_ttl: timedelta | None = None, intermediate_ttl: timedelta | None = None) -> list[Check]:
        """Check this configuration against the live Vault; the TTLs wanted (``ca.workload_ttl`` and
        ``ca.intermediate_ttl``) are checked against Vault's limits when given."""
        return doctor.run(self, workload_ttl=workload_ttl, intermediate_ttl=intermediate_ttl)

    def close(self) -> None:
        self.keeper.close()
        self.connection.close()


def create(context: ProviderContext, options: Mapping[str, Any]) -> VaultProvider:
    return VaultProvider(context, options)


SPEC = ProviderSpec(
    name=NAME,
    description="HashiCorp Vault PKI secrets engine (token, AppRole or Kubernetes auth; namespaces; TLS)",
    capabilities=CAPABILITIES,
    factory=create,
    options=OPTIONS,
)
