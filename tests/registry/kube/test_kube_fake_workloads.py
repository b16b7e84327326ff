"""The Kubernetes API test server's workload kinds and custom resources, checked through the real client: the
server's defaults, the official schemas (strict) on every write, CRD schemas on custom resources, list and watch
with label selectors, bookmarks, 410 for a too-old resourceVersion, 409 for a stale one, and the EndpointSlice
controller. What the registry's tests rely on, shown to hold."""

from __future__ import annotations

import json
from typing import Any

import kubernetes
import kubernetes_validate
import pytest
from kubernetes.client import ApiException

from tests.fakes.kube.workloads import SCHEMA_VERSIONS
from tests.registry.kube.conftest import Cluster
from tests.waiting import wait_until


def status_of(err: ApiException) -> dict[str, Any]:
    body: dict[str, Any] = json.loads(err.body)
    return body


def raw(call: Any, *args: Any, **kwargs: Any) -> dict[str, Any]:
    response = call(*args, _preload_content=False, **kwargs)
    try:
        result: dict[str, Any] = json.loads(response.read())
        return result
    finally:
        response.release_conn()


def post(cluster: Cluster, path: str, body: dict[str, Any]) -> tuple[int, dict[str, Any]]:
    """POST ``body`` as it is (the client's models would refuse what the server is to refuse)."""
    request = cluster.api.param_serialize(
        method="POST",
        resource_path=path,
        body=body,
        header_params={"Content-Type": "application/json", "Accept": "application/json"},
        auth_settings=["BearerToken"],
    )
    response = cluster.api.call_api(*request)
    return response.status, json.loads(response.read())


def test_the_server_fills_in_defaults_as_the_real_one_does(cluster: Cluster) -> None:
    cluster.namespace("shop")
    body = {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": "p"},
        "spec": {"containers": [{"name": "a", "image": "x"}]},
    }
    cluster.core.create_namespaced_pod("shop", body)
    pod = raw(cluster.core.read_namespaced_pod, "p", "shop")
    assert pod["spec"]["serviceAccountName"] == "default"
    assert pod["status"] == {"phase": "Pending", "qosClass": "BestEffort"}
    service_body = {"apiVersion": "v1", "kind": "Service", "metadata": {"name": "s"}, "spec": {"ports": [{"port": 80}]}}
    cluster.core.create_namespaced_service("shop", service_body)
    service = raw(cluster.core.read_namespaced_service, "s", "shop")["spec"]
    assert service["type"] == "ClusterIP" and service["clusterIP"].startswith("10.96.")
    assert service["ports"] == [{"port": 80, "protocol": "TCP", "targetPort": 80}]
    for version in SCHEMA_VERSIONS:
        kubernetes_validate.validate(pod, version, strict=True)


@pytest.mark.parametrize(
    ("body", "cause"),
    [
        (
            {"spec": {"containers": [{"name": "app", "image": "x", "colour": "blue"}]}},
            "spec.containers.0: Invalid value: Additional properties are not allowed ('colour' was unexpected)",
        ),
        ({"spec": {"containers": []}}, "spec.containers: Required value"),
        (
            {"spec": {"containers": [{"name": "app", "image": "x", "ports": [{"containerPort": "80"}]}]}},
            "spec.containers.0.ports.0.containerPort: Invalid value: '80' is not of type 'integer'",
        ),
    ],
)
def test_objects_the_official_schemas_refuse_are_422(cluster: Cluster, body: dict[str, Any], cause: str) -> None:
    cluster.namespace("shop")
    pod = {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "p", "namespace": "shop"}, **body}
    code, status = post(cluster, "/api/v1/namespaces/shop/pods", pod)
    assert code == 422 and status["reason"] == "Invalid"
    assert status["details"]["causes"][0]["message"].startswith(cause)


@pytest.mark.parametrize(
    ("spec", "cause"),
    [
        (
            {"service": "api", "backends": [{"service": "a", "weight": -1}]},
            "spec.backends[0].weight: Invalid value: -1 is less than the minimum of 0",
        ),
        (
            {"service": "api", "backends": [{"service": "a", "weight": 100}], "matches": []},
            "spec: Invalid value: Additional properties are not allowed ('matches' was unexpected)",
        ),
        ({"backends": [{"service": "a", "weight": 100}]}, "spec: Invalid value: 'service' is a required property"),
    ],
)
def test_custom_resources_the_crd_schema_refuses_are_422(cluster: Cluster, spec: dict[str, Any], cause: str) -> None:
    cluster.namespace("shop")
    with pytest.raises(ApiException) as caught:
        cluster.smi({"kind": "TrafficSplit", "metadata": {"name": "s", "namespace": "shop"}, "spec": spec})
    assert caught.value.status == 422
    assert status_of(caught.value)["details"]["causes"][0]["message"] == cause


def test_a_stale_resource_version_is_409_conflict(cluster: Cluster) -> None:
    cluster.namespace("shop")
    split = {
        "kind": "TrafficSplit",
        "metadata": {"name": "s", "namespace": "shop"},
        "spec": {"service": "api", "backends": [{"service": "a", "weight": 100}]},
    }
    created = cluster.smi(split)
    cluster.replace_smi(split | {"spec": {"service": "api", "backends": [{"service": "b", "weight": 100}]}})
    with pytest.raises(ApiException) as caught:  # a PUT of the version first read
        cluster.custom.replace_namespaced_custom_object(
            "split.smi-spec.io", "v1alpha4", "shop", "trafficsplits", "s", created
        )
    assert caught.value.status == 409 and status_of(caught.value)["reason"] == "Conflict"
    assert "the object has been modified" in status_of(caught.value)["message"]
    pod_body = {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": "p", "namespace": "shop", "resourceVersion": "1"},
        "spec": {"containers": [{"name": "app", "image": "x"}]},
    }
    cluster.pod("shop", "p", "default", {}, run=False)
    with pytest.raises(ApiException) as caught:
        cluster.core.replace_namespaced_pod("p", "shop", pod_body)
    assert caught.value.status == 409


def test_list_and_watch_by_label_with_bookmarks_and_410(cluster: Cluster) -> None:
    cluster.namespace("shop")
    cluster.namespace("other", mesh=None)
    listing = raw(cluster.core.list_namespace, label_selector="mesh-identity.io/monitored-by=demo")
    assert [n["metadata"]["name"] for n in listing["items"]] == ["shop"]
    version = listing["metadata"]["resourceVersion"]
    watch = cluster.core.list_namespace(
        label_selector="mesh-identity.io/monitored-by=demo",
        watch=True,
        allow_watch_bookmarks=True,
        resource_version=version,
        timeout_seconds=5,
        _preload_content=False,
    )
    try:
        cluster.label_namespace("other", "demo")  # enters the selection: ADDED
        cluster.label_namespace("shop", None)  # leaves it: DELETED
        assert cluster.server.send_bookmarks() >= 1
        lines = watch.stream(amt=None)
        events: list[dict[str, Any]] = []
        buffer = b""
        for chunk in lines:
            buffer += chunk
            while b"\n" in buffer:
                line, buffer = buffer.split(b"\n", 1)
                events.append(json.loads(line))
            if len(events) >= 3:
                break
    finally:
        watch.close()
    assert [(e["type"], e["object"]["metadata"].get("name")) for e in events] == [
        ("ADDED", "other"),
        ("DELETED", "shop"),
        ("BOOKMARK", None),
    ]
    cluster.server.compact()
    cluster.service_account("shop", "late")
    stream = raw(cluster.core.list_namespace, watch=True, resource_version=version, timeout_seconds=1)
    assert stream["type"] == "ERROR" and stream["object"]["code"] == 410


def test_the_endpointslice_controller_follows_pods_and_services(cluster: Cluster) -> None:
    cluster.namespace("shop")
    cluster.pod("shop", "a", "default", {"app": "x"})
    cluster.pod("shop", "b", "default", {"app": "x"}, run=False)
    cluster.service("shop", "x", {"app": "x"}, target="http")  # a named target port, resolved in the pod
    slices = kubernetes.client.DiscoveryV1Api(cluster.api)

    def endpoints() -> list[tuple[str, bool]]:
        found = raw(slices.list_namespaced_endpoint_slice, "shop", label_selector="kubernetes.io/service-name=x")
        return [(e["targetRef"]["name"], e["conditions"]["ready"]) for s in found["items"] for e in s["endpoints"]]

    wait_until(lambda: endpoints() == [("a", True)], "a in the slice")
    cluster.run("shop", "b", ready=False)
    wait_until(lambda: endpoints() == [("a", True), ("b", False)], "b, not ready")
    (found,) = raw(slices.list_namespaced_endpoint_slice, "shop")["items"]
    assert found["ports"] == [{"name": "http", "port": 8080, "protocol": "TCP"}]
    for version in SCHEMA_VERSIONS:
        kubernetes_validate.validate(found, version, strict=True)
    raw(cluster.core.delete_namespaced_service, "x", "shop")
    wait_until(lambda: endpoints() == [], "the slice gone with its Service")
