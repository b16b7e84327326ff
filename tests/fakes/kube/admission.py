"""Mutating admission webhooks for the Kubernetes fake, called as a real API server calls them.

:data:`MUTATING_WEBHOOK_CONFIGURATION` is the kind ``admissionregistration.k8s.io/v1``
MutatingWebhookConfiguration (cluster-scoped, the real server's defaults, checked against the official schemas
strict, plus a little of the real validation). :class:`MutatingWebhooks` serves it and registers itself as an
admission step of the server (:meth:`~tests.fakes.kube.server.KubeServer.add_admission`): on every create, for
each configuration (by name) and each of its webhooks (in order) whose ``rules`` match the operation, group,
version and resource, whose ``namespaceSelector`` matches the namespace's labels (the real server's
``kubernetes.io/metadata.name`` label included) and whose ``objectSelector`` matches the object's labels, it

* POSTs an AdmissionReview ``admission.k8s.io/v1`` (uid, kind, resource, requestKind, requestResource,
  namespace, name, operation, userInfo, object, oldObject null, dryRun, options) over HTTPS to
  ``clientConfig.url``, or for ``clientConfig.service`` to the address a test maps the service to
  (:meth:`MutatingWebhooks.route_service`), checking the server's certificate against ``clientConfig.caBundle``
  and the host name (the URL's host, or ``<service>.<namespace>.svc``), within ``timeoutSeconds``;
* applies a ``JSONPatch`` response (RFC 6902, :func:`~tests.fakes.kube.patches.json_patch`) to the object the
  next webhook is sent, and at the end the object is stored, so the kind's validation sees the patched object;
* refuses the create when a webhook answers ``allowed: false``: the webhook's status code (403 when none) and
  ``admission webhook "<name>" denied the request: <message>``, as the real server;
* when a webhook cannot be called (no connection, a certificate that does not verify, a timeout, a non-200
  answer, a response that is not a matching AdmissionReview): ``failurePolicy: Fail`` refuses the create with
  500 ``failed calling webhook "<name>": failed to call webhook: Post "<url>": <reason>``; ``Ignore`` goes on
  without that webhook. A patch that does not apply refuses the create whatever the policy (fail closed);
* returns a response's ``warnings`` to the client as ``Warning: 299 - "<text>"`` headers
  (:meth:`~tests.fakes.kube.server.KubeServer.warn`, the real server's limits), on an admitted create and on a
  refused one alike (kubectl prints each as ``Warning: <text>`` on stderr); they are kept in
  :attr:`MutatingWebhooks.warnings` too;
* on a dry run (``?dryRun=All``, what ``kubectl --dry-run=server`` sends) sends ``request.dryRun: true``; a
  webhook whose ``sideEffects`` is neither ``None`` nor ``NoneOnDryRun`` (only a configuration stored before
  ``admissionregistration.k8s.io/v1``, which refuses them, can have one) refuses the request, as the real server:
  400 ``admission webhook "<name>" does not support dry run``. The server then answers the object as it would be
  stored and stores nothing (:meth:`~tests.fakes.kube.server.KubeServer.dry_run`).

Not done: ``reinvocationPolicy: IfNeeded``, ``matchPolicy: Equivalent`` conversion, ``matchConditions``,
validating webhooks, dry runs of verbs other than create (the server refuses them with 400). Webhooks are not
called for the admissionregistration kinds themselves (nor are they in a real cluster).
"""

from __future__ import annotations

import base64
import binascii
import copy
import http.client
import json
import socket
import ssl
import threading
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

from tests.fakes.kube.errors import ApiError, JsonObj
from tests.fakes.kube.kinds import NAMESPACE, Kind
from tests.fakes.kube.patches import json_patch
from tests.fakes.kube.routing import Route
from tests.fakes.kube.selectors import Matcher, Requirement, labels_of
from tests.fakes.kube.server import KubeServer
from tests.fakes.kube.store import meta
from tests.fakes.kube.workloads import checked

GROUP = "admissionregistration.k8s.io"
REVIEW_VERSION = "admission.k8s.io/v1"
DEFAULT_TIMEOUT = 10
_OPERATORS = {"In": "in", "NotIn": "notin", "Exists": "exists", "DoesNotExist": "!exists"}
_STATUS_REASONS = {400: "BadRequest", 401: "Unauthorized", 403: "Forbidden", 404: "NotFound", 409: "Conflict"}


# ----------------------------------------------------------------------------------------------- the kind


def _prepare_configuration(obj: JsonObj) -> None:
    """The real server's defaults for a MutatingWebhookConfiguration's webhooks."""
    for webhook in obj.get("webhooks") or []:
        if not isinstance(webhook, dict):
            continue
        webhook.setdefault("failurePolicy", "Fail")
        webhook.setdefault("matchPolicy", "Equivalent")
        webhook.setdefault("namespaceSelector", {})
        webhook.setdefault("objectSelector", {})
        webhook.setdefault("timeoutSeconds", DEFAULT_TIMEOUT)
        webhook.setdefault("reinvocationPolicy", "Never")
        for rule in webhook.get("rules") or []:
            if isinstance(rule, dict):
                rule.setdefault("scope", "*")
        service = (webhook.get("clientConfig") or {}).get("service")
        if isinstance(service, dict):
            service.setdefault("port", 443)


def _validate_configuration(kind: Kind, old: JsonObj | None, new: JsonObj) -> list[str]:
    errors: list[str] = []
    names: set[str] = set()
    for i, webhook in enumerate(new.get("webhooks") or []):
        if not isinstance(webhook, dict):
            continue  # the schema says what is wrong
        where = f"webhooks[{i}]"
        name = webhook.get("name")
        if not isinstance(name, str) or name.count(".") < 2:
            errors.append(f'{where}.name: Invalid value: "{name}": should be a domain with at least three segments')
        elif name in names:
            errors.append(f'{where}.name: Duplicate value: "{name}"')
        names.add(str(name))
        if webhook.get("sideEffects") not in ("None", "NoneOnDryRun"):
            errors.append(
                f'{where}.sideEffects: Unsupported value: "{webhook.get("sideEffects")}": supported values: "None", '
                '"NoneOnDryRun"'
            )
        if "v1" not in (webhook.get("admissionReviewVersions") or []):
            errors.append(f'{where}.admissionReviewVersions: Invalid value: must include "v1" (the fake speaks v1)')
        config = webhook.get("clientConfig") or {}
        if isinstance(config, dict):
            if ("url" in config) == ("service" in config):
                errors.append(f"{where}.clientConfig: Required value: exactly one of url or service is required")
            elif "url" in config and urlsplit(str(config["url"])).scheme != "https":
                errors.append(f'{where}.clientConfig.url: Unsupported value: "{config["url"]}": "https" is required')
            bundle = config.get("caBundle")
            if bundle is not None:
                try:
                    base64.b64decode(str(bundle), validate=True)
                except binascii.Error:
                    errors.append(f"{where}.clientConfig.caBundle: Invalid value: illegal base64 data")
        timeout = webhook.get("timeoutSeconds")
        if not isinstance(timeout, int) or not 1 <= timeout <= 30:
            errors.append(
                f"{where}.timeoutSeconds: Invalid value: {timeout!r}: the timeout value must be between 1 and 30 seconds"
            )
    return errors


MUTATING_WEBHOOK_CONFIGURATION = Kind(
    "MutatingWebhookConfiguration",
    "mutatingwebhookconfigurations",
    group=GROUP,
    namespaced=False,
    prepare=_prepare_configuration,
    validate=checked(_validate_configuration),
)


# ----------------------------------------------------------------------------------------------- matching


def selector_matcher(selector: Any) -> Matcher:
    """A LabelSelector (``matchLabels``, ``matchExpressions``) as a matcher of labels; ``{}`` selects all."""
    selector = selector if isinstance(selector, dict) else {}
    requirements = [Requirement(k, "=", frozenset({str(v)})) for k, v in (selector.get("matchLabels") or {}).items()]
    for expression in selector.get("matchExpressions") or []:
        operator = _OPERATORS[expression["operator"]]
        requirements.append(Requirement(expression["key"], operator, frozenset(expression.get("values") or ())))
    return lambda labels: all(r.matches(labels) for r in requirements)


def _listed(values: Any, wanted: str) -> bool:
    return isinstance(values, list) and ("*" in values or wanted in values)


def rules_match(webhook: Mapping[str, Any], kind: Kind, operation: str) -> bool:
    for rule in webhook.get("rules") or []:
        resources = rule.get("resources") or []
        scope = rule.get("scope", "*")
        if (
            _listed(rule.get("operations"), operation)
            and _listed(rule.get("apiGroups"), kind.group)
            and _listed(rule.get("apiVersions"), kind.version)
            and ("*" in resources or "*/*" in resources or kind.plural in resources)
            and scope in ("*", "Namespaced" if kind.namespaced else "Cluster")
        ):
            return True
    return False


# ----------------------------------------------------------------------------------------------- calling


class CallError(Exception):
    """The webhook could not be called (its failurePolicy decides)."""


class _Connection(http.client.HTTPConnection):
    """HTTPS to ``address`` with the host name ``server_name`` checked (and sent as Host)."""

    def __init__(self, server_name: str, address: tuple[str, int], context: ssl.SSLContext, timeout: float) -> None:
        super().__init__(server_name, address[1], timeout=timeout)
        self._address = address
        self._tls = context

    def connect(self) -> None:
        raw = socket.create_connection(self._address, self.timeout)
        try:
            self.sock = self._tls.wrap_socket(raw, server_hostname=self.host)
        except BaseException:
            raw.close()
            raise


@dataclass
class Call:
    """One webhook call, as the tests see it afterwards."""

    webhook: str
    url: str
    review: JsonObj
    response: JsonObj | None = None
    error: str = ""


@dataclass
class MutatingWebhooks:
    """The admission step calling the MutatingWebhookConfigurations stored in ``server``. ``timeout_query``:
    append ``?timeout=<timeoutSeconds>s`` to the webhook's URL, as the real server does."""

    server: KubeServer
    timeout_query: bool = True
    services: dict[tuple[str, str, int], tuple[str, int]] = field(default_factory=dict)
    calls: list[Call] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    @classmethod
    def install(cls, server: KubeServer, *, timeout_query: bool = True) -> MutatingWebhooks:
        """Serve the MutatingWebhookConfiguration kind in ``server`` and call its webhooks on every create."""
        server.register(MUTATING_WEBHOOK_CONFIGURATION)
        webhooks = cls(server, timeout_query)
        server.add_admission(webhooks.admit)
        return webhooks

    def route_service(self, namespace: str, name: str, address: tuple[str, int], port: int = 443) -> None:
        """Send calls to the Service ``namespace/name`` port ``port`` to ``address`` (the certificate is
        checked for ``<name>.<namespace>.svc``, as the real server checks it)."""
        with self._lock:
            self.services[(namespace, name, port)] = address

    # -- the admission step
    def admit(self, user: str, route: Route, obj: JsonObj, params: Mapping[str, str]) -> JsonObj:
        kind = route.kind
        if kind.group == GROUP or (kind.namespaced and route.namespace is None):
            return obj
        namespace = route.namespace or ""
        obj = copy.deepcopy(obj)
        if kind.namespaced and not meta(obj).get("namespace"):
            meta(obj)["namespace"] = namespace  # the real server sets it before admission
        configurations = sorted(
            self.server.objects(MUTATING_WEBHOOK_CONFIGURATION), key=lambda c: str(meta(c).get("name"))
        )
        for configuration in configurations:
            for webhook in configuration.get("webhooks") or []:
                if self._applies(webhook, kind, namespace, obj):
                    obj = self._call(webhook, user, route, obj, params)
        return obj

    def _applies(self, webhook: Mapping[str, Any], kind: Kind, namespace: str, obj: JsonObj) -> bool:
        if not rules_match(webhook, kind, "CREATE"):
            return False
        if not selector_matcher(webhook.get("objectSelector"))(labels_of(obj)):
            return False
        if kind.namespaced:
            labels = {"kubernetes.io/metadata.name": namespace}
            found = self.server.objects(NAMESPACE)
            labels.update(next((labels_of(n) for n in found if meta(n).get("name") == namespace), {}))
        elif kind.kind == "Namespace":
            labels = {"kubernetes.io/metadata.name": str(meta(obj).get("name")), **labels_of(obj)}
        else:
            return True  # a cluster-scoped object: the namespaceSelector does not apply
        return selector_matcher(webhook.get("namespaceSelector"))(labels)

    def _call(
        self, webhook: Mapping[str, Any], user: str, route: Route, obj: JsonObj, params: Mapping[str, str]
    ) -> JsonObj:
        name = str(webhook["name"])
        dry_run = params.get("dryRun") == "All"
        if dry_run and webhook.get("sideEffects") not in ("None", "NoneOnDryRun"):
            raise ApiError(400, "BadRequest", f'admission webhook "{name}" does not support dry run')
        kind = route.kind
        identity = {"group": kind.group, "version": kind.version, "kind": kind.kind}
        resource = {"group": kind.group, "version": kind.version, "resource": kind.plural}
        uid = str(uuid.uuid4())
        request: JsonObj = {
            "uid": uid,
            "kind": identity,
            "resource": resource,
            "requestKind": identity,
            "requestResource": resource,
            "name": str(meta(obj).get("name") or ""),
            "operation": "CREATE",
            "userInfo": {"username": user, "groups": ["system:authenticated"]},
            "object": obj,
            "oldObject": None,
            "dryRun": dry_run,
            "options": {"apiVersion": "meta.k8s.io/v1", "kind": "CreateOptions"},
        }
        if kind.namespaced:
            request["namespace"] = route.namespace
        review = {"apiVersion": REVIEW_VERSION, "kind": "AdmissionReview", "request": request}
        timeout = int(webhook.get("timeoutSeconds") or DEFAULT_TIMEOUT)
        url, server_name, address = self._target(webhook.get("clientConfig") or {}, timeout)
        call = Call(name, url, copy.deepcopy(review))
        with self._lock:
            self.calls.append(call)
        try:
            if not address[0]:
                raise CallError(f"service {url.split('/')[2]}: no endpoints (map it with route_service)")
            context = self._context(webhook.get("clientConfig") or {})
            response = self._post(url, server_name, address, context, review, timeout)
            call.response = response
            answer = self._response(response, uid)
        except CallError as err:
            call.error = str(err)
            if webhook.get("failurePolicy", "Fail") == "Ignore":
                return obj
            raise ApiError(
                500,
                "InternalError",
                f'Internal error occurred: failed calling webhook "{name}": failed to call webhook: Post "{url}": '
                f"{err}",
            ) from None
        found_warnings = answer.get("warnings")
        warnings = [str(w) for w in found_warnings] if isinstance(found_warnings, list) else []
        with self._lock:
            self.warnings.extend(warnings)
        for warning in warnings:  # before the decision: a refusal carries them too, as on the real server
            self.server.warn(warning)
        if answer.get("allowed") is not True:
            found = answer.get("status")
            status: JsonObj = found if isinstance(found, dict) else {}
            given = status.get("code")
            code = given if isinstance(given, int) and given >= 400 else 403
            message = str(status.get("message") or "")
            text = f'admission webhook "{name}" denied the request'
            text += f": {message}" if message else " without explanation"
            reason = str(status.get("reason") or _STATUS_REASONS.get(code, ""))
            raise ApiError(code, reason, text)
        if "patch" not in answer:
            return obj
        return self._patched(name, obj, answer)

    def _target(self, config: Mapping[str, Any], timeout: int) -> tuple[str, str, tuple[str, int]]:
        query = f"?timeout={timeout}s" if self.timeout_query else ""
        if "url" in config:
            parts = urlsplit(str(config["url"]))
            host, port = parts.hostname or "", parts.port or 443
            return str(config["url"]) + query, host, (host, port)
        service = config["service"]
        namespace, name, port = str(service["namespace"]), str(service["name"]), int(service.get("port", 443))
        server_name = f"{name}.{namespace}.svc"
        with self._lock:
            address = self.services.get((namespace, name, port))
        path = str(service.get("path") or "/")
        url = f"https://{server_name}:{port}{path}{query}"
        return url, server_name, address or ("", 0)  # no address: a CallError, the failurePolicy decides

    @staticmethod
    def _context(config: Mapping[str, Any]) -> ssl.SSLContext:
        bundle = config.get("caBundle")
        if not bundle:
            raise CallError("tls: failed to verify certificate: no caBundle to verify it with")
        try:
            pem = base64.b64decode(str(bundle), validate=True).decode()
            return ssl.create_default_context(cadata=pem)
        except (binascii.Error, UnicodeDecodeError, ssl.SSLError, ValueError) as err:
            raise CallError(f"tls: the caBundle holds no certificate ({err})") from None

    @staticmethod
    def _post(
        url: str, server_name: str, address: tuple[str, int], context: ssl.SSLContext, review: JsonObj, timeout: int
    ) -> JsonObj:
        parts = urlsplit(url)
        target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
        body = json.dumps(review).encode()
        connection = _Connection(server_name, address, context, float(timeout))
        try:
            connection.request("POST", target, body, {"Content-Type": "application/json", "Accept": "application/json"})
            answer = connection.getresponse()
            data = answer.read()
        except ssl.SSLCertVerificationError as err:
            raise CallError(f"tls: failed to verify certificate: {err.verify_message}") from None
        except TimeoutError:
            raise CallError("context deadline exceeded (Client.Timeout exceeded while awaiting headers)") from None
        except (OSError, http.client.HTTPException) as err:
            raise CallError(f"{type(err).__name__}: {err}") from None
        finally:
            connection.close()
        if answer.status != 200:
            raise CallError(f"the server answered {answer.status}: {data[:200].decode(errors='replace').strip()}")
        try:
            document = json.loads(data)
        except ValueError as err:
            raise CallError(f"the response is not JSON: {err}") from None
        if not isinstance(document, dict):
            raise CallError("the response is not a JSON object")
        return document

    @staticmethod
    def _response(document: JsonObj, uid: str) -> JsonObj:
        if document.get("apiVersion") != REVIEW_VERSION or document.get("kind") != "AdmissionReview":
            raise CallError(f"expected response of kind AdmissionReview {REVIEW_VERSION}")
        answer = document.get("response")
        if not isinstance(answer, dict):
            raise CallError("the AdmissionReview has no response")
        if answer.get("uid") != uid:
            raise CallError(f"expected response.uid={uid!r}, got {answer.get('uid')!r}")
        return answer

    @staticmethod
    def _patched(name: str, obj: JsonObj, answer: JsonObj) -> JsonObj:
        if answer.get("patchType") != "JSONPatch":
            raise ApiError(500, "InternalError", f'webhook "{name}": unsupported patchType {answer.get("patchType")!r}')
        try:
            operations = json.loads(base64.b64decode(str(answer["patch"]), validate=True))
            patched = json_patch(obj, operations)
        except (binascii.Error, ValueError, ApiError, KeyError, IndexError, TypeError) as err:
            message = err.message if isinstance(err, ApiError) else str(err)
            raise ApiError(
                500, "InternalError", f'Internal error occurred: webhook "{name}": the patch does not apply: {message}'
            ) from None
        if not isinstance(patched, dict):
            raise ApiError(
                500, "InternalError", f'Internal error occurred: webhook "{name}": the patch replaced the object'
            )
        return patched
