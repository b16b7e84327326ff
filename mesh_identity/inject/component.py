"""The injector as a part of ``serve`` (config ``inject``): the webhook's HTTPS server, its serving certificate
from the mesh CA, and the MutatingWebhookConfiguration that points the API server at it.

* **The serving certificate** (:class:`ServingCertificates`): a TLS server certificate for the webhook's names
  (``<service>.<namespace>.svc``, or the URL's host), with a key made here, signed by this replica's intermediate
  (:meth:`~mesh_identity.authority.Authority.issue_serving`), ``inject.cert_ttl`` long at most (never past the
  intermediate). It is written to ``<state_dir>/injector/tls.key`` (0600) and ``tls.crt`` (leaf and
  intermediates), each replaced atomically, and renewed at ``ca.rotate_after`` of its lifetime, and at once when
  the replica's intermediate changes (a root rotation retires the root the old one chains to). The server
  (:class:`~mesh_identity.inject.server.TlsFiles`) loads the new pair at the next handshake: no restart, no
  failed admission. A failed renewal is retried every :data:`RETRY` (logged); the old certificate serves
  meanwhile. The key never leaves the state directory: no Secret holds it.
* **The webhook configuration** (:class:`~mesh_identity.inject.webhookconfig.WebhookConfigurations`, when a
  Kubernetes client is given): kept equal to what the config describes, its ``caBundle`` the mesh's trust bundle
  (every root, so a root rotation's new root is trusted before any certificate chains to it); written by the
  leader only.
* **Metrics**: ``mesh_identity_injector_admissions_total{outcome}``, ``mesh_identity_injector_admission_seconds``
  and ``mesh_identity_injector_certificate_expiry_timestamp_seconds``.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Protocol

from cryptography.hazmat.primitives import serialization
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from mesh_identity.authority import Authority, ServingCertificate
from mesh_identity.clock import Clock, utcnow
from mesh_identity.errors import MeshIdentityError
from mesh_identity.files import ensure_private_dir, write_private
from mesh_identity.inject.review import Injector
from mesh_identity.inject.server import WebhookServer
from mesh_identity.rotation.source import BundleSource

log = logging.getLogger(__name__)

CERT_FILE = "tls.crt"
KEY_FILE = "tls.key"
RETRY = timedelta(seconds=10)
CHECK = timedelta(seconds=2)  # how often the renewer looks whether the intermediate changed
BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0)


class InjectorMetrics:
    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        r = self.registry
        self.admissions = Counter(
            "mesh_identity_injector_admissions", "Admission reviews answered, by outcome", ["outcome"], registry=r
        )
        self.latency = Histogram(
            "mesh_identity_injector_admission_seconds", "Time to answer an admission review", buckets=BUCKETS,
            registry=r,
        )  # fmt: skip
        self.expiry = Gauge(
            "mesh_identity_injector_certificate_expiry_timestamp_seconds",
            "NotAfter of the webhook's serving certificate (Unix time)",
            registry=r,
        )

    def observe(self, outcome: str, seconds: float) -> None:
        self.admissions.labels(outcome).inc()
        self.latency.observe(seconds)


class ServingCertificates:
    """The webhook's serving certificate files in ``directory``, kept issued and renewed (module docstring)."""

    def __init__(
        self,
        authority: Authority,
        names: Sequence[str],
        directory: Path,
        *,
        ttl: timedelta,
        rotate_after: float,
        clock: Clock = utcnow,
        on_issued: Callable[[ServingCertificate], None] | None = None,
    ) -> None:
        if not 0 < rotate_after < 1:
            raise ValueError(f"rotate_after: {rotate_after} is not in (0, 1)")
        self.authority = authority
        self.names = tuple(names)
        self.directory = directory
        self.ttl = ttl
        self.rotate_after = rotate_after
        self.clock = clock
        self.on_issued = on_issued
        self.current: ServingCertificate | None = None
        self._issued_at = datetime.min.replace(tzinfo=UTC)
        self.issued = 0  # certificates written
        self.last_error = ""
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    @property
    def cert_file(self) -> Path:
        return self.directory / CERT_FILE

    @property
    def key_file(self) -> Path:
        return self.directory / KEY_FILE

    def renew(self) -> ServingCertificate:
        """Issue a certificate and write both files (the key first; each file replaced atomically)."""
        issued_at = self.clock()
        served = self.authority.issue_serving(self.names, self.ttl)
        key = served.private_key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
        ensure_private_dir(self.directory)
        write_private(self.key_file, key)
        write_private(self.cert_file, served.chain_pem, 0o644)
        self.current, self._issued_at = served, issued_at
        self.issued += 1
        self.last_error = ""
        log.info(
            "injector: serving certificate for %s issued, valid until %s",
            ", ".join(self.names), served.leaf.not_valid_after_utc.isoformat(),
        )  # fmt: skip
        if self.on_issued is not None:
            self.on_issued(served)
        return served

    def due(self) -> bool:
        """Whether the certificate should be renewed now: none yet, past ``rotate_after`` of its life, or its
        issuer is no longer the authority's intermediate."""
        current = self.current
        if current is None:
            return True
        signing = self.authority.signing_ca
        if signing is not None and (not current.chain or current.chain[0] != signing.certificate):
            return True
        start, end = self._issued_at, current.leaf.not_valid_after_utc  # NotBefore is backdated for clock skew
        return self.clock() >= start + (end - start) * self.rotate_after

    def start(self) -> None:
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, name="injector-certificate", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        thread, self._thread = self._thread, None
        if thread is not None:
            thread.join()

    def _run(self) -> None:
        while not self._stop.is_set():
            wait = CHECK
            if self.due():
                try:
                    self.renew()
                except (MeshIdentityError, OSError) as err:
                    self.last_error = str(err)
                    log.error("injector: renewing the serving certificate failed (retrying in %s): %s", RETRY, err)
                    wait = RETRY
            self._stop.wait(wait.total_seconds())


class WebhookConfigurationsLike(Protocol):
    """What the component needs of :class:`~mesh_identity.inject.webhookconfig.WebhookConfigurations`."""

    def set_bundle(self, pem: str) -> None: ...

    def start(self) -> None: ...

    def stop(self) -> None: ...


class InjectorComponent:
    """A :class:`~mesh_identity.server.service.Service` component: certificate, then server, then the webhook
    configuration (``webhooks``: None when nothing reconciles it, e.g. outside a cluster), fed by ``bundles``."""

    def __init__(
        self,
        certificates: ServingCertificates,
        injector: Injector,
        *,
        host: str,
        port: int,
        bundles: BundleSource,
        webhooks: WebhookConfigurationsLike | None = None,
    ) -> None:
        self.certificates = certificates
        self.injector = injector
        self.host = host
        self.port = port
        self.webhooks = webhooks
        self.bundles = bundles
        self.server: WebhookServer | None = None
        self._unsubscribe: Callable[[], None] | None = None

    def start(self) -> None:
        self.certificates.renew()  # fail closed: no server without a certificate
        self.server = WebhookServer(
            self.injector, self.certificates.cert_file, self.certificates.key_file, host=self.host, port=self.port
        ).start()
        self.certificates.start()
        log.info("injector: admission webhook on https://%s:%d/mutate", *self.server.address)
        if self.webhooks is not None:
            webhooks = self.webhooks
            self._unsubscribe = self.bundles.subscribe(lambda bundle: webhooks.set_bundle(bundle.pem().decode()))
            current = self.bundles.current()
            if current is not None:
                webhooks.set_bundle(current.pem().decode())
            webhooks.start()

    def stop(self) -> None:
        if self._unsubscribe is not None:
            self._unsubscribe()
            self._unsubscribe = None
        if self.webhooks is not None:
            self.webhooks.stop()
        self.certificates.stop()
        if self.server is not None:
            self.server.stop()
            self.server = None
