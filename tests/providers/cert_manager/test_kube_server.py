"""The test Kubernetes API server, driven only through the real ``kubernetes`` client."""

from __future__ import annotations

import base64
import json
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import kubernetes
import pytest
import urllib3
from kubernetes.client import ApiException

from tests.fakes.cert_manager import CERTIFICATE_REQUEST, install_crds
from tests.fakes.kube import DEFAULT_TOKEN, DEFAULT_USER, SECRET, KubeServer

G, V, CRS = "cert-manager.io", "v1", "certificaterequests"
NS = "mesh"


@pytest.fixture
def core(kube_api_client: kubernetes.client.ApiClient) -> kubernetes.client.CoreV1Api:
    return kubernetes.client.CoreV1Api(kube_api_client)


@pytest.fixture
def custom(kube_api_client: kubernetes.client.ApiClient) -> kubernetes.client.CustomObjectsApi:
    return kubernetes.client.CustomObjectsApi(kube_api_client)


def cr_body(name: str = "req", **spec: Any) -> dict[str, Any]:
    return {
        "apiVersion": f"{G}/{V}",
        "kind": "CertificateRequest",
        "metadata": {"name": name},
        "spec": {"request": base64.b64encode(b"csr").decode(), "issuerRef": {"name": "mesh-ca"}, **spec},
    }


def api_error(call: Callable[[], object]) -> tuple[int, str, str]:
    with pytest.raises(ApiException) as info:
        call()
    body = json.loads(info.value.body)
    assert body["kind"] == "Status"
    assert body["code"] == info.value.status
    return info.value.status, body["reason"], body["message"]


# ------------------------------------------------------------------------------------------------- CRUD


def test_secret_crud_through_core_api(core: kubernetes.client.CoreV1Api) -> None:
    created = core.create_namespaced_secret(
        NS, {"metadata": {"name": "s1", "labels": {"app": "a"}}, "stringData": {"token": "hunter2"}}
    )
    assert created.data == {"token": base64.b64encode(b"hunter2").decode()}
    assert created.type == "Opaque"
    assert created.metadata.uid
    assert created.metadata.creation_timestamp is not None
    read = core.read_namespaced_secret("s1", NS)
    assert read.metadata.resource_version == created.metadata.resource_version
    patched = core.patch_namespaced_secret("s1", NS, {"metadata": {"labels": {"tier": "x"}}})
    assert patched.metadata.labels == {"app": "a", "tier": "x"}
    assert int(patched.metadata.resource_version) > int(created.metadata.resource_version)
    patched.data = {"other": base64.b64encode(b"v").decode()}
    replaced = core.replace_namespaced_secret("s1", NS, patched)
    assert replaced.data == {"other": "dg=="}
    assert [s.metadata.name for s in core.list_namespaced_secret(NS).items] == ["s1"]
    status = core.delete_namespaced_secret("s1", NS)
    assert status["status"] == "Success"
    assert core.list_namespaced_secret(NS).items == []


def test_config_map_crud_and_all_namespaces_list(core: kubernetes.client.CoreV1Api) -> None:
    core.create_namespaced_config_map("a", {"metadata": {"name": "bundle"}, "data": {"ca.crt": "pem"}})
    core.create_namespaced_config_map("b", {"metadata": {"name": "bundle"}, "data": {"ca.crt": "other"}})
    assert core.read_namespaced_config_map("bundle", "b").data == {"ca.crt": "other"}
    everywhere = core.list_config_map_for_all_namespaces().items
    assert [(c.metadata.namespace, c.data["ca.crt"]) for c in everywhere] == [("a", "pem"), ("b", "other")]


def test_certificate_request_crud_through_custom_objects_api(custom: kubernetes.client.CustomObjectsApi) -> None:
    body = cr_body()
    body["status"] = {"certificate": "forged"}
    created = custom.create_namespaced_custom_object(G, V, NS, CRS, body)
    assert "status" not in created  # status is the /status subresource's, not the creator's
    assert created["metadata"]["generation"] == 1
    got = custom.get_namespaced_custom_object(G, V, NS, CRS, "req")
    assert got == created
    listed = custom.list_namespaced_custom_object(G, V, NS, CRS)
    assert listed["kind"] == "CertificateRequestList"
    assert [i["metadata"]["name"] for i in listed["items"]] == ["req"]
    custom.delete_namespaced_custom_object(G, V, NS, CRS, "req")
    assert custom.list_cluster_custom_object(G, V, CRS)["items"] == []


def test_cluster_scoped_kind(custom: kubernetes.client.CustomObjectsApi) -> None:
    body = {
        "apiVersion": f"{G}/{V}",
        "kind": "ClusterIssuer",
        "metadata": {"name": "root", "namespace": "x"},
        "spec": {"ca": {"secretName": "root-ca"}},
    }
    created = custom.create_cluster_custom_object(G, V, "clusterissuers", body)
    assert "namespace" not in created["metadata"]
    created["spec"]["ca"]["secretName"] = "new-ca"
    replaced = custom.replace_cluster_custom_object(G, V, "clusterissuers", "root", created)
    assert replaced["metadata"]["generation"] == 2
    assert custom.get_cluster_custom_object(G, V, "clusterissuers", "root")["spec"]["ca"]["secretName"] == "new-ca"


def test_status_subresource_writes_only_status(custom: kubernetes.client.CustomObjectsApi) -> None:
    created = custom.create_namespaced_custom_object(G, V, NS, CRS, cr_body())
    created["metadata"]["labels"] = {"ignored": "yes"}
    created["status"] = {"conditions": [{"type": "Approved", "status": "True", "reason": "r", "message": "m"}]}
    after_status = custom.replace_namespaced_custom_object_status(G, V, NS, CRS, "req", created)
    assert after_status["status"]["conditions"][0]["type"] == "Approved"
    assert "labels" not in after_status["metadata"]
    assert after_status["metadata"]["generation"] == 1
    after_status["status"] = {"certificate": "not via main resource"}
    after_status["metadata"]["labels"] = {"kept": "yes"}
    after_main = custom.replace_namespaced_custom_object(G, V, NS, CRS, "req", after_status)
    assert after_main["status"]["conditions"][0]["type"] == "Approved"
    assert "certificate" not in after_main["status"]
    assert after_main["metadata"]["labels"] == {"kept": "yes"}
    assert after_main["metadata"]["generation"] == 1  # spec unchanged
    merged = custom.patch_namespaced_custom_object_status(G, V, NS, CRS, "req", {"status": {"ca": "Y2E="}})
    assert merged["status"]["ca"] == "Y2E="
    assert merged["status"]["conditions"][0]["type"] == "Approved"


def test_resource_version_is_one_cluster_wide_counter(
    core: kubernetes.client.CoreV1Api, custom: kubernetes.client.CustomObjectsApi
) -> None:
    versions = [
        int(core.create_namespaced_secret("a", {"metadata": {"name": "s"}}).metadata.resource_version),
        int(custom.create_namespaced_custom_object(G, V, "b", CRS, cr_body())["metadata"]["resourceVersion"]),
        int(core.create_namespaced_config_map("c", {"metadata": {"name": "c"}}).metadata.resource_version),
        int(core.patch_namespaced_secret("s", "a", {"data": {"k": "dg=="}}).metadata.resource_version),
    ]
    assert versions == sorted(versions)
    assert len(set(versions)) == 4
    assert int(core.list_namespaced_secret("a").metadata.resource_version) == versions[-1]


def test_no_op_write_keeps_resource_version(core: kubernetes.client.CoreV1Api) -> None:
    created = core.create_namespaced_secret(NS, {"metadata": {"name": "s", "labels": {"a": "b"}}})
    same = core.patch_namespaced_secret("s", NS, {"metadata": {"labels": {"a": "b"}}})
    assert same.metadata.resource_version == created.metadata.resource_version


def test_generate_name(custom: kubernetes.client.CustomObjectsApi) -> None:
    body = cr_body()
    body["metadata"] = {"generateName": "mesh-identity-"}
    names = {custom.create_namespaced_custom_object(G, V, NS, CRS, body)["metadata"]["name"] for _ in range(20)}
    assert len(names) == 20
    for name in names:
        assert name.startswith("mesh-identity-")
        assert len(name) == len("mesh-identity-") + 5
        assert set(name.removeprefix("mesh-identity-")) <= set("bcdfghjklmnpqrstvwxz2456789")


# ----------------------------------------------------------------------------------------------- patches


def test_patch_flavours(core: kubernetes.client.CoreV1Api, custom: kubernetes.client.CustomObjectsApi) -> None:
    core.create_namespaced_config_map(
        NS, {"metadata": {"name": "c", "labels": {"a": "1", "b": "2"}}, "data": {"x": "1"}}
    )
    merged = core.patch_namespaced_config_map("c", NS, {"metadata": {"labels": {"a": None}}, "data": {"y": "2"}})
    assert merged.metadata.labels == {"b": "2"}
    assert merged.data == {"x": "1", "y": "2"}
    ops = [
        {"op": "add", "path": "/data/z", "value": "3"},
        {"op": "remove", "path": "/data/x"},
        {"op": "test", "path": "/data/y", "value": "2"},
        {"op": "replace", "path": "/metadata/labels/b", "value": "9"},
    ]
    patched = core.patch_namespaced_config_map("c", NS, ops)
    assert patched.data == {"y": "2", "z": "3"}
    assert patched.metadata.labels == {"b": "9"}
    created = custom.create_namespaced_custom_object(G, V, NS, CRS, cr_body())
    labelled = custom.patch_namespaced_custom_object(G, V, NS, CRS, "req", {"metadata": {"labels": {"l": "v"}}})
    assert labelled["metadata"]["labels"] == {"l": "v"}
    assert labelled["metadata"]["resourceVersion"] != created["metadata"]["resourceVersion"]


# -------------------------------------------------------------------------------------------------- errors

ERRORS: list[
    tuple[str, Callable[[kubernetes.client.CoreV1Api, kubernetes.client.CustomObjectsApi], object], int, str, str]
] = [
    (
        "missing secret",
        lambda core, custom: core.read_namespaced_secret("nope", NS),
        404,
        "NotFound",
        'secrets "nope" not found',
    ),
    (
        "missing certificate request",
        lambda core, custom: custom.get_namespaced_custom_object(G, V, NS, CRS, "nope"),
        404,
        "NotFound",
        'certificaterequests.cert-manager.io "nope" not found',
    ),
    (
        "delete missing certificate request",
        lambda core, custom: custom.delete_namespaced_custom_object(G, V, NS, CRS, "nope"),
        404,
        "NotFound",
        'certificaterequests.cert-manager.io "nope" not found',
    ),
    (
        "duplicate secret",
        lambda core, custom: core.create_namespaced_secret(NS, {"metadata": {"name": "taken"}}),
        409,
        "AlreadyExists",
        'secrets "taken" already exists',
    ),
    (
        "duplicate certificate request",
        lambda core, custom: custom.create_namespaced_custom_object(G, V, NS, CRS, cr_body("existing")),
        409,
        "AlreadyExists",
        'certificaterequests.cert-manager.io "existing" already exists',
    ),
    (
        "stale resourceVersion on replace",
        lambda core, custom: core.replace_namespaced_secret(
            "taken", NS, {"metadata": {"name": "taken", "resourceVersion": "1"}}
        ),
        409,
        "Conflict",
        'Operation cannot be fulfilled on secrets "taken": the object has been modified; please '
        "apply your changes to the latest version and try again",
    ),
    (
        "stale resourceVersion in a merge patch",
        lambda core, custom: custom.patch_namespaced_custom_object_status(
            G, V, NS, CRS, "existing", {"metadata": {"resourceVersion": "1"}, "status": {"ca": "eA=="}}
        ),
        409,
        "Conflict",
        'Operation cannot be fulfilled on certificaterequests.cert-manager.io "existing": the '
        "object has been modified; please apply your changes to the latest version and try again",
    ),
    (
        "delete precondition",
        lambda core, custom: core.delete_namespaced_secret("taken", NS, body={"preconditions": {"uid": "0000"}}),
        409,
        "Conflict",
        'Operation cannot be fulfilled on secrets "taken": Precondition failed: UID in '
        "precondition: 0000, UID in object meta: {uid}",
    ),
    (
        "custom object update without resourceVersion",
        lambda core, custom: custom.replace_namespaced_custom_object(G, V, NS, CRS, "existing", cr_body("existing")),
        422,
        "Invalid",
        'CertificateRequest.cert-manager.io "existing" is invalid: metadata.resourceVersion: '
        "Invalid value: 0x0: must be specified for an update",
    ),
    (
        "immutable certificate request spec",
        lambda core, custom: custom.patch_namespaced_custom_object(
            G, V, NS, CRS, "existing", {"spec": {"duration": "1h"}}
        ),
        422,
        "Invalid",
        'CertificateRequest.cert-manager.io "existing" is invalid: spec: Forbidden: field is immutable',
    ),
    (
        "certificate request without request or issuer",
        lambda core, custom: custom.create_namespaced_custom_object(
            G, V, NS, CRS, {"metadata": {"name": "empty"}, "spec": {}}
        ),
        422,
        "Invalid",
        'CertificateRequest.cert-manager.io "empty" is invalid: [spec.request: Required value, '
        "spec.issuerRef.name: Required value]",
    ),
    (
        "certificate request with an unknown usage",
        lambda core, custom: custom.create_namespaced_custom_object(
            G, V, NS, CRS, cr_body("u", usages=["server auth", "world domination"])
        ),
        422,
        "Invalid",
        'CertificateRequest.cert-manager.io "u" is invalid: spec.usages[1]: Unsupported value: "world domination"',
    ),
    (
        "approval then denial",
        lambda core, custom: custom.patch_namespaced_custom_object_status(
            G,
            V,
            NS,
            CRS,
            "approved",
            {"status": {"conditions": [{"type": "Approved", "status": "True"}, {"type": "Denied", "status": "True"}]}},
        ),
        422,
        "Invalid",
        'CertificateRequest.cert-manager.io "approved" is invalid: status.conditions: Forbidden: '
        "'Approved' and 'Denied' conditions cannot coexist",
    ),
    (
        "invalid name",
        lambda core, custom: core.create_namespaced_secret(NS, {"metadata": {"name": "Bad_Name"}}),
        422,
        "Invalid",
        "Secret \"Bad_Name\" is invalid: metadata.name: Invalid value: 'Bad_Name': a lowercase RFC "
        "1123 subdomain must consist of lower case alphanumeric characters, '-' or '.', and must "
        "start and end with an alphanumeric character (e.g. 'example.com', regex used for "
        r"validation is '[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*')",
    ),
    (
        "no name",
        lambda core, custom: core.create_namespaced_secret(NS, {"metadata": {}}),
        422,
        "Invalid",
        'Secret "" is invalid: metadata.name: Required value: name or generateName is required',
    ),
    (
        "namespace mismatch",
        lambda core, custom: core.create_namespaced_secret(NS, {"metadata": {"name": "x", "namespace": "other"}}),
        400,
        "BadRequest",
        "the namespace of the provided object does not match the namespace sent on the request",
    ),
    (
        "name mismatch",
        lambda core, custom: core.replace_namespaced_secret("taken", NS, {"metadata": {"name": "other"}}),
        400,
        "BadRequest",
        "the name of the object (other) does not match the name on the URL (taken)",
    ),
    (
        "resourceVersion on create",
        lambda core, custom: core.create_namespaced_secret(NS, {"metadata": {"name": "x", "resourceVersion": "5"}}),
        400,
        "BadRequest",
        "resourceVersion should not be set on objects to be created",
    ),
    (
        "kind mismatch",
        lambda core, custom: custom.create_namespaced_custom_object(
            G, V, NS, CRS, {**cr_body("k"), "kind": "Certificate"}
        ),
        400,
        "BadRequest",
        "the kind in the data (Certificate) does not match the expected kind (CertificateRequest)",
    ),
    (
        "secret data that is not base64",
        lambda core, custom: core.create_namespaced_secret(NS, {"metadata": {"name": "b"}, "data": {"k": "%%%"}}),
        400,
        "BadRequest",
        'Secret in version "v1" cannot be handled as a Secret: illegal base64 data in data.k',
    ),
    (
        "bad label selector",
        lambda core, custom: core.list_namespaced_secret(NS, label_selector="a in (b"),
        400,
        "BadRequest",
        "unable to parse requirement: 'a in (b'",
    ),
    (
        "unsupported field selector",
        lambda core, custom: core.list_namespaced_secret(NS, field_selector="spec.nodeName=x"),
        400,
        "BadRequest",
        "field label not supported: spec.nodeName",
    ),
    (
        "strategic merge patch on a custom resource",
        lambda core, custom: custom.patch_namespaced_custom_object(
            G,
            V,
            NS,
            CRS,
            "existing",
            {"metadata": {"labels": {"a": "b"}}},
            _content_type="application/strategic-merge-patch+json",
        ),
        415,
        "UnsupportedMediaType",
        "the body of the request was in an unknown format - accepted media types "
        "include: application/json-patch+json, application/merge-patch+json",
    ),
]


@pytest.mark.parametrize(("call", "code", "reason", "message"), [e[1:] for e in ERRORS], ids=[e[0] for e in ERRORS])
def test_errors_are_status_objects(
    core: kubernetes.client.CoreV1Api,
    custom: kubernetes.client.CustomObjectsApi,
    call: Callable[[kubernetes.client.CoreV1Api, kubernetes.client.CustomObjectsApi], object],
    code: int,
    reason: str,
    message: str,
) -> None:
    taken = core.create_namespaced_secret(NS, {"metadata": {"name": "taken"}})
    core.patch_namespaced_secret("taken", NS, {"metadata": {"labels": {"bump": "1"}}})
    custom.create_namespaced_custom_object(G, V, NS, CRS, cr_body("existing"))
    approved = custom.create_namespaced_custom_object(G, V, NS, CRS, cr_body("approved"))
    approved["status"] = {"conditions": [{"type": "Approved", "status": "True"}]}
    custom.replace_namespaced_custom_object_status(G, V, NS, CRS, "approved", approved)
    assert api_error(lambda: call(core, custom)) == (code, reason, message.format(uid=taken.metadata.uid))


def test_unknown_token_is_unauthorized(kube_server: KubeServer) -> None:
    with kubernetes.client.ApiClient(kube_server.client_configuration("wrong-token")) as api:
        assert api_error(lambda: kubernetes.client.CoreV1Api(api).list_namespaced_secret(NS)) == (
            401,
            "Unauthorized",
            "Unauthorized",
        )


def test_unknown_resource_is_not_found(kube_api_client: kubernetes.client.ApiClient) -> None:
    custom = kubernetes.client.CustomObjectsApi(kube_api_client)
    assert api_error(lambda: custom.list_namespaced_custom_object(G, V, NS, "certificates")) == (
        404,
        "NotFound",
        "the server could not find the requested resource",
    )


FORBIDDEN = [
    (
        "create",
        "certificaterequests",
        lambda core, custom: custom.create_namespaced_custom_object(G, V, NS, CRS, cr_body("new")),
        'certificaterequests.cert-manager.io is forbidden: User "system:serviceaccount:mesh-identity:mesh-identity" '
        'cannot create resource "certificaterequests" in API group "cert-manager.io" in the namespace "mesh"',
    ),
    (
        "get",
        "secrets",
        lambda core, custom: core.read_namespaced_secret("bundle", NS),
        'secrets "bundle" is forbidden: User "system:serviceaccount:mesh-identity:mesh-identity" cannot get '
        'resource "secrets" in API group "" in the namespace "mesh"',
    ),
    (
        "list",
        "configmaps",
        lambda core, custom: core.list_config_map_for_all_namespaces(),
        'configmaps is forbidden: User "system:serviceaccount:mesh-identity:mesh-identity" cannot list resource '
        '"configmaps" in API group "" at the cluster scope',
    ),
    (
        "update",
        "certificaterequests/status",
        lambda core, custom: custom.patch_namespaced_custom_object_status(G, V, NS, CRS, "existing", {"status": {}}),
        'certificaterequests.cert-manager.io "existing" is forbidden: User '
        '"system:serviceaccount:mesh-identity:mesh-identity" cannot patch resource "certificaterequests/status" in '
        'API group "cert-manager.io" in the namespace "mesh"',
    ),
    (
        "delete",
        "certificaterequests",
        lambda core, custom: custom.delete_namespaced_custom_object(G, V, NS, CRS, "existing"),
        'certificaterequests.cert-manager.io "existing" is forbidden: User '
        '"system:serviceaccount:mesh-identity:mesh-identity" cannot delete resource "certificaterequests" in API '
        'group "cert-manager.io" in the namespace "mesh"',
    ),
]


@pytest.mark.parametrize(("verb", "resource", "call", "message"), FORBIDDEN, ids=[f[0] for f in FORBIDDEN])
def test_deny_rules_answer_forbidden(
    kube_server: KubeServer,
    core: kubernetes.client.CoreV1Api,
    custom: kubernetes.client.CustomObjectsApi,
    verb: str,
    resource: str,
    call: Callable[[kubernetes.client.CoreV1Api, kubernetes.client.CustomObjectsApi], object],
    message: str,
) -> None:
    custom.create_namespaced_custom_object(G, V, NS, CRS, cr_body("existing"))
    rule = kube_server.deny("patch" if resource.endswith("/status") else verb, resource)
    assert api_error(lambda: call(core, custom)) == (403, "Forbidden", message)
    kube_server.allow(rule)
    with pytest.raises(ApiException) as info:  # allowed again: whatever it answers, not 403
        call(core, custom)
        raise ApiException(status=0)
    assert info.value.status != 403


def test_deny_rule_applies_to_one_user_only(kube_server: KubeServer, core: kubernetes.client.CoreV1Api) -> None:
    kube_server.tokens["other-token"] = "other-user"
    kube_server.deny("list", "secrets", user="other-user")
    assert core.list_namespaced_secret(NS).items == []
    with kubernetes.client.ApiClient(kube_server.client_configuration("other-token")) as api:
        status, reason, _ = api_error(lambda: kubernetes.client.CoreV1Api(api).list_namespaced_secret(NS))
    assert (status, reason) == (403, "Forbidden")


def test_injected_error_answers_the_given_number_of_times(
    kube_server: KubeServer, core: kubernetes.client.CoreV1Api
) -> None:
    kube_server.inject_error(
        "create", "secrets", code=503, reason="ServiceUnavailable", message="etcd is down", times=2
    )
    for _ in range(2):
        assert api_error(lambda: core.create_namespaced_secret(NS, {"metadata": {"name": "s"}})) == (
            503,
            "ServiceUnavailable",
            "etcd is down",
        )
    assert core.create_namespaced_secret(NS, {"metadata": {"name": "s"}}).metadata.name == "s"


# ------------------------------------------------------------------------------------------------- lists

SELECTORS = [
    ("app=web", ["a", "b"]),
    ("app==web,tier=front", ["a"]),
    ("app!=web", ["c", "d"]),
    ("tier in (front, back)", ["a", "b", "c"]),
    ("tier notin (front)", ["b", "c", "d"]),
    ("tier", ["a", "b", "c"]),
    ("!tier", ["d"]),
    ("example.com/owner=mesh-identity", ["d"]),
    ("", ["a", "b", "c", "d"]),
]


@pytest.mark.parametrize(("selector", "names"), SELECTORS)
def test_label_selectors(core: kubernetes.client.CoreV1Api, selector: str, names: list[str]) -> None:
    for name, labels in [
        ("a", {"app": "web", "tier": "front"}),
        ("b", {"app": "web", "tier": "back"}),
        ("c", {"app": "db", "tier": "back"}),
        ("d", {"example.com/owner": "mesh-identity"}),
    ]:
        core.create_namespaced_config_map(NS, {"metadata": {"name": name, "labels": labels}})
    assert [c.metadata.name for c in core.list_namespaced_config_map(NS, label_selector=selector).items] == names


def test_field_selectors(core: kubernetes.client.CoreV1Api) -> None:
    core.create_namespaced_secret(NS, {"metadata": {"name": "a"}, "type": "kubernetes.io/tls"})
    core.create_namespaced_secret(NS, {"metadata": {"name": "b"}})
    core.create_namespaced_secret("other", {"metadata": {"name": "a"}})
    assert [s.metadata.name for s in core.list_namespaced_secret(NS, field_selector="metadata.name=b").items] == ["b"]
    assert [
        s.metadata.name for s in core.list_namespaced_secret(NS, field_selector="type=kubernetes.io/tls").items
    ] == ["a"]
    everywhere = core.list_secret_for_all_namespaces(field_selector="metadata.namespace!=mesh").items
    assert [(s.metadata.namespace, s.metadata.name) for s in everywhere] == [("other", "a")]


def test_limit_and_continue(core: kubernetes.client.CoreV1Api) -> None:
    for index in range(5):
        core.create_namespaced_config_map(NS, {"metadata": {"name": f"c{index}"}})
    seen, token, pages = [], None, 0
    while True:
        page = core.list_namespaced_config_map(NS, limit=2, _continue=token)
        seen += [c.metadata.name for c in page.items]
        pages += 1
        token = page.metadata._continue
        if not token:
            break
    assert seen == ["c0", "c1", "c2", "c3", "c4"]
    assert pages == 3


def test_delete_collection_by_label(core: kubernetes.client.CoreV1Api) -> None:
    for name, owner in [("a", "me"), ("b", "me"), ("c", "you")]:
        core.create_namespaced_secret(NS, {"metadata": {"name": name, "labels": {"owner": owner}}})
    core.delete_collection_namespaced_secret(NS, label_selector="owner=me")
    assert [s.metadata.name for s in core.list_namespaced_secret(NS).items] == ["c"]


def test_finalizers_delay_deletion(core: kubernetes.client.CoreV1Api) -> None:
    core.create_namespaced_config_map(NS, {"metadata": {"name": "held", "finalizers": ["example.com/hold"]}})
    core.delete_namespaced_config_map("held", NS)
    held = core.read_namespaced_config_map("held", NS)
    assert held.metadata.deletion_timestamp is not None
    core.patch_namespaced_config_map("held", NS, {"metadata": {"finalizers": None}})
    status, reason, _ = api_error(lambda: core.read_namespaced_config_map("held", NS))
    assert (status, reason) == (404, "NotFound")


# ------------------------------------------------------------------------------------------------ watches


def collect(stream: Any, watch: kubernetes.watch.Watch, count: int) -> list[tuple[str, Any]]:
    events = []
    for event in stream:
        raw = event["raw_object"]
        events.append((event["type"], raw))
        if len(events) == count:
            watch.stop()
    return events


def test_watch_replays_events_after_a_resource_version(custom: kubernetes.client.CustomObjectsApi) -> None:
    start = custom.list_namespaced_custom_object(G, V, NS, CRS)["metadata"]["resourceVersion"]
    created = custom.create_namespaced_custom_object(G, V, NS, CRS, cr_body())
    custom.create_namespaced_custom_object(G, V, "elsewhere", CRS, cr_body())
    created["status"] = {"conditions": [{"type": "Approved", "status": "True"}]}
    custom.replace_namespaced_custom_object_status(G, V, NS, CRS, "req", created)
    custom.delete_namespaced_custom_object(G, V, NS, CRS, "req")
    watch = kubernetes.watch.Watch()
    events = collect(
        watch.stream(custom.list_namespaced_custom_object, G, V, NS, CRS, resource_version=start, timeout_seconds=30),
        watch,
        3,
    )
    assert [t for t, _ in events] == ["ADDED", "MODIFIED", "DELETED"]
    assert events[1][1]["status"]["conditions"][0]["type"] == "Approved"
    versions = [int(o["metadata"]["resourceVersion"]) for _, o in events]
    assert versions == sorted(versions)
    assert watch.resource_version == str(versions[-1])


def test_watch_without_resource_version_starts_with_current_objects(core: kubernetes.client.CoreV1Api) -> None:
    core.create_namespaced_secret(NS, {"metadata": {"name": "a"}})
    core.create_namespaced_secret(NS, {"metadata": {"name": "b"}})
    watch = kubernetes.watch.Watch()
    events = collect(watch.stream(core.list_namespaced_secret, NS, timeout_seconds=30), watch, 2)
    assert [(t, o["metadata"]["name"]) for t, o in events] == [("ADDED", "a"), ("ADDED", "b")]
    assert events[0][1]["kind"] == "Secret"


def test_watch_with_label_selector_sees_objects_enter_and_leave(core: kubernetes.client.CoreV1Api) -> None:
    start = core.list_namespaced_config_map(NS).metadata.resource_version
    core.create_namespaced_config_map(NS, {"metadata": {"name": "c", "labels": {"mesh": "no"}}})
    core.patch_namespaced_config_map("c", NS, {"metadata": {"labels": {"mesh": "yes"}}})
    core.patch_namespaced_config_map("c", NS, {"data": {"k": "v"}})
    core.patch_namespaced_config_map("c", NS, {"metadata": {"labels": {"mesh": "no"}}})
    watch = kubernetes.watch.Watch()
    events = collect(
        watch.stream(
            core.list_namespaced_config_map, NS, label_selector="mesh=yes", resource_version=start, timeout_seconds=30
        ),
        watch,
        3,
    )
    assert [t for t, _ in events] == ["ADDED", "MODIFIED", "DELETED"]


def test_watch_delivers_live_events_and_bookmarks(
    kube_server: KubeServer, custom: kubernetes.client.CustomObjectsApi
) -> None:
    start = custom.list_namespaced_custom_object(G, V, NS, CRS)["metadata"]["resourceVersion"]

    def act() -> None:
        assert kube_server.wait_for_watches(1)
        custom.create_namespaced_custom_object(G, V, NS, CRS, cr_body())
        assert kube_server.send_bookmarks() == 1

    actor = threading.Thread(target=act)
    actor.start()
    watch = kubernetes.watch.Watch()
    events = collect(
        watch.stream(
            custom.list_namespaced_custom_object,
            G,
            V,
            NS,
            CRS,
            resource_version=start,
            allow_watch_bookmarks=True,
            timeout_seconds=30,
        ),
        watch,
        2,
    )
    actor.join()
    assert [t for t, _ in events] == ["ADDED", "BOOKMARK"]
    bookmark = events[1][1]
    assert bookmark["kind"] == "CertificateRequest"
    assert bookmark["metadata"]["resourceVersion"] == events[0][1]["metadata"]["resourceVersion"]


def test_no_bookmarks_unless_asked(kube_server: KubeServer, core: kubernetes.client.CoreV1Api) -> None:
    def act() -> None:
        assert kube_server.wait_for_watches(1)
        assert kube_server.send_bookmarks() == 0
        core.create_namespaced_secret(NS, {"metadata": {"name": "after"}})

    actor = threading.Thread(target=act)
    actor.start()
    watch = kubernetes.watch.Watch()
    start = core.list_namespaced_secret(NS).metadata.resource_version
    events = collect(
        watch.stream(core.list_namespaced_secret, NS, resource_version=start, timeout_seconds=30), watch, 1
    )
    actor.join()
    assert [(t, o["metadata"]["name"]) for t, o in events] == [("ADDED", "after")]


def test_send_initial_events_ends_with_a_marked_bookmark(core: kubernetes.client.CoreV1Api) -> None:
    core.create_namespaced_secret(NS, {"metadata": {"name": "a"}})
    watch = kubernetes.watch.Watch()
    events = collect(
        watch.stream(
            core.list_namespaced_secret,
            NS,
            send_initial_events=True,
            resource_version_match="NotOlderThan",
            allow_watch_bookmarks=True,
            timeout_seconds=30,
        ),
        watch,
        2,
    )
    assert [t for t, _ in events] == ["ADDED", "BOOKMARK"]
    assert events[1][1]["metadata"]["annotations"] == {"k8s.io/initial-events-end": "true"}


def test_watch_from_an_expired_resource_version_is_gone(
    kube_server: KubeServer, core: kubernetes.client.CoreV1Api
) -> None:
    old = core.create_namespaced_secret(NS, {"metadata": {"name": "a"}}).metadata.resource_version
    core.create_namespaced_secret(NS, {"metadata": {"name": "b"}})
    assert kube_server.compact() == int(old) + 1
    watch = kubernetes.watch.Watch()
    with pytest.raises(ApiException) as info:
        list(watch.stream(core.list_namespaced_secret, NS, resource_version=old, timeout_seconds=30))
    assert info.value.status == 410
    assert info.value.reason == f"Expired: too old resource version: {old} ({int(old) + 1})"


def test_wait_for_watch_finds_a_stream_by_user_kind_and_start(
    kube_server: KubeServer, core: kubernetes.client.CoreV1Api
) -> None:
    start = int(core.create_namespaced_secret(NS, {"metadata": {"name": "a"}}).metadata.resource_version)
    now = int(core.create_namespaced_secret(NS, {"metadata": {"name": "b"}}).metadata.resource_version)

    def stream(**options: Any) -> threading.Thread:
        watch = kubernetes.watch.Watch()
        return threading.Thread(target=lambda: list(watch.stream(core.list_namespaced_secret, NS, **options)))

    streams = [stream(resource_version=str(start), timeout_seconds=30), stream(timeout_seconds=30)]
    streams[0].start()
    assert kube_server.wait_for_watch(user=DEFAULT_USER, kind=SECRET, since=start)
    assert not kube_server.wait_for_watch(since=start + 1, timeout=0)  # it resumed from an older version
    assert not kube_server.wait_for_watch(user="someone-else", timeout=0)
    assert not kube_server.wait_for_watch(kind=CERTIFICATE_REQUEST, timeout=0)
    streams[1].start()  # no version: it starts at the current one
    assert kube_server.wait_for_watch(user=DEFAULT_USER, kind=SECRET, since=now)
    kube_server.end_watches()
    for thread in streams:
        thread.join()


def test_history_limit_expires_old_resource_versions() -> None:
    with KubeServer(history_limit=2) as server, kubernetes.client.ApiClient(server.client_configuration()) as api:
        core = kubernetes.client.CoreV1Api(api)
        versions = [
            int(core.create_namespaced_secret(NS, {"metadata": {"name": name}}).metadata.resource_version)
            for name in "abcd"
        ]  # only the events of c and d are kept
        watch = kubernetes.watch.Watch()
        events = collect(
            watch.stream(core.list_namespaced_secret, NS, resource_version=str(versions[1]), timeout_seconds=30),
            watch,
            2,
        )
        assert [o["metadata"]["name"] for _, o in events] == ["c", "d"]
        with pytest.raises(ApiException) as info:
            list(watch.stream(core.list_namespaced_secret, NS, resource_version=str(versions[0]), timeout_seconds=30))
        assert info.value.reason == f"Expired: too old resource version: {versions[0]} ({versions[1]})"


# ------------------------------------------------------------------------------------ discovery, config


def test_dynamic_client_discovers_kinds(kube_api_client: kubernetes.client.ApiClient) -> None:
    dynamic = kubernetes.dynamic.DynamicClient(kube_api_client)
    requests = dynamic.resources.get(api_version=f"{G}/{V}", kind="CertificateRequest")
    assert requests.namespaced
    requests.create(body=cr_body("dyn"), namespace=NS)
    assert [i.metadata.name for i in requests.get(namespace=NS).items] == ["dyn"]
    secrets = dynamic.resources.get(api_version="v1", kind="Secret")
    assert secrets.get(namespace=NS).items == []
    version = kubernetes.client.VersionApi(kube_api_client).get_code()
    assert version.git_version == "v1.31.0-mesh-identity-test"


def test_kubeconfig_with_context(kube_server: KubeServer, tmp_path: Path) -> None:
    path = kube_server.write_kubeconfig(tmp_path / "config", context="test-ctx")
    with kubernetes.config.new_client_from_config(config_file=str(path), context="test-ctx") as api:
        kubernetes.client.CoreV1Api(api).create_namespaced_secret(NS, {"metadata": {"name": "via-kubeconfig"}})
    assert [s["metadata"]["name"] for s in kube_server.objects(SECRET, NS)] == ["via-kubeconfig"]


def test_in_cluster_files(kube_server: KubeServer, tmp_path: Path) -> None:
    env = kube_server.write_in_cluster_files(tmp_path)
    config = kubernetes.client.Configuration()
    kubernetes.config.incluster_config.InClusterConfigLoader(
        token_filename=str(tmp_path / "token"),
        cert_filename=str(tmp_path / "ca.crt"),
        environ=env,
    ).load_and_set(config)
    with kubernetes.client.ApiClient(config) as api:
        assert kubernetes.client.CoreV1Api(api).list_namespaced_secret(NS).items == []


def test_requests_are_recorded(kube_server: KubeServer, core: kubernetes.client.CoreV1Api) -> None:
    core.create_namespaced_secret(NS, {"metadata": {"name": "a"}})
    api_error(lambda: core.read_namespaced_secret("b", NS))
    assert [(r.verb, r.resource, r.name, r.code) for r in kube_server.requests] == [
        ("create", "secrets", "", 201),
        ("get", "secrets", "b", 404),
    ]
    assert kube_server.requests[0].user == "system:serviceaccount:mesh-identity:mesh-identity"


def test_plain_http(tmp_path: Path) -> None:
    with KubeServer(tls=False) as server, kubernetes.client.ApiClient(server.client_configuration()) as api:
        assert server.url.startswith("http://127.0.0.1:")
        kubernetes.client.CoreV1Api(api).create_namespaced_config_map(NS, {"metadata": {"name": "c"}})


# ------------------------------------------------------------------------------------------------ outages


def test_down_server_drops_connections_then_recovers(kube_server: KubeServer) -> None:
    config = kube_server.client_configuration()
    config.retries = 1
    with kubernetes.client.ApiClient(config) as api:
        core = kubernetes.client.CoreV1Api(api)
        core.create_namespaced_secret(NS, {"metadata": {"name": "before"}})
        kube_server.go_down()
        with pytest.raises(urllib3.exceptions.MaxRetryError):
            core.read_namespaced_secret("before", NS)
        kube_server.come_up()
        assert core.read_namespaced_secret("before", NS).metadata.name == "before"


def test_stopped_server_refuses_connections() -> None:
    server = KubeServer().start()
    config = server.client_configuration()
    config.retries = 0
    server.stop()
    with kubernetes.client.ApiClient(config) as api, pytest.raises(urllib3.exceptions.MaxRetryError) as info:
        kubernetes.client.CoreV1Api(api).list_namespaced_secret(NS)
    assert isinstance(info.value.reason, urllib3.exceptions.NewConnectionError)


def test_stop_ends_open_watches() -> None:
    server = install_crds(KubeServer()).start()
    with kubernetes.client.ApiClient(server.client_configuration()) as api:
        watch = kubernetes.watch.Watch()
        stopper = threading.Thread(target=lambda: server.wait_for_watches(1) and server.stop())
        stopper.start()
        events = list(
            watch.stream(
                kubernetes.client.CustomObjectsApi(api).list_namespaced_custom_object, G, V, NS, CRS, timeout_seconds=30
            )
        )
        stopper.join()
    assert events == []
    assert server.open_watches == 0


def test_objects_helper_reads_the_store(kube_server: KubeServer, custom: kubernetes.client.CustomObjectsApi) -> None:
    body = cr_body()
    body["metadata"]["labels"] = {"app.kubernetes.io/managed-by": "mesh-identity"}
    custom.create_namespaced_custom_object(G, V, NS, CRS, body)
    assert len(kube_server.objects(CERTIFICATE_REQUEST, NS, "app.kubernetes.io/managed-by=mesh-identity")) == 1
    assert kube_server.objects(CERTIFICATE_REQUEST, "elsewhere") == []
    assert DEFAULT_TOKEN in kube_server.tokens
