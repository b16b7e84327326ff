"""The signing API as ``serve`` builds it (``mesh_identity.compose``): the control plane's own SVID on both
listeners, rotated without a restart, the address files, the join-token CLI, the audit plugin, the service's
metrics, the JWT keys in the state directory. gRPC calls go through :class:`~tests.signing.client.TlsRelay`, which
checks the server's SPIFFE ID (grpcio's client can only check a host name)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
import yaml
from cryptography import x509

from mesh_identity.cli.main import main
from mesh_identity.compose import Stage, System, build
from mesh_identity.config import load_config
from mesh_identity.registry.base import agent_identity, control_plane_identity
from mesh_identity.svid import X509Svid, spiffe_id_of
from tests.signing.client import TlsRelay, csr, new_key, openssl_verify, presented_certificate
from tests.signing.conftest import AGENT_A, FRONTEND, MESH, TD
from tests.waiting import wait_until
from xds_sds.proto import signing_pb2, signing_pb2_grpc
from xds_sds.signing.component import ATTEST_ADDR, SIGNING_ADDR

CONTROL_PLANE = str(control_plane_identity(TD))


@pytest.fixture
def config_file(tmp_path: Path) -> Path:
    (tmp_path / "mesh.yaml").write_text(yaml.safe_dump(MESH))
    config = {
        "trust_domain": "example.org",
        "state_dir": "./state",
        "mesh_file": "mesh.yaml",
        "ca": {"workload_ttl": "1h", "intermediate_ttl": "24h"},
        "metrics": {"listen": "127.0.0.1:0"},
        "xds": {"listen": "127.0.0.1:0"},
        "signing": {"listen": "127.0.0.1:0", "attest_listen": "127.0.0.1:0"},
    }
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


@pytest.fixture
def system(config_file: Path) -> Iterator[System]:
    system = build(load_config(config_file), Stage.SERVER, create=True)
    assert system.service is not None
    system.service.start()
    try:
        yield system
    finally:
        system.service.stop()


@pytest.fixture
def relays() -> Iterator[list[tuple[TlsRelay, grpc.Channel]]]:
    made: list[tuple[TlsRelay, grpc.Channel]] = []
    yield made
    for relay, channel in made:
        channel.close()
        relay.close()


def _stub(
    relays: list[tuple[TlsRelay, grpc.Channel]], target: str, roots: bytes, svid: X509Svid | None = None
) -> signing_pb2_grpc.SigningStub:
    relay = TlsRelay(target, roots, CONTROL_PLANE, svid)
    channel = grpc.insecure_channel(relay.target)  # plaintext on loopback, to the relay, which speaks TLS onwards
    relays.append((relay, channel))
    return signing_pb2_grpc.SigningStub(channel)


def test_serve_runs_the_signing_api_with_the_control_planes_own_svid(
    system: System,
    config_file: Path,
    tmp_path: Path,
    relays: list[tuple[TlsRelay, grpc.Channel]],
    capsys: pytest.CaptureFixture[str],
) -> None:
    assert system.signing is not None and system.service is not None
    state = tmp_path / "state"
    signing_addr = (state / SIGNING_ADDR).read_text().strip()
    attest_addr = (state / ATTEST_ADDR).read_text().strip()
    server = system.signing.server
    assert server is not None
    assert (signing_addr, attest_addr) == (server.target, server.attest_target)
    roots = system.service.engine.bundles.bundle().pem()

    # the attestation listener: the control plane's SVID, no client certificate asked for
    presented = presented_certificate(attest_addr, roots)
    assert str(spiffe_id_of(presented)) == CONTROL_PLANE

    assert main(["token", "create", "--node", "host-a", "--config", str(config_file)]) == 0
    token = capsys.readouterr().out.strip()
    key = new_key()
    attest = _stub(relays, attest_addr, roots)
    response = attest.Attest(signing_pb2.AttestRequest(join_token=token, csr=csr(key)), timeout=30)
    assert response.spiffe_id == AGENT_A
    assert openssl_verify(tmp_path, response).strip().endswith(": OK")

    leaf, *chain = (x509.load_der_x509_certificate(c) for c in response.cert_chain)
    agent = X509Svid(agent_identity(TD, "host-a"), leaf, tuple(chain), key, system.service.engine.bundles.bundle())
    assert str(spiffe_id_of(presented_certificate(signing_addr, roots, agent))) == CONTROL_PLANE
    signing = _stub(relays, signing_addr, roots, agent)
    workload = signing.SignX509(signing_pb2.SignX509Request(spiffe_id=FRONTEND, csr=csr(new_key())), timeout=30)
    assert workload.spiffe_id == FRONTEND
    bundle = signing.FetchBundle(signing_pb2.BundleRequest(), timeout=30)
    assert any(k["use"] == "jwt-svid" for k in json.loads(bundle.jwks)["keys"])
    assert (state / "jwt" / "keys.json").is_file()

    # the audit plugin and the service's metrics saw it all
    lines = [json.loads(line) for line in (state / "audit.jsonl").read_text().splitlines()]
    decisions = [(d["rpc"], d["code"]) for d in lines if d["event"] == "SigningDecision"]
    assert decisions == [("Attest", "OK"), ("SignX509", "OK"), ("FetchBundle", "OK")]
    metrics = system.service.metrics_text().decode()
    assert 'mesh_identity_signing_requests_total{code="OK",rpc="Attest"} 1.0' in metrics
    assert "mesh_identity_signing_request_seconds_bucket" in metrics

    # a connection without a client certificate gets nothing from the signing listener
    anonymous = _stub(relays, signing_addr, roots)
    with pytest.raises(grpc.RpcError) as refused:
        anonymous.FetchBundle(signing_pb2.BundleRequest(), timeout=30)
    assert refused.value.code() is grpc.StatusCode.UNAVAILABLE  # type: ignore[attr-defined]


def test_the_control_planes_renewed_svid_is_presented_without_a_restart(system: System) -> None:
    assert system.service is not None and system.signing is not None and system.signing.server is not None
    engine = system.service.engine
    roots = engine.bundles.bundle().pem()
    server = system.signing.server
    before = presented_certificate(server.attest_target, roots)
    assert engine.rotate(control_plane_identity(TD))
    renewed = engine.source(control_plane_identity(TD)).svid()
    assert renewed.leaf.serial_number != before.serial_number
    after = wait_until(
        lambda: (
            (c := presented_certificate(server.attest_target, roots)).serial_number == renewed.leaf.serial_number and c
        ),
        "the attestation listener to present the renewed certificate",
    )
    assert str(spiffe_id_of(after)) == CONTROL_PLANE
    client = system.service.authority.issue(agent_identity(TD, "host-a"))
    assert presented_certificate(server.target, roots, client).serial_number == renewed.leaf.serial_number


def test_the_address_files_are_removed_at_stop(config_file: Path, tmp_path: Path) -> None:
    system = build(load_config(config_file), Stage.SERVER, create=True)
    assert system.service is not None
    system.service.start()
    assert (tmp_path / "state" / SIGNING_ADDR).is_file()
    system.service.stop()
    assert not (tmp_path / "state" / SIGNING_ADDR).exists()
    assert not (tmp_path / "state" / ATTEST_ADDR).exists()


def test_without_the_signing_section_there_is_no_signing_api(config_file: Path) -> None:
    data = yaml.safe_load(config_file.read_text())
    del data["signing"]
    config_file.write_text(yaml.safe_dump(data))
    system = build(load_config(config_file), Stage.SERVER, create=True)
    try:
        assert system.signing is None
    finally:
        system.close()
