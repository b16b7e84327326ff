"""The injector's MutatingWebhookConfiguration (``admissionregistration.k8s.io/v1``), kept present and current.

:func:`desired_configuration` is the object: one webhook, ``inject.mesh-identity.io``, called on the CREATE of
a v1 Pod in a namespace labelled ``mesh-identity.io/monitored-by=<mesh name>``, at a :class:`WebhookTarget` (the
injector's Service, or a URL) whose serving certificate the ``caBundle`` verifies. It has no side effect
(``sideEffects: None``: the API server sends it dryRun requests too), and every field the API server would
default is written out, so the stored object reads back as it was written.

:class:`WebhookConfigurations` writes it, as :class:`~mesh_identity.registry.kube.bundles.BundleConfigMaps`
writes the trust-bundle ConfigMaps: it is told the serving CA (:meth:`~WebhookConfigurations.set_bundle`, which
makes the desired object at once: a bad PEM is the caller's ValueError), and its thread then reads the object
and

* creates it when it is missing (404);
* replaces it, fenced by the resourceVersion it read (a 409 is dropped and the object read again), when it is
  ours (label ``app.kubernetes.io/managed-by: mesh-identity``) but differs in what we own: the ``webhooks``
  list, or our two labels (any other label, annotation or owner of the object is kept);
* leaves it alone when it is not ours (no managed-by label, or another mesh's ``mesh-identity.io/mesh``):
  logged once, and the reason kept in :attr:`~WebhookConfigurations.refusal` for status.

A second thread watches that one object (``fieldSelector=metadata.name=<name>``, resumed from the last
resourceVersion seen, listed again after a 410) so that an edit or a delete is repaired within moments; every
``resync_period`` (default: ``retry_period``) the object is read again anyway, in case the watch missed
something, and a failed pass is retried after ``retry_period``. Both threads work only while ``is_leader()``,
which is asked again before every write. Nothing is deleted: removing the configuration (uninstalling) is the
operator's.

What the writer did is counted (:attr:`~WebhookConfigurations.created`, ``replaced``, ``conflicts``,
``last_error``, :meth:`~WebhookConfigurations.status`) for tests and status. Logs name the fields that drifted,
never their values.
"""

from __future__ import annotations

import base64
import copy
import logging
import random
import re
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

from cryptography import x509

from mesh_identity.registry.kube.bundles import MESH
from mesh_identity.registry.kube.client import KubeClient, WatchStream
from mesh_identity.registry.kube.errors import KubeApiError, KubeConflictError, KubeExpiredError
from mesh_identity.registry.kube.lease import MANAGED_BY, MANAGER
from mesh_identity.registry.kube.objects import JsonObj, field, labels, text
from mesh_identity.registry.kube.resources import MONITORED_BY, MUTATING_WEBHOOK_CONFIGURATIONS
from mesh_identity.registry.kube.watch import Backoff

log = logging.getLogger(__name__)

NAME = "mesh-identity-injector"
"""The configuration's default name (``deploy/rbac.yaml`` grants its reads and writes by this name)."""
WEBHOOK = "inject.mesh-identity.io"
API_VERSION = "admissionregistration.k8s.io/v1"
KIND = "MutatingWebhookConfiguration"
FAILURE_POLICIES = ("Fail", "Ignore")
TIMEOUT_RANGE = (1, 30)
STREAM_SECONDS = (300, 600)
"""How long each watch stream lasts (random in this range): the server ends it, the next resumes."""

_DNS_LABEL = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?")
_DNS_1035_LABEL = re.compile(r"[a-z]([-a-z0-9]*[a-z0-9])?")
_DNS_SUBDOMAIN = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*")
_LABEL_VALUE = re.compile(r"[A-Za-z0-9]([-A-Za-z0-9_.]*[A-Za-z0-9])?")
_PEM_LABEL = re.compile(rb"-----BEGIN ([^-\r\n]+)-----")


# ------------------------------------------------------------------------------------------ the object


@dataclass(frozen=True, slots=True)
class WebhookTarget:
    """Where the API server calls the webhook: the Service ``namespace/name`` (``port``, ``path``; the serving
    certificate must name ``<name>.<namespace>.svc``), or ``url`` (https, no user, query or fragment), not both.
    ValueError naming the field otherwise."""

    namespace: str = ""
    name: str = ""
    port: int = 443
    path: str = "/mutate"
    url: str = ""

    def __post_init__(self) -> None:
        if self.url:
            if self.namespace or self.name:
                raise ValueError("WebhookTarget: give either url or a Service (namespace and name), not both")
            if self.port != 443 or self.path != "/mutate":
                raise ValueError("WebhookTarget: port and path belong to a Service target; a url carries its own")
            _check_url(self.url)
            return
        if not self.namespace and not self.name:
            raise ValueError("WebhookTarget: give a url or a Service (namespace and name)")
        if len(self.namespace) > 63 or not _DNS_LABEL.fullmatch(self.namespace):
            raise ValueError(f"WebhookTarget.namespace: {self.namespace!r} is not a namespace name (a DNS label)")
        if len(self.name) > 63 or not _DNS_1035_LABEL.fullmatch(self.name):
            raise ValueError(f"WebhookTarget.name: {self.name!r} is not a Service name (a DNS-1035 label)")
        if isinstance(self.port, bool) or not isinstance(self.port, int) or not 1 <= self.port <= 65535:
            raise ValueError(f"WebhookTarget.port: {self.port!r} is not a port (1 to 65535)")
        _check_path(self.path)

    def client_config(self, ca_bundle: str) -> JsonObj:
        """The webhook's ``clientConfig``, with ``ca_bundle`` (base64 of the PEM)."""
        if self.url:
            return {"url": self.url, "caBundle": ca_bundle}
        service = {"namespace": self.namespace, "name": self.name, "path": self.path, "port": self.port}
        return {"service": service, "caBundle": ca_bundle}


def _check_path(path: str) -> None:
    if not isinstance(path, str) or not path.startswith("/"):
        raise ValueError(f"WebhookTarget.path: {path!r} does not start with /")
    if any(c in path for c in "?# \t\r\n") or "//" in path:
        raise ValueError(f"WebhookTarget.path: {path!r} is not a plain URL path (no query, fragment, space or //)")


def _check_url(url: str) -> None:
    parts = urlsplit(url)
    if parts.scheme != "https":
        raise ValueError(f"WebhookTarget.url: {url!r} is not an https URL (the API server calls webhooks over TLS)")
    try:
        parts.port  # noqa: B018 (a port that is not a number raises)
    except ValueError as err:
        raise ValueError(f"WebhookTarget.url: {url!r}: {err}") from None
    if not parts.hostname:
        raise ValueError(f"WebhookTarget.url: {url!r} has no host")
    if parts.username is not None or parts.password is not None:
        raise ValueError("WebhookTarget.url: a user or password in the URL is not allowed")
    if parts.query or parts.fragment or url.endswith(("?", "#")):
        raise ValueError(f"WebhookTarget.url: {url!r}: a query or fragment is not allowed")


def ca_bundle(pem: str | bytes) -> str:
    """``caBundle``: base64 of ``pem``, which must hold certificates (at least one) and nothing else, since the
    configuration is readable cluster-wide. ValueError naming ``ca_bundle_pem`` otherwise (never its content)."""
    data = pem.encode() if isinstance(pem, str) else bytes(pem)
    others = sorted({m.decode(errors="replace") for m in _PEM_LABEL.findall(data)} - {"CERTIFICATE"})
    if others:
        raise ValueError(
            f"ca_bundle_pem: holds PEM blocks other than certificates ({', '.join(others)}): only the CA's "
            "certificates may be published in the webhook configuration"
        )
    try:
        certificates = x509.load_pem_x509_certificates(data)
    except ValueError as err:
        raise ValueError(f"ca_bundle_pem: not a PEM certificate: {err}") from None
    if not certificates:
        raise ValueError("ca_bundle_pem: holds no certificate")
    return base64.b64encode(data).decode()


def desired_configuration(
    name: str,
    mesh_name: str,
    target: WebhookTarget,
    ca_bundle_pem: str | bytes,
    *,
    failure_policy: str = "Fail",
    timeout_seconds: int = 10,
) -> JsonObj:
    """The MutatingWebhookConfiguration ``name`` of the injector of ``mesh_name`` (see the module docstring);
    ValueError naming the argument that is wrong."""
    if not isinstance(name, str) or len(name) > 253 or not _DNS_SUBDOMAIN.fullmatch(name):
        raise ValueError(f"name: {name!r} is not an object name (a DNS subdomain)")
    if not isinstance(mesh_name, str) or len(mesh_name) > 63 or not _LABEL_VALUE.fullmatch(mesh_name):
        raise ValueError(f"mesh_name: {mesh_name!r} is not a label value (63 characters at most: A-Z a-z 0-9 - _ .)")
    if not isinstance(target, WebhookTarget):
        raise ValueError(f"target: {type(target).__name__} is not a WebhookTarget")
    if failure_policy not in FAILURE_POLICIES:
        raise ValueError(f"failure_policy: {failure_policy!r} is not one of {', '.join(FAILURE_POLICIES)}")
    low, high = TIMEOUT_RANGE
    if isinstance(timeout_seconds, bool) or not isinstance(timeout_seconds, int) or not low <= timeout_seconds <= high:
        raise ValueError(f"timeout_seconds: {timeout_seconds!r} is not a whole number of seconds from {low} to {high}")
    webhook: JsonObj = {
        "name": WEBHOOK,
        "admissionReviewVersions": ["v1"],
        "clientConfig": target.client_config(ca_bundle(ca_bundle_pem)),
        "rules": [
            {
                "operations": ["CREATE"],
                "apiGroups": [""],
                "apiVersions": ["v1"],
                "resources": ["pods"],
                "scope": "Namespaced",
            }
        ],
        "namespaceSelector": {"matchLabels": {MONITORED_BY: mesh_name}},
        "objectSelector": {},
        "sideEffects": "None",
        "failurePolicy": failure_policy,
        "matchPolicy": "Equivalent",
        "reinvocationPolicy": "Never",
        "timeoutSeconds": timeout_seconds,
    }
    return {
        "apiVersion": API_VERSION,
        "kind": KIND,
        "metadata": {"name": name, "labels": {MANAGED_BY: MANAGER, MESH: mesh_name}},
        "webhooks": [webhook],
    }


def defaulted(webhooks: Any) -> Any:
    """``webhooks`` with the API server's defaults filled in (as it stores them), for comparing: a configuration
    someone wrote without a defaulted field is the same as ours with the default written out."""
    if not isinstance(webhooks, list):
        return webhooks
    found = copy.deepcopy(webhooks)
    for webhook in found:
        if not isinstance(webhook, dict):
            continue
        for key, value in (
            ("failurePolicy", "Fail"),
            ("matchPolicy", "Equivalent"),
            ("namespaceSelector", {}),
            ("objectSelector", {}),
            ("timeoutSeconds", 10),
            ("reinvocationPolicy", "Never"),
        ):
            webhook.setdefault(key, value)
        for rule in webhook.get("rules") or []:
            if isinstance(rule, dict):
                rule.setdefault("scope", "*")
        service = field(webhook, "clientConfig", "service")
        if isinstance(service, dict):
            service.setdefault("port", 443)
    return found


def drift(current: JsonObj, desired: JsonObj) -> list[str]:
    """What of ``desired`` (our labels, the webhooks) ``current`` does not have, as field paths (no values)."""
    found: list[str] = []
    have = labels(current)
    found += [f"metadata.labels[{k}]" for k, v in labels(desired).items() if have.get(k) != v]
    webhooks, wanted = defaulted(current.get("webhooks")), desired.get("webhooks") or []
    if webhooks == wanted:
        return found
    if not isinstance(webhooks, list) or len(webhooks) != len(wanted):
        count = len(webhooks) if isinstance(webhooks, list) else 0
        return [*found, f"webhooks ({count} webhooks, not {len(wanted)})"]
    for i, (found_webhook, want) in enumerate(zip(webhooks, wanted, strict=True)):
        webhook = found_webhook if isinstance(found_webhook, dict) else {}
        for key in sorted(set(webhook) | set(want)):
            if webhook.get(key) == want.get(key):
                continue
            inner, inner_want = webhook.get(key), want.get(key)
            if isinstance(inner, dict) and isinstance(inner_want, dict):
                found += [
                    f"webhooks[{i}].{key}.{k}"
                    for k in sorted(set(inner) | set(inner_want))
                    if inner.get(k) != inner_want.get(k)
                ]
            else:
                found.append(f"webhooks[{i}].{key}")
    return found


# ------------------------------------------------------------------------------------------ the writer


@dataclass(frozen=True, slots=True)
class WebhookConfigStatus:
    """What :class:`WebhookConfigurations` knows now (for status pages and tests)."""

    name: str
    in_sync: bool  # the last pass (while this replica led) found or made the object as desired
    created: int
    replaced: int
    conflicts: int
    last_error: str  # the last pass's failure ("" when it succeeded)
    refusal: str  # why an object of that name is left alone ("" when it is ours or missing)
    watching: bool  # a watch stream is open


@dataclass(frozen=True, slots=True)
class _Rendition:
    """Our last write, and its ``webhooks`` as the server answered (defaults it knows that we do not)."""

    sent: Any
    stored: Any


class WebhookConfigurations:
    """See the module docstring. ``make(pem)`` is the desired object for a serving CA (its ValueError reaches
    the caller of :meth:`set_bundle`); ``is_leader`` is asked before every write."""

    def __init__(
        self,
        client: KubeClient,
        name: str,
        make: Callable[[str], JsonObj],
        *,
        retry_period: float = 2.0,
        is_leader: Callable[[], bool] = lambda: True,
        resync_period: float | None = None,
        stream_seconds: tuple[int, int] = STREAM_SECONDS,
    ) -> None:
        if retry_period <= 0 or (resync_period is not None and resync_period <= 0):
            raise ValueError("retry_period and resync_period must be positive")
        self.client = client
        self.name = name
        self.make = make
        self.retry_period = retry_period
        self.resync_period = retry_period if resync_period is None else resync_period
        self.is_leader = is_leader
        self.stream_seconds = stream_seconds
        self._backoff = Backoff(first=min(0.5, retry_period), cap=max(30.0, retry_period))
        self._rng = random.Random()  # noqa: S311 (jitter, not secrets)
        self._cond = threading.Condition()
        self._pass_lock = threading.Lock()
        self._stopped = threading.Event()
        self._desired: JsonObj | None = None
        self._dirty = True
        self._threads: list[threading.Thread] = []
        self._stream: WatchStream | None = None
        self._rendition: _Rendition | None = None
        self._written_version = ""
        self.passes = 0
        self.created = 0
        self.replaced = 0
        self.conflicts = 0  # writes refused with 409: another writer got there first (read again)
        self.events = 0  # watch events that woke the writer
        self.streams = 0  # watch streams opened
        self.in_sync = False
        self.last_error = ""
        self.refusal = ""
        self.watch_error = ""

    # -- inputs (any thread)
    def set_bundle(self, pem: str) -> None:
        """The serving CA's PEM: the desired object is made now (ValueError when it cannot be), written by the
        thread."""
        desired = copy.deepcopy(self.make(pem))
        named = text(desired, "metadata", "name")
        if named != self.name:
            raise ValueError(f"the desired configuration is named {named!r}, not {self.name!r}")
        if not isinstance(desired.get("webhooks"), list):
            raise ValueError("the desired configuration has no webhooks list")
        with self._cond:
            if desired != self._desired:
                self._desired, self._dirty = desired, True
                self._cond.notify_all()

    def desired(self) -> JsonObj | None:
        with self._cond:
            return copy.deepcopy(self._desired)

    def status(self) -> WebhookConfigStatus:
        with self._cond:
            watching = self._stream is not None
        return WebhookConfigStatus(
            self.name,
            self.in_sync,
            self.created,
            self.replaced,
            self.conflicts,
            self.last_error,
            self.refusal,
            watching,
        )

    # -- lifecycle
    def start(self) -> None:
        if self._threads:
            return
        self._stopped.clear()
        with self._cond:
            self._dirty = True
        self._threads = [
            threading.Thread(target=self._run, name="webhook-config", daemon=True),
            threading.Thread(target=self._watch, name="webhook-config-watch", daemon=True),
        ]
        for thread in self._threads:
            thread.start()

    def stop(self, wait: float = 5.0) -> None:
        """End both threads; waits at most ``wait`` seconds (plus a call's timeout) for them."""
        self._stopped.set()
        with self._cond:
            self._cond.notify_all()
        threads, self._threads = self._threads, []
        deadline = time.monotonic() + wait + self.client.timeout
        for thread in threads:
            while thread.is_alive() and time.monotonic() < deadline:
                with self._cond:
                    stream = self._stream
                if stream is not None:
                    stream.stop()
                thread.join(timeout=0.05)
            if thread.is_alive():
                log.warning("webhook configuration %s: thread %s did not end in time", self.name, thread.name)

    def _poke(self) -> None:
        with self._cond:
            self._dirty = True
            self._cond.notify_all()

    def _run(self) -> None:
        """The writer: a pass when woken (a new bundle, a watch event), every resync period, and after a failed
        pass every retry period."""
        done = True
        while not self._stopped.is_set():
            with self._cond:
                period = self.resync_period if done else self.retry_period
                self._cond.wait_for(lambda: self._dirty or self._stopped.is_set(), period)
                if self._stopped.is_set():
                    return
                self._dirty = False
            try:
                done = self.sync()
            except Exception:  # a bug: logged, and retried after a retry period
                log.exception("webhook configuration %s: a pass failed", self.name)
                done = False

    def _watch(self) -> None:
        """The watch of the one object: any change (by anyone but this writer) wakes the writer."""
        version, failures = "", 0
        while not self._stopped.is_set():
            if not self.is_leader():
                version = ""  # listed again once this replica leads
                self._stopped.wait(self.retry_period)
                continue
            try:
                if not version:
                    version = self.client.list_webhook_configuration(self.name).resource_version
                    self._poke()  # whatever happened while no stream was open
                stream = self.client.watch_webhook_configuration(
                    self.name, version, self._rng.randint(*self.stream_seconds)
                )
                with self._cond:
                    self._stream = stream
                self.streams += 1
                if self.watch_error:
                    log.info("webhook configuration %s: the watch runs again", self.name)
                    self.watch_error = ""
                if self._stopped.is_set():
                    break
                began = time.monotonic()
                for event in stream.events():
                    version = event.resource_version or version
                    failures = 0
                    mine = event.type != "DELETED" and event.resource_version == self._written_version
                    if event.type != "BOOKMARK" and not mine:  # this writer's own write needs no pass
                        self.events += 1
                        self._poke()
                    if self._stopped.is_set() or not self.is_leader():
                        break
                if time.monotonic() - began < 1.0:  # a stream the server ended at once: no busy loop
                    self._stopped.wait(self._backoff.delay(failures, self._rng))
                    failures += 1
            except KubeExpiredError as err:
                log.info("webhook configuration %s: the watch must list again: %s", self.name, err)
                version = ""
            except KubeApiError as err:
                if self._stopped.is_set():
                    break
                level = logging.DEBUG if str(err) == self.watch_error else logging.WARNING
                log.log(level, "webhook configuration %s: the watch failed (retried with backoff): %s", self.name, err)
                self.watch_error = str(err)
                self._stopped.wait(self._backoff.delay(failures, self._rng))
                failures += 1
            except Exception:  # a bug: the watch goes on from a fresh list
                if self._stopped.is_set():
                    break
                log.exception("webhook configuration %s: the watch failed; listing again", self.name)
                version = ""
                self._stopped.wait(self._backoff.delay(failures, self._rng))
                failures += 1
            finally:
                with self._cond:
                    opened, self._stream = self._stream, None
                if opened is not None:
                    opened.close()

    # -- one pass
    def sync(self) -> bool:
        """Read the object and write it when it is missing or drifted; True when nothing is left to retry."""
        with self._pass_lock:
            return self._sync()

    def _sync(self) -> bool:
        with self._cond:
            desired = self._desired
        self.passes += 1
        if desired is None or not self.is_leader():
            return True  # nothing to write yet (set_bundle wakes the thread), or not ours to write
        try:
            current = self.client.read(MUTATING_WEBHOOK_CONFIGURATIONS, "", self.name)
            if current is None:
                return self._create(desired)
            refusal = self._foreign(current, desired)
            if refusal:
                self._refuse(refusal)
                return True
            self.refusal = ""
            changed = [] if self._matches(current, desired) else drift(current, desired)
            if not changed:
                self._settled()
                return True
            return self._replace(current, desired, changed)
        except KubeConflictError as err:
            self.conflicts += 1
            self.in_sync, self.last_error = False, str(err)
            log.warning(
                "webhook configuration %s: write dropped, it changed since it was read (read again): %s",
                self.name,
                err,
            )
            return False
        except KubeApiError as err:
            level = logging.DEBUG if str(err) == self.last_error else logging.WARNING
            self.in_sync, self.last_error = False, str(err)
            log.log(level, "webhook configuration %s: cannot reconcile it (retried): %s", self.name, err)
            return False

    def _matches(self, current: JsonObj, desired: JsonObj) -> bool:
        """``current`` holds what we own as ``desired`` has it (or as the server stored our last write of it)."""
        have = labels(current)
        if any(have.get(k) != v for k, v in labels(desired).items()):
            return False
        webhooks, wanted = current.get("webhooks"), desired["webhooks"]
        if webhooks == wanted or defaulted(webhooks) == wanted:
            return True
        rendition = self._rendition
        return rendition is not None and rendition.sent == wanted and rendition.stored == webhooks

    @staticmethod
    def _foreign(current: JsonObj, desired: JsonObj) -> str:
        """Why ``current`` is not ours to change ("" when it is)."""
        have, want = labels(current), labels(desired)
        name = text(current, "metadata", "name")
        if have.get(MANAGED_BY) != MANAGER:
            return (
                f"the MutatingWebhookConfiguration {name} exists without the label {MANAGED_BY}={MANAGER}: it is not "
                "ours and is left alone (delete it, or give the injector another configuration name, to let the "
                "control plane write it)"
            )
        if MESH in have and have[MESH] != want.get(MESH):
            return (
                f"the MutatingWebhookConfiguration {name} belongs to the mesh {have[MESH]!r}, not "
                f"{want.get(MESH)!r}: it is left alone (give each mesh's injector its own configuration name)"
            )
        return ""

    def _create(self, desired: JsonObj) -> bool:
        if not self.is_leader():
            return False
        self.refusal = ""
        written = self.client.create(MUTATING_WEBHOOK_CONFIGURATIONS, "", copy.deepcopy(desired))
        self._wrote(desired, written)
        self.created += 1
        log.info("webhook configuration %s created", self.name)
        return True

    def _replace(self, current: JsonObj, desired: JsonObj, changed: list[str]) -> bool:
        if not self.is_leader():
            return False
        metadata = {k: copy.deepcopy(v) for k, v in (current.get("metadata") or {}).items() if k != "managedFields"}
        metadata["labels"] = {**labels(current), **labels(desired)}
        body: JsonObj = {k: copy.deepcopy(v) for k, v in current.items() if k not in ("metadata", "webhooks")}
        body.update(apiVersion=API_VERSION, kind=KIND, metadata=metadata, webhooks=copy.deepcopy(desired["webhooks"]))
        rendition = self._rendition
        updated = rendition is not None and rendition.sent != desired["webhooks"]
        written = self.client.replace(MUTATING_WEBHOOK_CONFIGURATIONS, "", body)
        self._wrote(desired, written)
        self.replaced += 1
        if updated:  # the bundle (or the settings) changed since our last write
            log.info("webhook configuration %s updated: %s", self.name, ", ".join(changed))
        else:  # someone else changed it (or an earlier version of the control plane wrote it)
            log.warning("webhook configuration %s restored: %s differed", self.name, ", ".join(changed))
        return True

    def _wrote(self, desired: JsonObj, written: JsonObj) -> None:
        self._written_version = text(written, "metadata", "resourceVersion")
        self._rendition = _Rendition(copy.deepcopy(desired["webhooks"]), copy.deepcopy(written.get("webhooks")))
        self._settled()

    def _settled(self) -> None:
        if self.last_error:
            log.info("webhook configuration %s: reconciled again", self.name)
        self.in_sync, self.last_error = True, ""

    def _refuse(self, refusal: str) -> None:
        self.in_sync = False
        if refusal != self.refusal:
            self.refusal = refusal
            log.error("webhook configuration %s: %s", self.name, refusal)
