"""Attest with a Kubernetes service-account token: TokenReview at the Kubernetes API test server, through the
real ``kubernetes`` client, and every way the review can go wrong. Nothing is issued on a refusal."""

from __future__ import annotations

import re
from collections.abc import Callable
from datetime import timedelta
from typing import Any

import grpc
import pytest

from tests.signing.client import csr, new_key
from tests.signing.conftest import FRONTEND, Api
from tests.waiting import wait_until
from xds_sds.proto import signing_pb2


def _attest(api: Api, token: str, timeout: float = 30) -> signing_pb2.X509Response:
    response: signing_pb2.X509Response = api.attest_stub().Attest(
        signing_pb2.AttestRequest(kubernetes_token=token, csr=csr(new_key())), timeout=timeout
    )
    return response


def _refused(api: Api, token: str, timeout: float = 30) -> tuple[grpc.StatusCode, str]:
    with pytest.raises(grpc.RpcError) as caught:
        _attest(api, token, timeout)
    return caught.value.code(), caught.value.details()  # type: ignore[attr-defined]


def test_a_service_account_token_buys_its_workload_identity(api: Api) -> None:
    token = api.kube.token_reviews.issue("shop", "frontend", pod="frontend-7d9")
    assert _attest(api, token).spiffe_id == FRONTEND
    assert [e.subject for e in api.issued()] == [FRONTEND]
    review = api.kube.token_reviews.reviews[-1]
    assert review == {
        "apiVersion": "authentication.k8s.io/v1",
        "kind": "TokenReview",
        "spec": {"token": token, "audiences": ["mesh-identity"]},
    }
    records = [r for r in api.kube.requests if r.resource == "tokenreviews"]
    assert [(r.verb, r.code) for r in records] == [("create", 201)]


def test_a_service_account_that_is_not_a_workload_of_the_registry_is_permission_denied(api: Api) -> None:
    token = api.kube.token_reviews.issue("shop", "intruder")
    code, message = _refused(api, token)
    assert code is grpc.StatusCode.PERMISSION_DENIED
    assert message == (
        "spiffe://example.org/ns/shop/sa/intruder (service account shop/intruder) is not a workload of the registry"
    )
    assert api.issued() == []


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda api: "eyJhbGciOi.not-a-token.x", "did not authenticate the token: [invalid bearer token"),
        (
            lambda api: api.kube.token_reviews.issue("shop", "frontend", ttl=timedelta(seconds=-1)),
            "did not authenticate the token: [invalid bearer token, service account token has expired]",
        ),
        (
            lambda api: api.kube.token_reviews.issue("shop", "frontend", audiences=["vault"]),
            'token audiences ["vault"] is invalid for the target audiences ["mesh-identity"]',
        ),
        (lambda api: "bad token with spaces", "the Kubernetes token is malformed"),
    ],
    ids=["unknown", "expired", "wrong-audience", "malformed"],
)
def test_a_token_the_api_server_does_not_vouch_for_is_unauthenticated(
    api: Api, make: Callable[[Api], str], message: str
) -> None:
    code, details = _refused(api, make(api))
    assert code is grpc.StatusCode.UNAUTHENTICATED
    assert details.startswith("Kubernetes token refused: ")
    assert message in details
    assert api.issued() == []


def _drop_audiences(answer: dict[str, Any]) -> dict[str, Any]:
    answer["status"].pop("audiences", None)  # an API server that is not audience-aware
    return answer


def _other_audience(answer: dict[str, Any]) -> dict[str, Any]:
    answer["status"]["audiences"] = ["https://kubernetes.default.svc"]
    return answer


def _user(answer: dict[str, Any]) -> dict[str, Any]:
    answer["status"]["user"]["username"] = "alice"
    return answer


@pytest.mark.parametrize(
    ("tamper", "code", "message"),
    [
        (
            _drop_audiences,
            grpc.StatusCode.UNAUTHENTICATED,
            "but not for audience 'mesh-identity' (its audiences: none)",
        ),
        (_other_audience, grpc.StatusCode.UNAUTHENTICATED, "(its audiences: https://kubernetes.default.svc)"),
        (_user, grpc.StatusCode.UNAUTHENTICATED, "the token belongs to 'alice', which is not a service account"),
        (lambda a: {**a, "status": "yes"}, grpc.StatusCode.INTERNAL, "answer is malformed: status is not an object"),
        (
            lambda a: {**a, "status": {**a["status"], "authenticated": "true"}},
            grpc.StatusCode.INTERNAL,
            "answer is malformed: status.authenticated is not true or false",
        ),
        (
            lambda a: {**a, "status": {**a["status"], "user": {"username": 7}}},
            grpc.StatusCode.INTERNAL,
            "answer is malformed: status.user.username is not a string",
        ),
        (
            lambda a: {**a, "status": {**a["status"], "audiences": "mesh-identity"}},
            grpc.StatusCode.INTERNAL,
            "answer is malformed: status.audiences is not a list of strings",
        ),
        (lambda a: [a], grpc.StatusCode.INTERNAL, "answer is malformed: it is not a JSON object"),
    ],
    ids=[
        "no-audiences",
        "other-audience",
        "not-a-service-account",
        "status",
        "authenticated",
        "user",
        "audiences",
        "list",
    ],
)
def test_an_answer_that_does_not_vouch_for_our_audience_or_is_malformed_is_refused(
    api: Api, tamper: Callable[[dict[str, Any]], Any], code: grpc.StatusCode, message: str
) -> None:
    api.kube.token_reviews.tamper = tamper
    refused, details = _refused(api, api.kube.token_reviews.issue("shop", "frontend"))
    assert refused is code
    assert message in details
    assert api.issued() == []


def test_a_forbidden_review_is_internal_and_names_the_cause(api: Api) -> None:
    api.kube.deny("create", "tokenreviews", group="authentication.k8s.io")
    code, message = _refused(api, api.kube.token_reviews.issue("shop", "frontend"))
    assert code is grpc.StatusCode.INTERNAL
    assert "the control plane may not create tokenreviews at the Kubernetes API at https://127.0.0.1:" in message
    assert "(403 Forbidden)" in message
    assert 'User "system:serviceaccount:mesh-identity:mesh-identity" cannot create resource "tokenreviews"' in message
    assert api.issued() == []


def test_a_server_error_is_unavailable_and_the_next_review_succeeds(api: Api) -> None:
    api.kube.inject_error("create", "tokenreviews", code=500, times=1)
    token = api.kube.token_reviews.issue("shop", "frontend")
    code, message = _refused(api, token)
    assert code is grpc.StatusCode.UNAVAILABLE
    assert "answered the TokenReview with 500 InternalError" in message
    assert api.issued() == []
    assert _attest(api, token).spiffe_id == FRONTEND


def test_a_review_that_takes_longer_than_the_timeout_is_unavailable(make_api: Callable[..., Api]) -> None:
    api = make_api(kube_timeout=timedelta(seconds=0.5))
    release = api.kube.token_reviews.hold()
    try:
        code, message = _refused(api, api.kube.token_reviews.issue("shop", "frontend"))
    finally:
        release()
    assert code is grpc.StatusCode.UNAVAILABLE
    assert message.endswith("did not answer the TokenReview within 0.5s")
    assert api.issued() == []


def test_the_calls_deadline_bounds_the_review(make_api: Callable[..., Api]) -> None:
    patient = make_api(kube_timeout=timedelta(minutes=5))
    release = patient.kube.token_reviews.hold()
    try:
        code, _ = _refused(patient, patient.kube.token_reviews.issue("shop", "frontend"), timeout=1.0)
        assert code is grpc.StatusCode.DEADLINE_EXCEEDED
        refusal = wait_until(lambda: [d for d in patient.decisions() if not d.granted], "the refusal of the review")
    finally:
        release()
    # the review was given the call's remaining second, not the configured five minutes
    assert re.search(r"did not answer the TokenReview within (0\.\d+|1)s$", refusal[0].reason), refusal[0].reason
    assert refusal[0].code == "UNAVAILABLE"
    assert patient.issued() == []


def test_an_unreachable_api_server_is_unavailable(api: Api) -> None:
    api.kube.go_down()
    try:
        code, message = _refused(api, api.kube.token_reviews.issue("shop", "frontend"))
    finally:
        api.kube.come_up()
    assert code is grpc.StatusCode.UNAVAILABLE
    assert "the Kubernetes token could not be checked" in message
    assert api.issued() == []


def test_without_signing_kubernetes_a_kubernetes_token_is_unauthenticated(make_api: Callable[..., Api]) -> None:
    api = make_api(with_kubernetes=False)
    code, message = _refused(api, api.kube.token_reviews.issue("shop", "frontend"))
    assert code is grpc.StatusCode.UNAUTHENTICATED
    assert message == "this control plane takes no Kubernetes tokens (signing.kubernetes is not configured)"
    assert api.kube.token_reviews.reviews == []


def test_attestations_beyond_the_concurrency_bound_are_refused(make_api: Callable[..., Api]) -> None:
    api = make_api(max_concurrent_rpcs=1)
    release = api.kube.token_reviews.hold()
    stub = api.attest_stub()
    pending = stub.Attest.future(
        signing_pb2.AttestRequest(
            kubernetes_token=api.kube.token_reviews.issue("shop", "frontend"), csr=csr(new_key())
        ),
        timeout=30,
    )
    try:
        wait_until(lambda: api.kube.token_reviews.reviews, "the first review to reach the API server")
        code, message = _refused(api, api.kube.token_reviews.issue("shop", "frontend"))
        assert (code, message) == (grpc.StatusCode.RESOURCE_EXHAUSTED, "Concurrent RPC limit exceeded!")
    finally:
        release()
    assert pending.result().spiffe_id == FRONTEND
    assert [e.subject for e in api.issued()] == [FRONTEND]
