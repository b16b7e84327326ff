"""AdmissionReview ``admission.k8s.io/v1``: the request read strictly, the decision, the answer.

:func:`parse_review` takes the decoded JSON body and returns an :class:`AdmissionRequest`, or raises
:class:`InvalidReviewError` naming the field: the server answers that with HTTP 400 and never a patch. A well
formed request is answered (:meth:`Injector.answer`) in this order:

=====================================  ==========================================================================
the namespace is not monitored         allowed, unmodified
``spec.hostNetwork: true``             allowed, unmodified, with a warning (capture would rewrite the node's rules)
``mesh-identity.io/inject: "false"``   allowed, unmodified (opted out)
already injected                       allowed, unmodified (idempotent)
cannot be injected                     per :class:`~mesh_identity.inject.patch.FailureMode`: denied (403) with the
                                       reason, or allowed unmodified with the reason as a warning
otherwise                              allowed, ``patchType: JSONPatch``, the patch base64-encoded
=====================================  ==========================================================================

The decision has no side effect, so a ``dryRun`` request is answered exactly as another one.
"""

from __future__ import annotations

import base64
import json
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from mesh_identity.errors import MeshIdentityError
from mesh_identity.inject.patch import (
    INJECT,
    FailureMode,
    InjectError,
    InjectSettings,
    JsonObj,
    admission_warnings,
    is_injected,
    pod_annotations,
    pod_patch,
)

API_VERSION = "admission.k8s.io/v1"
KIND = "AdmissionReview"
POD_KIND = {"group": "", "version": "v1", "kind": "Pod"}
MAX_UID = 128
OUTCOMES = (
    "injected", "unmonitored", "host-network", "opted-out", "already-injected", "failed-denied", "failed-allowed",
    "malformed", "error",
)  # fmt: skip


class InvalidReviewError(MeshIdentityError, ValueError):
    """A malformed AdmissionReview (answered with HTTP 400); the message names the field."""


@dataclass(frozen=True, slots=True)
class AdmissionRequest:
    uid: str
    namespace: str
    name: str
    dry_run: bool
    pod: Mapping[str, Any]


@dataclass(frozen=True, slots=True)
class Answer:
    """The decision on one request; :meth:`review` makes the AdmissionReview that carries it."""

    allowed: bool
    patch: list[JsonObj] | None = None
    message: str = ""
    warnings: tuple[str, ...] = ()
    code: int = 403

    def review(self, uid: str) -> JsonObj:
        response: JsonObj = {"uid": uid, "allowed": self.allowed}
        if self.patch is not None:
            response["patchType"] = "JSONPatch"
            response["patch"] = base64.b64encode(json.dumps(self.patch, separators=(",", ":")).encode()).decode()
        if not self.allowed:
            response["status"] = {"code": self.code, "message": self.message}
        if self.warnings:
            response["warnings"] = list(self.warnings)
        return {"apiVersion": API_VERSION, "kind": KIND, "response": response}


def _mapping(value: Any, path: str) -> Mapping[str, Any]:
    if not isinstance(value, Mapping):
        raise InvalidReviewError(f"{path}: {_shown(value)} is not an object")
    return value


def _shown(value: Any) -> str:
    text = json.dumps(value) if isinstance(value, str | int | float | bool | type(None)) else type(value).__name__
    return text if len(text) <= 80 else text[:77] + "..."


def _text(value: Any, path: str, *, required: bool = True) -> str:
    if value is None and not required:
        return ""
    if not isinstance(value, str) or (required and not value):
        raise InvalidReviewError(f"{path}: {_shown(value)} is not a non-empty string")
    return value


def parse_review(document: Any) -> AdmissionRequest:
    """The request of an AdmissionReview ``admission.k8s.io/v1`` for a Pod CREATE; InvalidReviewError naming the
    field otherwise."""
    review = _mapping(document, "<review>")
    if review.get("apiVersion") != API_VERSION:
        raise InvalidReviewError(f"apiVersion: {_shown(review.get('apiVersion'))} is not {API_VERSION!r}")
    if review.get("kind") != KIND:
        raise InvalidReviewError(f"kind: {_shown(review.get('kind'))} is not {KIND!r}")
    if "response" in review:
        raise InvalidReviewError("response: a review sent to the webhook carries a request, not a response")
    request = _mapping(review.get("request"), "request")
    uid = _text(request.get("uid"), "request.uid")
    if len(uid) > MAX_UID or not uid.isascii() or not uid.isprintable():
        raise InvalidReviewError(f"request.uid: {_shown(uid)} is not a UID (printable ASCII, {MAX_UID} at most)")
    kind = _mapping(request.get("kind"), "request.kind")
    if {k: kind.get(k) for k in POD_KIND} != POD_KIND:
        raise InvalidReviewError(
            f"request.kind: {json.dumps(dict(kind))[:120]} is not a v1 Pod; this webhook injects Pods only"
        )
    if request.get("subResource"):
        raise InvalidReviewError(f"request.subResource: {_shown(request.get('subResource'))}: only a Pod is injected")
    operation = request.get("operation")
    if operation != "CREATE":
        raise InvalidReviewError(f"request.operation: {_shown(operation)} is not CREATE; pods are injected on creation")
    namespace = _text(request.get("namespace"), "request.namespace")
    name = _text(request.get("name"), "request.name", required=False)
    dry_run = request.get("dryRun", False)
    if not isinstance(dry_run, bool):
        raise InvalidReviewError(f"request.dryRun: {_shown(dry_run)} is not true or false")
    pod = _mapping(request.get("object"), "request.object")
    if pod.get("kind", "Pod") != "Pod" or pod.get("apiVersion", "v1") != "v1":
        raise InvalidReviewError(
            f"request.object: kind {_shown(pod.get('kind'))}, apiVersion {_shown(pod.get('apiVersion'))} is not a "
            "v1 Pod"
        )
    metadata = _mapping(pod.get("metadata", {}), "request.object.metadata")
    if metadata.get("namespace") not in (None, "", namespace):
        raise InvalidReviewError(
            f"request.object.metadata.namespace: {_shown(metadata.get('namespace'))} is not request.namespace "
            f"{_shown(namespace)}"
        )
    if "annotations" in metadata:
        found = _mapping(metadata["annotations"], "request.object.metadata.annotations")
        for key, value in found.items():
            if not isinstance(value, str):
                where = f"request.object.metadata.annotations[{key!r}]"
                raise InvalidReviewError(f"{where}: {_shown(value)} is not a string")
    spec = _mapping(pod.get("spec"), "request.object.spec")
    for key in ("containers", "initContainers", "volumes"):
        if key not in spec or (key != "containers" and spec[key] is None):
            continue
        items = spec[key]
        if not isinstance(items, list) or (key == "containers" and not items):
            raise InvalidReviewError(f"request.object.spec.{key}: {_shown(items)} is not a non-empty list")
        for index, item in enumerate(items):
            _mapping(item, f"request.object.spec.{key}[{index}]")
    if "containers" not in spec:
        raise InvalidReviewError("request.object.spec.containers: required (a Pod has at least one container)")
    if not isinstance(spec.get("hostNetwork", False), bool):
        raise InvalidReviewError(f"request.object.spec.hostNetwork: {_shown(spec.get('hostNetwork'))} is not a bool")
    return AdmissionRequest(uid, namespace, name, dry_run, pod)


@dataclass(slots=True)
class Injector:
    """Answers admission requests for ``settings``' mesh. ``monitored`` says whether a namespace is the mesh's
    (None: every namespace the API server sends, which the webhook's namespaceSelector chose)."""

    settings: InjectSettings
    monitored: Callable[[str], bool] | None = None
    observe: Callable[[str, float], None] | None = None  # (outcome, seconds) of each review: the metrics

    def answer(self, request: AdmissionRequest) -> Answer:
        """The decision on a well formed request (see the module docstring)."""
        return self._decide(request)[0]

    def review(self, document: Any) -> JsonObj:
        """The AdmissionReview answering ``document``; InvalidReviewError if it is malformed. The outcome (one
        of :data:`OUTCOMES`) goes to ``observe``."""
        started = time.perf_counter()
        outcome = "malformed"
        try:
            request = parse_review(document)
            answer, outcome = self._decide(request)
            return answer.review(request.uid)
        except InvalidReviewError:
            raise
        except Exception:
            outcome = "error"
            raise
        finally:
            if self.observe is not None:
                self.observe(outcome, time.perf_counter() - started)

    def _decide(self, request: AdmissionRequest) -> tuple[Answer, str]:
        pod = request.pod
        if self.monitored is not None and not self.monitored(request.namespace):
            return Answer(True), "unmonitored"
        if pod["spec"].get("hostNetwork") is True:
            warning = f"mesh-identity: pod in {request.namespace} uses hostNetwork; not injected (no capture)"
            return Answer(True, warnings=(warning,)), "host-network"
        choice = pod_annotations(pod).get(INJECT)
        if choice == "false":
            return Answer(True), "opted-out"
        if is_injected(pod):
            return Answer(True), "already-injected"
        try:
            if choice not in (None, "true"):
                raise InjectError(f'metadata.annotations[{INJECT!r}]: {_shown(choice)} is not "true" or "false"')
            patch = pod_patch(pod, request.namespace, self.settings)
        except InjectError as err:
            reason = f"mesh-identity cannot inject this pod: {err}"
            if self.settings.failure_mode is FailureMode.ALLOW:
                return Answer(True, warnings=(reason + "; admitted without the sidecar",)), "failed-allowed"
            return Answer(False, message=reason), "failed-denied"
        return Answer(True, patch=patch, warnings=admission_warnings(pod, self.settings.capture)), "injected"
