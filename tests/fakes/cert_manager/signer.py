"""A thread that plays cert-manager (its approver and a CA issuer) against a
:class:`~tests.fakes.kube.server.KubeServer`, on which it installs cert-manager's CRDs.

It talks to the server only through the real ``kubernetes`` client, as its own user
(``system:serviceaccount:cert-manager:cert-manager``), and does what cert-manager's controllers do with a
``CertificateRequest`` (``cert-manager.io/v1``):

1. the approver adds ``Approved`` (reason ``cert-manager.io``) or, when told to deny, ``Denied``;
2. the issuer looks up ``spec.issuerRef`` (an ``Issuer`` in the request's namespace, or a ``ClusterIssuer``)
   in the API: when it is missing the request stays ``Ready=False`` reason ``Pending`` with cert-manager's
   message ``Referenced "Issuer" not found: issuer.cert-manager.io "<name>" not found``;
3. it reads the issuer's CA key pair from the Secret named by ``spec.ca.secretName`` and signs
   ``spec.request`` (:func:`~tests.fakes.cert_manager.issuer.sign`); then sets ``status.certificate`` (leaf
   plus any intermediate), ``status.ca`` (the root, or nothing for an issuer told to omit it, or a forged CA
   for an issuer told so by :meth:`CertManagerSigner.forge_status_ca`) and ``Ready=True`` reason ``Issued``;
4. ``Denied`` ends in ``Ready=False`` reason ``Denied``; a failure in ``Ready=False`` reason ``Failed`` with
   ``status.failureTime``; a stalled request stays ``Ready=False`` reason ``Pending``.

What happens to a request is :attr:`CertManagerSigner.behaviour` (or, per request, :attr:`decide`).
Status writes are PUTs to the ``/status`` subresource with the read ``resourceVersion``, retried on 409.
"""

from __future__ import annotations

import base64
import contextlib
import datetime as dt
import enum
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, cast

import kubernetes
import pytest
import urllib3
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from tests.fakes.cert_manager.crds import GROUP, VERSION, install_crds
from tests.fakes.cert_manager.issuer import sign
from tests.fakes.kube import JsonObj, KubeServer
from tests.pki import TestCa

SIGNER_TOKEN = "cert-manager-controller-token"
SIGNER_USER = "system:serviceaccount:cert-manager:cert-manager"
CLUSTER_RESOURCE_NAMESPACE = "cert-manager"
APPROVER = "cert-manager.io"
TERMINAL_REASONS = frozenset({"Issued", "Failed", "Denied"})


class Behaviour(enum.StrEnum):
    ISSUE = "issue"  # approve and sign
    DENY = "deny"  # an approver denies
    FAIL = "fail"  # approved, then the issuer fails terminally
    STALL = "stall"  # approved, then Pending for ever (an issuer that never answers)
    IGNORE = "ignore"  # nothing touches the request (cert-manager not running)


@dataclass
class IssuerSettings:
    """What the signer knows about one issuer besides its API objects."""

    omit_ca: bool = False  # leave status.ca empty (as ACME and several external issuers do)
    max_duration: dt.timedelta | None = None  # shorten longer requests, as a CA's policy may
    forged_ca: x509.Certificate | None = None  # status.ca holds this instead (someone who can write status)


@dataclass
class Outcome:
    namespace: str
    name: str
    reason: str  # Issued, Failed, Denied, Pending


# ---------------------------------------------------------------------------------------------- signer


@dataclass
class CertManagerSigner:
    server: KubeServer
    behaviour: Behaviour = Behaviour.ISSUE
    decide: Callable[[JsonObj], Behaviour] | None = None
    deny_message: str = "Denied by mesh-identity test policy"
    fail_message: str = "the issuing CA refused the request"
    outcomes: list[Outcome] = field(default_factory=list)
    _issuers: dict[tuple[str, str, str], IssuerSettings] = field(default_factory=dict)
    _ca_cache: dict[tuple[str, str, str], TestCa] = field(default_factory=dict)
    _stopped: threading.Event = field(default_factory=threading.Event)
    _changed: threading.Condition = field(default_factory=threading.Condition)
    _thread: threading.Thread | None = None
    _watch: Any = None  # kubernetes.watch.Watch: untyped
    _api: kubernetes.client.ApiClient | None = None

    def __post_init__(self) -> None:
        install_crds(self.server)
        self.server.tokens[SIGNER_TOKEN] = SIGNER_USER
        self._api = kubernetes.client.ApiClient(self.server.client_configuration(SIGNER_TOKEN))
        self.custom = kubernetes.client.CustomObjectsApi(self._api)
        self.core = kubernetes.client.CoreV1Api(self._api)

    # -- lifecycle
    def start(self) -> CertManagerSigner:
        self._thread = threading.Thread(target=self._run, name="cert-manager-signer", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stopped.set()
        for _ in range(200):  # a watch opened just after the flag was set must be stopped too
            if self._watch is not None:
                self._watch.stop()
            if self._thread is None:
                break
            self._thread.join(timeout=0.05)
            if not self._thread.is_alive():
                break
        if self._api is not None:
            cast(Any, self._api).close()

    def __enter__(self) -> CertManagerSigner:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- issuers
    def add_ca_issuer(
        self,
        name: str,
        ca: TestCa,
        *,
        namespace: str | None = None,
        omit_ca: bool = False,
        max_duration: dt.timedelta | None = None,
    ) -> None:
        """Create an ``Issuer`` (in ``namespace``) or ``ClusterIssuer`` (``namespace`` None) of type CA, and
        the Secret holding its key pair, through the API; then re-examine pending requests."""
        kind = "Issuer" if namespace else "ClusterIssuer"
        secret_namespace = namespace or CLUSTER_RESOURCE_NAMESPACE
        secret_name = f"{name}-ca-key-pair"
        chain_pem = b"".join(c.public_bytes(serialization.Encoding.PEM) for c in [ca.certificate, *ca.chain[1:]])
        self.core.create_namespaced_secret(
            secret_namespace,
            kubernetes.client.V1Secret(
                metadata=kubernetes.client.V1ObjectMeta(name=secret_name),
                type="kubernetes.io/tls",
                data={
                    "tls.crt": base64.b64encode(chain_pem).decode(),
                    "tls.key": base64.b64encode(ca.key_pem()).decode(),
                    "ca.crt": base64.b64encode(ca.root.pem()).decode(),
                },
            ),
        )
        body = {
            "apiVersion": f"{GROUP}/{VERSION}",
            "kind": kind,
            "metadata": {"name": name},
            "spec": {"ca": {"secretName": secret_name}},
        }
        if namespace:
            self.custom.create_namespaced_custom_object(GROUP, VERSION, namespace, "issuers", body)
        else:
            self.custom.create_cluster_custom_object(GROUP, VERSION, "clusterissuers", body)
        self._issuers[(kind, namespace or "", name)] = IssuerSettings(omit_ca, max_duration)
        self._ca_cache[(kind, namespace or "", name)] = ca
        self.resync()

    def replace_issuer_ca(self, name: str, ca: TestCa, *, namespace: str | None = None) -> None:
        """Give an existing CA issuer another key pair, as whoever controls the issuer (or can write its
        Secret) can: its Secret is patched through the API, and later requests are signed under ``ca``."""
        kind = "Issuer" if namespace else "ClusterIssuer"
        chain_pem = b"".join(c.public_bytes(serialization.Encoding.PEM) for c in [ca.certificate, *ca.chain[1:]])
        self.core.patch_namespaced_secret(
            f"{name}-ca-key-pair",
            namespace or CLUSTER_RESOURCE_NAMESPACE,
            {
                "data": {
                    "tls.crt": base64.b64encode(chain_pem).decode(),
                    "tls.key": base64.b64encode(ca.key_pem()).decode(),
                    "ca.crt": base64.b64encode(ca.root.pem()).decode(),
                }
            },
        )
        self._ca_cache[(kind, namespace or "", name)] = ca

    def forge_status_ca(self, name: str, forged: x509.Certificate | None, *, namespace: str | None = None) -> None:
        """From now on ``status.ca`` of the issuer's requests holds ``forged`` (None: the truth again), as
        anyone allowed to write CertificateRequest status could make it; ``status.certificate`` stays
        the issuer's."""
        key = ("Issuer" if namespace else "ClusterIssuer", namespace or "", name)
        settings = self._issuers.setdefault(key, IssuerSettings())
        settings.forged_ca = forged

    def resync(self) -> None:
        """Reconcile every unfinished request again (cert-manager re-syncs periodically)."""
        with contextlib.suppress(kubernetes.client.ApiException, urllib3.exceptions.HTTPError):
            listing = cast(JsonObj, self.custom.list_cluster_custom_object(GROUP, VERSION, "certificaterequests"))
            for item in listing["items"]:
                self._reconcile(item)

    # -- waiting (for tests)
    def wait_for_outcomes(self, count: int, timeout: float = 10.0) -> bool:
        with self._changed:
            return self._changed.wait_for(lambda: len(self.outcomes) >= count, timeout)

    def _record(self, cr: JsonObj, reason: str) -> None:
        with self._changed:
            self.outcomes.append(Outcome(cr["metadata"]["namespace"], cr["metadata"]["name"], reason))
            self._changed.notify_all()

    # -- the controller loop
    def _run(self) -> None:
        while not self._stopped.is_set():
            try:
                listing = cast(JsonObj, self.custom.list_cluster_custom_object(GROUP, VERSION, "certificaterequests"))
                for item in listing["items"]:
                    self._reconcile(item)
                self._watch = cast(Any, kubernetes.watch).Watch()
                for event in self._watch.stream(
                    self.custom.list_cluster_custom_object,
                    GROUP,
                    VERSION,
                    "certificaterequests",
                    resource_version=listing["metadata"]["resourceVersion"],
                    allow_watch_bookmarks=True,
                ):
                    if self._stopped.is_set():
                        break
                    if event["type"] in ("ADDED", "MODIFIED"):
                        self._reconcile(event["object"])
            except (kubernetes.client.ApiException, urllib3.exceptions.HTTPError, OSError, ValueError):
                self._stopped.wait(0.05)  # server down, 410 Expired twice, or stopping: list again

    def _reconcile(self, cr: JsonObj) -> None:
        for _ in range(5):
            try:
                self._step(cr)
                return
            except kubernetes.client.ApiException as err:
                if err.status != 409:
                    raise
                meta = cr["metadata"]
                try:
                    cr = cast(
                        JsonObj,
                        self.custom.get_namespaced_custom_object(
                            GROUP, VERSION, meta["namespace"], "certificaterequests", meta["name"]
                        ),
                    )
                except kubernetes.client.ApiException as gone:
                    if gone.status == 404:
                        return
                    raise

    def _step(self, cr: JsonObj) -> None:
        conditions = {c["type"]: c for c in (cr.get("status") or {}).get("conditions") or []}
        ready = conditions.get("Ready")
        if ready is not None and ready.get("reason") in TERMINAL_REASONS:
            return
        if cr["metadata"].get("deletionTimestamp"):
            return
        spec = cr.get("spec") or {}
        ref = spec.get("issuerRef") or {}
        if ref.get("group", GROUP) not in ("", GROUP):
            return  # an external issuer's request: not ours
        behaviour = self.decide(cr) if self.decide else self.behaviour
        if behaviour is Behaviour.IGNORE:
            return
        if "Approved" not in conditions and "Denied" not in conditions:
            if behaviour is Behaviour.DENY:
                self._set(cr, "Denied", "True", APPROVER, self.deny_message)
            else:
                self._set(cr, "Approved", "True", APPROVER, "Certificate request has been approved by cert-manager.io")
            return  # the MODIFIED event brings the request back for the next step
        if "Denied" in conditions:
            self._set(
                cr,
                "Ready",
                "False",
                "Denied",
                "The CertificateRequest was denied by an approval controller",
                failed=True,
            )
            self._record(cr, "Denied")
            return
        kind = ref.get("kind") or "Issuer"
        namespace = cr["metadata"]["namespace"] if kind == "Issuer" else ""
        issuer_name = ref.get("name", "")
        try:
            issuer = self._get_issuer(kind, namespace, issuer_name)
        except kubernetes.client.ApiException as err:
            if err.status != 404:
                raise
            message = f'Referenced "{kind}" not found: {kind.lower()}.{GROUP} "{issuer_name}" not found'
            if ready is None or ready.get("message") != message:
                self._set(cr, "Ready", "False", "Pending", message)
                self._record(cr, "Pending")
            return
        if behaviour is Behaviour.STALL:
            message = "Waiting on certificate issuance from the issuer"
            if ready is None or ready.get("message") != message:
                self._set(cr, "Ready", "False", "Pending", message)
                self._record(cr, "Pending")
            return
        if behaviour is Behaviour.FAIL:
            self._set(cr, "Ready", "False", "Failed", f"Failed to sign certificate: {self.fail_message}", failed=True)
            self._record(cr, "Failed")
            return
        settings = self._issuers.get((kind, namespace, issuer_name), IssuerSettings())
        try:
            ca = self._issuer_ca(kind, namespace, issuer_name, issuer)
            leaf = sign(spec, ca, settings.max_duration)
        except ValueError as err:
            self._set(cr, "Ready", "False", "Failed", f"Failed to sign certificate: {err}", failed=True)
            self._record(cr, "Failed")
            return
        certificate_pem = b"".join(c.public_bytes(serialization.Encoding.PEM) for c in [leaf, *ca.chain])
        status_update: JsonObj = {"certificate": base64.b64encode(certificate_pem).decode()}
        if settings.forged_ca is not None:
            status_update["ca"] = base64.b64encode(settings.forged_ca.public_bytes(serialization.Encoding.PEM)).decode()
        elif not settings.omit_ca:
            status_update["ca"] = base64.b64encode(ca.root.pem()).decode()
        self._set(cr, "Ready", "True", "Issued", "Certificate fetched from issuer successfully", status_update)
        self._record(cr, "Issued")

    def _get_issuer(self, kind: str, namespace: str, name: str) -> JsonObj:
        if kind == "Issuer":
            return cast(JsonObj, self.custom.get_namespaced_custom_object(GROUP, VERSION, namespace, "issuers", name))
        return cast(JsonObj, self.custom.get_cluster_custom_object(GROUP, VERSION, "clusterissuers", name))

    def _issuer_ca(self, kind: str, namespace: str, name: str, issuer: JsonObj) -> TestCa:
        cached = self._ca_cache.get((kind, namespace, name))
        if cached is not None:
            return cached
        secret_name = ((issuer.get("spec") or {}).get("ca") or {}).get("secretName", "")
        secret = self.core.read_namespaced_secret(secret_name, namespace or CLUSTER_RESOURCE_NAMESPACE)
        data = secret.data or {}
        certs = x509.load_pem_x509_certificates(base64.b64decode(data["tls.crt"]))
        key = serialization.load_pem_private_key(base64.b64decode(data["tls.key"]), None)
        if not isinstance(key, ec.EllipticCurvePrivateKey):
            raise ValueError(f"CA key in secret {secret_name!r} is not an EC key")
        root = x509.load_pem_x509_certificate(base64.b64decode(data["ca.crt"]))
        parent = TestCa(root, key) if certs[0] != root else None  # the root's key is not needed to sign
        ca = TestCa(certs[0], key, parent)
        self._ca_cache[(kind, namespace, name)] = ca
        return ca

    def _set(
        self,
        cr: JsonObj,
        type_: str,
        status: str,
        reason: str,
        message: str,
        extra: JsonObj | None = None,
        *,
        failed: bool = False,
    ) -> None:
        now = dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
        body: JsonObj = {
            "apiVersion": cr["apiVersion"],
            "kind": cr["kind"],
            "metadata": cr["metadata"],
            "spec": cr.get("spec"),
            "status": dict(cr.get("status") or {}),
        }
        conditions = [c for c in body["status"].get("conditions") or [] if c.get("type") != type_]
        conditions.append(
            {"type": type_, "status": status, "reason": reason, "message": message, "lastTransitionTime": now}
        )
        body["status"]["conditions"] = conditions
        body["status"].update(extra or {})
        if failed:
            body["status"].setdefault("failureTime", now)
        meta = cr["metadata"]
        self.custom.replace_namespaced_custom_object_status(
            GROUP, VERSION, meta["namespace"], "certificaterequests", meta["name"], body
        )


# ---------------------------------------------------------------------------------------------- fixtures


@pytest.fixture
def cert_manager_signer(kube_server: KubeServer) -> Iterator[CertManagerSigner]:
    """A running :class:`CertManagerSigner` on :func:`kube_server` (add issuers with ``add_ca_issuer``)."""
    with CertManagerSigner(kube_server) as signer:
        yield signer
