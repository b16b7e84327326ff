"""The cert-manager CA provider: certificates signed by a cert-manager issuer through CertificateRequests.

Each signature is one ``CertificateRequest`` (``cert-manager.io/v1``) created from our CSR (see
:mod:`providers.cert_manager.request`): in ``intermediate`` mode one per intermediate lifetime (``isCA: true``),
in ``per-workload`` mode one per SVID. The provider then waits on a *watch* (no polling; one stream shared by
all its requests, see :mod:`providers.cert_manager.watcher`) until the request is Ready, Failed or Denied, or
cert-manager reports that the issuer does not exist, or ``timeout`` passes; it
reads the certificate from ``status.certificate`` and the bundle from ``status.ca`` or, where that is empty,
from the configured bundle (:mod:`providers.cert_manager.bundle`).

Cleanup: a request is deleted as soon as the provider is done with it, whatever the outcome; with
``keep_requests`` finished ones (Issued, Failed, Denied) stay for inspection, while timed-out or abandoned ones
are still deleted, since cert-manager might sign them later. A deletion that fails (API down) is retried before
the next request and on ``close()``; at start the provider also deletes requests of its trust domain that a
crashed process left pending for longer than twice the timeout.

RBAC the service account needs, in the provider's namespace: ``create``, ``get``, ``list``, ``watch`` and
``delete`` on ``certificaterequests.cert-manager.io``; for the health check, ``get`` on the issuer (optional);
for a bundle in a Secret or ConfigMap, ``get`` on it.
"""

from __future__ import annotations

import dataclasses
import logging
import secrets
import threading
import time
from collections.abc import Mapping
from datetime import datetime, timedelta
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import rsa

from mesh_identity.authority import workload_csr
from mesh_identity.durations import format_duration
from mesh_identity.errors import ProviderError, ProviderRejectedError
from mesh_identity.keys import KeyType, generate_key
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
from mesh_identity.svid import TrustBundle, fingerprint_of
from providers.cert_manager.bundle import BundleSource, merge
from providers.cert_manager.errors import (
    IssuerNotFoundError,
    KubeForbiddenError,
    KubeNotFoundError,
    KubeServerError,
    KubeUnreachableError,
    RequestDeniedError,
    RequestFailedError,
    RequestTimeoutError,
    TrustBundleError,
)
from providers.cert_manager.kube import NAME, JsonObj, KubeApi, connect
from providers.cert_manager.options import CERT_MANAGER_GROUP, OPTIONS, Settings
from providers.cert_manager.request import (
    LABEL_INSTANCE,
    LABEL_MANAGED_BY,
    LABEL_TRUST_DOMAIN,
    MANAGED_BY,
    Phase,
    Purpose,
    State,
    build_request,
    issued_certificates,
    label_value,
    name_of,
    state_of,
)
from providers.cert_manager.watcher import RequestWatcher

log = logging.getLogger(__name__)

CAPABILITIES = Capabilities(modes=frozenset(Mode))
SHORTENED_SLACK = timedelta(minutes=1)  # issuers backdate NotBefore; less than this is not "shortened"


class CertManagerProvider(CAProvider):
    name = NAME

    def __init__(
        self, context: ProviderContext, options: Mapping[str, Any], *, environ: Mapping[str, str] | None = None
    ) -> None:
        self.context = context
        settings = Settings.from_options(options)
        self.connection = connect(settings, environ)
        self.namespace = self.connection.namespace
        self.settings = dataclasses.replace(settings, namespace=self.namespace)
        self.api = KubeApi(self.connection, self.settings)
        self.bundles = BundleSource(self.settings, self.api, self.namespace, context.state_dir)
        self.instance = secrets.token_hex(6)
        self.watcher = RequestWatcher(self.api, self.namespace, f"{LABEL_INSTANCE}={self.instance}")
        self._lock = threading.Lock()
        self._undeleted: dict[tuple[str, str], str | None] = {}  # (namespace, name) -> uid
        self._last_success: datetime | None = None
        self._last_failure: tuple[datetime, ProviderError] | None = None
        self._sweep()

    # -- the contract --------------------------------------------------------------------------------------

    def capabilities(self) -> Capabilities:
        return CAPABILITIES

    def trust_bundle(self) -> TrustBundle:
        """The configured roots and the CAs ``status.ca`` has returned; before any request has returned one,
        a throwaway request (a short-lived leaf for a key that is discarded at once) learns it."""
        roots = merge(self.bundles.configured(), self.bundles.learned)
        if not roots:
            self._probe()
            roots = merge(self.bundles.configured(), self.bundles.learned)
        if not roots:
            raise TrustBundleError(NAME, self._no_bundle("the bundle probe"))
        return TrustBundle(self.context.trust_domain, roots)

    def sign_intermediate(self, csr: x509.CertificateSigningRequest, ttl: timedelta) -> SignedCertificate:
        return self._sign(csr, ttl, Purpose.INTERMEDIATE, str(self.context.trust_domain.id))

    def sign_workload(
        self, csr: x509.CertificateSigningRequest, spiffe_id: SpiffeId, ttl: timedelta
    ) -> SignedCertificate:
        return self._sign(csr, ttl, Purpose.WORKLOAD, str(spiffe_id))

    def health(self) -> Health:
        """Reachable, allowed to list CertificateRequests, the issuer exists and is Ready (where RBAC lets us
        read it), the watch runs, and the last request did not fail after the last success."""
        now = self.context.clock()
        try:
            self.api.list_requests(self.namespace, f"{LABEL_MANAGED_BY}={MANAGED_BY}", limit=1)
            issuer_problem = self._issuer_problem()
        except ProviderError as err:
            return Health(False, str(err), now)
        delete_error = self._retry_deletions()
        if delete_error is not None:
            left = ", ".join(self.undeleted)
            return Health(False, f"CertificateRequests not deleted ({left}): {delete_error}", now)
        if issuer_problem:
            return Health(False, f"{NAME}: {issuer_problem}", now)
        watch_error = self.watcher.error
        if watch_error is not None:
            return Health(False, str(watch_error), now)
        with self._lock:
            failure, success = self._last_failure, self._last_success
        if failure is not None and (success is None or failure[0] > success):
            return Health(False, f"the last CertificateRequest failed: {failure[1]}", now)
        return Health(
            True,
            f"{self.settings.issuer} reachable through {self.connection.host}; CertificateRequests "
            f"in namespace {self.namespace}",
            now,
        )

    def limits(self) -> Limits:
        roots = self.bundles.learned
        return Limits(
            ca_not_after=min((c.not_valid_after_utc for c in roots), default=None),
            notes=("a cert-manager issuer may shorten the requested duration; expiry is read from each certificate",),
        )

    def doctor(
        self, workload_ttl: timedelta | None = None, intermediate_ttl: timedelta | None = None
    ) -> list[Check]:
        # cert-manager issuers may shorten a duration silently and publish no limit to check against;
        # the TTLs are accepted for the contract, and expiry is read from each certificate instead.
        del workload_ttl, intermediate_ttl
        checks: list[Check] = []
        try:
            version = self.api.server_version()
            checks.append(
                Check("kubernetes api", True, f"{self.connection.host} ({version}), via {self.connection.source}")
            )
        except ProviderError as err:
            return [Check("kubernetes api", False, str(err))]
        try:
            self.api.list_requests(self.namespace, f"{LABEL_MANAGED_BY}={MANAGED_BY}", limit=1)
            checks.append(Check("certificaterequests", True, f"can list them in namespace {self.namespace}"))
        except ProviderError as err:
            checks.append(Check("certificaterequests", False, str(err)))
        try:
            problem = self._issuer_problem()
            checks.append(Check("issuer", problem is None, problem or f"{self.settings.issuer} is Ready"))
        except ProviderError as err:
            checks.append(Check("issuer", False, str(err)))
        try:
            configured = self.bundles.configured()
            roots = merge(configured, self.bundles.learned)
            detail = (
                f"{len(roots)} root(s) from {self.bundles.describe()}"
                if roots
                else "not known yet: learned from status.ca on the first request"
            )
            checks.append(Check("trust bundle", True, detail))
        except ProviderError as err:
            checks.append(Check("trust bundle", False, str(err)))
        return checks

    def close(self) -> None:
        """Stop the watch and delete what could not be deleted before; what still cannot (API down) is logged
        and left to the next start's sweep."""
        self.watcher.stop()
        try:
            error = self._retry_deletions()
            if error is not None:
                log.warning("%s: CertificateRequests left behind (%s): %s", NAME, ", ".join(self.undeleted), error)
        finally:
            self.api.close()

    # -- signing -------------------------------------------------------------------------------------------

    def _sign(
        self, csr: x509.CertificateSigningRequest, ttl: timedelta, purpose: Purpose, subject: str
    ) -> SignedCertificate:
        try:
            signed = self._request(csr, ttl, purpose, subject)
        except ProviderError as err:
            if not isinstance(err, KubeUnreachableError | KubeServerError):  # health() sees those itself
                with self._lock:
                    self._last_failure = (self.context.clock(), err)
            raise
        with self._lock:
            self._last_success = self.context.clock()
        return signed

    def _request(
        self, csr: x509.CertificateSigningRequest, ttl: timedelta, purpose: Purpose, subject: str
    ) -> SignedCertificate:
        self._retry_deletions()  # best effort: a failure was logged when the deletion first failed
        body = build_request(
            self.settings,
            csr,
            ttl,
            purpose,
            subject,
            self.context.trust_domain.name,
            self.instance,
            rsa=isinstance(csr.public_key(), rsa.RSAPublicKey),
        )
        created = self.api.create_request(self.namespace, body)
        meta = created["metadata"]
        name, uid = str(meta["name"]), meta.get("uid")
        state: State | None = None
        try:
            state, cr = self._wait(created)
            return self._result(cr, state, ttl)
        finally:
            if not (self.settings.keep_requests and state is not None and state.phase.terminal):
                self._delete(name, uid)
            self.watcher.forget(name)

    def _wait(self, created: JsonObj) -> tuple[State, JsonObj]:
        """Wait (on the shared watch) until the request is final or the timeout passes."""
        timeout = self.settings.timeout
        started = time.monotonic()
        try:
            outcome = self.watcher.wait(created, started + timeout.total_seconds())
        finally:
            self.api.add_wait_time(time.monotonic() - started)
        if outcome.state is not None:
            return outcome.state, outcome.obj
        if outcome.error is not None:
            raise outcome.error
        raise RequestTimeoutError(
            NAME,
            f"CertificateRequest {name_of(outcome.obj)} was not ready after {format_duration(timeout)} "
            f"({state_of(outcome.obj).detail}); is {self.settings.issuer} working?",
        )

    def _result(self, cr: JsonObj, state: State, ttl: timedelta) -> SignedCertificate:
        issuer = self.settings.issuer
        match state.phase:
            case Phase.DENIED:
                raise RequestDeniedError(NAME, f"CertificateRequest {name_of(cr)} was {state.detail}")
            case Phase.FAILED:
                raise RequestFailedError(NAME, f"{issuer} failed CertificateRequest {name_of(cr)}: {state.detail}")
            case Phase.ISSUER_NOT_FOUND:
                raise IssuerNotFoundError(
                    NAME,
                    f"CertificateRequest {name_of(cr)}: {state.detail} (check issuer_name, issuer_kind and namespace)",
                )
        try:
            certificates, cas = issued_certificates(cr)
        except ValueError as err:
            raise ProviderRejectedError(
                NAME, f"{issuer} answered CertificateRequest {name_of(cr)} with {err}"
            ) from None
        now = self.context.clock()
        if cas:
            self.bundles.learn(cas, now)
            roots = tuple(cas)
        else:
            roots = self.bundles.configured()
            if not roots:
                raise TrustBundleError(NAME, self._no_bundle(f"CertificateRequest {name_of(cr)}"))
        leaf = certificates[0]
        bundle = TrustBundle(self.context.trust_domain, roots)
        in_bundle = bundle.fingerprints
        chain = tuple(c for c in certificates[1:] if fingerprint_of(c) not in in_bundle and c.issuer != c.subject)
        warnings: list[str] = []
        lifetime = leaf.not_valid_after_utc - max(leaf.not_valid_before_utc, now)
        if lifetime < ttl - SHORTENED_SLACK:
            warnings.append(
                f"{issuer} shortened the duration: asked for {format_duration(ttl)}, the certificate "
                f"is valid for {format_duration(lifetime)} more"
            )
        return SignedCertificate(leaf, chain, bundle, tuple(warnings))

    def _no_bundle(self, what: str) -> str:
        return (
            f"{what} was issued by {self.settings.issuer} with an empty status.ca, and no trust bundle is "
            "configured: set trust_bundle_file, trust_bundle_secret or trust_bundle_configmap"
        )

    def _probe(self) -> None:
        """Learn ``status.ca`` with a throwaway request: a leaf for a discarded key, valid for an hour."""
        probe_id = SpiffeId.parse(f"{self.context.trust_domain.id}/mesh-identity/bundle-probe")
        key = generate_key(KeyType.ECDSA_P256)
        self._sign(workload_csr(key, probe_id), timedelta(hours=1), Purpose.BUNDLE_PROBE, str(probe_id))

    def _issuer_problem(self) -> str | None:
        """Why the issuer cannot sign (None when it looks fine or when it cannot be read)."""
        if self.settings.issuer_group != CERT_MANAGER_GROUP or self.settings.issuer_kind not in (
            "Issuer",
            "ClusterIssuer",
        ):
            return None  # an external issuer: its kind is not ours to read
        try:
            issuer = self.api.get_issuer(self.namespace)
        except KubeForbiddenError:
            return None  # reading issuers is optional RBAC
        except KubeNotFoundError:
            return f"{self.settings.issuer} does not exist"
        for condition in (issuer.get("status") or {}).get("conditions") or []:
            if condition.get("type") == "Ready" and condition.get("status") == "False":
                return f"{self.settings.issuer} is not Ready: {condition.get('message') or condition.get('reason')}"
        return None

    # -- cleanup -------------------------------------------------------------------------------------------

    def _delete(self, name: str, uid: str | None) -> None:
        try:
            self.api.delete_request(self.namespace, name, uid)
        except ProviderError as err:
            log.warning(
                "%s: CertificateRequest %s/%s not deleted yet (will retry): %s", NAME, self.namespace, name, err
            )
            with self._lock:
                self._undeleted[(self.namespace, name)] = uid

    def _retry_deletions(self) -> ProviderError | None:
        """Retry the deletions that failed; the error that still stops them, or None when none are left."""
        with self._lock:
            pending = dict(self._undeleted)
        for (namespace, name), uid in pending.items():
            try:
                self.api.delete_request(namespace, name, uid)
            except ProviderError as err:
                return err
            with self._lock:
                self._undeleted.pop((namespace, name), None)
        return None

    @property
    def undeleted(self) -> list[str]:
        """Requests whose deletion failed and is still to be retried (``namespace/name``)."""
        with self._lock:
            return [f"{ns}/{name}" for ns, name in self._undeleted]

    def _sweep(self) -> None:
        """Delete what a crashed process of this trust domain left behind: requests pending for longer than
        twice the timeout and, unless ``keep_requests``, finished ones. Best effort: the API may be down."""
        selector = (
            f"{LABEL_MANAGED_BY}={MANAGED_BY},"
            f"{LABEL_TRUST_DOMAIN}={label_value(self.context.trust_domain.name)},{LABEL_INSTANCE}!="
            f"{self.instance}"
        )
        now = self.context.clock()
        try:
            for cr in self.api.list_requests(self.namespace, selector):
                meta = cr.get("metadata") or {}
                created = _timestamp(str(meta.get("creationTimestamp") or ""))
                phase = state_of(cr).phase
                abandoned = not phase.terminal and created is not None and now - created > 2 * self.settings.timeout
                if abandoned or (phase.terminal and not self.settings.keep_requests):
                    self.api.delete_request(self.namespace, str(meta.get("name")), meta.get("uid"))
        except ProviderError as err:
            log.warning("%s: could not clean up old CertificateRequests: %s", NAME, err)


def _timestamp(text: str) -> datetime | None:
    try:
        return datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        return None


def create(context: ProviderContext, options: Mapping[str, Any]) -> CertManagerProvider:
    return CertManagerProvider(context, options)


SPEC = ProviderSpec(
    name=NAME,
    description="cert-manager: each certificate is a CertificateRequest signed by an Issuer or ClusterIssuer",
    capabilities=CAPABILITIES,
    factory=create,
    options=OPTIONS,
)
