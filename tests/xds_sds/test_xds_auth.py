"""mTLS and authorization: who may open a stream, and which node and secrets each identity may have."""

from __future__ import annotations

import socket
import ssl
from collections.abc import Callable
from pathlib import Path

import grpc
import pytest
from cryptography import x509

from mesh_identity.events import AccessDenied, ListSink
from mesh_identity.keys import private_key_pem
from mesh_identity.svid import X509Svid, cert_pem
from tests.pki import TestCa
from tests.waiting import wait_until
from tests.xds_sds.client import Client, connect_pem, delta, names_of, sotw
from tests.xds_sds.conftest import cluster
from xds_sds.protocol.auth import bundle_secret_name, tls_secret_name
from xds_sds.protocol.cache import SnapshotCache
from xds_sds.protocol.server import DiscoveryServer
from xds_sds.protocol.typeurls import CLUSTER, SECRET
from xds_sds.resources.secrets import tls_certificate_secret

A = "spiffe://example.org/ns/default/sa/a"
B = "spiffe://example.org/ns/default/sa/b"


def denied(audit: ListSink) -> list[tuple[str, str, str]]:
    return [(e.peer, e.resource, e.reason) for e in audit.events if isinstance(e, AccessDenied)]


@pytest.fixture
def b_secret_in_a_snapshot(cache: SnapshotCache, svid_b: X509Svid) -> None:
    """A wrongly built snapshot: node-a's holds B's key too. The authorizer must still keep it from A."""
    cache.update_resources("node-a", SECRET, {tls_secret_name(svid_b.spiffe_id): tls_certificate_secret(svid_b)})


@pytest.mark.usefixtures("b_secret_in_a_snapshot")
def test_a_gets_its_own_secret_and_the_bundle_but_not_b_secret(
    client_a: Client, audit: ListSink, server: DiscoveryServer, ca: TestCa
) -> None:
    bundle = bundle_secret_name(ca.trust_domain)
    response = client_a.ads().exchange(sotw(SECRET, [A, B, bundle]))
    assert names_of(response) == [bundle, A]
    assert denied(audit) == [(A, f"Secret {B}", f"secret '{B}' is not the certificate of {A}")]
    assert server.metrics.value("mesh_identity_xds_access_denied_total", type="Secret") == 1


@pytest.mark.usefixtures("b_secret_in_a_snapshot")
@pytest.mark.parametrize("variant", ["ads", "ads_delta", "sds", "sds_delta"])
def test_asking_only_for_b_secret_gets_nothing_on_every_variant(
    client_a: Client, audit: ListSink, variant: str
) -> None:
    stream = getattr(client_a, variant)()
    is_delta = variant.endswith("delta")
    stream.send(delta(SECRET, [B]) if is_delta else sotw(SECRET, [B]))
    wait_until(lambda: len(audit.events) == 1, "the refusal to be audited", timeout=10)
    assert denied(audit) == [(A, f"Secret {B}", f"secret '{B}' is not the certificate of {A}")]
    # the first response the stream ever gets is the one for A's own secret, asked for next
    response = stream.exchange(delta(SECRET, [A]) if is_delta else sotw(SECRET, [B, A]))
    assert names_of(response) == [A]


def test_fetch_secrets_returns_only_what_the_peer_may_have(
    client_a: Client, audit: ListSink, cache: SnapshotCache, svid_b: X509Svid
) -> None:
    cache.update_resources("node-a", SECRET, {B: tls_certificate_secret(svid_b)})
    response = client_a.fetch_secrets(sotw("", [A, B]))
    assert names_of(response) == [A]
    assert response.version_info == cache.get("node-a", SECRET).version
    assert denied(audit) == [(A, f"Secret {B}", f"secret '{B}' is not the certificate of {A}")]


@pytest.mark.parametrize(
    ("node", "message"),
    [
        ("node-b", f"node 'node-b' belongs to {B}, not to {A}"),
        ("node-x", "node 'node-x' is not a proxy of this mesh"),
    ],
)
@pytest.mark.parametrize("variant", ["ads", "ads_delta", "sds"])
def test_a_cannot_speak_for_another_node(
    client_a: Client, audit: ListSink, variant: str, node: str, message: str
) -> None:
    stream = getattr(client_a, variant)()
    stream.send(delta(SECRET, [B], node=node) if variant.endswith("delta") else sotw(SECRET, [B], node=node))
    assert stream.status() == (grpc.StatusCode.PERMISSION_DENIED, message)
    assert denied(audit) == [(A, f"node {node}", message)]


def test_fetch_secrets_for_another_node_is_refused(client_a: Client) -> None:
    with pytest.raises(grpc.RpcError) as info:
        client_a.fetch_secrets(sotw(SECRET, [B], node="node-b"))
    assert (info.value.code(), info.value.details()) == (
        grpc.StatusCode.PERMISSION_DENIED,
        f"node 'node-b' belongs to {B}, not to {A}",
    )


def test_no_client_certificate_cannot_open_a_stream(
    connect_as: Callable[[X509Svid | None], Client], server: DiscoveryServer
) -> None:
    stream = connect_as(None).ads()
    stream.send(sotw(CLUSTER))
    code, _ = stream.status()
    assert code == grpc.StatusCode.UNAVAILABLE
    assert server.streams() == []


def test_a_certificate_from_a_foreign_ca_cannot_open_a_stream(
    server: DiscoveryServer, ca: TestCa, foreign_ca: TestCa
) -> None:
    client = connect_pem(server.target, ca.pem(), *_pems(foreign_ca.svid("/ns/default/sa/a")))
    stream = client.ads()
    stream.send(sotw(CLUSTER))
    code, _ = stream.status()
    assert code == grpc.StatusCode.UNAVAILABLE
    client.close()


@pytest.mark.parametrize(
    ("uris", "message"),
    [
        (None, "the peer certificate is not an X.509-SVID: certificate has no subjectAltName, so no SPIFFE ID"),
        (
            [],
            "the peer certificate is not an X.509-SVID: an X.509-SVID has exactly one URI SAN, this certificate has 0",
        ),
        (
            [A, B],
            "the peer certificate is not an X.509-SVID: an X.509-SVID has exactly one URI SAN, this certificate has 2",
        ),
        (
            ["spiffe://example.org/a/../b"],
            "the peer certificate is not an X.509-SVID: Invalid SPIFFE ID 'spiffe://example.org/a/../b': "
            "path segment '..' is not allowed",
        ),
    ],
    ids=["no-san", "dns-san-only", "two-uri-sans", "dot-dot"],
)
def test_a_certificate_of_our_ca_without_one_spiffe_id_is_unauthenticated(
    server: DiscoveryServer, ca: TestCa, uris: list[str] | None, message: str
) -> None:
    cert, key = ca.leaf([], None) if uris is None else ca.leaf(uris, dns=["client.test"])
    client = connect_pem(server.target, ca.pem(), cert_pem(cert), private_key_pem(key))
    stream = client.ads()
    stream.send(sotw(CLUSTER))
    assert stream.status() == (grpc.StatusCode.UNAUTHENTICATED, message)
    client.close()


def _pems(svid: X509Svid) -> tuple[bytes, bytes]:
    return svid.cert_chain_pem(), svid.key_pem()


def _server_certificate(port: int, ca: TestCa, client: X509Svid, tmp_path: Path) -> x509.Certificate:
    """The certificate the server presents on a new TLS connection (a raw handshake, ALPN h2)."""
    chain, key = tmp_path / "chain.pem", tmp_path / "key.pem"
    chain.write_bytes(client.cert_chain_pem())
    key.write_bytes(client.key_pem())
    context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cadata=ca.pem().decode())
    context.check_hostname = False
    context.load_cert_chain(chain, key)
    context.set_alpn_protocols(["h2"])
    with (
        socket.create_connection(("127.0.0.1", port), timeout=10) as sock,
        context.wrap_socket(sock) as tls,
    ):
        der = tls.getpeercert(binary_form=True)
    assert der is not None
    return x509.load_der_x509_certificate(der)


def test_server_certificate_rotates_without_restart_and_open_streams_go_on(
    server: DiscoveryServer, ca: TestCa, client_a: Client, svid_a: X509Svid, cache: SnapshotCache, tmp_path: Path
) -> None:
    stream = client_a.ads()
    first = stream.exchange(sotw(CLUSTER))
    before = _server_certificate(server.port, ca, svid_a, tmp_path)
    new_server_svid = ca.server_svid()
    server.tls.update_svid(new_server_svid)
    after = _server_certificate(server.port, ca, svid_a, tmp_path)
    assert before.serial_number != after.serial_number
    assert after.serial_number == new_server_svid.leaf.serial_number
    # the stream opened before the rotation still gets pushes
    stream.send(sotw(CLUSTER, version=first.version_info, nonce=first.nonce))
    cache.update_resources("node-a", CLUSTER, {"c3": cluster("c3")})
    assert names_of(stream.recv()) == ["c1", "c2", "c3"]


def test_new_client_roots_apply_to_new_connections(server: DiscoveryServer, ca: TestCa, foreign_ca: TestCa) -> None:
    """Root rotation on the server side: trust a second root, and a client it signed gets in."""
    newcomer = foreign_ca.svid("/ns/default/sa/a")
    server.tls.update_roots(ca.pem() + foreign_ca.pem())
    client = connect_pem(server.target, ca.pem(), *_pems(newcomer))
    response = client.ads().exchange(sotw(CLUSTER))
    assert names_of(response) == ["c1", "c2"]
    client.close()
