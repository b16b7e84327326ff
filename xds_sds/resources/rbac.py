"""Access control on a sidecar's inbound port: Envoy's RBAC filters built from SMI TrafficTargets.

Principals are always ``authenticated.principal_name``: the URI SAN (the SPIFFE ID) of the client certificate
that the inbound TLS context has verified against the mesh's trust bundle. Nothing a client can write into a
request (``x-forwarded-client-cert`` included) is ever a principal; headers appear only in permissions, as the
HTTPRouteGroup matches ask.

* HTTP: the inbound connection manager always has the RBAC filter, configured to deny everything; the inbound
  route configuration overrides it per virtual host (``RBACPerRoute``) with the destination's policy. A policy
  change is therefore a route (RDS) update that applies to the next request, on open connections too, and the
  listener stays as it is. Should the override ever be missing, the filter denies (fail closed).
* TCP: the network RBAC filter before ``tcp_proxy``, checked when a connection's first bytes arrive; a denied
  connection is closed. A policy change replaces the listener's filter chain: new connections get the new
  policy, connections already admitted drain with the old chain. Limit: ``tcp_proxy`` opens the connection to
  the app as soon as the client's is accepted, so with a server-first protocol (the app speaks first: SMTP,
  MySQL) a denied client may read the app's greeting before its first byte gets it closed. Delaying the app
  connection to the client's first byte (``upstream_connect_mode``) would stop that, and deadlock such
  protocols for allowed clients too, so it is not done.

A destination no TrafficTarget names (or any destination in permissive mode) gets one explicit policy:
any identity of the mesh's trust domain, any request.
"""

from __future__ import annotations

from collections.abc import Sequence

from envoy.config.listener.v3 import listener_components_pb2
from envoy.config.rbac.v3 import rbac_pb2
from envoy.config.route.v3 import route_components_pb2
from envoy.extensions.filters.http.rbac.v3 import rbac_pb2 as http_rbac_pb2
from envoy.extensions.filters.network.http_connection_manager.v3 import http_connection_manager_pb2 as hcm_pb2
from envoy.extensions.filters.network.rbac.v3 import rbac_pb2 as network_rbac_pb2
from envoy.type.matcher.v3 import path_pb2, regex_pb2, string_pb2
from google.protobuf import any_pb2

from mesh_identity.mesh.model import Instance
from mesh_identity.mesh.policy import HttpMatch, HttpRule, TcpRule, TrafficTarget
from mesh_identity.spiffe import SpiffeId, TrustDomain
from xds_sds.resources.packing import pack

HTTP_RBAC = "envoy.filters.http.rbac"
NETWORK_RBAC = "envoy.filters.network.rbac"
MESH_POLICY = "mesh"
"""The name of the one policy of a destination open to the whole mesh."""

Access = Sequence[TrafficTarget] | None
"""The TrafficTargets naming a destination, or None when it is open to the mesh (see ``Policy.access_to``)."""


def principal(identity: SpiffeId) -> rbac_pb2.Principal:
    """The client whose verified certificate carries exactly this SPIFFE ID."""
    return rbac_pb2.Principal(
        authenticated=rbac_pb2.Principal.Authenticated(principal_name=string_pb2.StringMatcher(exact=str(identity)))
    )


def mesh_principal(trust_domain: TrustDomain) -> rbac_pb2.Principal:
    """Any client whose verified certificate has a SPIFFE ID of ``trust_domain``."""
    prefix = f"{trust_domain.id}/"
    return rbac_pb2.Principal(
        authenticated=rbac_pb2.Principal.Authenticated(principal_name=string_pb2.StringMatcher(prefix=prefix))
    )


def _regex(pattern: str) -> string_pb2.StringMatcher:
    return string_pb2.StringMatcher(safe_regex=regex_pb2.RegexMatcher(regex=pattern))


def http_permission(match: HttpMatch) -> rbac_pb2.Permission:
    """A request that satisfies every condition of one HTTPRouteGroup match."""
    conditions = []
    if match.path_regex is not None:
        conditions.append(rbac_pb2.Permission(url_path=path_pb2.PathMatcher(path=_regex(match.path_regex))))
    if match.methods:
        methods = [
            rbac_pb2.Permission(
                header=route_components_pb2.HeaderMatcher(
                    name=":method", string_match=string_pb2.StringMatcher(exact=method)
                )
            )
            for method in match.methods
        ]
        conditions.append(
            methods[0] if len(methods) == 1 else rbac_pb2.Permission(or_rules=rbac_pb2.Permission.Set(rules=methods))
        )
    for name, pattern in match.headers:
        conditions.append(
            rbac_pb2.Permission(header=route_components_pb2.HeaderMatcher(name=name, string_match=_regex(pattern)))
        )
    if not conditions:
        return rbac_pb2.Permission(any=True)
    if len(conditions) == 1:
        return conditions[0]
    return rbac_pb2.Permission(and_rules=rbac_pb2.Permission.Set(rules=conditions))


def _permissions(target: TrafficTarget, instance: Instance) -> list[rbac_pb2.Permission]:
    permissions: list[rbac_pb2.Permission] = []
    port = instance.app.port if instance.app is not None else None
    for rule in target.rules:
        if isinstance(rule, HttpRule):
            permissions.extend(http_permission(match) for match in rule.matches)
        elif isinstance(rule, TcpRule) and (not rule.ports or port in rule.ports):
            permissions.append(rbac_pb2.Permission(any=True))
    return permissions


def rules(access: Access, trust_domain: TrustDomain, instance: Instance) -> rbac_pb2.RBAC:
    """ALLOW rules for one sidecar's inbound port: a policy per TrafficTarget (named ``namespace/name``).

    A TrafficTarget whose rules grant nothing on this instance (a TCPRoute for other ports) adds no policy; with
    no policy at all, everything is denied.
    """
    if access is None:
        open_to_mesh = rbac_pb2.Policy(
            permissions=[rbac_pb2.Permission(any=True)], principals=[mesh_principal(trust_domain)]
        )
        return rbac_pb2.RBAC(action=rbac_pb2.RBAC.ALLOW, policies={MESH_POLICY: open_to_mesh})
    policies = {}
    for target in access:
        permissions = _permissions(target, instance)
        if permissions:
            policies[f"{target.namespace}/{target.name}"] = rbac_pb2.Policy(
                permissions=permissions, principals=[principal(source) for source in target.sources]
            )
    return rbac_pb2.RBAC(action=rbac_pb2.RBAC.ALLOW, policies=policies)


def http_filter() -> hcm_pb2.HttpFilter:
    """The inbound RBAC filter: deny all, unless the route's per-route config says otherwise."""
    deny_all = http_rbac_pb2.RBAC(rules=rbac_pb2.RBAC(action=rbac_pb2.RBAC.ALLOW))
    return hcm_pb2.HttpFilter(name=HTTP_RBAC, typed_config=pack(deny_all))


def http_per_route(access: Access, trust_domain: TrustDomain, instance: Instance) -> any_pb2.Any:
    """The ``typed_per_filter_config`` entry for :data:`HTTP_RBAC` on the inbound virtual host."""
    return pack(http_rbac_pb2.RBACPerRoute(rbac=http_rbac_pb2.RBAC(rules=rules(access, trust_domain, instance))))


def network_filter(
    stat_prefix: str, access: Access, trust_domain: TrustDomain, instance: Instance
) -> listener_components_pb2.Filter:
    """The network RBAC filter of a TCP service's inbound port (stats under ``<stat_prefix>.rbac.``)."""
    config = network_rbac_pb2.RBAC(stat_prefix=stat_prefix, rules=rules(access, trust_domain, instance))
    return listener_components_pb2.Filter(name=NETWORK_RBAC, typed_config=pack(config))
