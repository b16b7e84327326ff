"""The TokenReview client (kubeconfig and in-cluster config) and the Kubernetes API test server's TokenReview
endpoint: request bodies checked against the official schema, answers shaped as the real API server's."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import kubernetes
import kubernetes_validate
import pytest

from mesh_identity.config import KubernetesAuthConfig
from mesh_identity.errors import ConfigError
from mesh_identity.spiffe import SpiffeId, TrustDomain
from tests.fakes.kube import KubeServer
from tests.fakes.kube.tokenreview import PATH
from xds_sds.signing.tokenreview import TokenRejected, TokenReviewer

TD = TrustDomain("example.org")


@pytest.fixture
def kube() -> Iterator[KubeServer]:
    with KubeServer() as server:
        yield server


def test_a_reviewer_from_the_in_cluster_config(kube: KubeServer, tmp_path: Path) -> None:
    env = kube.write_in_cluster_files(tmp_path / "sa")
    reviewer = TokenReviewer(TD, KubernetesAuthConfig(None), service_account_dir=str(tmp_path / "sa"), environ=env)
    try:
        account = reviewer.review(kube.token_reviews.issue("shop", "frontend"))
    finally:
        reviewer.close()
    assert (account.namespace, account.name, account.spiffe_id) == (
        "shop",
        "frontend",
        SpiffeId.parse("spiffe://example.org/ns/shop/sa/frontend"),
    )


def test_an_unusable_config_is_a_config_error_naming_the_key(tmp_path: Path) -> None:
    (tmp_path / "kubeconfig").write_text("apiVersion: v1\nkind: Config\nclusters: []\n")
    with pytest.raises(ConfigError, match=r"^signing.kubernetes.kubeconfig: .*kubeconfig is not a usable kubeconfig"):
        TokenReviewer(TD, KubernetesAuthConfig(tmp_path / "kubeconfig"))
    with pytest.raises(ConfigError, match=r"^signing.kubernetes.in_cluster: cannot use the pod's service account in"):
        TokenReviewer(TD, KubernetesAuthConfig(None), service_account_dir=str(tmp_path / "none"), environ={})


def test_a_reviewer_refuses_a_token_whose_service_account_makes_no_spiffe_id(kube: KubeServer, tmp_path: Path) -> None:
    reviewer = TokenReviewer(TD, KubernetesAuthConfig(kube.write_kubeconfig(tmp_path / "kc")))
    try:
        with pytest.raises(TokenRejected, match="has no SPIFFE ID"):
            reviewer.review(kube.token_reviews.issue("shop", ".."))
    finally:
        reviewer.close()


# -- the test server's endpoint --------------------------------------------------------------------------------


def _post(kube: KubeServer, body: Any) -> tuple[int, dict[str, Any]]:
    with kubernetes.client.ApiClient(kube.client_configuration()) as api:
        request = api.param_serialize(
            "POST",
            PATH,
            header_params={"Content-Type": "application/json", "Accept": "application/json"},
            body=body,
            auth_settings=["BearerToken"],
        )
        response = api.call_api(*request)
        response.read()
        return int(response.status), json.loads(response.data)


def _review(token: str, **spec: Any) -> dict[str, Any]:
    return {"apiVersion": "authentication.k8s.io/v1", "kind": "TokenReview", "spec": {"token": token, **spec}}


def test_the_endpoint_answers_as_the_real_api_server(kube: KubeServer) -> None:
    token = kube.token_reviews.issue("shop", "frontend", pod="frontend-1")
    code, answer = _post(kube, _review(token, audiences=["mesh-identity", "other"]))
    assert code == 201
    kubernetes_validate.validate(answer, "1.33", strict=True)
    assert answer["status"]["authenticated"] is True
    assert answer["status"]["audiences"] == ["mesh-identity"]
    user = answer["status"]["user"]
    assert user["username"] == "system:serviceaccount:shop:frontend"
    assert user["groups"] == ["system:serviceaccounts", "system:serviceaccounts:shop", "system:authenticated"]
    assert user["extra"]["authentication.kubernetes.io/pod-name"] == ["frontend-1"]

    code, refused = _post(kube, _review("unknown"))
    assert code == 201
    kubernetes_validate.validate(refused, "1.33", strict=True)
    assert "authenticated" not in refused["status"]
    assert refused["status"]["error"].startswith("[invalid bearer token")


def test_a_review_without_audiences_is_checked_against_the_api_servers_own(kube: KubeServer) -> None:
    token = kube.token_reviews.issue("shop", "frontend")
    _, answer = _post(kube, _review(token))
    assert "token audiences" in answer["status"]["error"]


@pytest.mark.parametrize(
    ("body", "code", "message"),
    [
        (
            _review("t", audiences=["a"], extra=True),
            400,
            "strict decoding error: Additional properties are not allowed",
        ),
        ({**_review("t"), "status": {"authenticated": "yes"}}, 400, "strict decoding error"),
        ({**_review("t"), "kind": "Secret"}, 400, "do not match"),
        (_review(""), 422, "spec.token: Required value"),
        ([1], 400, "must be a JSON object"),
    ],
)
def test_a_request_that_breaks_the_schema_is_refused(kube: KubeServer, body: Any, code: int, message: str) -> None:
    status, answer = _post(kube, body)
    assert status == code
    assert answer["kind"] == "Status"
    assert message in answer["message"]
    assert kube.token_reviews.reviews == []


def test_the_existing_kinds_are_served_beside_token_reviews(kube: KubeServer) -> None:
    with kubernetes.client.ApiClient(kube.client_configuration()) as api:
        core = kubernetes.client.CoreV1Api(api)
        core.create_namespaced_config_map("default", {"metadata": {"name": "c"}, "data": {"k": "v"}})
        assert core.read_namespaced_config_map("c", "default").data == {"k": "v"}
        groups = [g.name for g in kubernetes.client.ApisApi(api).get_api_versions().groups]
    assert "authentication.k8s.io" not in groups  # discovery is unchanged: TokenReview is create-only, not a kind
