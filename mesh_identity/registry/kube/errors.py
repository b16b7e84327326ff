"""Errors of the Kubernetes registry's API calls: each says what the call tried to do and what went wrong.

::

    KubeApiError                       a call to the Kubernetes API failed (``code``: the HTTP status, or None)
    ├── KubeUnreachableError           no answer: connection refused, dropped, timed out, or TLS failed
    ├── KubeUnauthorizedError          401: the token or kubeconfig user is not accepted
    ├── KubeForbiddenError             403: RBAC does not allow the call (names the verb and resource)
    ├── KubeExpiredError               410: the watch's resourceVersion is too old (list again)
    ├── KubeConflictError              409: the object changed since it was read (a resourceVersion precondition
    │   │                              failed): read it again
    │   └── KubeAlreadyExistsError     409 AlreadyExists: a create lost to another writer: read the winner's
    └── MalformedAnswerError           an answer that is not what the API promises (not JSON, a key missing)

``kubernetes`` and ``urllib3`` exceptions become one of these in :mod:`mesh_identity.registry.kube.client`, with
``raise ... from``; nothing else of the registry sees them. The watches retry every one of them with backoff
(RBAC and tokens can be fixed while the server runs) and keep the objects they last saw.
"""

from __future__ import annotations

from mesh_identity.errors import MeshIdentityError


class KubeApiError(MeshIdentityError):
    """A call to the Kubernetes API failed; ``code`` is the HTTP status of the answer (None without one)."""

    def __init__(self, message: str, code: int | None = None) -> None:
        super().__init__(message)
        self.code = code


class KubeUnreachableError(KubeApiError):
    """No answer from the API server (refused, dropped, timed out, TLS)."""


class KubeUnauthorizedError(KubeApiError):
    """401: the API server does not accept the credentials."""


class KubeForbiddenError(KubeApiError):
    """403: RBAC forbids the call."""


class KubeExpiredError(KubeApiError):
    """410 Gone: the resourceVersion a watch resumed from is no longer in the server's history."""


class MalformedAnswerError(KubeApiError):
    """An answer that is not what the Kubernetes API promises."""


class KubeConflictError(KubeApiError):
    """409 Conflict: the object's resourceVersion is not the one the write was made against."""


class KubeAlreadyExistsError(KubeConflictError):
    """409 AlreadyExists: the object a create named exists already."""
