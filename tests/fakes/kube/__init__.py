"""A Kubernetes API server for tests: the REST API over real HTTPS on a loopback port (``:0``).

No Kubernetes API server can be installed on these machines, so tests drive this one through the real
``kubernetes`` client. It keeps objects in memory and implements the parts of the API our code relies on,
for any kinds it is told to serve; it knows nothing about any particular operator's custom resources (the
fake of an operator registers its kinds, see :meth:`KubeServer.register`):

* create / get / list / replace (PUT) / patch / delete / deletecollection, for namespaced and cluster-scoped
  kinds, with the ``/status`` subresource where a kind has one (writes to the main resource then ignore
  ``status``, writes to ``/status`` change nothing else) (:mod:`~tests.fakes.kube.store`,
  :mod:`~tests.fakes.kube.routing`);
* patches as JSON merge patch, JSON patch (RFC 6902) and, for built-in kinds, strategic merge patch; custom
  kinds answer 415 to a strategic merge patch, as the real server does (:mod:`~tests.fakes.kube.patches`);
* ``metadata``, one cluster-wide ``resourceVersion`` counter, finalizers, optimistic concurrency and the real
  server's ``kind: Status`` errors (:mod:`~tests.fakes.kube.store`, :mod:`~tests.fakes.kube.errors`); 401
  without a known bearer token, 403 ``Forbidden`` from deny rules (:mod:`~tests.fakes.kube.server`);
* label and field selectors, ``limit``/``continue`` (:mod:`~tests.fakes.kube.selectors`);
* ``watch=true`` streams with bookmarks, resumable from any retained ``resourceVersion``, 410 ``Expired`` for
  older ones (:mod:`~tests.fakes.kube.watch`);
* discovery: ``/version``, ``/api``, ``/api/v1``, ``/apis``, ``/apis/<group>``, ``/apis/<group>/<version>``;
* TokenReview (``POST /apis/authentication.k8s.io/v1/tokenreviews``) of service-account tokens a test registers
  with :meth:`KubeServer.token_reviews` (:mod:`~tests.fakes.kube.tokenreview`).

The served kinds are :class:`Kind` values (:mod:`~tests.fakes.kube.kinds`); :data:`DEFAULT_KINDS` are Secret,
ConfigMap, Namespace and Lease. Another fake adds its custom resources with :func:`custom_resource` and
:meth:`KubeServer.register`.

Use it through the ``kube_server`` and ``kube_api_client`` fixtures (import them into a ``conftest.py``),
or directly::

    with KubeServer() as server:
        with kubernetes.client.ApiClient(server.client_configuration()) as api:
            kubernetes.client.CoreV1Api(api).read_namespaced_secret("name", "namespace")

Faults for tests: :meth:`KubeServer.deny` (403), :meth:`KubeServer.inject_error` (any status, N times),
:meth:`KubeServer.go_down` / :meth:`KubeServer.come_up` (connections dropped, as an unreachable server),
:meth:`KubeServer.compact` (watch history expired), :meth:`KubeServer.send_bookmarks`.
"""

from tests.fakes.kube.errors import ApiError, JsonObj
from tests.fakes.kube.kinds import CONFIG_MAP, DEFAULT_KINDS, LEASE, NAMESPACE, SECRET, Kind, custom_resource
from tests.fakes.kube.server import (
    DEFAULT_TOKEN,
    DEFAULT_USER,
    InjectedError,
    KubeServer,
    RequestRecord,
    Rule,
    kube_api_client,
    kube_server,
)
from tests.fakes.kube.tokenreview import ServiceAccountToken, TokenReviews

__all__ = [
    "CONFIG_MAP",
    "DEFAULT_KINDS",
    "DEFAULT_TOKEN",
    "DEFAULT_USER",
    "LEASE",
    "NAMESPACE",
    "SECRET",
    "ApiError",
    "InjectedError",
    "JsonObj",
    "Kind",
    "KubeServer",
    "RequestRecord",
    "Rule",
    "ServiceAccountToken",
    "TokenReviews",
    "custom_resource",
    "kube_api_client",
    "kube_server",
]
