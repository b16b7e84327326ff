"""The Workload API for an injected pod's app containers (mesh_identity/inject/workloadapi.py): on request only,
read-only, with SPIFFE_ENDPOINT_SOCKET; the agent serves the pod's identity to the users the pod names; bad or
conflicting requests refused with the field named and no partial patch."""

from __future__ import annotations

from typing import Any

import pytest

from mesh_identity.inject import patch as p
from mesh_identity.inject.review import Injector
from tests.fakes.kube.workloads import schema_errors
from tests.inject.kit import decoded_patch, documents, pod, review, settings

ASK = {"mesh-identity.io/workload-api": "true"}
ENDPOINT = "unix:///var/run/mesh-identity/sockets/workload.sock"
MOUNT = {"name": "mesh-identity-sockets", "mountPath": "/var/run/mesh-identity/sockets", "readOnly": True}


def _two_apps(annotations: dict[str, str] | None) -> dict[str, Any]:
    return pod(
        annotations,
        securityContext={"runAsUser": 1000},
        containers=[
            {"name": "app", "image": "shop/app:1", "env": [{"name": "MODE", "value": "prod"}]},
            {
                "name": "worker",
                "image": "shop/worker:1",
                "securityContext": {"runAsUser": 1001},
                "volumeMounts": [{"name": "data", "mountPath": "/data"}],
            },
        ],
        volumes=[{"name": "data", "emptyDir": {}}],
    )


def _patched(obj: dict[str, Any]) -> tuple[dict[str, Any], list[p.Workload]]:
    seen: list[p.Workload] = []

    def recording(workload: p.Workload) -> p.SidecarDocuments:
        seen.append(workload)
        return documents(workload)

    ops = p.pod_patch(obj, "shop", settings(documents=recording))
    return p.apply_patch(obj, ops), seen


def test_asked_for_each_app_container_gets_the_socket_read_only_and_the_endpoint_and_its_user_an_entry() -> None:
    patched, [workload] = _patched(_two_apps(ASK))
    assert schema_errors(patched) == []
    app, worker, envoy, agent = patched["spec"]["containers"]
    assert app["env"] == [{"name": "MODE", "value": "prod"}, {"name": "SPIFFE_ENDPOINT_SOCKET", "value": ENDPOINT}]
    assert app["volumeMounts"] == [MOUNT]
    assert worker["env"] == [{"name": "SPIFFE_ENDPOINT_SOCKET", "value": ENDPOINT}]
    assert worker["volumeMounts"] == [{"name": "data", "mountPath": "/data"}, MOUNT]
    assert workload.app_uids == (1000, 1001)  # the pod's user and the worker's own
    assert (envoy["name"], agent["name"]) == (p.ENVOY_CONTAINER, p.AGENT_CONTAINER)
    assert "SPIFFE_ENDPOINT_SOCKET" not in str(envoy)  # the sidecars are left as they are


@pytest.mark.parametrize("annotations", [None, {"mesh-identity.io/workload-api": "false"}])
def test_not_asked_the_app_containers_get_nothing_and_the_agent_serves_envoy_alone(
    annotations: dict[str, str] | None,
) -> None:
    obj = _two_apps(annotations)
    patched, [workload] = _patched(obj)
    assert patched["spec"]["containers"][:2] == obj["spec"]["containers"]
    assert workload.app_uids == ()


def test_an_endpoint_already_set_to_the_agents_socket_is_not_set_twice() -> None:
    obj = pod(
        ASK, containers=[{"name": "app", "image": "a", "env": [{"name": "SPIFFE_ENDPOINT_SOCKET", "value": ENDPOINT}]}]
    )
    patched, _ = _patched(obj)
    assert patched["spec"]["containers"][0]["env"] == [{"name": "SPIFFE_ENDPOINT_SOCKET", "value": ENDPOINT}]
    assert patched["spec"]["containers"][0]["volumeMounts"] == [MOUNT]


@pytest.mark.parametrize(
    ("annotations", "container", "message"),
    [
        (
            {"mesh-identity.io/workload-api": "yes"},
            {},
            "metadata.annotations['mesh-identity.io/workload-api']: 'yes' is not \"true\" or \"false\"",
        ),
        (
            {"mesh-identity.io/workload-api": "x" * 500},
            {},
            "metadata.annotations['mesh-identity.io/workload-api']: '" + "x" * 76 + '... is not "true" or "false"',
        ),
        (
            ASK,
            {"env": [{"name": "SPIFFE_ENDPOINT_SOCKET", "value": "unix:///run/spire/agent.sock"}]},
            "spec.containers[0].env[0]: SPIFFE_ENDPOINT_SOCKET is already set, to 'unix:///run/spire/agent.sock'; "
            f"the agent's Workload API is {ENDPOINT}",
        ),
        (
            ASK,
            {"env": [{"name": "SPIFFE_ENDPOINT_SOCKET", "value": "unix:///" + "s" * 500}]},
            "spec.containers[0].env[0]: SPIFFE_ENDPOINT_SOCKET is already set, to 'unix:///"
            + "s" * 68
            + f"...; the agent's Workload API is {ENDPOINT}",
        ),
        (ASK, {"env": {"SPIFFE_ENDPOINT_SOCKET": "x"}}, "spec.containers[0].env: dict is not a list"),
        (
            ASK,
            {"volumeMounts": [{"name": "spire", "mountPath": "/var/run/mesh-identity/sockets/"}]},
            "spec.containers[0].volumeMounts[0].mountPath: /var/run/mesh-identity/sockets is where the agent's "
            "sockets go",
        ),
    ],
)
def test_a_bad_or_conflicting_request_is_refused_with_the_field_and_no_patch(
    annotations: dict[str, str], container: dict[str, Any], message: str
) -> None:
    obj = pod(annotations, containers=[{"name": "app", "image": "a", **container}])
    with pytest.raises(p.InjectError) as caught:
        p.pod_patch(obj, "shop", settings())
    assert str(caught.value) == message
    response = Injector(settings()).review(review(obj))["response"]
    assert response["allowed"] is False and "patch" not in response
    assert response["status"]["message"] == f"mesh-identity cannot inject this pod: {message}"


def test_a_container_that_names_no_user_gets_a_warning_and_no_entry() -> None:
    obj = pod(
        ASK,
        containers=[
            {"name": "app", "image": "a"},
            {"name": "worker", "image": "w", "securityContext": {"runAsUser": 1001}},
        ],
    )
    answer = Injector(settings()).review(review(obj))
    response = answer["response"]
    assert response["allowed"] is True
    assert response["warnings"] == [
        "mesh-identity: spec.containers[0] ('app') names no runAsUser, so the Workload API serves it no identity "
        "(the agent knows callers by user id); set securityContext.runAsUser"
    ]
    patched = p.apply_patch(obj, decoded_patch(answer))
    assert patched["spec"]["containers"][0]["volumeMounts"] == [MOUNT]  # mounted all the same: it may run as one
    _, [workload] = _patched(obj)
    assert workload.app_uids == (1001,)
    del obj["metadata"]["annotations"]
    assert "warnings" not in Injector(settings()).review(review(obj))["response"]  # not asked: nothing to warn of
