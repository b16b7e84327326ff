"""The JSONPatch of an injected pod: what it adds, validated with the official schemas (strict, both versions),
idempotent, and nothing in it that holds a key."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import yaml
from envoy.config.bootstrap.v3 import bootstrap_pb2
from google.protobuf import json_format

from mesh_identity.inject import patch as p
from mesh_identity.inject.review import Injector
from mesh_identity.inject.rules import CaptureSettings, capture_rules, shell_command
from tests.fakes.kube.workloads import SCHEMA_VERSIONS, schema_errors
from tests.inject.kit import decoded_patch, pod, review, settings
from xds_sds.agent.config import parse_agent_config


def injected(obj: dict[str, Any], mesh: p.InjectSettings | None = None) -> dict[str, Any]:
    ops = p.pod_patch(obj, obj["metadata"].get("namespace", "shop"), mesh or settings())
    return p.apply_patch(obj, ops)


def _container(obj: dict[str, Any], name: str, key: str = "containers") -> dict[str, Any]:
    [found] = [c for c in obj["spec"][key] if c["name"] == name]
    return found


SHAPES = {
    "bare": pod(),
    "annotated": pod({"prometheus.io/scrape": "true"}),
    "with init containers and volumes": pod(
        initContainers=[{"name": "migrate", "image": "busybox:1.36", "command": ["true"]}],
        volumes=[{"name": "data", "emptyDir": {}}],
    ),
    "generateName, no annotations": {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"generateName": "web-"},
        "spec": {"containers": [{"name": "app", "image": "nginx:1.27"}]},
    },
}


@pytest.mark.parametrize("shape", SHAPES)
def test_the_patched_pod_is_valid_on_both_schema_versions(shape):
    assert SCHEMA_VERSIONS == ("1.37", "1.35")
    obj = SHAPES[shape]
    assert schema_errors(obj) == []
    patched = injected(obj)
    assert schema_errors(patched) == []
    assert patched["metadata"]["annotations"]["mesh-identity.io/injected"] == "true"
    assert patched["spec"]["initContainers"][0]["name"] == "mesh-identity-capture"
    assert not p.is_injected(obj)
    assert p.is_injected(patched)


def test_existing_parts_of_the_pod_are_kept_and_ours_appended():
    obj = SHAPES["with init containers and volumes"]
    patched = injected(obj)
    assert [c["name"] for c in patched["spec"]["initContainers"]] == ["mesh-identity-capture", "migrate"]
    assert [c["name"] for c in patched["spec"]["containers"]] == ["app", *p.CONTAINERS[1:]]
    assert [v["name"] for v in patched["spec"]["volumes"]] == ["data", *p.VOLUMES]
    assert patched["metadata"]["labels"] == {"app": "web"}


def test_the_init_container_runs_the_capture_rules_with_the_pods_exclusions_as_root_with_two_capabilities():
    obj = pod(
        {
            "mesh-identity.io/exclude-outbound-ports": "5432, 6379",
            "mesh-identity.io/exclude-inbound-ports": "9000",
            "mesh-identity.io/exclude-outbound-ip-ranges": "169.254.169.254/32",
        }
    )
    mesh = settings(capture=CaptureSettings(exclude_outbound_cidrs=("10.96.0.5/32",)))
    init = _container(injected(obj, mesh), "mesh-identity-capture", "initContainers")
    expected = CaptureSettings(
        exclude_inbound_ports=(15090, 9000),
        exclude_outbound_ports=(5432, 6379),
        exclude_outbound_cidrs=("10.96.0.5/32", "169.254.169.254/32"),
    )
    assert init["command"] == ["sh", "-c", shell_command(capture_rules(expected))]
    assert init["securityContext"] == {
        "runAsUser": 0,
        "runAsNonRoot": False,
        "privileged": False,
        "allowPrivilegeEscalation": False,
        "capabilities": {"add": ["NET_ADMIN", "NET_RAW"], "drop": ["ALL"]},
    }


def test_envoy_and_the_agent_run_as_their_own_users_without_privileges_and_with_requests():
    patched = injected(pod())
    for name, uid in (("mesh-identity-envoy", 1337), ("mesh-identity-agent", 1338)):
        container = _container(patched, name)
        context = container["securityContext"]
        assert (context["runAsUser"], context["runAsNonRoot"], context["allowPrivilegeEscalation"]) == (
            uid,
            True,
            False,
        )
        assert context["capabilities"] == {"drop": ["ALL"]}
        assert set(container["resources"]["requests"]) == {"cpu", "memory"}
    envoy = _container(patched, "mesh-identity-envoy")
    assert envoy["command"] == [
        "envoy", "-c", "/var/run/mesh-identity/config/envoy.json", "--service-node", "$(POD_NAME).$(POD_NAMESPACE)"
    ]  # fmt: skip
    assert {e["name"]: e["valueFrom"]["fieldRef"]["fieldPath"] for e in envoy["env"]} == {
        "POD_NAME": "metadata.name",
        "POD_NAMESPACE": "metadata.namespace",
    }
    assert {port["containerPort"] for port in envoy["ports"]} == {15003, 15090}


def test_the_agent_has_the_projected_token_and_the_sockets_are_in_memory():
    patched = injected(pod())
    volumes = {v["name"]: v for v in patched["spec"]["volumes"]}
    assert volumes["mesh-identity-token"]["projected"]["sources"] == [
        {"serviceAccountToken": {"audience": "mesh-identity", "expirationSeconds": 3600, "path": "mesh-identity"}}
    ]
    assert volumes["mesh-identity-sockets"]["emptyDir"]["medium"] == "Memory"
    assert volumes["mesh-identity-agent"]["emptyDir"]["medium"] == "Memory"
    agent = _container(patched, "mesh-identity-agent")
    mounts = {m["name"]: m["mountPath"] for m in agent["volumeMounts"]}
    assert mounts["mesh-identity-token"] == "/var/run/secrets/tokens"
    assert mounts["mesh-identity-sockets"] == _mounts(patched, "mesh-identity-envoy")["mesh-identity-sockets"]
    envoy_mounts = _mounts(patched, "mesh-identity-envoy")
    assert "mesh-identity-token" not in envoy_mounts  # Envoy never sees the token


def _mounts(obj: dict[str, Any], name: str) -> dict[str, str]:
    return {m["name"]: m["mountPath"] for m in _container(obj, name)["volumeMounts"]}


def _strings(value: Any):
    if isinstance(value, str):
        yield value
    elif isinstance(value, dict):
        for key, item in value.items():
            yield key
            yield from _strings(item)
    elif isinstance(value, list):
        for item in value:
            yield from _strings(item)


def test_nothing_in_the_injected_pod_holds_a_key_or_a_secret():
    patched = injected(pod())
    for volume in patched["spec"]["volumes"]:
        assert "secret" not in volume, volume["name"]
        for source in volume.get("projected", {}).get("sources", []):
            assert set(source) == {"serviceAccountToken"}, volume["name"]
        assert set(volume) - {"name"} <= {"emptyDir", "projected", "downwardAPI", "configMap"}, volume["name"]
    for key in ("initContainers", "containers"):
        for container in patched["spec"][key]:
            assert "envFrom" not in container, container["name"]
            for env in container.get("env", []):
                assert "secretKeyRef" not in env.get("valueFrom", {}), container["name"]
    for text in _strings(patched):
        assert "PRIVATE KEY" not in text
        assert "BEGIN CERTIFICATE" not in text


def test_the_documents_are_what_the_sidecars_read():
    patched = injected(pod())
    annotations = patched["metadata"]["annotations"]
    document = json_format.Parse(annotations["mesh-identity.io/envoy-bootstrap"], bootstrap_pb2.Bootstrap())
    assert document.node.id == "web-1.shop"
    config = parse_agent_config(yaml.safe_load(annotations["mesh-identity.io/agent-config"]), Path("/"))
    assert str(config.sds_socket) == p.SDS_SOCKET
    assert str(config.credential.kubernetes_token_file) == p.TOKEN_FILE
    assert [str(e.spiffe_id) for e in config.entries] == ["spiffe://example.org/ns/shop/sa/web"]
    [config_volume] = [v for v in patched["spec"]["volumes"] if v["name"] == "mesh-identity-config"]
    paths = {i["path"]: i["fieldRef"]["fieldPath"] for i in config_volume["downwardAPI"]["items"]}
    assert paths == {
        "envoy.json": "metadata.annotations['mesh-identity.io/envoy-bootstrap']",
        "agent.yaml": "metadata.annotations['mesh-identity.io/agent-config']",
    }


def test_the_identity_comes_from_the_service_account_default_included():
    seen: list[p.Workload] = []

    def record(workload: p.Workload) -> p.SidecarDocuments:
        seen.append(workload)
        return p.SidecarDocuments("{}", "{}")

    obj = pod()
    del obj["spec"]["serviceAccountName"]
    p.pod_patch(obj, "shop", settings(documents=record))
    assert [str(w.spiffe_id) for w in seen] == ["spiffe://example.org/ns/shop/sa/default"]


def test_too_large_documents_are_refused_not_truncated():
    huge = p.SidecarDocuments("x" * (p.MAX_ANNOTATIONS_BYTES + 1), "{}")
    with pytest.raises(p.InjectError, match=r"^metadata.annotations: \d+ bytes with the sidecars' config"):
        p.pod_patch(pod(), "shop", settings(documents=lambda _: huge))


def test_the_review_patch_is_the_patch_and_annotation_keys_are_escaped():
    answer = Injector(settings()).review(review(pod({"a": "b"})))
    ops = decoded_patch(answer)
    assert ops == p.pod_patch(pod({"a": "b"}), "shop", settings())
    assert {"op": "add", "path": "/metadata/annotations/mesh-identity.io~1injected", "value": "true"} in ops
    assert all(op["op"] == "add" for op in ops)
    json.dumps(ops)


def test_apply_patch_refuses_what_it_does_not_know():
    with pytest.raises(ValueError, match="unsupported patch operation"):
        p.apply_patch({}, [{"op": "remove", "path": "/a"}])


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"envoy_image": ""}, "envoy_image: '' is not an image reference"),
        ({"capture_image": " x"}, "capture_image: ' x' is not an image reference"),
        ({"failure_mode": "ignore"}, "failure_mode: 'ignore' is not one of deny, allow"),
    ],
)
def test_bad_settings_are_refused_naming_the_field(changes, message):
    with pytest.raises(ValueError) as caught:
        settings(**changes)
    assert str(caught.value) == message


def test_a_service_account_that_cannot_be_an_identity_is_refused():
    obj = pod()
    obj["spec"]["serviceAccountName"] = "a/b"
    with pytest.raises(p.InjectError, match=r"^spec.serviceAccountName: Invalid SPIFFE ID for 'shop'/'a/b'"):
        p.pod_patch(obj, "shop", settings())
