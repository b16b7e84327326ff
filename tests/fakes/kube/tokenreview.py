"""The TokenReview API of the Kubernetes fake: ``POST /apis/authentication.k8s.io/v1/tokenreviews``.

A test registers service-account tokens (:meth:`TokenReviews.issue`: namespace, service account, audiences,
expiry) as the real server's token issuer would have minted them; a review answers as the real API server does
(``201 Created``, the request's ``spec`` echoed, ``status`` with ``authenticated``, ``user`` and ``audiences``,
or ``status.error`` and no ``authenticated`` for a token it does not accept). Audiences work as in the real
server: the answer's ``audiences`` are the intersection of the review's and the token's, and a token with none
in common is not authenticated (a review without audiences is checked against the API server's own,
:data:`API_AUDIENCE`).

Every request body is checked against the official schema of TokenReview (``kubernetes_validate``, strict: an
unknown field is a 400, as with the real server's strict field validation). Reviews are not stored.

Test controls: :meth:`TokenReviews.hold` keeps every review waiting until released (a client's timeout),
:attr:`TokenReviews.tamper` rewrites answers (malformed or misleading ones), and the server's deny rules and
injected errors apply to the ``create`` verb of resource ``tokenreviews`` in group ``authentication.k8s.io``.
"""

from __future__ import annotations

import secrets
import threading
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

import kubernetes_validate

from tests.fakes.kube.errors import ApiError, JsonObj, bad_request
from tests.fakes.kube.kinds import Kind

TOKEN_REVIEW = Kind("TokenReview", "tokenreviews", group="authentication.k8s.io", namespaced=False)
PATH = f"{TOKEN_REVIEW.prefix}/{TOKEN_REVIEW.plural}"
API_AUDIENCE = "https://kubernetes.default.svc.cluster.local"
SCHEMA_VERSION = "1.33"
MAX_HOLD = 30.0  # seconds a held review waits at most (a broken test must not hang the server)


@dataclass(frozen=True)
class ServiceAccountToken:
    """What the fake knows of a token it "minted": whose it is, for which audiences, until when."""

    namespace: str
    service_account: str
    audiences: tuple[str, ...]
    expires: datetime
    pod: str | None = None
    uid: str = field(default_factory=lambda: str(uuid.uuid4()))

    @property
    def username(self) -> str:
        return f"system:serviceaccount:{self.namespace}:{self.service_account}"


class TokenReviews:
    """The tokens the fake accepts, and how it answers reviews of them (see the module docstring)."""

    def __init__(self) -> None:
        self._tokens: dict[str, ServiceAccountToken] = {}
        self._lock = threading.Lock()
        self._released = threading.Event()
        self._released.set()
        self.reviews: list[JsonObj] = []  # every request body that passed the schema, in order
        self.tamper: Callable[[JsonObj], Any] | None = None  # rewrites an answer body before it is sent

    def issue(
        self,
        namespace: str,
        service_account: str,
        *,
        audiences: Sequence[str] = ("mesh-identity",),
        ttl: timedelta = timedelta(hours=1),
        pod: str | None = None,
    ) -> str:
        """A new token of ``namespace/service_account`` for ``audiences``, expiring after ``ttl`` (negative:
        already expired). Its text is opaque, shaped like a JWT."""
        token = ".".join(secrets.token_urlsafe(n) for n in (24, 96, 48))
        expires = datetime.now(UTC) + ttl
        with self._lock:
            self._tokens[token] = ServiceAccountToken(namespace, service_account, tuple(audiences), expires, pod)
        return token

    def hold(self) -> Callable[[], None]:
        """Keep every review waiting (at most :data:`MAX_HOLD` seconds) until the returned function is called."""
        self._released.clear()
        return self._released.set

    def release(self) -> None:
        self._released.set()

    def review(self, body: Any) -> JsonObj:
        """The answer to a review request, as the real API server gives it; ApiError for a bad request."""
        if not isinstance(body, dict):
            raise bad_request("the body of the request must be a JSON object")
        check_schema(body)
        if body.get("apiVersion") != TOKEN_REVIEW.api_version or body.get("kind") != TOKEN_REVIEW.kind:
            raise bad_request(
                f"the API version in the data ({body.get('apiVersion')}) and kind ({body.get('kind')}) do not match "
                f"the endpoint's {TOKEN_REVIEW.api_version} {TOKEN_REVIEW.kind}"
            )
        spec = body.get("spec") or {}
        token = spec.get("token") or ""
        if not token:
            raise ApiError(
                422,
                "Invalid",
                'TokenReview.authentication.k8s.io "" is invalid: spec.token: Required value',
                {"kind": "TokenReview", "group": TOKEN_REVIEW.group, "causes": []},
            )
        with self._lock:
            self.reviews.append(body)
            known = self._tokens.get(token)
        self._released.wait(MAX_HOLD)
        wanted = [a for a in (spec.get("audiences") or [API_AUDIENCE]) if a is not None]
        answer: JsonObj = {
            "kind": TOKEN_REVIEW.kind,
            "apiVersion": TOKEN_REVIEW.api_version,
            "metadata": {"creationTimestamp": None},
            "spec": spec,
            "status": _status(known, wanted),
        }
        tamper = self.tamper
        return tamper(answer) if tamper is not None else answer


def _status(known: ServiceAccountToken | None, wanted: Sequence[str]) -> JsonObj:
    if known is None:
        return {"user": {}, "error": "[invalid bearer token, square/go-jose: error in cryptographic primitive]"}
    if datetime.now(UTC) >= known.expires:
        return {"user": {}, "error": "[invalid bearer token, service account token has expired]"}
    common = [a for a in wanted if a in known.audiences]
    if not common:
        quoted = ", ".join(f'"{a}"' for a in known.audiences)
        targets = ", ".join(f'"{a}"' for a in wanted)
        return {
            "user": {},
            "error": f"[invalid bearer token, token audiences [{quoted}] is invalid for the target audiences "
            f"[{targets}]]",
        }
    extra: JsonObj = {"authentication.kubernetes.io/credential-id": [f"JTI={uuid.uuid4()}"]}
    if known.pod is not None:
        extra["authentication.kubernetes.io/pod-name"] = [known.pod]
        extra["authentication.kubernetes.io/pod-uid"] = [known.uid]
    return {
        "authenticated": True,
        "user": {
            "username": known.username,
            "uid": known.uid,
            "groups": ["system:serviceaccounts", f"system:serviceaccounts:{known.namespace}", "system:authenticated"],
            "extra": extra,
        },
        "audiences": common,
    }


def check_schema(obj: JsonObj) -> None:
    """400 BadRequest unless ``obj`` is a TokenReview by the official schema (strict: no unknown fields)."""
    try:
        kubernetes_validate.validate(obj, SCHEMA_VERSION, strict=True)
    except kubernetes_validate.ValidationError as err:
        first = str(err).splitlines()[0]
        raise bad_request(f"strict decoding error: {first}") from None
    except (kubernetes_validate.SchemaNotFoundError, kubernetes_validate.InvalidSchemaError):
        raise bad_request(
            f"the API version in the data ({obj.get('apiVersion')}) and kind ({obj.get('kind')}) do not match "
            f"the endpoint's {TOKEN_REVIEW.api_version} {TOKEN_REVIEW.kind}"
        ) from None
