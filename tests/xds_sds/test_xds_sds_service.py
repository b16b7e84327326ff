"""The standalone secret discovery service (StreamSecrets, DeltaSecrets, FetchSecrets)."""

from __future__ import annotations

import grpc
import pytest

from mesh_identity.svid import X509Svid
from tests.pki import TestCa
from tests.xds_sds.client import Client, ack, delta, names_of, sotw
from xds_sds.protocol.auth import bundle_secret_name, tls_secret_name
from xds_sds.protocol.cache import SnapshotCache
from xds_sds.protocol.typeurls import CLUSTER, SECRET
from xds_sds.resources.secrets import tls_certificate_secret


def test_stream_secrets_defaults_the_type_and_pushes_a_rotation(
    client_a: Client, svid_a: X509Svid, ca: TestCa, cache: SnapshotCache
) -> None:
    mine = tls_secret_name(svid_a.spiffe_id)
    stream = client_a.sds()
    first = stream.exchange(sotw("", [mine]))
    assert (first.type_url, names_of(first)) == (SECRET, [mine])
    stream.send(ack(first, [mine]))
    cache.update_resources("node-a", SECRET, {mine: tls_certificate_secret(ca.svid("/ns/default/sa/a"))})
    pushed = stream.recv()
    assert names_of(pushed) == [mine]
    assert pushed.version_info == cache.get("node-a", SECRET).version != first.version_info


def test_delta_secrets(client_a: Client, ca: TestCa) -> None:
    bundle = bundle_secret_name(ca.trust_domain)
    response = client_a.sds_delta().exchange(delta("", [bundle]))
    assert (response.type_url, names_of(response)) == (SECRET, [bundle])


@pytest.mark.parametrize("variant", ["sds", "sds_delta"])
def test_secret_service_refuses_other_types(client_a: Client, variant: str) -> None:
    stream = getattr(client_a, variant)()
    stream.send(delta(CLUSTER) if variant == "sds_delta" else sotw(CLUSTER))
    assert stream.status() == (
        grpc.StatusCode.INVALID_ARGUMENT,
        f"type_url '{CLUSTER}' is not served here (only {SECRET})",
    )


def test_fetch_secrets(client_a: Client, svid_a: X509Svid, ca: TestCa, cache: SnapshotCache) -> None:
    names = [tls_secret_name(svid_a.spiffe_id), bundle_secret_name(ca.trust_domain)]
    response = client_a.fetch_secrets(sotw(SECRET, names))
    assert names_of(response) == sorted(names)
    assert response.version_info == cache.get("node-a", SECRET).version


def test_fetch_secrets_refuses_other_types(client_a: Client) -> None:
    with pytest.raises(grpc.RpcError) as info:
        client_a.fetch_secrets(sotw(CLUSTER, ["c1"]))
    assert (info.value.code(), info.value.details()) == (
        grpc.StatusCode.INVALID_ARGUMENT,
        f"type_url '{CLUSTER}' is not served here (only {SECRET})",
    )
