"""FetchSecrets (unary) with bytes that are not a DiscoveryRequest: refused with INVALID_ARGUMENT, as the streams are.

The calls go through a generic ``unary_unary`` / ``stream_stream`` without serialisers, over the same mTLS
channel as the other tests, so the test sends exactly the bytes it chooses.
"""

from __future__ import annotations

import logging

import grpc
import pytest
from envoy.service.discovery.v3 import discovery_pb2

from mesh_identity.events import ListSink
from mesh_identity.svid import X509Svid
from tests.pki import TestCa
from tests.xds_sds.client import Client, Stream, names_of, sotw
from xds_sds.protocol.auth import bundle_secret_name, tls_secret_name
from xds_sds.protocol.server import DiscoveryServer
from xds_sds.protocol.typeurls import SECRET

SDS = "/envoy.service.secret.v3.SecretDiscoveryService/"
MALFORMED = "malformed request: it is not a valid discovery request message"


def raw_fetch(client: Client, data: bytes) -> bytes:
    """FetchSecrets without (de)serialisers: ``data`` as the request, the response's bytes."""
    response: bytes = client.channel.unary_unary(SDS + "FetchSecrets")(data, timeout=10)
    return response


def truncated() -> bytes:
    """A real request cut inside a length-delimited field."""
    return sotw(SECRET, ["spiffe://example.org/ns/default/sa/a"]).SerializeToString()[:-3]


@pytest.mark.parametrize(
    "data", [bytes.fromhex("ff00ff"), b"\xff\xff\xff\xff", truncated()], ids=["ff00ff", "ff", "cut"]
)
def test_undecodable_fetch_secrets_is_invalid_argument(
    client_a: Client,
    server: DiscoveryServer,
    audit: ListSink,
    svid_a: X509Svid,
    caplog: pytest.LogCaptureFixture,
    data: bytes,
) -> None:
    with caplog.at_level(logging.WARNING, logger="xds_sds"), pytest.raises(grpc.RpcError) as info:
        raw_fetch(client_a, data)
    assert (info.value.code(), info.value.details()) == (grpc.StatusCode.INVALID_ARGUMENT, MALFORMED)
    assert server.metrics.value("mesh_identity_xds_refused_streams_total", code="INVALID_ARGUMENT") == 1
    assert server.metrics.value("mesh_identity_xds_refused_streams_total", code="UNKNOWN") == 0
    refusals = [r.getMessage() for r in caplog.records if r.getMessage().startswith("refused FetchSecrets")]
    assert len(refusals) == 1
    assert refusals[0].startswith(f"refused FetchSecrets from {svid_a.spiffe_id} (")
    assert refusals[0].endswith(f"): {MALFORMED}")
    assert audit.events == []  # a malformed request is no access denial (as on the streams)
    # the server goes on serving FetchSecrets
    assert names_of(client_a.fetch_secrets(sotw(SECRET, [tls_secret_name(svid_a.spiffe_id)]))) == [
        tls_secret_name(svid_a.spiffe_id)
    ]


def test_valid_bytes_on_the_raw_method_are_served(client_a: Client, ca: TestCa) -> None:
    bundle = bundle_secret_name(ca.trust_domain)
    response = discovery_pb2.DiscoveryResponse.FromString(
        raw_fetch(client_a, sotw(SECRET, [bundle]).SerializeToString())
    )
    assert (response.type_url, names_of(response)) == (SECRET, [bundle])


def test_empty_bytes_are_an_empty_request_refused_for_its_missing_node(client_a: Client) -> None:
    with pytest.raises(grpc.RpcError) as info:
        raw_fetch(client_a, b"")
    assert (info.value.code(), info.value.details()) == (
        grpc.StatusCode.INVALID_ARGUMENT,
        "the first request must carry node.id",
    )


@pytest.mark.parametrize("method", ["StreamSecrets", "DeltaSecrets"])
def test_the_secret_streams_still_refuse_undecodable_bytes(
    client_a: Client, server: DiscoveryServer, method: str
) -> None:
    stream = Stream(client_a.channel.stream_stream(SDS + method))
    stream.send(bytes.fromhex("ff00ff"))
    assert stream.status() == (grpc.StatusCode.INVALID_ARGUMENT, MALFORMED)
    assert server.metrics.value("mesh_identity_xds_refused_streams_total", code="INVALID_ARGUMENT") == 1
