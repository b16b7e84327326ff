"""Agent mode (``xds.secrets: agent``) on the control plane: no private key leaves it.

Every response the xDS server sends is decoded (a tap on the server: ``DiscoveryServer.add_tap``) while real
clients ask over every protocol it speaks (SotW and delta ADS, the SDS streams, ``FetchSecrets``) for
everything, the certificate secret included, and while the certificates and the bundle rotate. The same run in
control-plane mode is the control: there the decoder must find the keys. Then the shapes: TLS contexts that
name the node agent, snapshots without certificates, the agent bootstrap, and the CLI's checks.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import yaml
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from envoy.config.bootstrap.v3 import bootstrap_pb2
from envoy.config.cluster.v3 import cluster_pb2
from envoy.config.core.v3 import base_pb2, config_source_pb2
from envoy.config.listener.v3 import listener_pb2
from envoy.extensions.transport_sockets.tls.v3 import common_pb2, secret_pb2, tls_pb2
from envoy.service.discovery.v3 import discovery_pb2
from google.protobuf import any_pb2, json_format
from google.protobuf.message import Message

from mesh_identity.cli.main import main
from mesh_identity.config import SecretSource
from mesh_identity.events import AccessDenied, ListSink
from mesh_identity.mesh.model import Address, Instance, Mesh, Protocol, Service, Upstream
from tests.pki import TestCa
from tests.xds_sds.client import Client, Stream, ack, connect, delta, sotw
from xds_sds.mesh.keyscan import KeyWatch, private_keys_in
from xds_sds.mesh.publisher import MeshPublisher
from xds_sds.protocol.auth import bundle_secret_name, tls_secret_name
from xds_sds.protocol.typeurls import CLUSTER, ENDPOINT, LISTENER, ROUTE, SECRET
from xds_sds.resources.bootstrap import (
    MAX_SOCKET_PATH,
    agent_bootstrap,
    check_agent_socket,
    write_agent_bootstrap,
)
from xds_sds.resources.packing import ads, pack
from xds_sds.resources.proxy import proxy_resources, secret_resources
from xds_sds.resources.secrets import tls_certificate_secret
from xds_sds.resources.tls import AGENT_CLUSTER

CA = TestCa.for_trust_domain("example.org")
FRONTEND = CA.id("/ns/shop/sa/frontend")
BACKEND = CA.id("/ns/shop/sa/backend")
BUNDLE = bundle_secret_name(CA.trust_domain)
SERVER = CA.id("/mesh-identity/xds")


def _mesh() -> Mesh:
    return Mesh(
        CA.trust_domain,
        {
            "frontend": Service(
                "frontend",
                FRONTEND,
                Protocol.HTTP,
                (Instance("frontend-1", Address("127.0.0.1", 8080), Address("127.0.0.1", 15080)),),
                (Upstream("backend", Address("127.0.0.1", 16081)),),
            ),
            "backend": Service(
                "backend",
                BACKEND,
                Protocol.TCP,
                (Instance("backend-1", Address("127.0.0.1", 8081), Address("127.0.0.1", 15081)),),
            ),
        },
    )


def _agent_source() -> config_source_pb2.ConfigSource:
    """What the brief says agent mode names: SDS over gRPC (v3) on the static cluster mesh-identity-agent."""
    return json_format.ParseDict(
        {
            "apiConfigSource": {
                "apiType": "GRPC",
                "transportApiVersion": "V3",
                "grpcServices": [{"envoyGrpc": {"clusterName": "mesh-identity-agent"}}],
            },
            "resourceApiVersion": "V3",
        },
        config_source_pb2.ConfigSource(),
    )


# -- on the wire: every response decoded ----------------------------------------------------------------------


class Recorder:
    """A tap keeping every response the server sends, with the service it went out on."""

    def __init__(self) -> None:
        self.sent: list[tuple[str, Message]] = []

    def __call__(self, service: str, response: Message) -> None:
        copy = type(response)()
        copy.CopyFrom(response)
        self.sent.append((service, copy))

    def secrets(self) -> list[secret_pb2.Secret]:
        """Every Secret in every response."""
        found = []
        for _, response in self.sent:
            assert isinstance(response, discovery_pb2.DiscoveryResponse | discovery_pb2.DeltaDiscoveryResponse)
            for item in response.resources:
                body = item.resource if isinstance(item, discovery_pb2.Resource) else item
                if body.Is(secret_pb2.Secret.DESCRIPTOR):
                    secret = secret_pb2.Secret()
                    body.Unpack(secret)
                    found.append(secret)
        return found


@pytest.fixture(params=[SecretSource.AGENT, SecretSource.CONTROL_PLANE], ids=["agent", "control-plane"])
def mode(request: pytest.FixtureRequest) -> SecretSource:
    return SecretSource(request.param)


@pytest.fixture
def served(mode: SecretSource) -> Iterator[tuple[MeshPublisher, Recorder, KeyWatch, ListSink]]:
    audit = ListSink()
    xds = MeshPublisher(_mesh(), CA.server_svid(), audit=audit, secrets=mode)
    recorder, watch = Recorder(), KeyWatch()
    xds.server.add_tap(recorder)
    xds.server.add_tap(watch)
    for identity in (FRONTEND, BACKEND):
        xds.update_identity(CA.svid(identity.path))
    xds.start()
    yield xds, recorder, watch, audit
    xds.stop(None)


def _ask_everything(stream: Stream, node: str, names: list[str]) -> None:
    """SotW on one aggregated stream: every type, the secrets by name; ACK each answer."""
    every = ((CLUSTER, []), (ENDPOINT, ["outbound|backend"]), (LISTENER, []), (ROUTE, ["inbound|frontend"]))
    for type_url, wanted in (*every, (SECRET, names)):
        response = stream.exchange(sotw(type_url, wanted, node=node))
        stream.send(ack(response, wanted, node=node))


def test_every_response_is_decoded_and_only_control_plane_mode_carries_keys(
    served: tuple[MeshPublisher, Recorder, KeyWatch, ListSink], mode: SecretSource
) -> None:
    xds, recorder, watch, audit = served
    svid = CA.svid(FRONTEND.path)
    names = [tls_secret_name(FRONTEND), BUNDLE]
    clients: list[Client] = []

    def client() -> Client:
        clients.append(connect(xds.server.target, CA.pem(), svid))
        return clients[-1]

    try:
        ads_stream = client().ads()
        _ask_everything(ads_stream, "frontend-1", names)
        delta_stream = client().ads_delta()
        delta_stream.exchange(delta(SECRET, names, node="frontend-1"))
        delta_stream.exchange(delta(LISTENER, node="frontend-1"))
        sds_stream = client().sds()
        first = sds_stream.exchange(sotw("", names, node="frontend-1"))
        sds_stream.send(ack(first, names, node="frontend-1"))
        fetched = client().fetch_secrets(sotw(SECRET, names, node="frontend-1"))

        # rotation: a new certificate, a new bundle (what the server pushes then is decoded too)
        xds.update_identity(CA.svid(FRONTEND.path))
        xds.update_bundle(CA.bundle.with_authorities(TestCa.for_trust_domain("example.org", "next").bundle.authorities))
        ads_stream.recv()  # the bundle change reaches the aggregated stream in both modes
        sds_stream.recv()
        fetched_again = client().fetch_secrets(sotw(SECRET, names, node="frontend-1"))
    finally:
        for each in clients:
            each.close()

    figures = watch.figures()
    assert figures.responses == len(recorder.sent) >= 10
    services = {service for service, _ in recorder.sent}
    assert services == {"ads", "ads-delta", "sds", "FetchSecrets"}
    certificates = [s for s in recorder.secrets() if s.HasField("tls_certificate")]
    bundles = [s for s in recorder.secrets() if s.HasField("validation_context")]
    assert {s.name for s in bundles} == {BUNDLE}
    if mode is SecretSource.AGENT:
        assert figures.with_keys == 0 and figures.first is None
        assert [private_keys_in(response) for _, response in recorder.sent] == [[]] * len(recorder.sent)
        assert certificates == []
        for response in (first, fetched, fetched_again):
            assert [r.type_url for r in response.resources] == [pack(secret_pb2.Secret()).type_url]
        refusals = [e for e in audit.events if isinstance(e, AccessDenied)]
        assert any(tls_secret_name(FRONTEND) in e.resource for e in refusals)
        assert all("node agent delivers certificates" in e.reason for e in refusals)
    else:  # the control: the same decoding finds the keys the control plane sends
        assert figures.with_keys >= 5
        assert figures.first is not None and figures.first.endswith(".tls_certificate.private_key")
        assert {s.name for s in certificates} == {tls_secret_name(FRONTEND)}


def test_taps_can_be_removed_and_a_failing_tap_does_not_stop_a_response(caplog: pytest.LogCaptureFixture) -> None:
    xds = MeshPublisher(_mesh(), CA.server_svid(), secrets=SecretSource.AGENT)
    recorder = Recorder()
    remove = xds.server.add_tap(recorder)

    def broken(service: str, response: Message) -> None:
        raise RuntimeError("tap broke")

    xds.server.add_tap(broken)
    with xds:
        client = connect(xds.server.target, CA.pem(), CA.svid(FRONTEND.path))
        try:
            assert client.fetch_secrets(sotw(SECRET, [BUNDLE], node="frontend-1")).resources
            remove()
            assert client.fetch_secrets(sotw(SECRET, [BUNDLE], node="frontend-1")).resources
        finally:
            client.close()
    assert [service for service, _ in recorder.sent] == ["FetchSecrets"]
    assert "an xDS response tap failed" in caplog.text


# -- the decoder finds keys wherever they are ------------------------------------------------------------------


def _key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def test_the_decoder_finds_a_key_in_a_secret_nested_in_anys_in_der_and_in_unknown_types() -> None:
    svid = CA.svid(FRONTEND.path)
    assert private_keys_in(tls_certificate_secret(svid)) == [
        "Secret.tls_certificate.private_key",  # the field is set
        "Secret.tls_certificate.private_key.inline_bytes",  # and holds a PEM key
    ]
    # a key inline in a listener's transport socket, two Anys down
    context = tls_pb2.DownstreamTlsContext(
        common_tls_context=tls_pb2.CommonTlsContext(
            tls_certificates=[
                common_pb2.TlsCertificate(
                    certificate_chain=base_pb2.DataSource(inline_bytes=svid.cert_chain_pem()),
                    private_key=base_pb2.DataSource(inline_bytes=svid.key_pem()),
                )
            ]
        )
    )
    listener = listener_pb2.Listener(
        name="l", filter_chains=[{"transport_socket": base_pb2.TransportSocket(name="tls", typed_config=pack(context))}]
    )
    response = discovery_pb2.DiscoveryResponse(resources=[pack(listener)])
    found = private_keys_in(response)
    assert len(found) == 2 and all("<DownstreamTlsContext>" in f for f in found)  # the field, and the PEM in it
    # DER (plain and encrypted) in any bytes field; PEM in a string field
    der = _key().private_bytes(
        serialization.Encoding.DER, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    encrypted = _key().private_bytes(
        serialization.Encoding.DER, serialization.PrivateFormat.PKCS8, serialization.BestAvailableEncryption(b"pw")
    )
    for data in (der, encrypted):
        assert private_keys_in(base_pb2.DataSource(inline_bytes=data)) == ["DataSource.inline_bytes"]
    assert private_keys_in(base_pb2.DataSource(inline_string=svid.key_pem().decode())) == ["DataSource.inline_string"]
    # in a map of Anys (a cluster's typed_extension_protocol_options)
    cluster = cluster_pb2.Cluster(name="c")
    cluster.typed_extension_protocol_options["x"].CopyFrom(pack(base_pb2.DataSource(inline_bytes=der)))
    assert private_keys_in(cluster) == ["Cluster.typed_extension_protocol_options['x']<DataSource>.inline_bytes"]
    # what cannot be decoded is not clean
    unknown = any_pb2.Any(type_url="type.googleapis.com/no.such.Type", value=b"\x0a\x01x")
    assert private_keys_in(discovery_pb2.DiscoveryResponse(resources=[unknown])) == [
        "DiscoveryResponse.resources[0]: an Any of type 'no.such.Type' that cannot be decoded here (not checked)"
    ]
    # certificates and bundles are not keys
    assert private_keys_in(pack(secret_resources(None, CA.bundle)[BUNDLE])) == []


# -- shapes --------------------------------------------------------------------------------------------------


def _contexts(resources: dict[str, dict[str, Message]]) -> list[tls_pb2.CommonTlsContext]:
    found = []
    for listener in resources[LISTENER].values():
        assert isinstance(listener, listener_pb2.Listener)
        for chain in listener.filter_chains:
            if chain.HasField("transport_socket"):
                context = tls_pb2.DownstreamTlsContext()
                assert chain.transport_socket.typed_config.Unpack(context)
                found.append(context.common_tls_context)
    for cluster in resources[CLUSTER].values():
        assert isinstance(cluster, cluster_pb2.Cluster)
        if cluster.HasField("transport_socket"):
            upstream = tls_pb2.UpstreamTlsContext()
            assert cluster.transport_socket.typed_config.Unpack(upstream)
            found.append(upstream.common_tls_context)
    return found


@pytest.mark.parametrize(("node", "identity"), [("frontend-1", FRONTEND), ("backend-1", BACKEND)])
def test_agent_mode_tls_contexts_take_the_certificate_from_the_agent_and_the_bundle_over_ads(
    node: str, identity: object
) -> None:
    agent = proxy_resources(_mesh(), node, secrets=SecretSource.AGENT)
    contexts = _contexts(agent)
    assert len(contexts) == (2 if node == "frontend-1" else 1)  # inbound listener (+ the upstream cluster)
    for context in contexts:
        [certificate] = context.tls_certificate_sds_secret_configs
        assert certificate.name == tls_secret_name(identity)  # type: ignore[arg-type]
        assert certificate.sds_config == _agent_source()
        bundle = context.combined_validation_context.validation_context_sds_secret_config
        assert (bundle.name, bundle.sds_config) == (BUNDLE, ads())
    # the same sidecar in control-plane mode: everything over ADS, and nothing else differs
    plane = proxy_resources(_mesh(), node)
    for context in _contexts(plane):
        assert context.tls_certificate_sds_secret_configs[0].sds_config == ads()
    assert {t: set(r) for t, r in agent.items()} == {t: set(r) for t, r in plane.items()}
    assert agent[ROUTE] == plane[ROUTE] and agent[ENDPOINT] == plane[ENDPOINT]


def test_agent_mode_snapshots_hold_the_bundle_alone_through_rotations() -> None:
    xds = MeshPublisher(_mesh(), CA.server_svid(), secrets=SecretSource.AGENT)
    before = xds.cache.get("frontend-1", SECRET).version
    assert xds.update_identity(CA.svid(FRONTEND.path)) == ("frontend-1",)
    assert xds.cache.get("frontend-1", SECRET).version == before
    xds.update_bundle(CA.bundle)
    for node in ("frontend-1", "backend-1"):
        assert set(xds.cache.get(node, SECRET).resources) == {BUNDLE}
    assert secret_resources(CA.svid(FRONTEND.path), CA.bundle, SecretSource.AGENT).keys() == {BUNDLE}
    assert xds.proxies_chaining_to(frozenset({"any"})) == []


def test_the_agent_bootstrap_has_the_agent_cluster_and_no_certificate(tmp_path: Path) -> None:
    socket = tmp_path / "run" / "sds.sock"
    path = write_agent_bootstrap(
        tmp_path / "web-1", node="web-1", identity=FRONTEND, xds=Address("127.0.0.1", 7443),
        server_identity=SERVER, agent_socket=socket, cluster="web", delta=True,
    )  # fmt: skip
    assert sorted(p.name for p in (tmp_path / "web-1").iterdir()) == ["envoy.json"]
    text = path.read_text()
    assert "PRIVATE KEY" not in text and "CERTIFICATE" not in text
    document = json_format.Parse(text, bootstrap_pb2.Bootstrap())
    assert private_keys_in(document) == []
    assert document.dynamic_resources.ads_config.api_type == config_source_pb2.ApiConfigSource.DELTA_GRPC
    xds_cluster, agent = document.static_resources.clusters
    assert (xds_cluster.name, agent.name) == ("mesh-identity-xds", AGENT_CLUSTER)
    [endpoint] = agent.load_assignment.endpoints[0].lb_endpoints
    assert endpoint.endpoint.address.pipe.path == str(socket)
    assert agent.type == cluster_pb2.Cluster.STATIC and not agent.HasField("transport_socket")
    assert "envoy.extensions.upstreams.http.v3.HttpProtocolOptions" in agent.typed_extension_protocol_options
    upstream = tls_pb2.UpstreamTlsContext()
    assert xds_cluster.transport_socket.typed_config.Unpack(upstream)
    common = upstream.common_tls_context
    [certificate] = common.tls_certificate_sds_secret_configs
    assert (certificate.name, certificate.sds_config) == (tls_secret_name(FRONTEND), _agent_source())
    validation = common.combined_validation_context
    assert validation.validation_context_sds_secret_config.name == BUNDLE
    assert validation.validation_context_sds_secret_config.sds_config == _agent_source()
    [san] = validation.default_validation_context.match_typed_subject_alt_names
    assert san.matcher.exact == str(SERVER)


@pytest.mark.parametrize(
    ("socket", "message"),
    [
        (Path("run/sds.sock"), "the agent socket 'run/sds.sock' is not an absolute path"),
        (
            Path("/" + "s" * MAX_SOCKET_PATH),
            f"the agent socket path is 108 bytes long; a Unix socket's is at most {MAX_SOCKET_PATH}",
        ),
    ],
)
def test_agent_socket_paths_are_checked(socket: Path, message: str) -> None:
    with pytest.raises(ValueError) as info:
        check_agent_socket(socket)
    assert str(info.value) == message
    with pytest.raises(ValueError):
        agent_bootstrap(
            node="n", cluster="n", identity=FRONTEND, xds=Address("127.0.0.1", 1), server_identity=SERVER,
            agent_socket=socket, admin=Address("127.0.0.1", 0),
        )  # fmt: skip


# -- the CLI ---------------------------------------------------------------------------------------------------


def _config(directory: Path, secrets: SecretSource) -> Path:
    mesh = {
        "services": {
            "frontend": {
                "identity": str(FRONTEND),
                "instances": [{"node": "frontend-1", "app": "127.0.0.1:18080", "inbound": "127.0.0.1:18443"}],
            }
        }
    }
    (directory / "mesh.yaml").write_text(yaml.safe_dump(mesh))
    config: dict[str, object] = {
        "trust_domain": "example.org",
        "state_dir": "state",
        "mesh_file": "mesh.yaml",
        "xds": {"listen": "127.0.0.1:15010", "secrets": secrets.value},
    }
    if secrets is SecretSource.AGENT:
        config["signing"] = {"listen": "127.0.0.1:0", "attest_listen": "127.0.0.1:0"}
    path = directory / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


Cli = Callable[..., tuple[int, str, str]]


@pytest.fixture
def cli(capsys: pytest.CaptureFixture[str]) -> Cli:
    def run(*args: str) -> tuple[int, str, str]:
        code = main(list(args))
        out, err = capsys.readouterr()
        return code, out, err

    return run


def test_bootstrap_agent_writes_envoy_json_alone_without_touching_the_ca(tmp_path: Path, cli: Cli) -> None:
    config = _config(tmp_path, SecretSource.AGENT)
    out = tmp_path / "out"
    code, text, err = cli(
        "bootstrap", "-c", str(config), "--identity", str(FRONTEND), "--node", "frontend-1", "--out", str(out),
        "--agent", "run/sds.sock",
    )  # fmt: skip
    assert (code, err) == (0, "")
    socket = Path("run/sds.sock").absolute()
    assert text.splitlines() == [
        f"wrote the bootstrap of sidecar frontend-1 ({FRONTEND}) to {out / 'envoy.json'}",
        "  xDS server 127.0.0.1:15010 over mTLS (state of the world ADS)",
        f"  certificates and trust bundle from the node agent's SDS socket {socket} (no certificate files)",
        f"  run: envoy -c {out / 'envoy.json'} --admin-address-path {out / 'admin.addr'}",
    ]
    assert sorted(p.name for p in out.iterdir()) == ["envoy.json"]
    assert not (tmp_path / "state").exists()  # no CA created or read, no sidecar registered
    document = json.loads((out / "envoy.json").read_text())
    pipe = document["staticResources"]["clusters"][1]["loadAssignment"]["endpoints"][0]["lbEndpoints"][0]
    assert pipe["endpoint"]["address"] == {"pipe": {"path": str(socket)}}


@pytest.mark.parametrize(
    ("secrets", "extra", "message"),
    [
        (SecretSource.CONTROL_PLANE, ["--agent", "/run/sds.sock"],
         "--agent: xds.secrets is control-plane in the config {config}, so the control plane delivers the "
         "certificates; set xds.secrets: agent (and the signing section) to take them from node agents"),
        (SecretSource.AGENT, [],
         "xds.secrets is agent in the config {config}: the control plane sends no keys; pass --agent SOCKET (the "
         "node agent's SDS socket)"),
        (SecretSource.AGENT, ["--agent", "/" + "s" * 200],
         f"--agent: the agent socket path is 201 bytes long; a Unix socket's is at most {MAX_SOCKET_PATH}"),
    ],
)  # fmt: skip
def test_bootstrap_refuses_the_other_modes_bootstrap(
    tmp_path: Path, cli: Cli, secrets: SecretSource, extra: list[str], message: str
) -> None:
    config = _config(tmp_path, secrets)
    code, text, err = cli(
        "bootstrap", "-c", str(config), "--identity", str(FRONTEND), "--node", "frontend-1",
        "--out", str(tmp_path / "out"), *extra,
    )  # fmt: skip
    assert (code, text, err) == (2, "", f"mesh-identity: error: {message.format(config=config.resolve())}\n")
    assert not (tmp_path / "out").exists()
    assert not (tmp_path / "state").exists()
