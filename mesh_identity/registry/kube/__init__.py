"""The Kubernetes API as a workload registry: namespaces, service accounts, pods, Services, EndpointSlices and
the SMI custom resources, followed with watches and turned into the mesh model.

* :mod:`~mesh_identity.registry.kube.registry`: :class:`KubernetesRegistry` (the seam's second implementation);
* :mod:`~mesh_identity.registry.kube.watch`: one watch per kind (list, watch from the resourceVersion with
  bookmarks, list again on 410, backoff on errors, last good objects kept);
* :mod:`~mesh_identity.registry.kube.translate` and :mod:`~mesh_identity.registry.kube.smi`: objects to the
  mesh model, pure (the mapping is documented there);
* :mod:`~mesh_identity.registry.kube.client`: the only module that speaks the ``kubernetes`` client;
* :mod:`~mesh_identity.registry.kube.events`: the Events written about refused objects.

The CRDs of the SMI kinds are in ``deploy/crds/``, examples in ``deploy/examples/``.
"""

from __future__ import annotations

from mesh_identity.mesh.ports import INBOUND_PORT
from mesh_identity.registry.kube.registry import KubernetesRegistry
from mesh_identity.registry.kube.watch import Backoff

__all__ = ["INBOUND_PORT", "Backoff", "KubernetesRegistry"]
