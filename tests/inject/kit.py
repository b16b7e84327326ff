"""Shared pieces of the injection tests: a mesh's InjectSettings whose documents are the real ones (an agent-mode
Envoy bootstrap from xds_sds, an agent config that xds_sds.agent.config accepts), pods and reviews."""

from __future__ import annotations

import base64
import copy
import json
from pathlib import Path
from typing import Any

import yaml
from google.protobuf import json_format

from mesh_identity.inject import patch as p
from mesh_identity.mesh.model import Address
from mesh_identity.spiffe import SpiffeId, TrustDomain
from xds_sds.resources.bootstrap import agent_bootstrap

TRUST_DOMAIN = TrustDomain.parse("example.org")
CONTROL_PLANE = "10.96.0.5"
SERVER_ID = SpiffeId.parse("spiffe://example.org/mesh-identity/control-plane")


def documents(workload: p.Workload) -> p.SidecarDocuments:
    node = f"{workload.pod_name}.{workload.namespace}"
    bootstrap = agent_bootstrap(
        node=node,
        cluster=workload.service_account,
        identity=workload.spiffe_id,
        xds=Address(CONTROL_PLANE, 15010),
        server_identity=SERVER_ID,
        agent_socket=Path(p.SDS_SOCKET),
        admin=Address("127.0.0.1", 15000),
    )
    agent = {
        "trust_domain": str(TRUST_DOMAIN),
        "host": workload.pod_name,
        "state_dir": p.AGENT_STATE_DIR,
        "control_plane": {
            "signing": f"{CONTROL_PLANE}:8443",
            "attest": f"{CONTROL_PLANE}:8444",
            "bundle": p.CA_DIR + "/ca.crt",
        },
        "credential": {"kubernetes_token_file": p.TOKEN_FILE},
        "sockets": {"sds": p.SDS_SOCKET, "workload_api": p.WORKLOAD_SOCKET},
        "entries": [{"spiffe_id": str(workload.spiffe_id), "selectors": ["unix:uid:1337"]}],
    }
    return p.SidecarDocuments(json_format.MessageToJson(bootstrap, indent=1), yaml.safe_dump(agent))


def settings(**changes: Any) -> p.InjectSettings:
    values: dict[str, Any] = {
        "trust_domain": TRUST_DOMAIN,
        "envoy_image": "docker.io/envoyproxy/envoy:v1.36.0",
        "agent_image": "ghcr.io/mesh-identity/mesh-identity:0.1.0",
        "capture_image": "ghcr.io/mesh-identity/capture:0.1.0",
        "documents": documents,
    }
    values.update(changes)
    return p.InjectSettings(**values)


def pod(annotations: dict[str, str] | None = None, **spec: Any) -> dict[str, Any]:
    found: dict[str, Any] = {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": "web-1", "namespace": "shop", "labels": {"app": "web"}},
        "spec": {
            "serviceAccountName": "web",
            "containers": [{"name": "app", "image": "nginx:1.27", "ports": [{"containerPort": 8080}]}],
            **spec,
        },
    }
    if annotations is not None:
        found["metadata"]["annotations"] = annotations
    return found


def review(obj: dict[str, Any] | None = None, **request: Any) -> dict[str, Any]:
    body: dict[str, Any] = {
        "uid": "705ab4f5-6393-11e8-b7cc-42010a800002",
        "kind": {"group": "", "version": "v1", "kind": "Pod"},
        "resource": {"group": "", "version": "v1", "resource": "pods"},
        "requestKind": {"group": "", "version": "v1", "kind": "Pod"},
        "namespace": "shop",
        "name": "web-1",
        "operation": "CREATE",
        "userInfo": {"username": "admin"},
        "object": copy.deepcopy(obj if obj is not None else pod()),
        "oldObject": None,
        "dryRun": False,
        "options": {"apiVersion": "meta.k8s.io/v1", "kind": "CreateOptions"},
    }
    body.update(request)
    return {"apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview", "request": body}


def decoded_patch(answer: dict[str, Any]) -> list[dict[str, Any]]:
    response = answer["response"]
    assert response["patchType"] == "JSONPatch"
    return json.loads(base64.b64decode(response["patch"], validate=True))
