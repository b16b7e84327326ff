"""Kubernetes service-account tokens, checked with the TokenReview API (``authentication.k8s.io/v1``).

:class:`TokenReviewer` asks the API server (the official ``kubernetes`` client, configured from
``signing.kubernetes``: a kubeconfig file or the pod's in-cluster service account) whether a token is valid for
the configured audience, with a timeout. The answer is checked, not trusted for its shape: ``status.authenticated``
must be true, ``status.audiences`` must contain the audience (an API server that is not audience-aware answers
without it, and the token may have been minted for someone else), and ``status.user.username`` must be a service
account's, ``system:serviceaccount:<namespace>:<name>``. Then the token buys
``spiffe://<td>/ns/<namespace>/sa/<name>``.

Errors: :class:`TokenRejected` when the API server does not vouch for the token for us (the caller's problem:
``UNAUTHENTICATED``); :class:`TokenReviewError` when the review could not be done (the API server unreachable,
slow, refusing the control plane's own credentials, or answering something malformed: the server's problem,
``retryable`` when trying again may help). Messages never hold the token; text from the API server is escaped
and bounded.

This module and the cert-manager provider are the only places that speak the ``kubernetes`` client (an
import-linter contract).
"""

from __future__ import annotations

import json
import re
import threading
from dataclasses import dataclass
from typing import Any, cast

import kubernetes
import urllib3
from kubernetes.client import ApiException
from kubernetes.config import ConfigException, kube_config
from kubernetes.config.incluster_config import InClusterConfigLoader

from mesh_identity.config import KubernetesAuthConfig
from mesh_identity.errors import ConfigError, InvalidSpiffeIdError, MeshIdentityError
from mesh_identity.spiffe import SpiffeId, TrustDomain
from xds_sds.protocol.text import escaped

API_VERSION = "authentication.k8s.io/v1"
MAX_TOKEN_CHARS = 16 * 1024
MAX_ANSWER_BYTES = 256 * 1024
_TOKEN = re.compile(r"^[A-Za-z0-9._~+/=-]+$")
_USER = re.compile(r"^system:serviceaccount:([^:]+):([^:]+)$")


class TokenRejected(MeshIdentityError):
    """The API server does not vouch for the token for our audience, or it is not a service account's."""


class TokenReviewError(MeshIdentityError):
    """The review could not be done; ``retryable`` says whether trying again may help."""

    def __init__(self, message: str, *, retryable: bool) -> None:
        super().__init__(message)
        self.retryable = retryable


@dataclass(frozen=True, slots=True)
class ServiceAccount:
    """Whom the API server says a token belongs to, and the SPIFFE ID that makes in the trust domain."""

    namespace: str
    name: str
    spiffe_id: SpiffeId

    def __str__(self) -> str:
        return f"{self.namespace}/{self.name}"


class TokenReviewer:
    """Reviews tokens for ``settings.audience`` at the API server ``settings`` names (see the module docstring).

    :param trust_domain: the trust domain whose ``ns/<ns>/sa/<sa>`` identities a reviewed token buys.
    :param settings: ``signing.kubernetes``: a kubeconfig file, or None for the in-cluster config.
    :param service_account_dir: where the in-cluster config's token and ``ca.crt`` are (tests point elsewhere).
    :param environ: the environment the in-cluster config reads ``KUBERNETES_SERVICE_HOST``/``_PORT`` from.
    """

    def __init__(
        self,
        trust_domain: TrustDomain,
        settings: KubernetesAuthConfig,
        *,
        service_account_dir: str = "/var/run/secrets/kubernetes.io/serviceaccount",
        environ: dict[str, str] | None = None,
    ) -> None:
        self.trust_domain = trust_domain
        self.audience = settings.audience
        self.timeout = settings.timeout.total_seconds()
        config = kubernetes.client.Configuration()
        if settings.kubeconfig is None:
            loader = cast(Any, InClusterConfigLoader)(
                token_filename=f"{service_account_dir}/token",
                cert_filename=f"{service_account_dir}/ca.crt",
                **({"environ": environ} if environ is not None else {}),
            )
            try:
                loader.load_and_set(config)
            except ConfigException as err:
                raise ConfigError(
                    f"signing.kubernetes.in_cluster: cannot use the pod's service account in {service_account_dir}: "
                    f"{err}"
                ) from None
        else:
            try:
                cast(Any, kube_config).load_kube_config(
                    config_file=str(settings.kubeconfig), client_configuration=config, persist_config=False
                )
            except (ConfigException, ValueError, OSError) as err:
                raise ConfigError(
                    f"signing.kubernetes.kubeconfig: {settings.kubeconfig} is not a usable kubeconfig: {err}"
                ) from None
        config.retries = 0  # one attempt within the caller's deadline; the agent retries with backoff
        self.host = str(config.host)
        self._client = kubernetes.client.ApiClient(config)
        self._api: Any = kubernetes.client.AuthenticationV1Api(self._client)  # the client's types: partial
        self._lock = threading.Lock()
        self._closed = False

    def review(self, token: str, timeout: float | None = None) -> ServiceAccount:
        """Whose ``token`` is, by the API server, for our audience; within ``timeout`` seconds (default: the
        configured one; the smaller of the two when both are given). TokenRejected or TokenReviewError."""
        if not token:
            raise TokenRejected("the Kubernetes token is empty")
        if len(token) > MAX_TOKEN_CHARS:
            raise TokenRejected(f"the Kubernetes token is {len(token)} characters, more than {MAX_TOKEN_CHARS}")
        if not _TOKEN.match(token):
            raise TokenRejected("the Kubernetes token is malformed (not a JWT's characters)")
        seconds = self.timeout if timeout is None else max(0.001, min(timeout, self.timeout))
        body = kubernetes.client.V1TokenReview(
            api_version=API_VERSION,
            kind="TokenReview",
            spec=kubernetes.client.V1TokenReviewSpec(token=token, audiences=[self.audience]),
        )
        try:
            response = self._api.create_token_review(body, _request_timeout=seconds, _preload_content=False)
            try:
                raw = response.read(MAX_ANSWER_BYTES + 1)
            except BaseException:
                response.close()
                raise
            if len(raw) > MAX_ANSWER_BYTES:
                response.close()  # the rest is not read: the connection cannot be used again
            else:
                response.release_conn()
        except ApiException as err:
            raise _api_error(err, self.host) from None
        except (urllib3.exceptions.HTTPError, OSError) as err:
            raise _network_error(err, self.host, seconds) from None
        return self.check_answer(raw)

    def check_answer(self, raw: bytes) -> ServiceAccount:
        """The service account of a TokenReview answer (the bytes the API server sent), if it vouches for it."""
        if len(raw) > MAX_ANSWER_BYTES:
            raise _malformed(f"it is larger than {MAX_ANSWER_BYTES} bytes")
        try:
            answer = json.loads(raw)
        except (ValueError, UnicodeDecodeError):
            raise _malformed("it is not JSON") from None
        if not isinstance(answer, dict):
            raise _malformed("it is not a JSON object")
        status = answer.get("status")
        if not isinstance(status, dict):
            raise _malformed("status is not an object")
        authenticated = status.get("authenticated", False)
        if not isinstance(authenticated, bool):
            raise _malformed("status.authenticated is not true or false")
        if not authenticated:
            error = status.get("error")
            why = f": {_text(error)}" if isinstance(error, str) and error else ""
            raise TokenRejected(f"the Kubernetes API did not authenticate the token{why}")
        audiences = status.get("audiences")
        if audiences is not None and (
            not isinstance(audiences, list) or not all(isinstance(a, str) for a in audiences)
        ):
            raise _malformed("status.audiences is not a list of strings")
        if not audiences or self.audience not in audiences:
            shown = ", ".join(_text(a, 64) for a in (audiences or [])[:4]) or "none"
            raise TokenRejected(
                f"the Kubernetes API authenticated the token, but not for audience {self.audience!r} "
                f"(its audiences: {shown})"
            )
        user = status.get("user")
        if not isinstance(user, dict) or not isinstance(user.get("username"), str):
            raise _malformed("status.user.username is not a string")
        username: str = user["username"]
        match = _USER.match(username)
        if match is None:
            raise TokenRejected(f"the token belongs to {_text(username, 80)!r}, which is not a service account")
        namespace, name = match.group(1), match.group(2)
        try:
            spiffe_id = SpiffeId.for_kubernetes(self.trust_domain, namespace, name)
        except InvalidSpiffeIdError as err:
            raise TokenRejected(
                f"the token's service account {_text(username, 80)!r} has no SPIFFE ID: {err}"
            ) from None
        return ServiceAccount(namespace, name, spiffe_id)

    def close(self) -> None:
        with self._lock:
            if self._closed:
                return
            self._closed = True
        cast(Any, self._client).close()


def _text(value: str, limit: int = 200) -> str:
    text = escaped(value)
    return text if len(text) <= limit else text[:limit] + "..."


def _malformed(why: str) -> TokenReviewError:
    return TokenReviewError(f"the Kubernetes API's TokenReview answer is malformed: {why}", retryable=False)


def _api_error(err: ApiException, host: str) -> TokenReviewError:
    code = int(err.status or 0)
    reason, message = str(err.reason or ""), ""
    try:
        body = json.loads(err.body or "")
    except (TypeError, ValueError):
        body = None
    if isinstance(body, dict) and body.get("kind") == "Status":
        reason, message = str(body.get("reason") or reason), str(body.get("message") or "")
    shown = f"{code} {reason}".strip()
    detail = f": {_text(message)}" if message else ""
    if code == 0:
        return TokenReviewError(f"cannot reach the Kubernetes API at {host}: {_text(str(err.reason))}", retryable=True)
    if code == 401:
        return TokenReviewError(
            f"the Kubernetes API at {host} refused the control plane's own credentials ({shown}){detail}",
            retryable=False,
        )
    if code == 403:
        return TokenReviewError(
            f"the control plane may not create tokenreviews at the Kubernetes API at {host} ({shown}){detail}",
            retryable=False,
        )
    retryable = code == 429 or code >= 500
    return TokenReviewError(
        f"the Kubernetes API at {host} answered the TokenReview with {shown}{detail}", retryable=retryable
    )


def _network_error(err: BaseException, host: str, seconds: float) -> TokenReviewError:
    reason = err.reason if isinstance(err, urllib3.exceptions.MaxRetryError) and err.reason else err
    if isinstance(reason, urllib3.exceptions.ReadTimeoutError | urllib3.exceptions.ConnectTimeoutError | TimeoutError):
        return TokenReviewError(
            f"the Kubernetes API at {host} did not answer the TokenReview within {seconds:g}s", retryable=True
        )
    if isinstance(reason, urllib3.exceptions.SSLError):
        return TokenReviewError(f"TLS with the Kubernetes API at {host} failed: {_text(str(reason))}", retryable=False)
    return TokenReviewError(f"cannot reach the Kubernetes API at {host}: {_text(str(reason))}", retryable=True)
