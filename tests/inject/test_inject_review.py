"""The AdmissionReview handler: strict parsing (HTTP 400 material), and a clear answer for every case of the
issue's Bad input list, never a partial patch."""

from __future__ import annotations

import copy
from typing import Any

import pytest

from mesh_identity.inject.patch import FailureMode, apply_patch, is_injected
from mesh_identity.inject.review import Injector, InvalidReviewError, parse_review
from tests.fakes.kube.workloads import schema_errors
from tests.inject.kit import decoded_patch, pod, review, settings

UID = "705ab4f5-6393-11e8-b7cc-42010a800002"


def test_a_pod_is_injected_and_the_answer_echoes_the_uid():
    answer = Injector(settings()).review(review())
    assert answer["apiVersion"] == "admission.k8s.io/v1"
    assert answer["kind"] == "AdmissionReview"
    response = answer["response"]
    assert response["uid"] == UID
    assert response["allowed"] is True
    assert "status" not in response
    patched = apply_patch(pod(), decoded_patch(answer))
    assert schema_errors(patched) == []
    assert [c["name"] for c in patched["spec"]["containers"]] == ["app", "mesh-identity-envoy", "mesh-identity-agent"]


def test_an_injected_pod_is_not_injected_again():
    injector = Injector(settings())
    patched = apply_patch(pod(), decoded_patch(injector.review(review())))
    again = injector.review(review(patched))["response"]
    assert again == {"uid": UID, "allowed": True}


def test_a_pod_with_one_of_our_containers_but_no_marker_is_left_alone():
    found = pod()
    found["spec"]["containers"].append({"name": "mesh-identity-envoy", "image": "envoy"})
    assert is_injected(found)
    assert Injector(settings()).review(review(found))["response"] == {"uid": UID, "allowed": True}


def test_a_pod_in_an_unmonitored_namespace_is_admitted_unmodified():
    injector = Injector(settings(), monitored=lambda namespace: namespace == "shop")
    elsewhere = pod()
    elsewhere["metadata"]["namespace"] = "other"
    assert injector.review(review(elsewhere, namespace="other"))["response"] == {"uid": UID, "allowed": True}
    assert "patch" in injector.review(review())["response"]


def test_a_host_network_pod_is_admitted_unmodified_with_a_warning():
    response = Injector(settings()).review(review(pod(hostNetwork=True)))["response"]
    assert response["allowed"] is True
    assert "patch" not in response
    assert response["warnings"] == ["mesh-identity: pod in shop uses hostNetwork; not injected (no capture)"]


def test_an_opted_out_pod_is_admitted_unmodified():
    response = Injector(settings()).review(review(pod({"mesh-identity.io/inject": "false"})))["response"]
    assert response == {"uid": UID, "allowed": True}


def test_a_dry_run_is_answered_as_a_real_request():
    injector = Injector(settings())
    assert injector.review(review(dryRun=True)) == injector.review(review())


BAD_POD = [
    (
        {"mesh-identity.io/exclude-inbound-ports": "8080,http"},
        "metadata.annotations['mesh-identity.io/exclude-inbound-ports']: 'http' is not a port (1-65535)",
    ),
    (
        {"mesh-identity.io/exclude-outbound-ports": "0"},
        "metadata.annotations['mesh-identity.io/exclude-outbound-ports']: '0' is not a port (1-65535)",
    ),
    (
        {"mesh-identity.io/exclude-outbound-ports": "443,443"},
        "metadata.annotations['mesh-identity.io/exclude-outbound-ports']: port 443 is listed twice",
    ),
    (
        {"mesh-identity.io/exclude-inbound-ports": "15003"},
        "metadata.annotations['mesh-identity.io/exclude-inbound-ports']: port 15003 is the sidecar's own capture "
        "port; excluding it would bypass the mesh",
    ),
    (
        {"mesh-identity.io/exclude-outbound-ports": "15001"},
        "metadata.annotations['mesh-identity.io/exclude-outbound-ports']: port 15001 is the sidecar's own capture "
        "port; excluding it would bypass the mesh",
    ),
    (
        {"mesh-identity.io/exclude-outbound-ip-ranges": "10.0.0.1/8"},
        "metadata.annotations['mesh-identity.io/exclude-outbound-ip-ranges']: '10.0.0.1/8' is not a CIDR "
        "(10.0.0.1/8 has host bits set)",
    ),
    (
        {"mesh-identity.io/exclude-outbound-ip-ranges": "fd00::/8"},
        "metadata.annotations['mesh-identity.io/exclude-outbound-ip-ranges']: 'fd00::/8' is IPv6; the capture "
        "rules are IPv4",
    ),
    (
        {"mesh-identity.io/inject": "yes"},
        'metadata.annotations[\'mesh-identity.io/inject\']: "yes" is not "true" or "false"',
    ),
]


@pytest.mark.parametrize(("annotations", "message"), BAD_POD)
def test_a_pod_that_cannot_be_injected_is_denied_with_the_reason(annotations, message):
    response = Injector(settings()).review(review(pod(annotations)))["response"]
    assert response == {
        "uid": UID,
        "allowed": False,
        "status": {"code": 403, "message": f"mesh-identity cannot inject this pod: {message}"},
    }


@pytest.mark.parametrize(("annotations", "message"), BAD_POD)
def test_in_allow_mode_it_is_admitted_unmodified_with_the_reason(annotations, message):
    response = Injector(settings(failure_mode=FailureMode.ALLOW)).review(review(pod(annotations)))["response"]
    assert response == {
        "uid": UID,
        "allowed": True,
        "warnings": [f"mesh-identity cannot inject this pod: {message}; admitted without the sidecar"],
    }


def test_an_app_running_as_envoys_user_is_denied():
    found = pod(securityContext={"runAsUser": 1337})
    response = Injector(settings()).review(review(found))["response"]
    assert response["allowed"] is False
    assert response["status"]["message"] == (
        "mesh-identity cannot inject this pod: spec.containers[0].securityContext.runAsUser: 1337 is the sidecar's "
        "user; the app's traffic would escape capture"
    )


def test_an_app_port_that_is_a_sidecar_port_is_denied():
    found = pod()
    found["spec"]["containers"][0]["ports"] = [{"containerPort": 15090}]
    response = Injector(settings()).review(review(found))["response"]
    assert response["status"]["message"] == (
        "mesh-identity cannot inject this pod: spec.containers[0].ports[0].containerPort: 15090 is a port of the "
        "sidecar (15000, 15001, 15003, 15090 are reserved)"
    )


def _without(document: dict[str, Any], *path: str) -> dict[str, Any]:
    document = copy.deepcopy(document)
    target = document
    for key in path[:-1]:
        target = target[key]
    del target[path[-1]]
    return document


def _with(document: dict[str, Any], value: Any, *path: str) -> dict[str, Any]:
    document = copy.deepcopy(document)
    target = document
    for key in path[:-1]:
        target = target[key]
    target[path[-1]] = value
    return document


GOOD = review()
MALFORMED = [
    ([], "<review>: list is not an object"),
    (
        _with(GOOD, "admission.k8s.io/v1beta1", "apiVersion"),
        "apiVersion: \"admission.k8s.io/v1beta1\" is not 'admission.k8s.io/v1'",
    ),
    (_with(GOOD, "Review", "kind"), "kind: \"Review\" is not 'AdmissionReview'"),
    (
        _with(GOOD, {"uid": UID, "allowed": True}, "response"),
        "response: a review sent to the webhook carries a request, not a response",
    ),
    (_without(GOOD, "request"), "request: null is not an object"),
    (_without(GOOD, "request", "uid"), "request.uid: null is not a non-empty string"),
    (_with(GOOD, "", "request", "uid"), 'request.uid: "" is not a non-empty string'),
    (
        _with(GOOD, "x" * 129, "request", "uid"),
        'request.uid: "' + "x" * 76 + "... is not a UID (printable ASCII, 128 at most)",
    ),
    (
        _with(GOOD, {"group": "apps", "version": "v1", "kind": "Deployment"}, "request", "kind"),
        'request.kind: {"group": "apps", "version": "v1", "kind": "Deployment"} is not a v1 Pod; this webhook injects Pods only',
    ),
    (_with(GOOD, "status", "request", "subResource"), 'request.subResource: "status": only a Pod is injected'),
    (
        _with(GOOD, "UPDATE", "request", "operation"),
        'request.operation: "UPDATE" is not CREATE; pods are injected on creation',
    ),
    (_without(GOOD, "request", "namespace"), "request.namespace: null is not a non-empty string"),
    (_with(GOOD, "yes", "request", "dryRun"), 'request.dryRun: "yes" is not true or false'),
    (_without(GOOD, "request", "object"), "request.object: null is not an object"),
    (
        _with(GOOD, "Service", "request", "object", "kind"),
        'request.object: kind "Service", apiVersion "v1" is not a v1 Pod',
    ),
    (
        _with(GOOD, "other", "request", "object", "metadata", "namespace"),
        'request.object.metadata.namespace: "other" is not request.namespace "shop"',
    ),
    (
        _with(GOOD, {"a": 1}, "request", "object", "metadata", "annotations"),
        "request.object.metadata.annotations['a']: 1 is not a string",
    ),
    (_without(GOOD, "request", "object", "spec"), "request.object.spec: null is not an object"),
    (
        _without(GOOD, "request", "object", "spec", "containers"),
        "request.object.spec.containers: required (a Pod has at least one container)",
    ),
    (
        _with(GOOD, [], "request", "object", "spec", "containers"),
        "request.object.spec.containers: list is not a non-empty list",
    ),
    (
        _with(GOOD, ["app"], "request", "object", "spec", "containers"),
        'request.object.spec.containers[0]: "app" is not an object',
    ),
    (
        _with(GOOD, {"name": "x"}, "request", "object", "spec", "volumes"),
        "request.object.spec.volumes: dict is not a non-empty list",
    ),
    (
        _with(GOOD, "true", "request", "object", "spec", "hostNetwork"),
        'request.object.spec.hostNetwork: "true" is not a bool',
    ),
]


@pytest.mark.parametrize(("document", "message"), MALFORMED)
def test_a_malformed_review_is_refused_naming_the_field(document, message):
    with pytest.raises(InvalidReviewError) as caught:
        Injector(settings()).review(document)
    assert str(caught.value) == message


def test_the_request_is_read():
    request = parse_review(review(dryRun=True))
    assert (request.uid, request.namespace, request.name, request.dry_run) == (UID, "shop", "web-1", True)


def test_network_probes_get_a_warning_unless_their_port_is_excluded():
    found = pod()
    app = found["spec"]["containers"][0]
    app["ports"] = [{"name": "http", "containerPort": 8080}]
    app["readinessProbe"] = {"httpGet": {"path": "/ready", "port": "http"}}
    app["livenessProbe"] = {"exec": {"command": ["true"]}}
    response = Injector(settings()).review(review(found))["response"]
    assert response["allowed"] is True
    assert response["warnings"] == [
        "mesh-identity: spec.containers[0].readinessProbe.httpGet (port http) goes through the sidecar's mTLS "
        "listener and fails; exclude its port with mesh-identity.io/exclude-inbound-ports or use an exec probe"
    ]
    found["metadata"]["annotations"] = {"mesh-identity.io/exclude-inbound-ports": "8080"}
    response = Injector(settings()).review(review(found))["response"]
    assert "warnings" not in response
    assert "patch" in response


@pytest.mark.parametrize(
    "spec",
    [
        {"securityContext": "root"},
        {"containers": [{"name": "app", "image": "nginx", "securityContext": 7, "ports": "8080"}]},
        {"containers": [{"name": "app", "image": "nginx", "readinessProbe": {"httpGet": "x"}}]},
    ],
)
def test_odd_shapes_the_review_does_not_check_still_get_an_answer(spec):
    response = Injector(settings()).review(review(pod(**spec)))["response"]
    assert response["allowed"] is True
