"""The xDS server does not trust a handshake forever; callers are X.509-SVID leaves; audit and logs are bounded.

Real TLS handshakes and real gRPC streams throughout: short-lived certificates (seconds) for expiry, a client
TLS session cache for resumption, a second root for bundle changes, an injected clock where the test moves time.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import grpc
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from grpc.experimental import session_cache

from mesh_identity.events import AccessDenied, ListSink
from mesh_identity.keys import private_key_pem
from mesh_identity.svid import X509Svid, cert_pem
from tests.pki import SERVER_NAME, TestCa
from tests.waiting import wait_until
from tests.xds_sds.client import Client, connect, connect_pem, delta, names_of, sotw
from tests.xds_sds.conftest import A_PATH, cluster
from tests.xds_sds.waiting import ack_events
from xds_sds.protocol.acks import AckTracker
from xds_sds.protocol.auth import BindingAuthorizer
from xds_sds.protocol.cache import SnapshotCache
from xds_sds.protocol.credentials import ServerTls
from xds_sds.protocol.server import DiscoveryServer
from xds_sds.protocol.text import escaped
from xds_sds.protocol.typeurls import CLUSTER, SECRET

A = "spiffe://example.org/ns/default/sa/a"
B = "spiffe://example.org/ns/default/sa/b"
MAX_RESOURCE_NAMES = 1000  # the documented cap of resource names per request
ServerFactory = Callable[..., DiscoveryServer]


def denied(audit: ListSink) -> list[AccessDenied]:
    return [e for e in audit.events if isinstance(e, AccessDenied)]


@pytest.fixture
def make_server(
    ca: TestCa, cache: SnapshotCache, audit: ListSink, acks: AckTracker, svid_a: X509Svid, svid_b: X509Svid
) -> Iterator[ServerFactory]:
    """Servers like the ``server`` fixture's, with the given keyword arguments (clock, connection age...)."""
    started: list[DiscoveryServer] = []

    def make(**kwargs: Any) -> DiscoveryServer:
        authorizer = BindingAuthorizer({"node-a": svid_a.spiffe_id, "node-b": svid_b.spiffe_id})
        server = DiscoveryServer(
            cache, ServerTls.from_svid(ca.server_svid()), authorizer, acks=acks, audit=audit, **kwargs
        )
        server.start()
        started.append(server)
        return server

    yield make
    for server in started:
        server.stop(None)


@pytest.fixture
def clients() -> Iterator[list[Client]]:
    made: list[Client] = []
    yield made
    for client in made:
        client.close()


def _resuming_client(target: str, ca: TestCa, svid: X509Svid, cache: object) -> Client:
    """A channel whose TLS sessions go into (and are resumed from) ``cache``."""
    creds = grpc.ssl_channel_credentials(ca.pem(), svid.key_pem(), svid.cert_chain_pem())
    options = [("grpc.ssl_target_name_override", SERVER_NAME), ("grpc.ssl_session_cache", cache)]
    return Client(grpc.secure_channel(target, creds, options=options))


def _wait_past(moment: datetime) -> None:
    while datetime.now(UTC) <= moment + timedelta(milliseconds=200):
        time.sleep(0.1)


def _expiry_text(cert: x509.Certificate) -> str:
    return f"{cert.not_valid_after_utc:%Y-%m-%dT%H:%M:%SZ}"


# -- 2. the server checks the peer's certificate on every stream, not only at the handshake ---------------------


def test_a_stream_ends_when_the_peer_certificate_expires(
    server: DiscoveryServer, ca: TestCa, clients: list[Client]
) -> None:
    short = ca.svid(A_PATH, ttl=timedelta(seconds=6))
    clients.append(client := connect(server.target, ca.pem(), short))
    stream = client.ads()
    assert names_of(stream.exchange(sotw(CLUSTER))) == ["c1", "c2"]
    assert stream.status(timeout=20) == (
        grpc.StatusCode.UNAUTHENTICATED,
        f"the peer certificate expired at {_expiry_text(short.leaf)}",
    )
    # the client has the status as soon as it is sent; the server forgets the stream once its handler returns
    wait_until(lambda: server.streams() == [], "the server to forget the ended stream", 10)


def test_a_resumed_tls_session_of_an_expired_certificate_cannot_open_a_stream(
    server: DiscoveryServer, ca: TestCa, clients: list[Client], audit: ListSink
) -> None:
    """TLS resumption skips the certificate check of a full handshake; the stream-open check still refuses."""
    short = ca.svid(A_PATH, ttl=timedelta(seconds=6))
    sessions = session_cache.ssl_session_cache_lru(4)
    clients.append(first := _resuming_client(server.target, ca, short, sessions))
    assert names_of(first.ads().exchange(sotw(CLUSTER))) == ["c1", "c2"]
    first.close()
    _wait_past(short.leaf.not_valid_after_utc)
    clients.append(resumed := _resuming_client(server.target, ca, short, sessions))
    stream = resumed.ads()
    stream.send(sotw(CLUSTER))
    # UNAUTHENTICATED, not UNAVAILABLE: the handshake (resumed) went through, the stream was refused
    assert stream.status() == (
        grpc.StatusCode.UNAUTHENTICATED,
        f"the peer certificate expired at {_expiry_text(short.leaf)}",
    )
    [event] = denied(audit)
    assert (event.peer, event.resource) == (A, "ads stream")


def test_an_expired_certificate_cannot_open_a_new_stream_on_its_old_connection(
    make_server: ServerFactory, ca: TestCa, svid_a: X509Svid, clients: list[Client]
) -> None:
    now = [datetime.now(UTC)]
    server = make_server(clock=lambda: now[0])
    clients.append(client := connect(server.target, ca.pem(), svid_a))
    first = client.ads()
    assert names_of(first.exchange(sotw(CLUSTER))) == ["c1", "c2"]
    now[0] = svid_a.not_after + timedelta(seconds=1)
    expired = (grpc.StatusCode.UNAUTHENTICATED, f"the peer certificate expired at {_expiry_text(svid_a.leaf)}")
    second = client.ads()  # same channel, same connection: no new handshake
    second.send(sotw(CLUSTER))
    assert second.status() == expired
    with pytest.raises(grpc.RpcError) as info:
        client.fetch_secrets(sotw(SECRET, [A]))
    assert (info.value.code(), info.value.details()) == expired
    # the open stream is checked again on demand (its timer runs on the real clock)
    server.revalidate()
    assert first.status() == expired


def test_streams_end_when_the_bundle_drops_their_root(
    make_server: ServerFactory, ca: TestCa, foreign_ca: TestCa, svid_b: X509Svid, cache: SnapshotCache,
    clients: list[Client],
) -> None:  # fmt: skip
    server = make_server(max_connection_idle=None)  # keep the refused connection open, to open a stream on it
    server.tls.update_roots(ca.pem() + foreign_ca.pem())
    clients.append(foreign := connect(server.target, ca.pem(), foreign_ca.svid(A_PATH)))
    clients.append(ours := connect(server.target, ca.pem(), svid_b))
    doomed, kept = foreign.ads(), ours.ads()
    assert names_of(doomed.exchange(sotw(CLUSTER))) == ["c1", "c2"]
    first = kept.exchange(sotw(CLUSTER, node="node-b"))

    server.tls.update_roots(ca.pem())  # the foreign root is retired

    dropped = (
        grpc.StatusCode.UNAUTHENTICATED,
        "the peer certificate does not chain to any root of the current trust bundle",
    )
    assert doomed.status() == dropped
    again = foreign.ads()  # its connection still exists: a new stream on it is refused too
    again.send(sotw(CLUSTER))
    assert again.status() == dropped
    # a stream whose root is still trusted goes on
    kept.send(sotw(CLUSTER, node="node-b", version=first.version_info, nonce=first.nonce))
    cache.update_resources("node-b", CLUSTER, {"c3": cluster("c3")})
    assert names_of(kept.recv()) == ["c1", "c2", "c3"]
    # the refused streams are forgotten once their handlers return (after their status reached the client)
    wait_until(lambda: [s.node_id for s in server.streams()] == ["node-b"], "node-b's stream alone", 10)


def test_a_connection_refused_for_its_certificate_is_closed_so_the_client_handshakes_again(
    server: DiscoveryServer, ca: TestCa, foreign_ca: TestCa, clients: list[Client]
) -> None:
    """Envoy keeps its connections when it loads a new certificate, and retries a refused stream on the same
    connection: the server closes the connection (idle once its streams were refused) so a new handshake happens."""
    server.tls.update_roots(ca.pem() + foreign_ca.pem())
    clients.append(client := connect(server.target, ca.pem(), foreign_ca.svid(A_PATH)))
    stream = client.ads()
    assert names_of(stream.exchange(sotw(CLUSTER))) == ["c1", "c2"]
    server.tls.update_roots(ca.pem())
    assert stream.status()[0] == grpc.StatusCode.UNAUTHENTICATED

    backoff = [0.5]

    def retry() -> grpc.StatusCode | None:  # a client retrying with a doubling backoff, as Envoy does
        attempt = client.ads()
        attempt.send(sotw(CLUSTER))
        code, _ = attempt.status()
        if code == grpc.StatusCode.UNAVAILABLE:
            return code
        time.sleep(backoff[0])
        backoff[0] *= 2
        return None

    assert wait_until(retry, "the stale connection to be closed", timeout=30)


def test_a_chain_through_an_intermediate_is_checked_against_the_bundle(
    server: DiscoveryServer, ca: TestCa, clients: list[Client]
) -> None:
    intermediate = TestCa.create("test intermediate", parent=ca, lifetime=timedelta(hours=2))
    clients.append(client := connect(server.target, ca.pem(), intermediate.svid(A_PATH)))
    assert names_of(client.ads().exchange(sotw(CLUSTER))) == ["c1", "c2"]


def test_a_stream_ends_when_an_intermediate_of_its_chain_expires(
    server: DiscoveryServer, ca: TestCa, clients: list[Client]
) -> None:
    intermediate = TestCa.create("short intermediate", parent=ca, lifetime=timedelta(seconds=3))
    svid = intermediate.svid(A_PATH)  # the leaf outlives its issuer
    clients.append(client := connect(server.target, ca.pem(), svid))
    stream = client.ads()
    assert names_of(stream.exchange(sotw(CLUSTER))) == ["c1", "c2"]
    code, message = stream.status(timeout=15)
    assert code == grpc.StatusCode.UNAUTHENTICATED
    assert message == (
        f"the peer's certificate chain expired at {_expiry_text(intermediate.certificate)} "
        "('CN=short intermediate' is not valid after then)"
    )


def test_the_server_sets_a_maximum_connection_age(
    make_server: ServerFactory, ca: TestCa, svid_a: X509Svid, clients: list[Client], server: DiscoveryServer
) -> None:
    assert ("grpc.max_connection_age_ms", 30 * 60 * 1000) in server.options
    assert ("grpc.max_connection_age_grace_ms", 60 * 1000) in server.options
    assert ("grpc.max_connection_idle_ms", 3_000) in server.options
    aged = make_server(max_connection_age=timedelta(seconds=1), max_connection_age_grace=timedelta(seconds=1))
    clients.append(client := connect(aged.target, ca.pem(), svid_a))
    stream = client.ads()
    assert names_of(stream.exchange(sotw(CLUSTER))) == ["c1", "c2"]
    code, _ = stream.status(timeout=15)
    assert code == grpc.StatusCode.UNAVAILABLE
    # the client reconnects (a new handshake) and carries on
    assert names_of(client.ads().exchange(sotw(CLUSTER))) == ["c1", "c2"]


# -- 4. callers must present an X.509-SVID leaf ---------------------------------------------------------------------


def _odd_leaf(ca: TestCa, *, is_ca: bool | None, key_usage: x509.KeyUsage | None) -> tuple[bytes, bytes]:
    """A certificate of our CA with A's SPIFFE ID, and the given basic constraints and key usage (None: no key
    usage extension: TLS itself refuses a key usage without digitalSignature, but not a missing one; is_ca None:
    no basic constraints, which RFC 5280 reads as not a CA)."""
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.now(UTC)
    builder = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "odd")]))
        .issuer_name(ca.certificate.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - timedelta(minutes=1))
        .not_valid_after(now + timedelta(hours=1))
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca.key.public_key()), critical=False)
        .add_extension(x509.SubjectAlternativeName([x509.UniformResourceIdentifier(A)]), critical=False)
    )
    if is_ca is not None:
        builder = builder.add_extension(x509.BasicConstraints(ca=is_ca, path_length=None), critical=True)
    if key_usage is not None:
        builder = builder.add_extension(key_usage, critical=True)
    return cert_pem(builder.sign(ca.key, hashes.SHA256())), private_key_pem(key)


def _usage(*, cert_sign: bool = False) -> x509.KeyUsage:
    return x509.KeyUsage(True, False, False, False, False, cert_sign, cert_sign, False, False)


@pytest.mark.parametrize(
    ("is_ca", "usage", "message"),
    [
        (True, _usage(cert_sign=True), "the peer certificate is not an X.509-SVID leaf: it is a CA certificate"),
        (
            False,
            _usage(cert_sign=True),
            "the peer certificate is not an X.509-SVID leaf: its key usage allows keyCertSign",
        ),
        (False, None, "the peer certificate is not an X.509-SVID leaf: its key usage lacks digitalSignature"),
    ],
    ids=["ca-true", "key-cert-sign", "no-key-usage"],
)
def test_a_certificate_that_is_not_an_svid_leaf_is_unauthenticated(
    server: DiscoveryServer, ca: TestCa, clients: list[Client], is_ca: bool | None, usage: x509.KeyUsage | None,
    message: str,
) -> None:  # fmt: skip
    clients.append(client := connect_pem(server.target, ca.pem(), *_odd_leaf(ca, is_ca=is_ca, key_usage=usage)))
    stream = client.ads()
    stream.send(sotw(CLUSTER))
    assert stream.status() == (grpc.StatusCode.UNAUTHENTICATED, message)
    with pytest.raises(grpc.RpcError) as info:
        client.fetch_secrets(sotw(SECRET, [A]))
    assert (info.value.code(), info.value.details()) == (grpc.StatusCode.UNAUTHENTICATED, message)
    assert server.streams() == []


# -- 6. every refusal is audited, once per request, and requests are bounded -------------------------------------


def test_fetch_secrets_for_another_identity_is_audited(client_a: Client, audit: ListSink) -> None:
    response = client_a.fetch_secrets(sotw("", [A, B]))  # B is not even in node-a's snapshot
    assert names_of(response) == [A]
    [event] = denied(audit)
    assert (event.peer, event.resource, event.reason) == (
        A,
        f"Secret {B}",
        f"secret '{B}' is not the certificate of {A}",
    )
    assert (event.resources, event.count) == ((f"Secret {B}",), 1)


def _others(count: int) -> list[str]:
    return [f"spiffe://example.org/ns/other/sa/s{i:05d}" for i in range(count)]


@pytest.mark.parametrize("variant", ["ads", "ads_delta", "fetch"])
def test_one_request_naming_many_forbidden_secrets_is_one_audit_event_and_one_log_line(
    client_a: Client, audit: ListSink, server: DiscoveryServer, caplog: pytest.LogCaptureFixture, variant: str
) -> None:
    caplog.set_level(logging.INFO, logger="xds_sds")
    others = _others(MAX_RESOURCE_NAMES - 1)
    if variant == "fetch":
        response: Any = client_a.fetch_secrets(sotw(SECRET, [A, *others]))
    elif variant == "ads":
        response = client_a.ads().exchange(sotw(SECRET, [A, *others]))
    else:
        response = client_a.ads_delta().exchange(delta(SECRET, [A, *others]))
    assert names_of(response) == [A]
    [event] = denied(audit)
    assert event.peer == A
    assert event.count == len(others)
    assert event.resource == f"Secret {others[0]} and {len(others) - 1} more"
    assert event.reason == f"secret '{others[0]}' is not the certificate of {A} (and {len(others) - 1} more refusals)"
    assert event.resources == tuple(f"Secret {name}" for name in others[:32])
    lines = [r for r in caplog.records if r.name == "xds_sds" and "access denied" in r.getMessage()]
    assert len(lines) == 1
    assert server.metrics.value("mesh_identity_xds_access_denied_total", type="Secret") == len(others)


@pytest.mark.parametrize("variant", ["ads", "ads_delta", "sds", "fetch"])
def test_a_request_over_the_name_cap_is_invalid_argument(client_a: Client, audit: ListSink, variant: str) -> None:
    names = [A, *_others(20_000)]
    message = f"a Secret request may name at most {MAX_RESOURCE_NAMES} resources; this one names {len(names)}"
    if variant == "fetch":
        with pytest.raises(grpc.RpcError) as info:
            client_a.fetch_secrets(sotw(SECRET, names))
        assert (info.value.code(), info.value.details()) == (grpc.StatusCode.INVALID_ARGUMENT, message)
    else:
        stream = getattr(client_a, variant)()
        stream.send(delta(SECRET, names) if variant.endswith("delta") else sotw(SECRET, names))
        assert stream.status() == (grpc.StatusCode.INVALID_ARGUMENT, message)
    assert denied(audit) == []


# -- 7. peer-controlled text is logged escaped --------------------------------------------------------------------


def test_escaped_makes_control_characters_visible() -> None:
    assert escaped("node-a") == "node-a"
    assert escaped("a\nb\rc\td\x00e\x1bf\x7fg") == "a\\nb\\rc\\td\\x00e\\x1bf\\x7fg"
    assert escaped("x\u2028y\u202ez\x85") == "x\\u2028y\\u202ez\\x85"
    assert escaped("é ü 名") == "é ü 名"
    assert escaped("a" * 600, limit=10) == "aaaaaaaaaa...(590 more characters)"


def _forged(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "xds_sds" and any(c in r.getMessage() for c in "\n\r")]


def test_node_ids_resource_names_nacks_and_nonces_are_logged_escaped(
    client_a: Client, acks: AckTracker, audit: ListSink, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG, logger="xds_sds")
    forged = "\n2030-01-01 00:00:00 CRITICAL forged line"
    # a node id: refused, and logged
    stream = client_a.ads()
    stream.send(sotw(CLUSTER, node="node-a" + forged))
    assert stream.status()[0] == grpc.StatusCode.PERMISSION_DENIED
    # a resource name: refused, and logged
    stream = client_a.ads()
    first = stream.exchange(sotw(SECRET, [A, B + forged]))
    wait_until(lambda: len(audit.events) == 2, "both refusals to be audited", timeout=10)
    # a stale nonce, then a NACK text
    stream.send(sotw(SECRET, [A], nonce="stale" + forged))
    with ack_events(acks) as events:
        stream.send(sotw(SECRET, [A], version=first.version_info, nonce=first.nonce, error="bad" + forged))
        assert events.next().nack is not None
    assert _forged(caplog) == []
    messages = [r.getMessage() for r in caplog.records if r.name == "xds_sds"]
    assert any("NACK from node node-a" in m and "bad\\n2030" in m for m in messages)
    assert any("stale nonce stale\\n2030" in m for m in messages)
    assert any("access denied to node node-a\\n2030" in m for m in messages)
    assert any(f"access denied to Secret {B}\\n2030" in m for m in messages)
    # the audit events carry the same text, escaped
    assert [e.resource for e in denied(audit)] == [f"node node-a{escaped(forged)}", f"Secret {B}{escaped(forged)}"]


def test_a_huge_resource_name_is_bounded_in_the_log_and_the_audit(
    client_a: Client, audit: ListSink, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="xds_sds")
    huge = "spiffe://example.org/" + "x" * 1_000_000
    assert names_of(client_a.ads().exchange(sotw(SECRET, [A, huge]))) == [A]
    [event] = denied(audit)
    assert event.resources == (f"Secret {huge[:512]}...({len(huge) - 512} more characters)",)
    assert len(event.reason) < 2_100
    [line] = [r.getMessage() for r in caplog.records if "access denied" in r.getMessage()]
    assert len(line) < 5_000
