"""The provider's connection to the Kubernetes API.

:func:`connect` builds a ``kubernetes`` client from the pod's service account or a kubeconfig file;
:class:`KubeApi` makes the few calls the provider needs (CertificateRequests, issuers, Secrets, ConfigMaps, a
watch), times them, and turns every ``kubernetes``/``urllib3`` exception into one of
:mod:`providers.cert_manager.errors` with ``raise ... from``. Nothing outside this module sees a client object
or an untyped exception.
"""

from __future__ import annotations

import base64
import json
import math
import os
import re
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar, cast

import kubernetes
import urllib3
from kubernetes.client import ApiException
from kubernetes.config.config_exception import ConfigException
from kubernetes.config.incluster_config import InClusterConfigLoader

from mesh_identity.errors import ConfigError, ProviderError
from providers.cert_manager.errors import (
    KubeForbiddenError,
    KubeInvalidError,
    KubeNotFoundError,
    KubeServerError,
    KubeTlsError,
    KubeUnauthorizedError,
    KubeUnreachableError,
)
from providers.cert_manager.options import CERT_MANAGER_GROUP, PREFIX, ObjectRef, Settings

NAME = "cert-manager"
VERSION = "v1"
REQUESTS = "certificaterequests"
JsonObj = dict[str, Any]
T = TypeVar("T")


@dataclass(frozen=True, slots=True)
class Connection:
    """A configured client, the server it talks to, and the namespace to work in."""

    api: kubernetes.client.ApiClient
    host: str
    namespace: str
    source: str  # how it was configured, for messages: "in-cluster service account" or the kubeconfig


def connect(settings: Settings, environ: Mapping[str, str] | None = None) -> Connection:
    """Configure a client: in-cluster when asked (or when in a pod and no kubeconfig is given), else kubeconfig.

    ConfigError (naming the option) when the service account or kubeconfig cannot be used; nothing here
    contacts the API server.
    """
    env = os.environ if environ is None else environ
    config = kubernetes.client.Configuration()
    kube_config = cast(Any, kubernetes.config)  # untyped
    in_cluster = settings.in_cluster or (
        settings.kubeconfig is None and settings.context is None and "KUBERNETES_SERVICE_HOST" in env
    )
    default_namespace: str | None = None
    if in_cluster:
        directory = settings.service_account_dir
        loader = cast(Any, InClusterConfigLoader)(
            token_filename=str(directory / "token"), cert_filename=str(directory / "ca.crt"), environ=env
        )
        try:
            loader.load_and_set(config)
        except ConfigException as err:
            raise ConfigError(
                f"{PREFIX}.in_cluster: cannot use the pod's service account in {directory}: {err}"
            ) from None
        namespace_file = directory / "namespace"
        if namespace_file.is_file():
            default_namespace = namespace_file.read_text().strip() or None
        source = f"the in-cluster service account ({directory})"
    else:
        files = str(settings.kubeconfig) if settings.kubeconfig else env.get("KUBECONFIG") or "~/.kube/config"
        key = f"{PREFIX}.kubeconfig"
        paths = [Path(p).expanduser() for p in files.split(os.pathsep) if p]
        if not any(p.is_file() for p in paths):
            hint = "" if "KUBERNETES_SERVICE_HOST" in env else " (and not in a pod: KUBERNETES_SERVICE_HOST is unset)"
            raise ConfigError(f"{key}: no kubeconfig file at {files}{hint}")
        try:
            contexts, current = kube_config.list_kube_config_contexts(config_file=files)
        except (ConfigException, ValueError, OSError) as err:
            raise ConfigError(f"{key}: {files} is not a usable kubeconfig: {err}") from None
        names = [c["name"] for c in contexts]
        if settings.context is not None and settings.context not in names:
            raise ConfigError(
                f"{PREFIX}.context: no context {settings.context!r} in {files} (it has: {', '.join(names)})"
            )
        chosen = next(c for c in contexts if c["name"] == settings.context) if settings.context else current
        try:
            kube_config.load_kube_config(
                config_file=files, context=settings.context, client_configuration=config, persist_config=False
            )
        except (ConfigException, ValueError, OSError) as err:
            raise ConfigError(f"{key}: cannot use context {chosen['name']!r} of {files}: {err}") from None
        default_namespace = (chosen.get("context") or {}).get("namespace")
        source = f"kubeconfig {files} (context {chosen['name']!r})"
    namespace = settings.namespace or default_namespace or "default"
    return Connection(kubernetes.client.ApiClient(config), str(config.host), namespace, source)


# --------------------------------------------------------------------------------------------- errors


def _status(err: ApiException) -> tuple[str, str]:
    """The ``reason`` and ``message`` of the Status body an error came with (or of the exception itself)."""
    try:
        body = json.loads(err.body or "")
    except (TypeError, ValueError):
        body = None
    if isinstance(body, dict) and body.get("kind") == "Status":
        return str(body.get("reason") or err.reason or ""), str(body.get("message") or "")
    return str(err.reason or ""), str(err.body or err.reason or "").strip()


def _network_reason(err: BaseException) -> str:
    """A short, address-free reason for a connection failure."""
    reason = err.reason if isinstance(err, urllib3.exceptions.MaxRetryError) and err.reason else err
    text = str(reason)
    match = re.search(r"\[Errno -?\d+\] ([^)'\"]+)", text)
    if match:
        return match.group(1).strip().lower()
    if isinstance(reason, urllib3.exceptions.ConnectTimeoutError):
        return "the connection timed out"
    if isinstance(reason, urllib3.exceptions.ReadTimeoutError | TimeoutError):
        return "no answer in time"
    if isinstance(reason, urllib3.exceptions.ProtocolError):
        return "the connection was dropped"
    return text


def translate(err: BaseException, what: str, host: str) -> ProviderError:
    """The provider error for a failed call; ``what`` says what the call tried to do."""
    if isinstance(err, ApiException):
        code = int(err.status or 0)
        reason, message = _status(err)
        if code == 0:
            detail = str(err.reason or "").replace("\n", ": ")
            if "SSL" in detail or "CERTIFICATE" in detail:
                return KubeTlsError(NAME, f"TLS with the Kubernetes API at {host} failed: {detail}")
            return KubeUnreachableError(NAME, f"cannot {what}: {detail}")
        shown = f"{code} {reason}".strip()
        match code:
            case 401:
                return KubeUnauthorizedError(
                    NAME,
                    f"the Kubernetes API at {host} refused the credentials ({shown}) to {what}: check the "
                    "service-account token or the kubeconfig user",
                )
            case 403:
                return KubeForbiddenError(NAME, f"not allowed to {what} ({shown}): {message}")
            case 404:
                hint = ""
                if message == "the server could not find the requested resource":
                    hint = " (are cert-manager's CRDs installed?)"
                return KubeNotFoundError(NAME, f"cannot {what} ({shown}): {message}{hint}")
            case 400 | 409 | 415 | 422:
                return KubeInvalidError(NAME, f"the API server refused to {what} ({shown}): {message}")
        return KubeServerError(NAME, f"the Kubernetes API at {host} answered {shown} to {what}: {message}")
    if isinstance(err, urllib3.exceptions.MaxRetryError) and isinstance(err.reason, urllib3.exceptions.SSLError):
        return KubeTlsError(NAME, f"TLS with the Kubernetes API at {host} failed: {err.reason}")
    if isinstance(err, urllib3.exceptions.SSLError):
        return KubeTlsError(NAME, f"TLS with the Kubernetes API at {host} failed: {err}")
    return KubeUnreachableError(NAME, f"cannot reach the Kubernetes API at {host} to {what}: {_network_reason(err)}")


NETWORK_ERRORS = (ApiException, urllib3.exceptions.HTTPError, OSError)


class WatchExpired(Exception):
    """The watch's resourceVersion is too old (410): read the object again and watch from its version."""


# ------------------------------------------------------------------------------------------------- calls


class WatchStream:
    """One open watch: iterate :meth:`events` in one thread, :meth:`stop` from any other."""

    def __init__(
        self, api: KubeApi, namespace: str, label_selector: str, resource_version: str, timeout: float
    ) -> None:
        self._api = api
        self._what = f'watch CertificateRequests in namespace "{namespace}"'
        self._watch = cast(Any, kubernetes.watch).Watch()
        self._seconds = max(1, math.ceil(timeout))
        self._args = (api.custom.list_namespaced_custom_object, CERT_MANAGER_GROUP, VERSION, namespace, REQUESTS)
        self._kwargs = {
            "label_selector": label_selector,
            "resource_version": resource_version,
            "timeout_seconds": self._seconds,
            "allow_watch_bookmarks": True,
            "_request_timeout": (api.timeout[0], self._seconds + api.timeout[1]),
        }

    def events(self) -> Iterator[tuple[str, JsonObj]]:
        """``(type, object)`` pairs; BOOKMARK objects carry only the resourceVersion. :class:`WatchExpired` on
        410, a provider error on anything else."""
        self._api.count_watch()
        try:
            for event in self._watch.stream(*self._args, **self._kwargs):
                yield str(event["type"]), cast(JsonObj, event["raw_object"])
        except ApiException as err:
            if err.status == 410:
                raise WatchExpired(str(err.reason)) from err
            raise translate(err, self._what, self._api.host) from err
        except NETWORK_ERRORS as err:
            raise translate(err, self._what, self._api.host) from err
        finally:
            self._watch.stop()

    def stop(self) -> None:
        self._watch.stop()


@dataclass
class Timings:
    """Where the provider spent its time with the API server (for benchmarks): ``calls`` request/response
    round trips, ``waits`` from a CertificateRequest's creation until it was final, ``watches`` streams opened."""

    calls: int = 0
    call_seconds: float = 0.0
    waits: int = 0
    wait_seconds: float = 0.0
    watches: int = 0


class KubeApi:
    """The calls the provider makes, typed, timed and with errors translated."""

    def __init__(self, connection: Connection, settings: Settings) -> None:
        self.connection = connection
        self.settings = settings
        self.host = connection.host
        self.custom = kubernetes.client.CustomObjectsApi(connection.api)
        self.core = kubernetes.client.CoreV1Api(connection.api)
        self.timings = Timings()
        self._timings_lock = threading.Lock()
        seconds = settings.api_timeout.total_seconds()
        self.timeout = (seconds, seconds)

    def close(self) -> None:
        cast(Any, self.connection.api).close()

    def add_wait_time(self, seconds: float) -> None:
        with self._timings_lock:
            self.timings.waits += 1
            self.timings.wait_seconds += seconds

    def count_watch(self) -> None:
        with self._timings_lock:
            self.timings.watches += 1

    def _call(self, what: str, call: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        started = time.perf_counter()
        try:
            return call(*args, _request_timeout=self.timeout, **kwargs)
        except NETWORK_ERRORS as err:
            raise translate(err, what, self.host) from err
        finally:
            elapsed = time.perf_counter() - started
            with self._timings_lock:
                self.timings.calls += 1
                self.timings.call_seconds += elapsed

    # -- CertificateRequests
    def create_request(self, namespace: str, body: JsonObj) -> JsonObj:
        return cast(
            JsonObj,
            self._call(
                f'create a CertificateRequest in namespace "{namespace}"',
                self.custom.create_namespaced_custom_object,
                CERT_MANAGER_GROUP,
                VERSION,
                namespace,
                REQUESTS,
                body,
            ),
        )

    def get_request(self, namespace: str, name: str) -> JsonObj:
        return cast(
            JsonObj,
            self._call(
                f"get CertificateRequest {namespace}/{name}",
                self.custom.get_namespaced_custom_object,
                CERT_MANAGER_GROUP,
                VERSION,
                namespace,
                REQUESTS,
                name,
            ),
        )

    def list_requests(self, namespace: str, label_selector: str, limit: int | None = None) -> list[JsonObj]:
        return list(self._list_requests(namespace, label_selector, limit).get("items") or [])

    def _list_requests(self, namespace: str, label_selector: str, limit: int | None = None) -> JsonObj:
        return cast(
            JsonObj,
            self._call(
                f'list CertificateRequests in namespace "{namespace}"',
                self.custom.list_namespaced_custom_object,
                CERT_MANAGER_GROUP,
                VERSION,
                namespace,
                REQUESTS,
                label_selector=label_selector,
                limit=limit,
            ),
        )

    def delete_request(self, namespace: str, name: str, uid: str | None = None) -> bool:
        """Delete one CertificateRequest (only the one with ``uid``); False when it was already gone."""
        options = kubernetes.client.V1DeleteOptions(
            preconditions=kubernetes.client.V1Preconditions(uid=uid) if uid else None,
            propagation_policy="Background",
        )
        try:
            self._call(
                f"delete CertificateRequest {namespace}/{name}",
                self.custom.delete_namespaced_custom_object,
                CERT_MANAGER_GROUP,
                VERSION,
                namespace,
                REQUESTS,
                name,
                body=options,
            )
        except KubeNotFoundError:
            return False
        except KubeInvalidError as err:
            if "Precondition failed" in str(err):  # a new object of the same name: not ours
                return False
            raise
        return True

    def open_watch(self, namespace: str, label_selector: str, resource_version: str, timeout: float) -> WatchStream:
        """A watch of the CertificateRequests matching ``label_selector`` from ``resource_version``, ended by the
        server after ``timeout`` seconds (or by :meth:`WatchStream.stop`)."""
        return WatchStream(self, namespace, label_selector, resource_version, timeout)

    def list_requests_at(self, namespace: str, label_selector: str) -> tuple[list[JsonObj], str]:
        """The matching CertificateRequests and the resourceVersion of the listing (to watch from)."""
        listing = self._list_requests(namespace, label_selector)
        return list(listing.get("items") or []), str((listing.get("metadata") or {}).get("resourceVersion") or "")

    # -- issuers, bundles, server
    def get_issuer(self, namespace: str) -> JsonObj:
        settings = self.settings
        if settings.issuer_kind == "ClusterIssuer":
            return cast(
                JsonObj,
                self._call(
                    f"get ClusterIssuer {settings.issuer_name}",
                    self.custom.get_cluster_custom_object,
                    settings.issuer_group,
                    VERSION,
                    "clusterissuers",
                    settings.issuer_name,
                ),
            )
        return cast(
            JsonObj,
            self._call(
                f"get Issuer {namespace}/{settings.issuer_name}",
                self.custom.get_namespaced_custom_object,
                settings.issuer_group,
                VERSION,
                namespace,
                "issuers",
                settings.issuer_name,
            ),
        )

    def read_secret_key(self, ref: ObjectRef, default_namespace: str, key: str) -> bytes:
        value = self._read_key("Secret", self.core.read_namespaced_secret, ref, default_namespace, key)
        return base64.b64decode(value)

    def read_configmap_key(self, ref: ObjectRef, default_namespace: str, key: str) -> bytes:
        value = self._read_key("ConfigMap", self.core.read_namespaced_config_map, ref, default_namespace, key)
        return str(value).encode()

    def _read_key(self, kind: str, read: Callable[..., Any], ref: ObjectRef, default_namespace: str, key: str) -> Any:
        """The value under ``key`` in the data of the Secret or ConfigMap ``ref`` (read with ``read``)."""
        namespace = ref.namespace or default_namespace
        found = self._call(f"read {kind} {namespace}/{ref.name}", read, ref.name, namespace)
        data = found.data or {}
        if key not in data:
            raise KubeNotFoundError(
                NAME, f"{kind} {namespace}/{ref.name} has no key {key!r} (it has: {', '.join(sorted(data)) or 'none'})"
            )
        return data[key]

    def server_version(self) -> str:
        info = self._call("read the server version", kubernetes.client.VersionApi(self.connection.api).get_code)
        return str(info.git_version)
