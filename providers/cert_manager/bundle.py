"""Which roots the cert-manager provider trusts, and where they come from.

cert-manager hands back a CA in ``status.ca``, but that field is only what the issuer (or anyone allowed to write
CertificateRequest status) *says* the CA is: it is never a reason to trust a root. Every answer is verified
against one set of roots, the **anchors**:

* **pinned roots** (``trust_bundle_file``, ``trust_bundle_secret`` or ``trust_bundle_configmap``), read afresh
  whenever they are needed so that a rotated bundle is picked up. Nothing is ever stored or learned then.
* without a pinned bundle, the **stored roots** in ``<state_dir>/cert-manager/ca.pem`` (0600 in a 0700
  directory, replaced atomically). The first root an answer chains to is trusted on first use
  (:meth:`BundleSource.trust_first`, with a loud warning); after that a root is added only by the operator
  (``mesh-identity ca trust FILE``, :meth:`BundleSource.add`). The file is re-read when it changes, so a
  running server sees what ``ca trust`` added. A store that cannot be read is an error, never a reason to
  trust on first use again; one that disappears while running keeps what this process already trusted.

Never the issuer's name: a name is not a certificate.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Sequence
from datetime import datetime
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import InvalidSignature

from mesh_identity.files import ensure_private_dir, write_private
from mesh_identity.profile import is_ca
from mesh_identity.provider import root_problem
from mesh_identity.svid import certs_pem, fingerprint_of, load_certs_pem
from providers.cert_manager.errors import NAME, TrustBundleError
from providers.cert_manager.kube import KubeApi
from providers.cert_manager.options import Settings

log = logging.getLogger(__name__)


def issued_by(child: x509.Certificate, parent: x509.Certificate) -> bool:
    """``parent``'s key signed ``child`` (and the names match)."""
    try:
        child.verify_directly_issued_by(parent)
    except (ValueError, TypeError, InvalidSignature):
        return False
    return True


def self_signed(cert: x509.Certificate) -> bool:
    return cert.issuer == cert.subject and issued_by(cert, cert)


def chain_below(
    certificates: Sequence[x509.Certificate], roots: Sequence[x509.Certificate]
) -> tuple[x509.Certificate, ...]:
    """The certificates ``status.certificate`` holds above its leaf, without ``roots`` and self-signed ones: the
    chain from the leaf's issuer up to (not including) a root."""
    anchors = {fingerprint_of(r) for r in roots}
    return tuple(c for c in certificates[1:] if fingerprint_of(c) not in anchors and not self_signed(c))


def show(cert: x509.Certificate) -> str:
    """``'CN=mesh root' (sha256 ab12...)``: how messages name a certificate."""
    return f"{cert.subject.rfc4514_string()!r} (sha256 {fingerprint_of(cert)})"


class BundleSource:
    def __init__(self, settings: Settings, api: KubeApi, namespace: str, state_dir: Path) -> None:
        self.settings = settings
        self.api = api
        self.namespace = namespace
        self.path = state_dir / "cert-manager" / "ca.pem"
        self._lock = threading.Lock()
        self._stored: tuple[x509.Certificate, ...] = ()
        self._stamp: tuple[int, int, int] | None = None  # (inode, mtime, size) of the file last read

    @property
    def pinned(self) -> bool:
        return self.settings.has_configured_bundle

    def describe(self) -> str:
        settings = self.settings
        if settings.trust_bundle_file:
            return f"file {settings.trust_bundle_file}"
        if settings.trust_bundle_secret:
            return f"Secret {settings.trust_bundle_secret.show(self.namespace)} key {settings.trust_bundle_key!r}"
        if settings.trust_bundle_configmap:
            return f"ConfigMap {settings.trust_bundle_configmap.show(self.namespace)} key {settings.trust_bundle_key!r}"
        return f"the roots trusted in {self.path}"

    def anchors(self) -> tuple[x509.Certificate, ...]:
        """The roots every answer must chain to: the pinned ones (read now), else the stored ones (() before
        the first use)."""
        return self.configured() if self.pinned else self.stored()

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

    # -- the stored roots (no pinned bundle)

    def stored(self) -> tuple[x509.Certificate, ...]:
        """The roots trusted on first use or by the operator, re-read when the file changed."""
        with self._lock:
            return self._refresh()

    def trust_first(self, root: x509.Certificate, source: str) -> tuple[x509.Certificate, ...]:
        """Trust ``root`` on first use (``source`` says which answer named it) when no root is stored yet, loudly;
        returns the stored roots, which are another request's when that one came first."""
        with self._lock:
            current = self._refresh()
            if current:
                return current
            self._write((root,))
        log.warning(
            "%s: TRUST ON FIRST USE: no trust bundle is pinned, so root %s, named in status.ca of %s, is now the "
            "mesh's trust anchor (kept in %s); no other root will be trusted without `mesh-identity ca trust "
            "FILE`. Check this fingerprint against the issuer's CA, then pin it: set "
            "ca.provider_options.trust_bundle_file (or trust_bundle_secret, trust_bundle_configmap)",
            NAME,
            show(root),
            source,
            self.path,
        )
        return (root,)

    def add(self, roots: Sequence[x509.Certificate], now: datetime) -> list[x509.Certificate]:
        """The operator's step: add ``roots`` to the stored ones (each must be a valid self-signed CA); returns
        those that were not trusted yet. Refused, changing nothing, when the bundle is pinned."""
        if self.pinned:
            raise TrustBundleError(
                NAME,
                f"the trust bundle is pinned ({self.describe()}): add the root there; `mesh-identity ca trust` "
                "only adds to the roots the provider keeps without a pinned bundle",
            )
        for cert in roots:
            problem = root_problem(cert, now)
            if problem is not None:
                raise TrustBundleError(NAME, f"cannot trust {show(cert)}: it {problem}")
        with self._lock:
            current = self._refresh()
            known = {fingerprint_of(c) for c in current}
            added: list[x509.Certificate] = []
            for cert in roots:
                if fingerprint_of(cert) not in known:
                    known.add(fingerprint_of(cert))
                    added.append(cert)
            if added:
                self._write((*current, *added))
        for cert in added:
            log.warning("%s: the operator trusted root %s: added to %s", NAME, show(cert), self.path)
        return added

    def _refresh(self) -> tuple[x509.Certificate, ...]:
        """Re-read the file if it changed (under the lock)."""
        try:
            stat = self.path.stat()
        except FileNotFoundError:
            return self._stored  # none yet, or deleted under us: what this process trusted stays trusted
        except OSError as err:
            raise TrustBundleError(NAME, self._unusable(err.strerror or str(err))) from None
        stamp = (stat.st_ino, stat.st_mtime_ns, stat.st_size)
        if stamp == self._stamp:
            return self._stored
        if stat.st_mode & 0o077:  # 0644, as earlier versions wrote it: the trust anchors are ours alone
            try:
                self.path.chmod(0o600)
            except OSError as err:
                log.warning("%s: cannot make %s private (0600): %s", NAME, self.path, err.strerror)
        try:
            data = self.path.read_bytes()
        except OSError as err:
            raise TrustBundleError(NAME, self._unusable(err.strerror or str(err))) from None
        try:
            certs = tuple(x509.load_pem_x509_certificates(data))
        except ValueError:
            raise TrustBundleError(NAME, self._unusable("it does not hold valid PEM certificates")) from None
        self._stored, self._stamp = certs, stamp
        return certs

    def _write(self, roots: tuple[x509.Certificate, ...]) -> None:
        """Replace the file with ``roots`` (under the lock); TrustBundleError when it cannot be written, since a
        trust that is not kept would be given again to whoever answers after a restart."""
        try:
            ensure_private_dir(self.path.parent)
            write_private(self.path, certs_pem(roots))
            stat = self.path.stat()
        except OSError as err:
            raise TrustBundleError(
                NAME, f"cannot keep the trusted roots in {self.path}: {err.strerror}; refused, nothing trusted"
            ) from None
        self._stored, self._stamp = roots, (stat.st_ino, stat.st_mtime_ns, stat.st_size)

    def _unusable(self, why: str) -> str:
        return (
            f"the roots trusted in {self.path} cannot be read ({why}): fix the file, or delete it to trust the "
            "issuer's root on first use again"
        )
