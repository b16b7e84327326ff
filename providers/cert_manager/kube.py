"""The provider's connection to the Kubernetes API.

:func:`connect` builds a ``kubernetes`` client from the pod's service account or a kubeconfig file;
:class:`KubeApi` makes the few calls the provider needs (CertificateRequests, issuers, Secrets, ConfigMaps, a
watch), times them, and turns every ``kubernetes``/``urllib3`` exception into one of
:mod:`providers.cert_manager.errors` with ``raise ... from``. Nothing outside this module sees a client object
or an untyped exception.

Answers are read here, not by the client's models: each call asks for the raw response
(``_preload_content=False``), and its body, or each line of a watch stream, is parsed and checked with the
readers of :mod:`providers.cert_manager.shapes` (CertificateRequests with
:func:`~providers.cert_manager.request.read_request`). So a body that is not JSON, or a value of another type
than the API's, is a :class:`~providers.cert_manager.errors.MalformedAnswerError` naming the object and the key,
never a TypeError somewhere further on; and the client's own decode and validation errors become one too.
"""

from __future__ import annotations

import base64
import contextlib
import json
import logging
import math
import os
import re
import socket
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import kubernetes
import urllib3
from kubernetes.client import ApiException
from kubernetes.client.exceptions import OpenApiException
from kubernetes.config.config_exception import ConfigException
from kubernetes.config.incluster_config import InClusterConfigLoader

from mesh_identity.document import shown
from mesh_identity.errors import ConfigError, ProviderError
from providers.cert_manager.errors import (
    NAME,
    KubeForbiddenError,
    KubeInvalidError,
    KubeNotFoundError,
    KubeServerError,
    KubeTlsError,
    KubeUnauthorizedError,
    KubeUnreachableError,
    MalformedAnswerError,
)
from providers.cert_manager.options import CERT_MANAGER_GROUP, PREFIX, ObjectRef, Settings
from providers.cert_manager.request import read_request
from providers.cert_manager.shapes import (
    JsonObj,
    conditions,
    integer,
    items,
    malformed,
    mapping,
    obj,
    parse_json,
    string,
    string_map,
    text,
)

log = logging.getLogger(__name__)

VERSION = "v1"
REQUESTS = "certificaterequests"
MAX_EVENT_BYTES = 8 * 2**20  # one watch event (an object is at most 1.5 MiB in etcd): a longer line is malformed
EVENT_TYPES = ("ADDED", "MODIFIED", "DELETED", "BOOKMARK", "ERROR")


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


def _unreadable(err: ValueError | LookupError) -> str:
    """What the client could not read in an answer: the kind of problem only, since the text of its errors
    (a model's validation errors) quotes the values it got, which may be a Secret's."""
    if isinstance(err, UnicodeDecodeError):
        return "it is not UTF-8 text"
    if isinstance(err, json.JSONDecodeError):
        return f"it is not JSON: {err.msg}"
    if isinstance(err, LookupError):
        return "its charset is unknown"
    return f"{type(err).__name__} from the kubernetes client"


def _error_event(code: int, reason: str, message: str) -> ApiException:
    """An ERROR event of a watch as the exception the client raises for an answer with that Status."""
    err = ApiException(status=code, reason=reason or None)
    err.body = json.dumps({"kind": "Status", "code": code, "reason": reason, "message": message})
    return err


class WatchExpired(Exception):
    """The watch's resourceVersion is too old (410): read the object again and watch from its version."""


# ------------------------------------------------------------------------------------------------- calls


class WatchStream:
    """One open watch: iterate :meth:`events` in one thread, :meth:`stop` from any other.

    The stream is read here, line by line, not by ``kubernetes.watch``: that one lets out a TypeError or a
    KeyError for a line that is not JSON or an event without an object. Each line must be one event, a JSON
    object whose ``type`` is ADDED, MODIFIED, DELETED or BOOKMARK with a CertificateRequest (for a BOOKMARK, just
    its resourceVersion) as ``object``, or ERROR with a Status; anything else ends the stream with a
    MalformedAnswerError (the watcher lists again: the event it could not read may have been the one it waits
    for)."""

    def __init__(
        self, api: KubeApi, namespace: str, label_selector: str, resource_version: str, timeout: float
    ) -> None:
        self._api = api
        self._namespace = namespace
        self._what = f'watch CertificateRequests in namespace "{namespace}"'
        self._watch_of = f'watch of CertificateRequests in namespace "{namespace}"'
        self._event_what = f"an event of the {self._watch_of}"
        self._seconds = max(1, math.ceil(timeout))
        self._args = (CERT_MANAGER_GROUP, VERSION, namespace, REQUESTS)
        self._kwargs: dict[str, Any] = {
            "label_selector": label_selector,
            "resource_version": resource_version,
            "timeout_seconds": self._seconds,
            "allow_watch_bookmarks": True,
            "watch": True,
            "_preload_content": False,
            "_request_timeout": (api.timeout[0], self._seconds + api.timeout[1]),
        }
        self._lock = threading.Lock()
        self._response: Any = None
        self._stopped = False

    def events(self) -> Iterator[tuple[str, JsonObj]]:
        """``(type, object)`` pairs; BOOKMARK objects carry only the resourceVersion. :class:`WatchExpired` on
        410 (an answer or an ERROR event), a provider error on anything else: MalformedAnswerError for an event
        that cannot be read."""
        self._api.count_watch()
        try:
            response = self._api.custom.list_namespaced_custom_object(*self._args, **self._kwargs)
            with self._lock:
                self._response = response
                if self._stopped:
                    return
            for line in self._lines(response):
                if line.strip():
                    yield self._event(line)
                if self._stopped:
                    break
        except ApiException as err:
            if err.status == 410:
                raise WatchExpired(str(err.reason)) from err
            raise translate(err, self._what, self._api.host) from err
        except NETWORK_ERRORS as err:
            raise translate(err, self._what, self._api.host) from err
        finally:
            with self._lock:
                response, self._response = self._response, None
            if response is not None:
                with contextlib.suppress(*NETWORK_ERRORS):
                    response.close()
                    response.release_conn()

    def stop(self) -> None:
        """End the stream from another thread: its socket is shut down, which wakes the read."""
        with self._lock:
            self._stopped = True
            response = self._response
        connection = getattr(response, "connection", None)
        sock = getattr(connection, "sock", None)
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)

    def _lines(self, response: Any) -> Iterator[bytes]:
        """The lines of the stream as they come, each at most MAX_EVENT_BYTES (a last one without its newline
        too)."""
        buffer = bytearray()
        for chunk in response.stream(amt=None, decode_content=True):
            start = len(buffer)
            buffer += chunk
            end = buffer.find(b"\n", start)
            while end >= 0:
                yield bytes(buffer[:end])
                del buffer[: end + 1]
                end = buffer.find(b"\n")
            if len(buffer) > MAX_EVENT_BYTES:
                raise MalformedAnswerError(NAME, f"{self._event_what} is longer than {MAX_EVENT_BYTES} bytes")
        if buffer:
            yield bytes(buffer)

    def _event(self, line: bytes) -> tuple[str, JsonObj]:
        what = self._event_what
        event = obj(parse_json(line, what), what)
        kind = string(event, "type", what, required=True)
        if kind not in EVENT_TYPES:
            raise malformed(what, "type", f"is not one of {', '.join(EVENT_TYPES)} (got {shown(kind)})")
        if kind == "ERROR":
            status = mapping(event, "object", what)
            code = integer(status, "code", what, "object")
            if code is None or not 400 <= code <= 599:
                raise malformed(what, "object.code", f"is not an HTTP error status (got {code})")
            reason, message = string(status, "reason", what, "object"), string(status, "message", what, "object")
            if code != 410:
                log.warning(
                    "%s: the %s ended with an ERROR event (%s %s: %s): listing them again",
                    NAME,
                    self._watch_of,
                    code,
                    text(reason, 80),
                    text(message) or "no message",
                )
            raise _error_event(code, reason, message)
        if kind == "BOOKMARK":
            bookmark = obj(event.get("object"), what, "object")
            string(mapping(bookmark, "metadata", what, "object"), "resourceVersion", what, "object.metadata")
            return kind, bookmark
        return kind, read_request(event.get("object"), what, self._namespace, "object")


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

    def _call(self, what: str, call: Callable[..., Any], *args: Any, **kwargs: Any) -> bytes:
        """The body of the 2xx answer to one call (``what`` says what it does, for messages), read here: with
        ``_preload_content=False`` the client's models never parse it. Every failure is a provider error: the
        client's and urllib3's exceptions are translated, and what the client raises on an answer it cannot
        decode is a MalformedAnswerError."""
        started = time.perf_counter()
        try:
            response = call(*args, _request_timeout=self.timeout, _preload_content=False, **kwargs)
            try:
                body = response.read()
            finally:
                response.release_conn()
        except NETWORK_ERRORS as err:
            raise translate(err, what, self.host) from err
        except (ValueError, LookupError) as err:
            if isinstance(err, OpenApiException):  # the client refused our own arguments: a bug, not an answer
                raise
            raise MalformedAnswerError(NAME, f"the answer to {what} cannot be read: {_unreadable(err)}") from None
        finally:
            elapsed = time.perf_counter() - started
            with self._timings_lock:
                self.timings.calls += 1
                self.timings.call_seconds += elapsed
        return bytes(body)

    def _object(self, what: str, call: Callable[..., Any], *args: Any, secret: bool = False, **kwargs: Any) -> JsonObj:
        """The answer to one call, a JSON object (``secret``: a Secret's, whose values no message shows)."""
        answer = f"the answer to {what}"
        return obj(parse_json(self._call(what, call, *args, **kwargs), answer), answer, secret=secret)

    # -- CertificateRequests
    def create_request(self, namespace: str, body: JsonObj) -> JsonObj:
        what = f'create a CertificateRequest in namespace "{namespace}"'
        created = self._object(
            what, self.custom.create_namespaced_custom_object, CERT_MANAGER_GROUP, VERSION, namespace, REQUESTS, body
        )
        return read_request(created, f"the answer to {what}", namespace)

    def get_request(self, namespace: str, name: str) -> JsonObj:
        what = f"get CertificateRequest {namespace}/{name}"
        found = self._object(
            what, self.custom.get_namespaced_custom_object, CERT_MANAGER_GROUP, VERSION, namespace, REQUESTS, name
        )
        return read_request(found, f"the answer to {what}", namespace)

    def list_requests(self, namespace: str, label_selector: str, limit: int | None = None) -> list[JsonObj]:
        return self._list_requests(namespace, label_selector, limit)[0]

    def _list_requests(
        self, namespace: str, label_selector: str, limit: int | None = None
    ) -> tuple[list[JsonObj], str]:
        what = f'list CertificateRequests in namespace "{namespace}"'
        listing = self._object(
            what,
            self.custom.list_namespaced_custom_object,
            CERT_MANAGER_GROUP,
            VERSION,
            namespace,
            REQUESTS,
            label_selector=label_selector,
            limit=limit,
        )
        answer = f"the answer to {what}"
        found = [
            read_request(item, answer, namespace, f"items[{i}]")
            for i, item in enumerate(items(listing, "items", answer))
        ]
        return found, string(mapping(listing, "metadata", answer), "resourceVersion", answer, "metadata")

    def delete_request(self, namespace: str, name: str, uid: str | None = None) -> bool:
        """Delete one CertificateRequest (only the one with ``uid``); False when it was already gone."""
        options = kubernetes.client.V1DeleteOptions(
            preconditions=kubernetes.client.V1Preconditions(uid=uid) if uid else None,
            propagation_policy="Background",
        )
        try:
            self._call(  # the answer (the object, or a Status) is not read
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
        return self._list_requests(namespace, label_selector)

    # -- issuers, bundles, server
    def get_issuer(self, namespace: str) -> JsonObj:
        """The issuer of the settings, its ``status.conditions`` checked (see
        :func:`~providers.cert_manager.shapes.conditions`)."""
        settings = self.settings
        if settings.issuer_kind == "ClusterIssuer":
            issuer = self._object(
                f"get ClusterIssuer {settings.issuer_name}",
                self.custom.get_cluster_custom_object,
                settings.issuer_group,
                VERSION,
                "clusterissuers",
                settings.issuer_name,
            )
        else:
            issuer = self._object(
                f"get Issuer {namespace}/{settings.issuer_name}",
                self.custom.get_namespaced_custom_object,
                settings.issuer_group,
                VERSION,
                namespace,
                "issuers",
                settings.issuer_name,
            )
        conditions(issuer, settings.issuer)
        return issuer

    def read_secret_key(self, ref: ObjectRef, default_namespace: str, key: str) -> bytes:
        value = self._read_key("Secret", self.core.read_namespaced_secret, ref, default_namespace, key)
        try:
            return base64.b64decode(value)
        except ValueError:  # binascii.Error, or a value that is not ASCII
            namespace = ref.namespace or default_namespace
            raise MalformedAnswerError(NAME, f"Secret {namespace}/{ref.name}: data[{key!r}] is not base64") from None

    def read_configmap_key(self, ref: ObjectRef, default_namespace: str, key: str) -> bytes:
        return self._read_key("ConfigMap", self.core.read_namespaced_config_map, ref, default_namespace, key).encode()

    def _read_key(self, kind: str, read: Callable[..., Any], ref: ObjectRef, default_namespace: str, key: str) -> str:
        """The value under ``key`` in the data of the Secret or ConfigMap ``ref`` (read with ``read``). No message
        shows a value of its data, or its other keys' values."""
        namespace = ref.namespace or default_namespace
        found = self._object(f"read {kind} {namespace}/{ref.name}", read, ref.name, namespace, secret=True)
        data = string_map(found, "data", f"{kind} {namespace}/{ref.name}", secret=True)
        if key not in data:
            keys = ", ".join(text(k, 80) for k in sorted(data)[:20]) or "none"
            raise KubeNotFoundError(NAME, f"{kind} {namespace}/{ref.name} has no key {key!r} (it has: {keys})")
        return data[key]

    def server_version(self) -> str:
        what = "read the server version"
        info = self._object(what, kubernetes.client.VersionApi(self.connection.api).get_code)
        return text(string(info, "gitVersion", f"the answer to {what}", required=True), 80)
