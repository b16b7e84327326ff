"""Where the cert-manager provider's trust bundle comes from.

cert-manager hands back the issuing CA in ``status.ca``, but not every issuer fills it (ACME and several
external issuers leave it empty), and there is no API to read an issuer's CA otherwise. So:

* **configured roots** (``trust_bundle_file``, ``trust_bundle_secret`` or ``trust_bundle_configmap``) are read
  afresh whenever they are needed, so a rotated bundle is picked up;
* **learned roots** are the CAs ``status.ca`` returned; they are kept in ``<state_dir>/cert-manager/ca.pem``
  (expired ones dropped) so that a restart knows the bundle before its first request.

Never the issuer's name: a name is not a certificate.
"""

from __future__ import annotations

import logging
import threading
from datetime import datetime
from pathlib import Path

from cryptography import x509

from mesh_identity.files import ensure_private_dir, write_private
from mesh_identity.profile import is_ca
from mesh_identity.svid import certs_pem, fingerprint_of, load_certs_pem
from providers.cert_manager.errors import TrustBundleError
from providers.cert_manager.kube import NAME, KubeApi
from providers.cert_manager.options import Settings

log = logging.getLogger(__name__)


def merge(*groups: tuple[x509.Certificate, ...]) -> tuple[x509.Certificate, ...]:
    """All certificates of ``groups`` in order, each once (by fingerprint)."""
    seen: set[str] = set()
    merged: list[x509.Certificate] = []
    for group in groups:
        for cert in group:
            if fingerprint_of(cert) not in seen:
                seen.add(fingerprint_of(cert))
                merged.append(cert)
    return tuple(merged)


class BundleSource:
    def __init__(self, settings: Settings, api: KubeApi, namespace: str, state_dir: Path) -> None:
        self.settings = settings
        self.api = api
        self.namespace = namespace
        self.path = state_dir / "cert-manager" / "ca.pem"
        self._lock = threading.Lock()
        self._learned: tuple[x509.Certificate, ...] = self._load()

    def describe(self) -> str:
        settings = self.settings
        if settings.trust_bundle_file:
            return f"file {settings.trust_bundle_file}"
        if settings.trust_bundle_secret:
            return f"Secret {settings.trust_bundle_secret.show(self.namespace)} key {settings.trust_bundle_key!r}"
        if settings.trust_bundle_configmap:
            return f"ConfigMap {settings.trust_bundle_configmap.show(self.namespace)} key {settings.trust_bundle_key!r}"
        return "status.ca"

    def configured(self) -> tuple[x509.Certificate, ...]:
        """The configured roots, read now; () when none are configured. TrustBundleError (or a Kube error for a
        missing Secret/ConfigMap) when they are configured but cannot be used."""
        settings = self.settings
        if settings.trust_bundle_file:
            try:
                data = Path(settings.trust_bundle_file).read_bytes()
            except OSError as err:
                raise TrustBundleError(
                    NAME, f"cannot read trust_bundle_file {settings.trust_bundle_file}: {err.strerror}"
                ) from None
        elif settings.trust_bundle_secret:
            data = self.api.read_secret_key(settings.trust_bundle_secret, self.namespace, settings.trust_bundle_key)
        elif settings.trust_bundle_configmap:
            data = self.api.read_configmap_key(
                settings.trust_bundle_configmap, self.namespace, settings.trust_bundle_key
            )
        else:
            return ()
        what = f"the trust bundle ({self.describe()})"
        try:
            certs = load_certs_pem(data, what)
        except ValueError as err:
            raise TrustBundleError(NAME, str(err)) from None
        for cert in certs:
            if not is_ca(cert):
                raise TrustBundleError(NAME, f"{what} holds {cert.subject.rfc4514_string()!r}, which is not a CA")
        return certs

    @property
    def learned(self) -> tuple[x509.Certificate, ...]:
        return self._learned

    def learn(self, cas: list[x509.Certificate], now: datetime) -> None:
        """Remember the CAs ``status.ca`` returned (and forget expired ones); persisted when that changes."""
        with self._lock:
            fresh = tuple(c for c in merge(self._learned, tuple(cas)) if c.not_valid_after_utc > now)
            if [fingerprint_of(c) for c in fresh] == [fingerprint_of(c) for c in self._learned]:
                return
            self._learned = fresh
            try:
                ensure_private_dir(self.path.parent)
                write_private(self.path, certs_pem(fresh), mode=0o644)
            except OSError as err:
                log.warning("cert-manager: cannot keep the learned CA in %s: %s", self.path, err.strerror)

    def _load(self) -> tuple[x509.Certificate, ...]:
        try:
            data = self.path.read_bytes()
        except FileNotFoundError:
            return ()
        except OSError as err:
            log.warning("cert-manager: cannot read the learned CA in %s: %s", self.path, err.strerror)
            return ()
        try:
            return load_certs_pem(data, str(self.path))
        except ValueError as err:
            log.warning("cert-manager: ignoring %s", err)
            return ()
