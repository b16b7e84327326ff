"""Fuzz target: a live ``DiscoveryServer`` (ADS SotW and delta, SDS SotW and delta, ``FetchSecrets``) over mTLS.

Inputs: streams of ``DiscoveryRequest`` / ``DeltaDiscoveryRequest`` messages with drawn node ids, type URLs,
resource names (also lists around and far beyond the server's limit), versions, nonces (stale, current,
junk), ``error_detail`` (NACKs) and initial versions; and raw bytes on the same methods (a generic
``stream_stream``/``unary_unary`` without serializers): random, and mutations of real serialized requests.
The rule:

* each stream ends, within ``BOUND``, with OK or a status that refuses the input (``INVALID_ARGUMENT``,
  ``PERMISSION_DENIED``, ``UNAUTHENTICATED``, ``RESOURCE_EXHAUSTED``, ...), never ``UNKNOWN`` (a servicer that
  raised) and never a server that stops answering;
* no log line or status message holds a private key; a stream authenticated as A never receives B's key
  (B's secret is planted in A's snapshot, as a wrongly built snapshot would have it);
* afterwards, a well-formed client is served (node-a gets its clusters).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
from envoy.config.core.v3 import base_pb2
from envoy.service.discovery.v3 import discovery_pb2
from google.protobuf.message import Message
from google.rpc import status_pb2
from hypothesis import given
from hypothesis import strategies as st

from mesh_identity.events import ListSink
from mesh_identity.svid import X509Svid
from tests.fuzz.harness import (
    Rule,
    Watch,
    corpus_cases,
    count,
    fuzz_settings,
    mutated_bytes,
    outcome,
    secret_markers,
)
from tests.pki import TestCa
from tests.xds_sds.client import Client, connect, delta, names_of, sotw
from tests.xds_sds.conftest import A_PATH, B_PATH, cluster
from xds_sds.protocol.acks import AckTracker
from xds_sds.protocol.auth import BindingAuthorizer, bundle_secret_name, tls_secret_name
from xds_sds.protocol.cache import SnapshotCache
from xds_sds.protocol.credentials import ServerTls
from xds_sds.protocol.server import DiscoveryServer
from xds_sds.protocol.typeurls import CLUSTER, ENDPOINT, LISTENER, PREFIX, ROUTE, SECRET
from xds_sds.resources.secrets import tls_certificate_secret, validation_context_secret

TARGET = "xds"
BOUND = 10.0  # seconds for a stream to end after the client half-closed it (it takes milliseconds)
REFUSALS = {
    grpc.StatusCode.OK,
    grpc.StatusCode.INVALID_ARGUMENT,
    grpc.StatusCode.PERMISSION_DENIED,
    grpc.StatusCode.UNAUTHENTICATED,
    grpc.StatusCode.RESOURCE_EXHAUSTED,
    grpc.StatusCode.FAILED_PRECONDITION,
    grpc.StatusCode.NOT_FOUND,
    grpc.StatusCode.OUT_OF_RANGE,
}
ADS = "/envoy.service.discovery.v3.AggregatedDiscoveryService/"
SDS = "/envoy.service.secret.v3.SecretDiscoveryService/"
METHODS = {  # name -> (path, streaming, delta)
    "ads": (ADS + "StreamAggregatedResources", True, False),
    "ads-delta": (ADS + "DeltaAggregatedResources", True, True),
    "sds": (SDS + "StreamSecrets", True, False),
    "sds-delta": (SDS + "DeltaSecrets", True, True),
    "fetch": (SDS + "FetchSecrets", False, False),
}


@dataclass
class Mesh:
    server: DiscoveryServer
    a: Client
    b: Client
    svid_a: X509Svid
    svid_b: X509Svid
    audit: ListSink


@pytest.fixture(scope="module")
def mesh() -> Iterator[Mesh]:
    ca = TestCa.for_trust_domain("example.org")
    svid_a, svid_b = ca.svid(A_PATH), ca.svid(B_PATH)
    cache = SnapshotCache()
    bundle = validation_context_secret(ca.bundle)
    for node, svid in (("node-a", svid_a), ("node-b", svid_b)):
        secrets = {
            tls_secret_name(svid.spiffe_id): tls_certificate_secret(svid),
            bundle_secret_name(ca.trust_domain): bundle,
        }
        cache.set_snapshot(node, {CLUSTER: {"c1": cluster("c1"), "c2": cluster("c2")}, SECRET: secrets})
    # a wrongly built snapshot: node-a's holds B's key too; the authorizer must keep it from A
    cache.update_resources("node-a", SECRET, {tls_secret_name(svid_b.spiffe_id): tls_certificate_secret(svid_b)})
    authorizer = BindingAuthorizer({"node-a": svid_a.spiffe_id, "node-b": svid_b.spiffe_id})
    audit = ListSink()
    server_svid = ca.server_svid()
    server = DiscoveryServer(cache, ServerTls.from_svid(server_svid), authorizer, acks=AckTracker(), audit=audit)
    server.start()
    a, b = connect(server.target, ca.pem(), svid_a), connect(server.target, ca.pem(), svid_b)
    try:
        yield Mesh(server, a, b, svid_a, svid_b, audit)
    finally:
        a.close()
        b.close()
        server.stop(None)


@pytest.fixture(scope="module")
def rule(mesh: Mesh) -> Iterator[Rule]:
    keys = secret_markers(mesh.svid_a.key_pem(), mesh.svid_b.key_pem())
    with Watch() as watch:
        yield Rule(TARGET, secrets=keys, timeout=BOUND + 5, watch=watch)


# -- one call ------------------------------------------------------------------------------------------------


@dataclass
class Outcome:
    code: grpc.StatusCode
    details: str
    responses: list[bytes]


def _identity(data: bytes) -> bytes:
    return data


def call(client: Client, method: str, messages: list[bytes]) -> Outcome:
    """Send serialized ``messages`` on ``method`` (then half-close), collect the answers until the end."""
    path, streaming, _ = METHODS[method]
    responses: list[bytes] = []
    try:
        if streaming:
            stream = client.channel.stream_stream(path, request_serializer=_identity, response_deserializer=_identity)
            answers = stream(iter(messages), timeout=BOUND)
            for answer in answers:
                responses.append(answer)
            return Outcome(answers.code(), answers.details() or "", responses)
        unary = client.channel.unary_unary(path, request_serializer=_identity, response_deserializer=_identity)
        responses.append(unary(messages[0] if messages else b"", timeout=BOUND))
        return Outcome(grpc.StatusCode.OK, "", responses)
    except grpc.RpcError as err:
        return Outcome(err.code(), err.details() or "", responses)  # type: ignore[attr-defined]


def check(mesh: Mesh, rule: Rule, as_b: bool, method: str, messages: list[bytes], *, raw: bool) -> None:
    client = mesh.b if as_b else mesh.a
    ok, result = rule.call(lambda: call(client, method, messages), f"a {method} call")
    assert ok, result
    answer: Outcome = result
    if answer.code is grpc.StatusCode.DEADLINE_EXCEEDED:
        raise AssertionError(f"{method}: the stream did not end within {BOUND}s after the half-close (a hang)")
    rule.settle(f"a {method} call")  # first: what the server logged (a servicer that raised) says more
    if answer.code not in REFUSALS:
        cause = "DecodeError" if "DecodeError" in answer.details else answer.details[:60]
        rule.violation(
            (answer.code.name, f"{method}: {cause}"),
            f"{method}: the call ended with {answer.code.name} {answer.details[:2000]!r}, not a refusal of the input",
        )
    else:
        outcome(f"{method} {answer.code.name}")
    rule.check_text("a status message", answer.details)
    if not as_b:
        key_b = mesh.svid_b.key_pem()
        for response in answer.responses:
            assert key_b not in response, f"{method}: a stream of A received B's private key"
    healthy = mesh.a.ads()
    try:
        assert names_of(healthy.exchange(sotw(CLUSTER), timeout=BOUND)) == ["c1", "c2"]
    finally:
        healthy.cancel()


# -- the seed corpus: one call per file: a first line ``<method> <as-a|as-b>``, then one message per line as
# hexadecimal (raw bytes, serialized requests or not) --------------------------------------------------------


def read_case(path: Path) -> tuple[str, bool, list[bytes]]:
    head, *lines = path.read_text().splitlines()
    method, who = head.split()
    return method, who == "as-b", [bytes.fromhex(line) for line in lines]


@pytest.mark.parametrize("path", corpus_cases(TARGET))
def test_corpus(mesh: Mesh, rule: Rule, path: Path) -> None:
    count(TARGET, corpus=True)
    method, as_b, messages = read_case(path)
    with rule.strictly():
        check(mesh, rule, as_b, method, messages, raw=True)


# -- generated requests --------------------------------------------------------------------------------------

A = "spiffe://example.org" + A_PATH
B = "spiffe://example.org" + B_PATH
TYPES = [
    CLUSTER,
    SECRET,
    LISTENER,
    ROUTE,
    ENDPOINT,
    "",
    PREFIX,
    PREFIX + "envoy.Foo",
    "type.googleapis.com",
    "x" * 3000,
]
NAMES = ["c1", "c2", "*", "", A, B, "spiffe://example.org", "spiffe://evil.org", B + "/../a", "c1\x00", "\u00e9"]
NONCES = ["", "1", "2", "3", "0", "-1", "99999999999999999999"]

texts = st.text(max_size=16)
type_urls = st.sampled_from([CLUSTER, CLUSTER, SECRET, SECRET, LISTENER]) | st.sampled_from(TYPES) | texts
names = st.one_of(
    st.lists(st.sampled_from(["c1", "c2", "*", A, B, "spiffe://example.org"]), max_size=3),
    st.lists(st.sampled_from(NAMES) | texts, max_size=5),
    st.sampled_from([999, 1000, 1001, 20_000]).map(lambda n: [f"n{i}" for i in range(n)]),
)
errors = st.none() | st.builds(
    lambda code, message: status_pb2.Status(code=code, message=message),
    st.integers(-(2**31), 2**31 - 1),
    texts | st.just("e" * 200_000),
)
errors = st.none() | st.none() | errors


def node_ids(own: str) -> st.SearchStrategy[str | None]:
    """Mostly the stream's own node (so the requests get past the node check), else none, another's, junk."""
    other = "node-a" if own == "node-b" else "node-b"
    return st.sampled_from([own, own, own, own, None, None, "", other, "node-c", "n" * 100_000]) | texts


@st.composite
def sotw_request(draw: st.DrawFn, own: str) -> discovery_pb2.DiscoveryRequest:
    request = discovery_pb2.DiscoveryRequest(
        type_url=draw(type_urls),
        resource_names=draw(names),
        version_info=draw(texts),
        response_nonce=draw(st.sampled_from(NONCES[:4]) | st.sampled_from(NONCES) | texts),
    )
    node = draw(node_ids(own))
    if node is not None:
        request.node.CopyFrom(base_pb2.Node(id=node, cluster=draw(texts)))
    error = draw(errors)
    if error is not None:
        request.error_detail.CopyFrom(error)
    return request


@st.composite
def delta_request(draw: st.DrawFn, own: str) -> discovery_pb2.DeltaDiscoveryRequest:
    request = discovery_pb2.DeltaDiscoveryRequest(
        type_url=draw(type_urls),
        resource_names_subscribe=draw(names),
        resource_names_unsubscribe=draw(st.lists(st.sampled_from(NAMES) | texts, max_size=3)),
        response_nonce=draw(st.sampled_from(NONCES[:4]) | st.sampled_from(NONCES) | texts),
        initial_resource_versions=draw(st.dictionaries(st.sampled_from(NAMES) | texts, texts, max_size=3)),
    )
    node = draw(node_ids(own))
    if node is not None:
        request.node.CopyFrom(base_pb2.Node(id=node, cluster=draw(texts)))
    error = draw(errors)
    if error is not None:
        request.error_detail.CopyFrom(error)
    return request


@st.composite
def structured_calls(draw: st.DrawFn) -> tuple[bool, str, list[Message]]:
    as_b = draw(st.booleans())
    own = "node-b" if as_b else "node-a"
    method = draw(st.sampled_from(sorted(METHODS)))
    _, streaming, is_delta = METHODS[method]
    make = delta_request(own) if is_delta else sotw_request(own)
    messages: list[Message] = draw(st.lists(make, min_size=1, max_size=5 if streaming else 1))
    if streaming and draw(st.booleans()):  # a well-formed first request, so what follows gets past it
        first_type = SECRET if method.startswith("sds") else draw(st.sampled_from([CLUSTER, SECRET]))
        some = draw(st.lists(st.sampled_from(NAMES[:7]), max_size=3))
        first = delta(first_type, some, node=own) if is_delta else sotw(first_type, some, node=own)
        messages = [first, *messages]
    return as_b, method, messages


@fuzz_settings(120)
@given(case=structured_calls())
def test_generated_requests(mesh: Mesh, rule: Rule, case: tuple[bool, str, list[Message]]) -> None:
    count(TARGET)
    as_b, method, messages = case
    check(mesh, rule, as_b, method, [m.SerializeToString() for m in messages], raw=False)


VALID = [
    sotw(CLUSTER).SerializeToString(),
    sotw(SECRET, [A, "spiffe://example.org"]).SerializeToString(),
    sotw(CLUSTER, ["c1"], nonce="1", version="v1", error="bad config").SerializeToString(),
    discovery_pb2.DeltaDiscoveryRequest(
        node=base_pb2.Node(id="node-a"), type_url=CLUSTER, resource_names_subscribe=["*", "c1"],
        initial_resource_versions={"c2": "v1"},
    ).SerializeToString(),
]  # fmt: skip
raw_messages = st.one_of(st.binary(max_size=120), st.one_of(*[mutated_bytes(v, 6) for v in VALID]))


@fuzz_settings(100)
@given(
    as_b=st.booleans(),
    method=st.sampled_from(sorted(METHODS)),
    messages=st.lists(raw_messages, min_size=1, max_size=3),
)
def test_raw_bytes(mesh: Mesh, rule: Rule, as_b: bool, method: str, messages: list[bytes]) -> None:
    count(TARGET)
    check(mesh, rule, as_b, method, messages, raw=True)


def test_refusals_are_audited_without_keys(mesh: Mesh, rule: Rule) -> None:
    """After all of the above: what the audit sink received holds no private key."""
    for event in mesh.audit.events:
        rule.check_text("an audit event", repr(event))
