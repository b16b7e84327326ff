"""The cert-manager CA provider: certificates signed by a cert-manager issuer through CertificateRequests.

Each signature is one ``CertificateRequest`` (``cert-manager.io/v1``) created from our CSR (see
:mod:`providers.cert_manager.request`): in ``intermediate`` mode one per intermediate lifetime (``isCA: true``),
in ``per-workload`` mode one per SVID. The provider then waits on a *watch* (no polling; one stream shared by
all its requests, see :mod:`providers.cert_manager.watcher`) until the request is Ready, Failed or Denied, or
cert-manager reports that the issuer does not exist, or ``timeout`` passes; it reads the certificate from
``status.certificate``.

Trust (see :mod:`providers.cert_manager.bundle`): every chain the issuer returns must end at a trusted root,
or it is refused (:class:`~providers.cert_manager.errors.UntrustedRootError`, naming the request and the
root's fingerprint) and nothing of it is used or kept. With a pinned bundle (``trust_bundle_file``,
``trust_bundle_secret`` or ``trust_bundle_configmap``) the trusted roots are those, only. Without one, the
first root an answer chains to is trusted on first use, with a WARNING naming it and saying how to pin it, and
stored; no root is added after that except by the operator (``mesh-identity ca trust FILE``,
:meth:`CertManagerProvider.trust_roots`). ``status.ca`` is never trusted for what it says: it only offers the
root to trust on first use, and the chain must verify against that root before it is kept.

Issuer isolation: whoever controls the issuer, or can write the status of our CertificateRequests, can answer
in its name. Pin the bundle, and give the mesh its own issuer: a CA ``Issuer`` in a namespace of its own, or a
``ClusterIssuer`` whose CA Secret (in cert-manager's cluster resource namespace) only cert-manager can read;
let an approver policy (cert-manager approver-policy, with cert-manager's default approver disabled) approve
only our requests, to that issuer, for SPIFFE IDs of the trust domain; and grant ``update``/``patch`` on
``certificaterequests/status`` to cert-manager alone (in that namespace, nobody else needs it).

Cleanup: a request is deleted as soon as the provider is done with it, whatever the outcome; with
``keep_requests`` finished ones (Issued, Failed, Denied) stay for inspection, while timed-out or abandoned ones
are still deleted, since cert-manager might sign them later. A deletion that fails (API down) is retried before
the next request and on ``close()``; at start the provider also deletes requests of its trust domain that a
crashed process left pending for longer than twice the timeout.

RBAC the service account needs, in the provider's namespace: ``create``, ``get``, ``list``, ``watch`` and
``delete`` on ``certificaterequests.cert-manager.io``; for the health check, ``get`` on the issuer (optional);
for a bundle in a Secret or ConfigMap, ``get`` on it. It needs nothing on ``certificaterequests/status``.
"""

from __future__ import annotations

import dataclasses
import logging
import secrets
import threading
import time
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime, timedelta
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import rsa

from mesh_identity.authority import workload_csr
from mesh_identity.durations import format_duration
from mesh_identity.errors import ProviderError, ProviderRejectedError
from mesh_identity.keys import KeyType, generate_key
from mesh_identity.profile import is_ca
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
    root_problem,
)
from mesh_identity.spiffe import SpiffeId
from mesh_identity.svid import TrustBundle, fingerprint_of
from mesh_identity.verify import chain_problem
from providers.cert_manager.bundle import BundleSource, chain_below, issued_by, self_signed, show
from providers.cert_manager.errors import (
    NAME,
    IssuerNotFoundError,
    KubeForbiddenError,
    KubeNotFoundError,
    KubeServerError,
    KubeUnreachableError,
    MalformedAnswerError,
    RequestDeniedError,
    RequestFailedError,
    RequestTimeoutError,
    TrustBundleError,
    UntrustedRootError,
)
from providers.cert_manager.kube import KubeApi, connect
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
    created_at,
    issued_certificates,
    label_value,
    name_of,
    request_ref,
    state_of,
)
from providers.cert_manager.shapes import JsonObj, conditions, text
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
        self._ignored_cas: set[str] = set()  # fingerprints of untrusted status.ca entries already warned about
        self._sweep()

    # -- the contract --------------------------------------------------------------------------------------

    def capabilities(self) -> Capabilities:
        return CAPABILITIES

    def trust_bundle(self) -> TrustBundle:
        """The trusted roots: the pinned bundle, else the stored roots. Before any root is stored, a throwaway
        request (a short-lived leaf for a key that is discarded at once) finds the root to trust on first use."""
        roots = self.bundles.anchors()
        if not roots and not self.bundles.pinned:
            self._probe()
            roots = self.bundles.anchors()
        if not roots:
            raise TrustBundleError(NAME, self._no_bundle("the bundle probe"))
        return TrustBundle(self.context.trust_domain, roots)

    def trust_roots(self, roots: Sequence[x509.Certificate]) -> list[x509.Certificate]:
        """The operator's step (``mesh-identity ca trust``): add ``roots`` to the stored roots; refused with a
        pinned bundle (add them there)."""
        return self.bundles.add(list(roots), self.context.clock())

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
        try:
            roots = self.bundles.anchors()
        except ProviderError:
            roots = ()
        return Limits(
            ca_not_after=min((c.not_valid_after_utc for c in roots), default=None),
            notes=("a cert-manager issuer may shorten the requested duration; expiry is read from each certificate",),
        )

    def doctor(self, workload_ttl: timedelta | None = None, intermediate_ttl: timedelta | None = None) -> list[Check]:
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
            roots = self.bundles.anchors()
            shown = ", ".join(f"sha256 {fingerprint_of(c)}" for c in roots)
            if self.bundles.pinned:
                detail = f"{len(roots)} root(s) pinned by {self.bundles.describe()}: {shown}"
            elif roots:
                detail = (
                    f"{len(roots)} root(s) trusted in {self.bundles.path} (on first use, or by `mesh-identity ca "
                    f"trust`): {shown}; not pinned: set trust_bundle_file, trust_bundle_secret or "
                    "trust_bundle_configmap to pin"
                )
            else:
                detail = (
                    "not pinned, and no root trusted yet: the root of the first answer will be trusted on first "
                    "use; set trust_bundle_file, trust_bundle_secret or trust_bundle_configmap to pin it"
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
        created = self.api.create_request(self.namespace, body)  # checked: a CertificateRequest with a name
        name, uid = request_ref(created)
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
            raise MalformedAnswerError(
                NAME, f"{issuer} answered CertificateRequest {name_of(cr)} with {text(str(err))}"
            ) from None
        now = self.context.clock()
        chain, roots = self._verified(cr, certificates, cas, now)
        leaf = certificates[0]
        bundle = TrustBundle(self.context.trust_domain, roots)
        warnings: list[str] = []
        lifetime = leaf.not_valid_after_utc - max(leaf.not_valid_before_utc, now)
        if lifetime < ttl - SHORTENED_SLACK:
            warnings.append(
                f"{issuer} shortened the duration: asked for {format_duration(ttl)}, the certificate "
                f"is valid for {format_duration(lifetime)} more"
            )
        return SignedCertificate(leaf, chain, bundle, tuple(warnings))

    # -- trust ---------------------------------------------------------------------------------------------

    def _verified(
        self, cr: JsonObj, certificates: list[x509.Certificate], cas: list[x509.Certificate], now: datetime
    ) -> tuple[tuple[x509.Certificate, ...], tuple[x509.Certificate, ...]]:
        """The chain of an answer up to a trusted root, and the trusted roots. The chain is verified against
        the pinned or stored roots, never against the ``status.ca`` of the same answer: that only offers the
        root to trust on first use. UntrustedRootError, nothing kept, when it ends at another root."""
        answered = f"{self.settings.issuer} answered CertificateRequest {name_of(cr)}"
        roots = self.bundles.anchors()
        if not roots:
            first = self._first_root(answered, cr, certificates, cas, now)
            roots = self.bundles.trust_first(first, f"CertificateRequest {name_of(cr)} by {self.settings.issuer}")
        chain = chain_below(certificates, roots)
        top = chain[-1] if chain else certificates[0]
        if not any(issued_by(top, root) for root in roots):
            raise UntrustedRootError(
                NAME, f"{answered} with {self._chain_to(top, certificates, cas)}, which is {self._not_trusted(roots)}"
            )
        problem = chain_problem(certificates[0], chain, TrustBundle(self.context.trust_domain, roots))
        if problem is not None:
            raise ProviderRejectedError(NAME, f"{answered} with a chain that does not verify: {problem}")
        self._ignore_untrusted_cas(cr, cas, roots)
        return chain, roots

    def _first_root(
        self,
        answered: str,
        cr: JsonObj,
        certificates: list[x509.Certificate],
        cas: list[x509.Certificate],
        now: datetime,
    ) -> x509.Certificate:
        """The root to trust on first use: a valid self-signed CA of ``status.ca`` that the chain verifies to."""
        if not cas:
            raise TrustBundleError(NAME, self._no_bundle(f"CertificateRequest {name_of(cr)}"))
        for ca in cas:
            if root_problem(ca, now) is None:
                bundle = TrustBundle(self.context.trust_domain, (ca,))
                if chain_problem(certificates[0], chain_below(certificates, (ca,)), bundle) is None:
                    return ca
        offered = ", ".join(f"{c.subject.rfc4514_string()!r} sha256 {fingerprint_of(c)}" for c in cas)
        raise UntrustedRootError(
            NAME,
            f"{answered} with a chain that no root of its status.ca signs (status.ca: {offered}): nothing to trust "
            "on first use; refused, nothing trusted. Pin the issuer's root with trust_bundle_file, "
            "trust_bundle_secret or trust_bundle_configmap, or add it with `mesh-identity ca trust FILE`",
        )

    @staticmethod
    def _chain_to(top: x509.Certificate, certificates: list[x509.Certificate], cas: list[x509.Certificate]) -> str:
        """The root an untrusted chain leads to, as the answer itself shows it."""
        for cert in (*cas, *certificates[1:]):
            if is_ca(cert) and self_signed(cert) and issued_by(top, cert):
                return f"a chain to root {show(cert)}"
        return (
            f"a chain that ends at {top.subject.rfc4514_string()!r}, issued by {top.issuer.rfc4514_string()!r} "
            "(no root for it in the answer)"
        )

    def _not_trusted(self, roots: tuple[x509.Certificate, ...]) -> str:
        if self.bundles.pinned:
            return f"not in the pinned trust bundle ({self.bundles.describe()}): refused, nothing trusted"
        trusted = ", ".join(fingerprint_of(c) for c in roots)
        return (
            f"not one of the roots trusted in {self.bundles.path} (sha256 {trusted}): refused, nothing trusted. If "
            "the issuer's root really changed, check the new root out of band and add it with `mesh-identity ca "
            "trust FILE`"
        )

    def _ignore_untrusted_cas(
        self, cr: JsonObj, cas: list[x509.Certificate], roots: tuple[x509.Certificate, ...]
    ) -> None:
        """status.ca naming CAs that are not trusted changes nothing, but says something: warn once for each."""
        trusted = {fingerprint_of(r) for r in roots}
        with self._lock:
            fresh = [c for c in cas if fingerprint_of(c) not in trusted and fingerprint_of(c) not in self._ignored_cas]
            self._ignored_cas.update(fingerprint_of(c) for c in fresh)
        if fresh:
            log.warning(
                "%s: status.ca of CertificateRequest %s names %s, which is not trusted: ignored (the chain verified "
                "against %s)",
                NAME,
                name_of(cr),
                ", ".join(show(c) for c in fresh),
                self.bundles.describe(),
            )

    def _no_bundle(self, what: str) -> str:
        return (
            f"{what} was issued by {self.settings.issuer} with an empty status.ca, and no root is pinned or "
            "trusted yet: set trust_bundle_file, trust_bundle_secret or trust_bundle_configmap, or add the "
            "issuer's root with `mesh-identity ca trust FILE`"
        )

    def _probe(self) -> None:
        """Find the root to trust on first use with a throwaway request: a leaf for a discarded key, valid for an
        hour."""
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
        for condition in conditions(issuer, self.settings.issuer):
            if condition.type == "Ready" and condition.status == "False":
                return f"{self.settings.issuer} is not Ready: {text(condition.message or condition.reason)}"
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
            for cr in self.api.list_requests(self.namespace, selector):  # checked: CertificateRequests
                created = _timestamp(created_at(cr))
                phase = state_of(cr).phase
                abandoned = not phase.terminal and created is not None and now - created > 2 * self.settings.timeout
                if abandoned or (phase.terminal and not self.settings.keep_requests):
                    self.api.delete_request(self.namespace, *request_ref(cr))
        except ProviderError as err:
            log.warning("%s: could not clean up old CertificateRequests: %s", NAME, err)


def _timestamp(value: str) -> datetime | None:
    """An RFC 3339 timestamp (one without a zone is taken as UTC); None when it is none."""
    try:
        found = datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        return None
    return found if found.tzinfo is not None else found.replace(tzinfo=UTC)


def create(context: ProviderContext, options: Mapping[str, Any]) -> CertManagerProvider:
    return CertManagerProvider(context, options)


SPEC = ProviderSpec(
    name=NAME,
    description="cert-manager: each certificate is a CertificateRequest signed by an Issuer or ClusterIssuer",
    capabilities=CAPABILITIES,
    factory=create,
    options=OPTIONS,
)
