"""What a sidecar gets, built from the mesh model; and the MeshPublisher's inputs (without Envoy)."""

from __future__ import annotations

import pytest
from envoy.config.cluster.v3 import cluster_pb2
from envoy.config.listener.v3 import listener_pb2
from envoy.extensions.filters.network.http_connection_manager.v3 import http_connection_manager_pb2 as hcm_pb2
from envoy.extensions.filters.network.tcp_proxy.v3 import tcp_proxy_pb2
from envoy.extensions.transport_sockets.tls.v3 import common_pb2, tls_pb2
from google.protobuf import any_pb2
from google.protobuf.message import Message

from mesh_identity.mesh.model import Address, Instance, Mesh, Protocol, Service, Upstream
from mesh_identity.svid import fingerprint_of
from tests.pki import TestCa
from xds_sds.mesh.publisher import MeshPublisher
from xds_sds.protocol.cache import Resource
from xds_sds.protocol.typeurls import CLUSTER, ENDPOINT, LISTENER, ROUTE, SECRET
from xds_sds.resources.proxy import proxy_resources
from xds_sds.resources.secrets import validation_context_secret

CA = TestCa.for_trust_domain("example.org")
FRONTEND = CA.id("/ns/shop/sa/frontend")
BACKEND = CA.id("/ns/shop/sa/backend")
LEDGER = CA.id("/ns/shop/sa/ledger")


def _mesh(backend_inbound: int = 15081, with_ledger: bool = True) -> Mesh:
    services = {
        "frontend": Service(
            "frontend",
            FRONTEND,
            Protocol.HTTP,
            (Instance("frontend-1", Address("127.0.0.1", 8080), Address("127.0.0.1", 15080)),),
            (Upstream("backend", Address("127.0.0.1", 16081)),)
            + ((Upstream("ledger", Address("127.0.0.1", 16082)),) if with_ledger else ()),
        ),
        "backend": Service(
            "backend",
            BACKEND,
            Protocol.HTTP,
            (Instance("backend-1", Address("127.0.0.1", 8081), Address("127.0.0.1", backend_inbound)),),
        ),
    }
    if with_ledger:
        services["ledger"] = Service(
            "ledger",
            LEDGER,
            Protocol.TCP,
            (Instance("ledger-1", Address("127.0.0.1", 8082), Address("127.0.0.1", 15082)),),
        )
    return Mesh(CA.trust_domain, services)


def unpack(body: any_pb2.Any, cls: type[Message]) -> Message:
    message = cls()
    assert body.Unpack(message), body.type_url
    return message


def test_sidecar_resources_by_name() -> None:
    out = proxy_resources(_mesh(), "frontend-1")
    assert sorted(out[LISTENER]) == ["inbound|frontend", "outbound|backend", "outbound|ledger"]
    assert sorted(out[CLUSTER]) == ["inbound|frontend|app", "outbound|backend", "outbound|ledger"]
    assert sorted(out[ENDPOINT]) == ["outbound|backend", "outbound|ledger"]
    assert sorted(out[ROUTE]) == ["inbound|frontend", "outbound|backend"]  # tcp has no routes
    with pytest.raises(KeyError) as info:
        proxy_resources(_mesh(), "nobody")
    assert info.value.args == ("node 'nobody' is not a sidecar of the mesh",)


def test_inbound_listener_requires_a_mesh_client_certificate_and_sets_xfcc() -> None:
    listener = proxy_resources(_mesh(), "backend-1")[LISTENER]["inbound|backend"]
    assert isinstance(listener, listener_pb2.Listener)
    assert (listener.address.socket_address.address, listener.address.socket_address.port_value) == ("127.0.0.1", 15081)
    chain = listener.filter_chains[0]
    context = unpack(chain.transport_socket.typed_config, tls_pb2.DownstreamTlsContext)
    assert isinstance(context, tls_pb2.DownstreamTlsContext)
    assert context.require_client_certificate.value is True
    common = context.common_tls_context
    assert [s.name for s in common.tls_certificate_sds_secret_configs] == [str(BACKEND)]
    assert common.tls_certificate_sds_secret_configs[0].sds_config.HasField("ads")
    combined = common.combined_validation_context
    assert combined.validation_context_sds_secret_config.name == "spiffe://example.org"
    [matcher] = combined.default_validation_context.match_typed_subject_alt_names
    assert (matcher.san_type, matcher.matcher.prefix) == (common_pb2.SubjectAltNameMatcher.URI, "spiffe://example.org/")
    manager = unpack(chain.filters[0].typed_config, hcm_pb2.HttpConnectionManager)
    assert isinstance(manager, hcm_pb2.HttpConnectionManager)
    assert manager.forward_client_cert_details == hcm_pb2.HttpConnectionManager.SANITIZE_SET
    assert manager.set_current_client_cert_details.uri is True
    assert manager.rds.route_config_name == "inbound|backend"
    assert [f.name for f in manager.http_filters] == ["envoy.filters.http.rbac", "envoy.filters.http.router"]


def test_upstream_cluster_accepts_only_the_upstream_identity() -> None:
    out = proxy_resources(_mesh(), "frontend-1")
    cluster = out[CLUSTER]["outbound|backend"]
    assert isinstance(cluster, cluster_pb2.Cluster)
    assert cluster.type == cluster_pb2.Cluster.EDS
    assert cluster.eds_cluster_config.service_name == "outbound|backend"
    context = unpack(cluster.transport_socket.typed_config, tls_pb2.UpstreamTlsContext)
    assert isinstance(context, tls_pb2.UpstreamTlsContext)
    common = context.common_tls_context
    assert [s.name for s in common.tls_certificate_sds_secret_configs] == [str(FRONTEND)]
    [matcher] = common.combined_validation_context.default_validation_context.match_typed_subject_alt_names
    assert (matcher.san_type, matcher.matcher.exact) == (common_pb2.SubjectAltNameMatcher.URI, str(BACKEND))
    endpoints = out[ENDPOINT]["outbound|backend"]
    [locality] = endpoints.endpoints  # type: ignore[attr-defined]
    assert [(e.endpoint.address.socket_address.address, e.endpoint.address.socket_address.port_value)
            for e in locality.lb_endpoints] == [("127.0.0.1", 15081)]  # fmt: skip


def test_tcp_upstream_and_inbound_use_tcp_proxy() -> None:
    outbound = proxy_resources(_mesh(), "frontend-1")[LISTENER]["outbound|ledger"]
    inbound = proxy_resources(_mesh(), "ledger-1")[LISTENER]["inbound|ledger"]
    for listener, cluster in ((outbound, "outbound|ledger"), (inbound, "inbound|ledger|app")):
        [chain] = listener.filter_chains  # type: ignore[attr-defined]
        proxy = unpack(chain.filters[-1].typed_config, tcp_proxy_pb2.TcpProxy)  # after RBAC, inbound
        assert proxy.cluster == cluster  # type: ignore[attr-defined]


# -- MeshPublisher inputs ----------------------------------------------------------------------------------------


@pytest.fixture
def xds() -> MeshPublisher:
    return MeshPublisher(_mesh(), CA.server_svid())


def _versions(xds: MeshPublisher, node: str) -> dict[str, str]:
    return {t: xds.cache.get(node, t).version for t in (LISTENER, ROUTE, CLUSTER, ENDPOINT, SECRET)}


def test_update_identity_changes_only_that_identity_secrets(xds: MeshPublisher) -> None:
    before = {node: _versions(xds, node) for node in xds.mesh.nodes()}
    svid = CA.svid("/ns/shop/sa/backend")
    assert xds.update_identity(svid) == ("backend-1",)
    after = {node: _versions(xds, node) for node in xds.mesh.nodes()}
    assert after["frontend-1"] == before["frontend-1"]
    assert after["ledger-1"] == before["ledger-1"]
    changed = {t for t in before["backend-1"] if before["backend-1"][t] != after["backend-1"][t]}
    assert changed == {SECRET}
    assert sorted(xds.cache.get("backend-1", SECRET).resources) == ["spiffe://example.org", str(BACKEND)]
    assert xds.update_identity(CA.svid("/ns/elsewhere/sa/nobody")) == ()


def test_update_bundle_reaches_every_sidecar_and_the_xds_port(xds: MeshPublisher) -> None:
    other = TestCa.for_trust_domain("example.org", "next root")
    generation = xds.tls.generation
    bundle = CA.bundle.with_authorities(other.bundle.authorities)
    xds.update_bundle(bundle)
    for node in xds.mesh.nodes():
        secret = xds.cache.get(node, SECRET).resources["spiffe://example.org"]
        assert secret.version == Resource.pack("x", validation_context_secret(bundle)).version
    assert xds.tls.generation == generation + 1
    with pytest.raises(ValueError) as info:
        xds.update_bundle(TestCa.for_trust_domain("partner.example").bundle)
    assert str(info.value) == "bundle of partner.example is not the mesh's trust domain example.org"


def test_nodes_trusting_a_root(xds: MeshPublisher) -> None:
    other = TestCa.for_trust_domain("example.org", "next root")
    xds.update_bundle(CA.bundle.with_authorities(other.bundle.authorities))
    bundle = xds.cache.get("backend-1", SECRET).resources["spiffe://example.org"]
    xds.acks.record_ack("backend-1", SECRET, [bundle])
    old_only = xds.cache.get("ledger-1", SECRET).resources["spiffe://example.org"]
    xds.acks.record_ack("ledger-1", SECRET, [old_only])
    xds.acks.record_ack(
        "frontend-1", SECRET, [Resource.pack("spiffe://example.org", validation_context_secret(CA.bundle))]
    )
    assert xds.nodes_trusting(fingerprint_of(other.certificate)) == {"backend-1", "ledger-1"}
    assert xds.nodes_trusting(fingerprint_of(CA.certificate)) == {"backend-1", "ledger-1", "frontend-1"}


def test_update_mesh_pushes_only_what_changed_and_forgets_departed_sidecars(xds: MeshPublisher) -> None:
    before = _versions(xds, "frontend-1")
    xds.update_mesh(_mesh(backend_inbound=15999))
    after = _versions(xds, "frontend-1")
    assert {t for t in before if before[t] != after[t]} == {ENDPOINT}
    xds.update_mesh(_mesh(backend_inbound=15999, with_ledger=False))
    assert "ledger-1" not in xds.cache.nodes()
    final = _versions(xds, "frontend-1")
    assert {t for t in after if after[t] != final[t]} == {LISTENER, CLUSTER, ENDPOINT}


def test_update_mesh_refuses_another_trust_domain(xds: MeshPublisher) -> None:
    with pytest.raises(ValueError) as info:
        xds.update_mesh(Mesh(TestCa.for_trust_domain("other.org").trust_domain, {}))
    assert str(info.value) == "the mesh moved from example.org to other.org"


def test_client_only_sidecar_has_no_inbound_and_port_upstreams_bind_its_own_ip() -> None:
    backend = _mesh(with_ledger=False).service("backend")
    jobs = Service(
        "jobs",
        CA.id("/ns/shop/sa/jobs"),
        Protocol.HTTP,
        (
            Instance("jobs-1", None, Address("127.0.0.21", 15003)),
            Instance("jobs-2", Address("127.0.0.22", 8080), Address("127.0.0.22", 15003)),
        ),
        (Upstream("backend", port=80),),
    )
    mesh = Mesh(CA.trust_domain, {"backend": backend, "jobs": jobs})
    client_only = proxy_resources(mesh, "jobs-1")
    assert sorted(client_only[LISTENER]) == ["outbound|backend"]
    assert "inbound|jobs|app" not in client_only[CLUSTER]
    served = proxy_resources(mesh, "jobs-2")
    assert sorted(served[LISTENER]) == ["inbound|jobs", "outbound|backend"]
    for node, host in (("jobs-1", "127.0.0.21"), ("jobs-2", "127.0.0.22")):
        listener = proxy_resources(mesh, node)[LISTENER]["outbound|backend"]
        assert isinstance(listener, listener_pb2.Listener)
        assert (listener.address.socket_address.address, listener.address.socket_address.port_value) == (host, 80)
    assert mesh.service("jobs").endpoints == (Address("127.0.0.22", 15003),)


def test_an_upstream_has_exactly_one_of_listen_and_port() -> None:
    with pytest.raises(ValueError, match="give exactly one of listen and port"):
        Upstream("backend")
    with pytest.raises(ValueError, match="give exactly one of listen and port"):
        Upstream("backend", Address("127.0.0.1", 80), 80)
