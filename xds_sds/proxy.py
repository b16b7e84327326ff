"""Everything one sidecar receives, built from the mesh model.

For the sidecar of ``service`` (node ``instance.node``):

* ``inbound|<service>``: a listener on the instance's inbound address requiring a mesh client certificate,
  HTTP (with XFCC) or TCP to the cluster ``inbound|<service>|app``, the app on loopback;
* for each upstream ``U``: a plaintext listener ``outbound|U`` on the upstream's listen address, routing to
  the EDS cluster ``outbound|U`` whose endpoints are U's sidecars and whose TLS accepts only U's SPIFFE ID;
* secrets (built separately, they change on their own clock): the SVID of the service's identity and the
  trust bundle.
"""

from __future__ import annotations

from collections.abc import Mapping
from datetime import timedelta

from google.protobuf.message import Message

from mesh_identity.mesh import Mesh, Protocol, Service
from mesh_identity.svid import TrustBundle, X509Svid
from xds_sds import clusters, listeners, names, routes, tls
from xds_sds.auth import bundle_secret_name, tls_secret_name
from xds_sds.secrets import tls_certificate_secret, validation_context_secret
from xds_sds.typeurls import CLUSTER, ENDPOINT, LISTENER, ROUTE

Resources = dict[str, dict[str, Message]]


def proxy_resources(mesh: Mesh, node: str, *, max_connection_age: timedelta | None = None) -> Resources:
    """Listeners, routes, clusters and endpoints of one sidecar (no secrets).

    ``max_connection_age`` bounds the reuse of upstream HTTP connections (see :func:`clusters.upstream`).
    """
    found = mesh.instance(node)
    if found is None:
        raise KeyError(f"node {node!r} is not a sidecar of the mesh")
    service, instance = found
    out: Resources = {LISTENER: {}, ROUTE: {}, CLUSTER: {}, ENDPOINT: {}}

    inbound, app = names.inbound(service.name), names.local_app(service.name)
    out[CLUSTER][app] = clusters.local_app(app, instance.app)
    if service.protocol is Protocol.HTTP:
        front = listeners.http_manager(inbound, inbound, inbound=True)
        out[ROUTE][inbound] = routes.to_cluster(inbound, app)
    else:
        front = listeners.tcp_proxy(inbound, app)
    out[LISTENER][inbound] = listeners.listener(inbound, instance.inbound, [front], tls.downstream(service.identity))

    for upstream in service.upstreams:
        target = mesh.service(upstream.service)
        name = names.outbound(target.name)
        out[CLUSTER][name] = clusters.upstream(
            name,
            service.identity,
            target.identity,
            http=target.protocol is Protocol.HTTP,
            max_connection_age=max_connection_age,
        )
        out[ENDPOINT][name] = clusters.load_assignment(name, target.endpoints)
        if target.protocol is Protocol.HTTP:
            out[ROUTE][name] = routes.to_cluster(name, name)
            out[LISTENER][name] = listeners.listener(
                name, upstream.listen, [listeners.http_manager(name, name, inbound=False)]
            )
        else:
            out[LISTENER][name] = listeners.listener(name, upstream.listen, [listeners.tcp_proxy(name, name)])
    return out


def secret_resources(svid: X509Svid | None, bundle: TrustBundle) -> dict[str, Message]:
    """The secrets of a sidecar: its SVID (once issued) and its trust bundle."""
    out: dict[str, Message] = {bundle_secret_name(bundle.trust_domain): validation_context_secret(bundle)}
    if svid is not None:
        out[tls_secret_name(svid.spiffe_id)] = tls_certificate_secret(svid)
    return out


def services_by_node(mesh: Mesh) -> Mapping[str, Service]:
    return {i.node: s for s in mesh.services.values() for i in s.instances}
