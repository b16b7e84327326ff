"""The registry's connection to the Kubernetes API: the one module that speaks the ``kubernetes`` client.

:func:`connect` configures a client from the pod's service account or a kubeconfig file (nothing is contacted
yet); :class:`KubeClient` lists a kind across all namespaces (pages of :data:`PAGE` objects), opens watch
streams (:class:`WatchStream`: resumed from a resourceVersion, with bookmarks, ended by the server after the
seconds asked), reads, creates and replaces single objects (:meth:`KubeClient.read`, ...: namespaced ones, and
the injector's cluster-scoped MutatingWebhookConfiguration), and creates Events. Every ``kubernetes``/``urllib3``
exception becomes one of :mod:`mesh_identity.registry.kube.errors`, naming what the call tried to do.

Answers are read here, not by the client's models (``_preload_content=False``): a body is parsed as JSON and
checked to be a list of objects, and each line of a watch stream to be one event, so an answer of another shape
is a :class:`~mesh_identity.registry.kube.errors.MalformedAnswerError`, never a TypeError further on. What the
objects hold is read by :mod:`mesh_identity.registry.kube.translate`, which trusts no field.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import socket
import threading
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any, cast

import kubernetes
import urllib3
import yaml
from kubernetes.client import ApiException
from kubernetes.config.config_exception import ConfigException
from kubernetes.config.incluster_config import InClusterConfigLoader

from mesh_identity.config import RegistryConfig
from mesh_identity.document import shown
from mesh_identity.errors import ConfigError
from mesh_identity.registry.kube.errors import (
    KubeAlreadyExistsError,
    KubeApiError,
    KubeConflictError,
    KubeExpiredError,
    KubeForbiddenError,
    KubeUnauthorizedError,
    KubeUnreachableError,
    MalformedAnswerError,
)
from mesh_identity.registry.kube.objects import JsonObj
from mesh_identity.registry.kube.resources import (
    CONFIG_MAPS,
    LEASES,
    MUTATING_WEBHOOK_CONFIGURATIONS,
    SECRETS,
    Resource,
)

SERVICE_ACCOUNT_DIR = Path("/var/run/secrets/kubernetes.io/serviceaccount")
PAGE = 500  # objects per list request
MAX_EVENT_BYTES = 8 * 2**20  # one watch event (an object is at most 1.5 MiB in etcd): a longer line is malformed
EVENT_TYPES = ("ADDED", "MODIFIED", "DELETED", "BOOKMARK", "ERROR")
NETWORK_ERRORS = (ApiException, urllib3.exceptions.HTTPError, OSError)


@dataclass(frozen=True, slots=True)
class Listing:
    """The objects of a kind and the resourceVersion of the list (a watch resumes from it)."""

    items: tuple[JsonObj, ...]
    resource_version: str


@dataclass(frozen=True, slots=True)
class WatchEvent:
    """``type`` is ADDED, MODIFIED, DELETED or BOOKMARK (whose object carries only its resourceVersion)."""

    type: str
    object: JsonObj

    @property
    def resource_version(self) -> str:
        metadata = self.object.get("metadata")
        value = metadata.get("resourceVersion") if isinstance(metadata, dict) else None
        return value if isinstance(value, str) else ""


def connect(
    settings: RegistryConfig,
    environ: Mapping[str, str] | None = None,
    service_account_dir: Path = SERVICE_ACCOUNT_DIR,
) -> KubeClient:
    """A client configured from ``settings``: its kubeconfig, or (none given) the pod's service account (the
    token and CA in ``service_account_dir``, the API's address in ``KUBERNETES_SERVICE_HOST``/``_PORT``).
    ConfigError naming the key when that cannot be used; nothing here contacts the API server."""
    env = os.environ if environ is None else environ
    config = kubernetes.client.Configuration()
    if settings.kubeconfig is None:
        loader = cast(Any, InClusterConfigLoader)(
            token_filename=str(service_account_dir / "token"),
            cert_filename=str(service_account_dir / "ca.crt"),
            environ=env,
        )
        try:
            loader.load_and_set(config)
        except ConfigException as err:
            raise ConfigError(f"registry.in_cluster: cannot use the pod's service account: {err}") from None
        source = f"the in-cluster service account ({service_account_dir})"
    else:
        path = settings.kubeconfig
        if not path.is_file():
            raise ConfigError(f"registry.kubeconfig: no kubeconfig file at {path}")
        try:
            cast(Any, kubernetes.config).load_kube_config(
                config_file=str(path), client_configuration=config, persist_config=False
            )
        except (ConfigException, ValueError, OSError, yaml.YAMLError) as err:
            raise ConfigError(f"registry.kubeconfig: {path} is not a usable kubeconfig: {err}") from None
        source = f"kubeconfig {path}"
    config.retries = False  # the watches retry, with backoff; urllib3 would retry at once and warn each time
    return KubeClient(kubernetes.client.ApiClient(config), str(config.host), source, settings.timeout.total_seconds())


# --------------------------------------------------------------------------------------------- errors


def _status(err: ApiException) -> tuple[str, str]:
    """The ``reason`` and ``message`` of the Status an error came with (or of the exception itself)."""
    try:
        body = json.loads(err.body or "")
    except (TypeError, ValueError):
        body = None
    if isinstance(body, dict) and body.get("kind") == "Status":
        return str(body.get("reason") or err.reason or ""), str(body.get("message") or "")
    return str(err.reason or ""), str(err.body or "").strip()[:200]


def _network_reason(err: BaseException) -> str:
    """A short reason for a failure without an answer."""
    reason = err.reason if isinstance(err, urllib3.exceptions.MaxRetryError) and err.reason else err
    if isinstance(reason, urllib3.exceptions.SSLError):
        return f"TLS failed: {reason}"
    if isinstance(reason, urllib3.exceptions.ConnectTimeoutError):
        return "the connection timed out"
    if isinstance(reason, urllib3.exceptions.ReadTimeoutError | TimeoutError | socket.timeout):
        return "no answer in time"
    if isinstance(reason, urllib3.exceptions.ProtocolError):
        return "the connection was dropped"
    match = re.search(r"\[Errno -?\d+\] ([^)'\"]+)", str(reason))
    return match.group(1).strip().lower() if match else str(reason) or type(reason).__name__


def translate_error(err: BaseException, what: str, host: str) -> KubeApiError:
    """The registry's error for a failed call; ``what`` says what the call tried to do."""
    if isinstance(err, ApiException) and err.status:
        code = int(err.status)
        reason, message = _status(err)
        shown_status = f"{code} {reason}".strip()
        if code == 401:
            return KubeUnauthorizedError(
                f"the Kubernetes API at {host} refused the credentials ({shown_status}) to {what}: check the "
                "service-account token or the kubeconfig user",
                code,
            )
        if code == 403:
            return KubeForbiddenError(
                f"not allowed to {what} ({shown_status}): {message} (the control plane's ClusterRole must allow it)",
                code,
            )
        if code == 410:
            return KubeExpiredError(f"cannot {what} ({shown_status}): {message}", code)
        if code == 409:
            error = KubeAlreadyExistsError if reason == "AlreadyExists" else KubeConflictError
            return error(f"cannot {what} ({shown_status}): {message}", code)
        if code == 404 and message == "the server could not find the requested resource":
            message += " (are the SMI CRDs of deploy/crds installed?)"
        return KubeApiError(f"the Kubernetes API at {host} answered {shown_status} to {what}: {message}", code)
    if isinstance(err, ApiException):  # the client's wrapping of urllib3's SSLError: "SSLError\n<detail>"
        detail = str(err.reason or err).strip().replace("\n", ": ")
        return KubeUnreachableError(f"cannot reach the Kubernetes API at {host} to {what}: {detail}")
    return KubeUnreachableError(f"cannot reach the Kubernetes API at {host} to {what}: {_network_reason(err)}")


def _ended(status: JsonObj, what: str, resource: Resource, version: str) -> KubeApiError:
    """The error of an ERROR event that ended a watch (its object is a Status)."""
    code = status.get("code")
    shown_status = f"{code} {status.get('reason') or ''}".strip()
    message = status.get("message") or "no message"
    if code == 410:
        return KubeExpiredError(f"cannot {what} from resourceVersion {version} ({shown_status}): {message}", 410)
    if code == 403:
        return KubeForbiddenError(f"not allowed to {what} ({shown_status}): {message}", 403)
    number = code if isinstance(code, int) and not isinstance(code, bool) else None
    return KubeApiError(f"the watch of {resource} ended with an error ({shown_status}): {message}", number)


def _parse(data: bytes, what: str) -> JsonObj:
    try:
        value = json.loads(data)
    except (UnicodeDecodeError, ValueError) as err:
        raise MalformedAnswerError(f"{what} is not JSON: {err}") from None
    if not isinstance(value, dict):
        raise MalformedAnswerError(f"{what} is not a JSON object: {shown(value)}")
    return value


# ------------------------------------------------------------------------------------------------ calls


class KubeClient:
    """Lists, watches and Events, typed and with errors translated (see the module docstring)."""

    def __init__(self, api: kubernetes.client.ApiClient, host: str, source: str, timeout: float) -> None:
        self.api = api
        self.host = host
        self.source = source
        self.timeout = timeout
        self._core = kubernetes.client.CoreV1Api(api)
        self._discovery = kubernetes.client.DiscoveryV1Api(api)
        self._custom = kubernetes.client.CustomObjectsApi(api)
        self._coordination = kubernetes.client.CoordinationV1Api(api)
        self._admission = kubernetes.client.AdmissionregistrationV1Api(api)

    def close(self) -> None:
        cast(Any, self.api).close()

    def _lister(self, resource: Resource) -> Callable[..., Any]:
        """The client's call that lists (and watches) ``resource`` across all namespaces."""
        calls: dict[tuple[str, str], Callable[..., Any]] = {
            ("", "namespaces"): self._core.list_namespace,
            ("", "serviceaccounts"): self._core.list_service_account_for_all_namespaces,
            ("", "pods"): self._core.list_pod_for_all_namespaces,
            ("", "services"): self._core.list_service_for_all_namespaces,
            ("discovery.k8s.io", "endpointslices"): self._discovery.list_endpoint_slice_for_all_namespaces,
            ("", "configmaps"): self._core.list_config_map_for_all_namespaces,
            (
                "admissionregistration.k8s.io",
                "mutatingwebhookconfigurations",
            ): self._admission.list_mutating_webhook_configuration,
        }
        found = calls.get((resource.group, resource.plural))
        if found is not None:
            return found
        custom = self._custom.list_cluster_custom_object

        def list_custom(**kwargs: Any) -> Any:
            return custom(resource.group, resource.version, resource.plural, **kwargs)

        return list_custom

    def _body(self, what: str, call: Callable[..., Any], **kwargs: Any) -> bytes:
        try:
            response = call(_preload_content=False, _request_timeout=(self.timeout, self.timeout), **kwargs)
            try:
                return bytes(response.read())
            finally:
                response.release_conn()
        except NETWORK_ERRORS as err:
            raise translate_error(err, what, self.host) from err

    def list(self, resource: Resource, label_selector: str = "", *, namespace: str | None = None) -> Listing:
        """Every object of ``resource`` (matching ``label_selector``; in ``namespace`` alone when given, for
        ConfigMaps and Leases), read in pages, and the list's version."""
        what = f"list {resource}" + (f" in namespace {namespace}" if namespace else "")
        what += f" ({label_selector})" if label_selector else ""
        lister = self._lister(resource) if namespace is None else self._namespaced_lister(resource, namespace)
        items: list[JsonObj] = []
        token: str | None = None
        while True:
            kwargs: dict[str, Any] = {"limit": PAGE, "label_selector": label_selector or None}
            if token:
                kwargs["_continue"] = token
            listing = _parse(self._body(what, lister, **kwargs), f"the answer to {what}")
            found = listing.get("items")
            metadata = listing.get("metadata")
            if found is None:
                found = []
            if not isinstance(found, list) or not all(isinstance(i, dict) for i in found):
                raise MalformedAnswerError(f"the answer to {what}: items is not a list of objects")
            if not isinstance(metadata, dict) or not isinstance(metadata.get("resourceVersion"), str):
                raise MalformedAnswerError(f"the answer to {what}: metadata.resourceVersion is missing")
            items.extend(found)
            token = metadata.get("continue") or None
            if not token:
                return Listing(tuple(items), metadata["resourceVersion"])

    def watch(self, resource: Resource, resource_version: str, seconds: int, label_selector: str = "") -> WatchStream:
        """Open a watch of ``resource`` from ``resource_version``, with bookmarks, that the server ends after
        ``seconds`` (an error when it cannot be opened); iterate :meth:`WatchStream.events` in one thread,
        :meth:`WatchStream.stop` from any."""
        stream = WatchStream(self, resource, resource_version, seconds, label_selector)
        stream.open()
        return stream

    def create_event(self, namespace: str, body: JsonObj) -> None:
        """Create the Event ``body`` in ``namespace``."""
        what = f"create an Event in namespace {namespace}"
        self._body(what, self._core.create_namespaced_event, namespace=namespace, body=body)

    # -- single objects: Secrets, ConfigMaps, Leases (namespaced), MutatingWebhookConfigurations (cluster-scoped)

    def _calls(self, resource: Resource) -> tuple[Callable[..., Any], Callable[..., Any], Callable[..., Any]]:
        """The client's read, create and replace calls of an object of ``resource``."""
        core, coordination, admission = self._core, self._coordination, self._admission
        calls: dict[Resource, tuple[Callable[..., Any], Callable[..., Any], Callable[..., Any]]] = {
            SECRETS: (core.read_namespaced_secret, core.create_namespaced_secret, core.replace_namespaced_secret),
            CONFIG_MAPS: (
                core.read_namespaced_config_map,
                core.create_namespaced_config_map,
                core.replace_namespaced_config_map,
            ),
            LEASES: (
                coordination.read_namespaced_lease,
                coordination.create_namespaced_lease,
                coordination.replace_namespaced_lease,
            ),
            MUTATING_WEBHOOK_CONFIGURATIONS: (
                admission.read_mutating_webhook_configuration,
                admission.create_mutating_webhook_configuration,
                admission.replace_mutating_webhook_configuration,
            ),
        }
        if resource not in calls:
            raise ValueError(f"{resource} is not a kind KubeClient reads one by one")
        return calls[resource]

    @staticmethod
    def _scope(resource: Resource, namespace: str, name: str) -> tuple[str, dict[str, str]]:
        """How ``name`` is shown in messages (``namespace/name``, or ``name`` for a cluster-scoped kind), and the
        namespace argument of the client's calls (none for a cluster-scoped kind, whose ``namespace`` must be "")."""
        if resource.namespaced:
            return f"{namespace}/{name}", {"namespace": namespace}
        if namespace:
            raise ValueError(f"{resource.kind} is cluster-scoped: no namespace is given ({namespace!r})")
        return name, {}

    def read(self, resource: Resource, namespace: str, name: str) -> JsonObj | None:
        """The object ``namespace/name`` of ``resource`` (``namespace`` "" for a cluster-scoped kind), or None
        when it does not exist (404)."""
        shown_name, scope = self._scope(resource, namespace, name)
        what = f"read {resource.kind} {shown_name}"
        try:
            data = self._body(what, self._calls(resource)[0], name=name, **scope)
        except KubeApiError as err:
            if err.code == 404:
                return None
            raise
        return _parse(data, f"the answer to {what}")

    def create(self, resource: Resource, namespace: str, body: JsonObj) -> JsonObj:
        """Create ``body`` in ``namespace`` ("" for a cluster-scoped kind); :class:`KubeAlreadyExistsError` when
        its name is taken."""
        name = body.get("metadata", {}).get("name", "?")
        shown_name, scope = self._scope(resource, namespace, name)
        what = f"create {resource.kind} {shown_name}"
        data = self._body(what, self._calls(resource)[1], body=body, **scope)
        return _parse(data, f"the answer to {what}")

    def replace(self, resource: Resource, namespace: str, body: JsonObj) -> JsonObj:
        """Replace the object with ``body``, whose ``metadata.resourceVersion`` is the precondition (the one it was
        read at): :class:`KubeConflictError` when the object changed since, so no writer overwrites another."""
        metadata = body.get("metadata", {})
        name = metadata.get("name", "?")
        shown_name, scope = self._scope(resource, namespace, name)
        if not metadata.get("resourceVersion"):
            raise ValueError(f"replacing {resource.kind} {shown_name} needs metadata.resourceVersion")
        what = f"replace {resource.kind} {shown_name} at resourceVersion {metadata['resourceVersion']}"
        data = self._body(what, self._calls(resource)[2], name=name, body=body, **scope)
        return _parse(data, f"the answer to {what}")

    # -- Leases and ConfigMaps (leader election, replica evidence, the trust-bundle ConfigMaps: server/cluster.py)

    def _namespaced_lister(self, resource: Resource, namespace: str) -> Callable[..., Any]:
        """The client's call that lists ``resource`` in one namespace (ConfigMaps, Leases)."""
        calls: dict[Resource, Callable[..., Any]] = {
            CONFIG_MAPS: self._core.list_namespaced_config_map,
            LEASES: self._coordination.list_namespaced_lease,
        }
        if resource not in calls:
            raise ValueError(f"{resource} is not a kind KubeClient lists in one namespace")
        call = calls[resource]

        def list_in(**kwargs: Any) -> Any:
            return call(namespace, **kwargs)

        return list_in

    def delete(self, resource: Resource, namespace: str, name: str, resource_version: str) -> bool:
        """Delete ``namespace/name`` of ``resource`` if it is still at ``resource_version`` (a DeleteOptions
        precondition): :class:`KubeConflictError` when it changed since it was read; False when it is gone."""
        if not resource_version:
            raise ValueError(f"deleting {resource.kind} {namespace}/{name} needs the resourceVersion it was read at")
        calls: dict[Resource, Callable[..., Any]] = {
            CONFIG_MAPS: self._core.delete_namespaced_config_map,
            LEASES: self._coordination.delete_namespaced_lease,
        }
        if resource not in calls:
            raise ValueError(f"{resource} is not a kind KubeClient deletes one by one")
        what = f"delete {resource.kind} {namespace}/{name} at resourceVersion {resource_version}"
        body = {"apiVersion": "v1", "kind": "DeleteOptions", "preconditions": {"resourceVersion": resource_version}}
        try:
            self._body(what, calls[resource], name=name, namespace=namespace, body=body)
        except KubeApiError as err:
            if err.code == 404:
                return False
            raise
        return True

    # -- Secrets (one Secret followed by name: the built-in CA's state, providers/builtin/secretstore.py)

    def list_secret(self, namespace: str, name: str) -> Listing:
        """The Secret ``namespace/name`` as a list of at most one (``fieldSelector=metadata.name=<name>``, which
        RBAC's ``resourceNames`` allows), with the list's resourceVersion for :meth:`watch_secret`."""
        what = f"list Secret {namespace}/{name}"
        call = self._core.list_namespaced_secret
        return _named_listing(self._body(what, call, namespace=namespace, field_selector=f"metadata.name={name}"), what)

    def watch_secret(self, namespace: str, name: str, resource_version: str, seconds: int) -> WatchStream:
        """Open a watch of the one Secret ``namespace/name`` from ``resource_version`` (as :meth:`watch`)."""
        stream = SecretWatchStream(self, namespace, name, resource_version, seconds)
        stream.open()
        return stream

    # -- the injector's MutatingWebhookConfiguration (one followed by name: mesh_identity/inject/webhookconfig.py)

    def list_webhook_configuration(self, name: str) -> Listing:
        """The MutatingWebhookConfiguration ``name`` as a list of at most one (``fieldSelector=metadata.name=
        <name>``, which RBAC's ``resourceNames`` allows), with the list's resourceVersion for
        :meth:`watch_webhook_configuration`."""
        what = f"list MutatingWebhookConfiguration {name}"
        call = self._admission.list_mutating_webhook_configuration
        return _named_listing(self._body(what, call, field_selector=f"metadata.name={name}"), what)

    def watch_webhook_configuration(self, name: str, resource_version: str, seconds: int) -> WatchStream:
        """Open a watch of the one MutatingWebhookConfiguration ``name`` from ``resource_version`` (as
        :meth:`watch`)."""
        stream = WebhookConfigurationWatchStream(self, name, resource_version, seconds)
        stream.open()
        return stream


def _named_listing(data: bytes, what: str) -> Listing:
    """The answer to a list of one object by name (``fieldSelector=metadata.name=<name>``): at most one item."""
    listing = _parse(data, f"the answer to {what}")
    found, metadata = listing.get("items") or [], listing.get("metadata")
    if not isinstance(found, list) or not all(isinstance(i, dict) for i in found):
        raise MalformedAnswerError(f"the answer to {what}: items is not a list of objects")
    if not isinstance(metadata, dict) or not isinstance(metadata.get("resourceVersion"), str):
        raise MalformedAnswerError(f"the answer to {what}: metadata.resourceVersion is missing")
    return Listing(tuple(found), metadata["resourceVersion"])


class WatchStream:
    """One open watch stream (see :meth:`KubeClient.watch`). The lines are read here: each must be one event,
    a JSON object whose ``type`` is one of :data:`EVENT_TYPES` with an object; an ERROR event raises the error of
    its Status (:class:`~mesh_identity.registry.kube.errors.KubeExpiredError` for 410)."""

    def __init__(self, client: KubeClient, resource: Resource, version: str, seconds: int, selector: str) -> None:
        self._client = client
        self._resource = resource
        self._what = f"watch {resource}" + (f" ({selector})" if selector else "")
        self._kwargs: dict[str, Any] = {
            "watch": True,
            "allow_watch_bookmarks": True,
            "resource_version": version,
            "timeout_seconds": seconds,
            "label_selector": selector or None,
            "_preload_content": False,
            "_request_timeout": (client.timeout, seconds + client.timeout),
        }
        self._lock = threading.Lock()
        self._response: Any = None
        self._stopped = False

    def open(self) -> None:
        """Send the request; returns once the server has answered that the stream is open."""
        try:
            response = self._client._lister(self._resource)(**self._kwargs)
        except NETWORK_ERRORS as err:
            raise translate_error(err, self._what, self._client.host) from err
        with self._lock:
            self._response = response

    def events(self) -> Iterator[WatchEvent]:
        """The stream's events until the server ends it (or :meth:`stop`)."""
        try:
            with self._lock:
                response = self._response
            if response is None or self._stopped:
                return
            for line in self._lines(response):
                if line.strip():
                    yield self._event(line)
                if self._stopped:
                    return
        except NETWORK_ERRORS as err:
            if self._stopped:
                return
            raise translate_error(err, self._what, self._client.host) from err
        finally:
            self.close()

    def close(self) -> None:
        """Release the stream's connection (it is not reused: the server's answer was not read to its end)."""
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
        sock = getattr(getattr(response, "connection", None), "sock", None)
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)

    def _lines(self, response: Any) -> Iterator[bytes]:
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
                raise MalformedAnswerError(f"an event of the {self._what} is longer than {MAX_EVENT_BYTES} bytes")
        if buffer.strip():
            yield bytes(buffer)

    def _event(self, line: bytes) -> WatchEvent:
        what = f"an event of the {self._what}"
        event = _parse(line, what)
        kind, obj = event.get("type"), event.get("object")
        if kind not in EVENT_TYPES:
            raise MalformedAnswerError(f"{what}: type {shown(kind)} is not one of {', '.join(EVENT_TYPES)}")
        if not isinstance(obj, dict):
            raise MalformedAnswerError(f"{what}: object is not a JSON object")
        if kind == "ERROR":
            raise _ended(obj, self._what, self._resource, str(self._kwargs["resource_version"]))
        return WatchEvent(str(kind), obj)


# ----------------------------------------------------------------------------------------------- Secrets


class SecretWatchStream(WatchStream):
    """The watch of one Secret (:meth:`KubeClient.watch_secret`): namespaced, with
    ``fieldSelector=metadata.name=<name>``; otherwise a :class:`WatchStream`."""

    def __init__(self, client: KubeClient, namespace: str, name: str, version: str, seconds: int) -> None:
        super().__init__(client, SECRETS, version, seconds, "")
        self._what = f"watch Secret {namespace}/{name}"
        self._kwargs.update(namespace=namespace, field_selector=f"metadata.name={name}")
        del self._kwargs["label_selector"]

    def open(self) -> None:
        try:
            response = self._client._core.list_namespaced_secret(**self._kwargs)
        except NETWORK_ERRORS as err:
            raise translate_error(err, self._what, self._client.host) from err
        with self._lock:
            self._response = response


class WebhookConfigurationWatchStream(WatchStream):
    """The watch of one MutatingWebhookConfiguration (:meth:`KubeClient.watch_webhook_configuration`): with
    ``fieldSelector=metadata.name=<name>``; otherwise a :class:`WatchStream`."""

    def __init__(self, client: KubeClient, name: str, version: str, seconds: int) -> None:
        super().__init__(client, MUTATING_WEBHOOK_CONFIGURATIONS, version, seconds, "")
        self._what = f"watch MutatingWebhookConfiguration {name}"
        self._kwargs.update(field_selector=f"metadata.name={name}")
        del self._kwargs["label_selector"]


def connect_for(
    option: str,
    kubeconfig: Path | None,
    timeout: float = 10.0,
    environ: Mapping[str, str] | None = None,
    service_account_dir: Path = SERVICE_ACCOUNT_DIR,
) -> KubeClient:
    """:func:`connect` for a user other than the registry (the built-in CA's Secret store): ``kubeconfig``, or
    None for the pod's service account; a ConfigError names ``option`` (``ca.provider_options.kubeconfig``)."""
    settings = RegistryConfig("-", kubeconfig, timedelta(seconds=timeout))
    try:
        return connect(settings, environ, service_account_dir)
    except ConfigError as err:
        text = str(err).replace("registry.kubeconfig", option)
        raise ConfigError(text.replace("registry.in_cluster", f"{option} (not set: in-cluster)")) from None
