"""``deploy/rbac.yaml`` grants exactly what the control plane's code calls, no more.

The calls are read from the code, not listed by hand: every ``kubernetes`` client method named in the modules
that may speak it (``mesh_identity/registry/kube/client.py``, ``xds_sds/signing/tokenreview.py``; the
cert-manager provider is not part of this deployment) gives a verb on a resource, and the watches are those of
the registry's kinds and of the CA Secret. The granted (group, resource, verb) set must equal that set; the
Secret and the Lease are the Role's, in the control plane's namespace, everything else the ClusterRole's; and
no rule is a wildcard, a subresource, a non-resource URL or an escalation verb. Then, against the test API
server, every request the registry and the client's object calls make as the control plane's service account
is one these rules allow (an RBAC evaluator over the shipped roles, with ``resourceNames``)."""

from __future__ import annotations

import ast
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import kubernetes
import pytest
import yaml

from mesh_identity.config import RegistryConfig
from mesh_identity.registry.kube import Backoff, KubernetesRegistry, bundles, resources
from mesh_identity.registry.kube.client import KubeClient, connect
from mesh_identity.spiffe import TrustDomain
from providers.builtin import secretstore
from tests.deploy.conftest import (
    ACCOUNT,
    ADMIN_TOKEN,
    CONTROL_PLANE_TOKEN,
    CRDS,
    DEPLOY,
    NAMESPACE_NAME,
    ROOT,
    USER,
    base_documents,
    only,
    read_documents,
)
from tests.fakes.kube import KubeServer
from tests.fakes.kube.customresources import read_crds
from tests.waiting import wait_until

KUBERNETES_SPEAKERS = (
    ROOT / "mesh_identity" / "registry" / "kube" / "client.py",
    ROOT / "xds_sds" / "signing" / "tokenreview.py",
)
API_GROUPS = {
    "CoreV1Api": "",
    "DiscoveryV1Api": "discovery.k8s.io",
    "CoordinationV1Api": "coordination.k8s.io",
    "AuthenticationV1Api": "authentication.k8s.io",
    "AdmissionregistrationV1Api": "admissionregistration.k8s.io",
}
VERBS = {"read": "get", "list": "list", "create": "create", "replace": "update", "patch": "patch", "delete": "delete"}
OWN_NAMESPACE = {("", "secrets"), ("coordination.k8s.io", "leases")}  # the Secret store's and the Lease's
NEVER_VERBS = {"*", "escalate", "bind", "impersonate", "deletecollection", "approve", "sign", "use"}

Grant = tuple[str, str, str]  # (API group, resource, verb)


# -- what the code calls


def _client_methods(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    return {node.attr for node in ast.walk(tree) if isinstance(node, ast.Attribute)} | {
        node.id for node in ast.walk(tree) if isinstance(node, ast.Name)
    }


def _grant_of(api: str, method: str) -> Grant:
    verb, _, rest = method.partition("_")
    rest = rest.removeprefix("namespaced_").removesuffix("_for_all_namespaces")
    return API_GROUPS[api], rest.replace("_", "") + "s", VERBS[verb]


def called_grants() -> set[Grant]:
    """(group, resource, verb) of every call the code makes (see the module docstring)."""
    needed: set[Grant] = set()
    for path in KUBERNETES_SPEAKERS:
        names = _client_methods(path)
        for api in API_GROUPS:
            if api not in names:  # the module never builds this API's client
                continue
            cls = getattr(kubernetes.client, api)
            for method in names:
                if method.split("_")[0] in VERBS and callable(getattr(cls, method, None)):
                    if method.endswith("_with_http_info"):
                        continue
                    needed.add(_grant_of(api, method))
        if "list_cluster_custom_object" in names:  # the SMI kinds' lister
            needed |= {(r.group, r.plural, "list") for r in resources.SMI}
    watched = set(resources.WATCHED)
    product = [p for d in ("mesh_identity", "providers", "xds_sds", "plugins") for p in (ROOT / d).rglob("*.py")]
    if any("watch_secret(" in p.read_text() for p in product if p.name != "client.py"):
        watched.add(resources.SECRETS)
    if any("watch_webhook_configuration(" in p.read_text() for p in product if p.name != "client.py"):
        watched.add(resources.MUTATING_WEBHOOK_CONFIGURATIONS)
    needed |= {(r.group, r.plural, "watch") for r in watched}
    return needed


# -- what the roles grant


def roles() -> dict[str, dict[str, Any]]:
    return {d["kind"]: d for d in read_documents(DEPLOY / "rbac.yaml") if d["kind"] in ("ClusterRole", "Role")}


def granted(role: dict[str, Any]) -> set[Grant]:
    return {
        (group, resource, verb)
        for rule in role["rules"]
        for group in rule["apiGroups"]
        for resource in rule["resources"]
        for verb in rule["verbs"]
    }


def test_the_code_calls_are_read_from_the_code() -> None:
    needed = called_grants()
    # the registry's watches and its Events, the TokenReview of the signing API: the calls every version had
    assert ("", "pods", "watch") in needed and ("", "events", "create") in needed
    assert ("authentication.k8s.io", "tokenreviews", "create") in needed
    assert all(verb in VERBS.values() or verb == "watch" for _, _, verb in needed)


def test_the_roles_grant_exactly_what_the_code_calls() -> None:
    found = roles()
    given = granted(found["ClusterRole"]) | granted(found["Role"])
    needed = called_grants()
    assert sorted(given - needed) == [], "granted, never called"
    assert sorted(needed - given) == [], "called, never granted"


def test_the_control_planes_own_objects_are_the_roles_alone() -> None:
    found = roles()
    assert found["Role"]["metadata"]["namespace"] == NAMESPACE_NAME
    assert {(g, r) for g, r, _ in granted(found["Role"])} == OWN_NAMESPACE
    assert not {(g, r) for g, r, _ in granted(found["ClusterRole"])} & OWN_NAMESPACE


def test_no_rule_is_a_wildcard_a_subresource_or_an_escalation() -> None:
    for role in roles().values():
        for rule in role["rules"]:
            assert "nonResourceURLs" not in rule
            assert "*" not in rule["apiGroups"] and "*" not in rule["resources"], rule
            assert not set(rule["verbs"]) & NEVER_VERBS, rule
            assert all("/" not in r for r in rule["resources"]), f"a subresource (pods/exec, ...): {rule}"
            assert "*" not in rule.get("resourceNames", []), rule


def test_secrets_are_granted_by_name_except_create() -> None:
    options = _provider_options()
    assert options["store"] == "kubernetes"
    secret_name = options["secret_name"]
    assert secret_name == secretstore.DEFAULT_SECRET_NAME
    for rule in roles()["Role"]["rules"]:
        if "secrets" not in rule["resources"]:
            continue
        assert rule["resources"] == ["secrets"]
        if rule["verbs"] != ["create"]:
            assert rule["resourceNames"] == [secret_name], rule
        else:
            assert "resourceNames" not in rule  # create is not restricted by name: say so in the file
    text = (DEPLOY / "rbac.yaml").read_text()
    assert "create cannot be restricted by" in text


def test_the_bundle_configmaps_are_read_and_changed_by_name() -> None:
    for rule in roles()["ClusterRole"]["rules"]:
        if "configmaps" in rule["resources"] and set(rule["verbs"]) & {"get", "update", "delete", "patch"}:
            assert rule["resourceNames"] == [bundles.NAME], rule


def test_every_role_is_bound_to_the_deployments_service_account() -> None:
    documents = base_documents()
    account = only(documents, "Deployment")["spec"]["template"]["spec"]["serviceAccountName"]
    assert account == ACCOUNT
    for binding_kind, role_kind in (("ClusterRoleBinding", "ClusterRole"), ("RoleBinding", "Role")):
        binding = only(documents, binding_kind)
        assert binding["roleRef"] == {
            "apiGroup": "rbac.authorization.k8s.io",
            "kind": role_kind,
            "name": only(documents, role_kind)["metadata"]["name"],
        }
        assert binding["subjects"] == [{"kind": "ServiceAccount", "name": ACCOUNT, "namespace": NAMESPACE_NAME}]


def _provider_options() -> dict[str, Any]:
    data = only(base_documents(), "ConfigMap", "mesh-identity-config")["data"]["config.yaml"]
    options: dict[str, Any] = yaml.safe_load(data)["ca"]["provider_options"]
    return options


# -- against the test API server: every request the control plane makes is allowed


def allowed(verb: str, group: str, resource: str, namespace: str, name: str) -> bool:
    """What Kubernetes RBAC decides for the control plane's service account under the shipped roles."""
    found = roles()
    candidates = list(found["ClusterRole"]["rules"])
    if namespace == NAMESPACE_NAME:
        candidates += found["Role"]["rules"]
    for rule in candidates:
        if group in rule["apiGroups"] and resource in rule["resources"] and verb in rule["verbs"]:
            names = rule.get("resourceNames")
            if not names or name in names:
                return True
    return False


def test_the_evaluator_refuses_what_the_roles_do_not_grant() -> None:
    assert allowed("get", "", "secrets", NAMESPACE_NAME, "mesh-identity-ca")
    assert not allowed("get", "", "secrets", NAMESPACE_NAME, "another")
    assert not allowed("get", "", "secrets", "shop", "mesh-identity-ca")
    assert allowed("create", "", "secrets", NAMESPACE_NAME, "")
    assert not allowed("delete", "", "pods", "shop", "web-0")
    assert not allowed("get", "", "configmaps", "shop", "app-config")


@pytest.fixture
def control_plane_client(api_server: KubeServer, tmp_path: Path) -> Iterator[KubeClient]:
    kubeconfig = api_server.write_kubeconfig(tmp_path / "control-plane", token=CONTROL_PLANE_TOKEN)
    client = connect(RegistryConfig("demo", kubeconfig, timedelta(seconds=5)))
    yield client
    client.close()


def _seed_mesh(server: KubeServer) -> None:
    """As an admin: the CRDs, a namespace of the mesh with a workload, and a TrafficSplit the registry refuses."""
    crd_kind = next(k for k in server.kinds if k.kind == "CustomResourceDefinition")
    for crd in read_crds([CRDS]):
        server.put_object(crd_kind, crd)
    with kubernetes.client.ApiClient(server.client_configuration(token=ADMIN_TOKEN)) as api:
        core: Any = kubernetes.client.CoreV1Api(api)  # bodies as dicts, as a user's manifests
        meta = {"name": "shop", "labels": {resources.MONITORED_BY: "demo"}}
        core.create_namespace({"apiVersion": "v1", "kind": "Namespace", "metadata": meta})
        core.create_namespace({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": NAMESPACE_NAME}})
        account = {"apiVersion": "v1", "kind": "ServiceAccount", "metadata": {"name": "web", "namespace": "shop"}}
        core.create_namespaced_service_account("shop", account)
        split = {
            "apiVersion": "split.smi-spec.io/v1alpha4",
            "kind": "TrafficSplit",
            "metadata": {"name": "bad", "namespace": "shop"},
            "spec": {
                "service": "web",
                "backends": [{"service": "web-v1", "weight": 90}, {"service": "web", "weight": 20}],
            },
        }
        kubernetes.client.CustomObjectsApi(api).create_namespaced_custom_object(
            "split.smi-spec.io", "v1alpha4", "shop", "trafficsplits", split
        )


def test_every_request_of_the_control_plane_is_allowed(
    api_server: KubeServer, control_plane_client: KubeClient, tmp_path: Path
) -> None:
    _seed_mesh(api_server)
    kubeconfig = api_server.write_kubeconfig(tmp_path / "registry", token=CONTROL_PLANE_TOKEN)
    registry = KubernetesRegistry(
        RegistryConfig("demo", kubeconfig, timedelta(seconds=5)),
        TrustDomain("cluster.local"),
        backoff=Backoff(0.05, 0.5),
        sync_timeout=20,
    )
    registry.start()
    try:
        wait_until(lambda: any(r.resource == "events" for r in api_server.requests), "the registry's Event")
    finally:
        registry.stop()

    client = control_plane_client
    # the CA Secret (create-or-load, then a replace at its resourceVersion), as the Secret store does
    secret_name = str(_provider_options()["secret_name"])
    body = {"apiVersion": "v1", "kind": "Secret", "metadata": {"name": secret_name}, "data": {}}
    written = client.create(resources.SECRETS, NAMESPACE_NAME, body)
    client.replace(
        resources.SECRETS, NAMESPACE_NAME, client.read(resources.SECRETS, NAMESPACE_NAME, secret_name) or written
    )
    # a bundle ConfigMap in a monitored namespace: created, read, replaced, listed, deleted
    bundle = {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": bundles.NAME}, "data": {"ca.crt": ""}}
    client.create(resources.CONFIG_MAPS, "shop", bundle)
    current = client.read(resources.CONFIG_MAPS, "shop", bundles.NAME)
    assert current is not None
    replaced = client.replace(resources.CONFIG_MAPS, "shop", current)
    client.list(resources.CONFIG_MAPS, "app.kubernetes.io/managed-by=mesh-identity")
    client.delete(resources.CONFIG_MAPS, "shop", bundles.NAME, replaced["metadata"]["resourceVersion"])
    # the Leases in the control plane's namespace
    lease = {"apiVersion": "coordination.k8s.io/v1", "kind": "Lease", "metadata": {"name": "mesh-identity"}, "spec": {}}
    made = client.create(resources.LEASES, NAMESPACE_NAME, lease)
    client.replace(resources.LEASES, NAMESPACE_NAME, made)
    client.list(resources.LEASES, "mesh-identity.io/lease=replica", namespace=NAMESPACE_NAME)
    current = client.read(resources.LEASES, NAMESPACE_NAME, "mesh-identity")
    assert current is not None
    client.delete(resources.LEASES, NAMESPACE_NAME, "mesh-identity", current["metadata"]["resourceVersion"])

    groups = {k.plural: k.group for k in api_server.kinds}
    mine = [r for r in api_server.requests if r.user == USER]
    assert {r.resource for r in mine} >= {"namespaces", "pods", "trafficsplits", "events", "secrets", "leases"}
    refused = [
        r for r in mine if not allowed(r.verb, groups[r.resource.split("/")[0]], r.resource, r.namespace, r.name)
    ]
    assert refused == []
    assert [r for r in mine if r.code in (401, 403)] == []
