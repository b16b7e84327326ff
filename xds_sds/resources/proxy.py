"""Everything one sidecar receives, built from the mesh model.

For the sidecar of ``service`` (node ``instance.node``):

* ``inbound|<service>``: a listener on the instance's inbound address requiring a mesh client certificate,
  HTTP (with XFCC and the RBAC filter; the access policy rides on the route ``inbound|<service>``) or TCP
  (network RBAC, then ``tcp_proxy``) to the cluster ``inbound|<service>|app``, the app on loopback
  (see :mod:`xds_sds.resources.rbac`); none for a client-only sidecar (an instance without an app);
* for each upstream ``U``: a plaintext listener ``outbound|U`` on the upstream's listen address (or at its port
  on the instance's own inbound IP). Its traffic goes to the EDS cluster ``outbound|B`` of each backend ``B``,
  whose endpoints are B's sidecars and whose TLS accepts only B's SPIFFE ID: B is U itself, or, when a
  TrafficSplit has U as its root, each of the split's backends, chosen by weight per request (HTTP weighted
  clusters on the route ``outbound|U``) or per connection (TCP);
* secrets (built separately, they change on their own clock): the SVID of the service's identity and the
  trust bundle. With ``secrets=SecretSource.AGENT`` (the mesh's ``xds.secrets: agent``) the TLS contexts fetch
  the SVID from the node agent instead (see :mod:`xds_sds.resources.tls`) and :func:`secret_resources` holds
  the trust bundle alone: no private key is in anything built here.

A sidecar's config is a function of its :class:`ProxyView` alone, which :func:`proxy_view` gathers from the
mesh: the xDS server rebuilds only the sidecars whose view changed.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from datetime import timedelta

from google.protobuf.message import Message

from mesh_identity.config import Egress, SecretSource
from mesh_identity.mesh.model import Address, Instance, Mesh, Protocol, Service
from mesh_identity.mesh.policy import TOTAL_WEIGHT, TrafficTarget
from mesh_identity.spiffe import SpiffeId
from mesh_identity.svid import TrustBundle, X509Svid
from xds_sds.protocol.auth import bundle_secret_name, tls_secret_name
from xds_sds.protocol.typeurls import CLUSTER, ENDPOINT, LISTENER, ROUTE
from xds_sds.resources import clusters, listeners, names, rbac, routes, stats, tls
from xds_sds.resources.secrets import tls_certificate_secret, validation_context_secret

Resources = dict[str, dict[str, Message]]


@dataclass(frozen=True, slots=True)
class BackendView:
    """A service the traffic for an upstream goes to, with its share (percent)."""

    service: str
    identity: SpiffeId
    endpoints: tuple[Address, ...]
    weight: int = TOTAL_WEIGHT


@dataclass(frozen=True, slots=True)
class UpstreamView:
    service: str
    listen: Address
    protocol: Protocol
    backends: tuple[BackendView, ...]
    cluster_ip: Address | None = None  # where a captured sidecar's app reaches it (Service.cluster_ip)


@dataclass(frozen=True, slots=True)
class ProxyView:
    """Everything one sidecar's config is built from: equal views build equal config."""

    service: str
    identity: SpiffeId
    protocol: Protocol
    instance: Instance
    access: tuple[TrafficTarget, ...] | None
    upstreams: tuple[UpstreamView, ...]
    egress: Egress = Egress.DENY  # a captured sidecar's choice for destinations outside the mesh (Mesh.egress)


def proxy_view(mesh: Mesh, service: Service, instance: Instance) -> ProxyView:
    """What the sidecar of ``instance`` (of ``service``) needs to know of the mesh."""
    upstreams = []
    for upstream in service.upstreams:
        if upstream.capture_only and not instance.captured:
            continue
        target = mesh.service(upstream.service)
        split = mesh.policy.split_of(target.name)
        shares = ((target.name, TOTAL_WEIGHT),) if split is None else ((b.service, b.weight) for b in split.backends)
        backends = tuple(
            BackendView(name, backend.identity, backend.endpoints, weight)
            for name, weight in shares
            for backend in (mesh.service(name),)
        )
        upstreams.append(
            UpstreamView(target.name, upstream.address_for(instance), target.protocol, backends, target.cluster_ip)
        )
    return ProxyView(
        service.name,
        service.identity,
        service.protocol,
        instance,
        mesh.policy.access_to(service.identity),
        tuple(upstreams),
        mesh.egress if instance.captured else Egress.DENY,
    )


def proxy_views(mesh: Mesh) -> dict[str, ProxyView]:
    """The view of every sidecar of the mesh, by node id."""
    return {i.node: proxy_view(mesh, s, i) for s in mesh.services.values() for i in s.instances}


def proxy_resources(
    mesh: Mesh,
    node: str,
    *,
    max_connection_age: timedelta | None = None,
    secrets: SecretSource = SecretSource.CONTROL_PLANE,
) -> Resources:
    """Listeners, routes, clusters and endpoints of one sidecar (no secrets).

    ``max_connection_age`` bounds the reuse of upstream HTTP connections (see :func:`clusters.upstream`);
    ``secrets``: where the sidecar fetches its certificate.
    """
    found = mesh.instance(node)
    if found is None:
        raise KeyError(f"node {node!r} is not a sidecar of the mesh")
    view = proxy_view(mesh, *found)
    return build_proxy(view, max_connection_age=max_connection_age, secrets=secrets)


def build_proxy(
    view: ProxyView,
    *,
    max_connection_age: timedelta | None = None,
    secrets: SecretSource = SecretSource.CONTROL_PLANE,
) -> Resources:
    """The resources of the sidecar described by ``view`` (see the module docstring)."""
    out: Resources = {LISTENER: {}, ROUTE: {}, CLUSTER: {}, ENDPOINT: {}}
    instance = view.instance
    if instance.app is not None:  # a client-only sidecar has no inbound listener
        _inbound(view, instance.app, out, secrets)

    for upstream in view.upstreams:
        http = upstream.protocol is Protocol.HTTP
        name = names.outbound(upstream.service)
        for backend in upstream.backends:
            cluster = names.outbound(backend.service)
            out[CLUSTER][cluster] = clusters.upstream(
                cluster, view.identity, backend.identity, http=http, max_connection_age=max_connection_age,
                secrets=secrets,
            )  # fmt: skip
            out[ENDPOINT][cluster] = clusters.load_assignment(cluster, backend.endpoints)
        weights = [(names.outbound(b.service), b.weight) for b in upstream.backends if b.weight > 0]
        if http:
            if len(weights) == 1:
                out[ROUTE][name] = routes.to_cluster(name, weights[0][0], retries=True)
            else:
                out[ROUTE][name] = routes.to_weighted_clusters(name, weights, retries=True)
            front = [listeners.http_manager(name, name, inbound=False)]
        elif len(weights) == 1:
            front = [listeners.tcp_proxy(name, weights[0][0], outbound=True)]
        else:
            front = [listeners.tcp_proxy_weighted(name, weights)]
        out[LISTENER][name] = listeners.listener(name, upstream.listen, front)
    stats.instrument(view, out)  # labelled stat prefixes and access logs, where the instance asks for them
    return out


def _inbound(view: ProxyView, app_address: Address, out: Resources, secrets: SecretSource) -> None:
    """The inbound mTLS listener of ``view``'s sidecar and the cluster of its local app."""
    instance, trust_domain = view.instance, view.identity.trust_domain
    inbound, app = names.inbound(view.service), names.local_app(view.service)
    out[CLUSTER][app] = clusters.local_app(app, app_address)
    if view.protocol is Protocol.HTTP:
        front = [listeners.http_manager(inbound, inbound, inbound=True, http_filters=[rbac.http_filter()])]
        policy = rbac.http_per_route(view.access, trust_domain, instance)
        out[ROUTE][inbound] = routes.to_cluster(inbound, app, {rbac.HTTP_RBAC: policy})
    else:
        front = [rbac.network_filter(inbound, view.access, trust_domain, instance), listeners.tcp_proxy(inbound, app)]
    downstream = tls.downstream(view.identity, secrets=secrets)
    out[LISTENER][inbound] = listeners.listener(inbound, instance.inbound, front, downstream)


def secret_resources(
    svid: X509Svid | None, bundle: TrustBundle, secrets: SecretSource = SecretSource.CONTROL_PLANE
) -> dict[str, Message]:
    """The secrets of a sidecar from the control plane: its SVID (once issued) and its trust bundle; with
    ``SecretSource.AGENT`` the trust bundle alone (its SVID and key come from the node agent)."""
    out: dict[str, Message] = {bundle_secret_name(bundle.trust_domain): validation_context_secret(bundle)}
    if svid is not None and secrets is SecretSource.CONTROL_PLANE:
        out[tls_secret_name(svid.spiffe_id)] = tls_certificate_secret(svid)
    return out


def services_by_node(mesh: Mesh) -> Mapping[str, Service]:
    return {i.node: s for s in mesh.services.values() for i in s.instances}
