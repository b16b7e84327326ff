"""An xDS client of our own for the protocol tests: real gRPC over mTLS, driven step by step.

Each :class:`Stream` feeds requests from a queue and collects responses in another, so a test sends a
request, reads the next response, and checks it. ``recv`` waits at most ``timeout`` seconds: that bounds a
broken test, it is not a speed check.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import grpc
from envoy.config.core.v3 import base_pb2
from envoy.service.discovery.v3 import ads_pb2_grpc, discovery_pb2
from envoy.service.secret.v3 import sds_pb2_grpc
from google.rpc import status_pb2

from mesh_identity.svid import X509Svid
from tests.pki import SERVER_NAME

_CLOSE = object()
_END = object()


class StreamEnded(AssertionError):
    """The server ended the stream while a response was expected."""


class Stream:
    """One bidirectional stream."""

    def __init__(self, method: grpc.StreamStreamMultiCallable) -> None:
        self._out: queue.Queue[Any] = queue.Queue()
        self._in: queue.Queue[Any] = queue.Queue()
        self._call = method(iter(self._out.get, _CLOSE))
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        try:
            for message in self._call:
                self._in.put(message)
        except grpc.RpcError as err:
            self._in.put(err)
        else:
            self._in.put(_END)

    def send(self, request: Any) -> None:
        self._out.put(request)

    def recv(self, timeout: float = 10.0) -> Any:
        try:
            item = self._in.get(timeout=timeout)
        except queue.Empty:
            raise AssertionError(f"no response within {timeout}s") from None
        if item is _END:
            self._in.put(item)
            raise StreamEnded("the server ended the stream")
        if isinstance(item, grpc.RpcError):
            self._in.put(item)
            raise StreamEnded(f"the stream failed: {item.code()} {item.details()}")
        return item

    def exchange(self, request: Any, timeout: float = 10.0) -> Any:
        self.send(request)
        return self.recv(timeout)

    def close(self) -> None:
        """Half-close: the client sends no more requests."""
        self._out.put(_CLOSE)

    def cancel(self) -> None:
        self._call.cancel()
        self._out.put(_CLOSE)

    def status(self, timeout: float = 10.0) -> tuple[grpc.StatusCode, str]:
        """Wait for the stream to end; its status code and details."""
        self._reader.join(timeout)
        if self._reader.is_alive():
            raise AssertionError(f"the stream did not end within {timeout}s")
        self._out.put(_CLOSE)
        return self._call.code(), self._call.details()


@dataclass
class Client:
    channel: grpc.Channel

    def ads(self) -> Stream:
        return Stream(ads_pb2_grpc.AggregatedDiscoveryServiceStub(self.channel).StreamAggregatedResources)

    def ads_delta(self) -> Stream:
        return Stream(ads_pb2_grpc.AggregatedDiscoveryServiceStub(self.channel).DeltaAggregatedResources)

    def sds(self) -> Stream:
        return Stream(sds_pb2_grpc.SecretDiscoveryServiceStub(self.channel).StreamSecrets)

    def sds_delta(self) -> Stream:
        return Stream(sds_pb2_grpc.SecretDiscoveryServiceStub(self.channel).DeltaSecrets)

    def fetch_secrets(self, request: discovery_pb2.DiscoveryRequest) -> discovery_pb2.DiscoveryResponse:
        stub = sds_pb2_grpc.SecretDiscoveryServiceStub(self.channel)
        response: discovery_pb2.DiscoveryResponse = stub.FetchSecrets(request, timeout=10)
        return response

    def raw_ads(self) -> Stream:
        """The ADS method without (de)serialisers: the test sends raw bytes."""
        method = self.channel.stream_stream(
            "/envoy.service.discovery.v3.AggregatedDiscoveryService/StreamAggregatedResources"
        )
        return Stream(method)

    def close(self) -> None:
        self.channel.close()


def connect(target: str, roots_pem: bytes, svid: X509Svid | None) -> Client:
    """A channel to the xDS server, presenting ``svid`` as client certificate (none when None)."""
    if svid is None:
        return connect_pem(target, roots_pem, None, None)
    return connect_pem(target, roots_pem, svid.cert_chain_pem(), svid.key_pem())


def connect_pem(target: str, roots_pem: bytes, chain_pem: bytes | None, key_pem: bytes | None) -> Client:
    creds = grpc.ssl_channel_credentials(roots_pem, key_pem, chain_pem)
    channel = grpc.secure_channel(target, creds, options=[("grpc.ssl_target_name_override", SERVER_NAME)])
    return Client(channel)


def sotw(
    type_url: str,
    names: Iterable[str] = (),
    *,
    node: str | None = "node-a",
    version: str = "",
    nonce: str = "",
    error: str | None = None,
) -> discovery_pb2.DiscoveryRequest:
    request = discovery_pb2.DiscoveryRequest(
        type_url=type_url, resource_names=list(names), version_info=version, response_nonce=nonce
    )
    if node is not None:
        request.node.CopyFrom(base_pb2.Node(id=node))
    if error is not None:
        request.error_detail.CopyFrom(status_pb2.Status(code=3, message=error))
    return request


def ack(response: discovery_pb2.DiscoveryResponse, names: Iterable[str] = (), **kw: Any) -> Any:
    return sotw(response.type_url, names, version=response.version_info, nonce=response.nonce, **kw)


def delta(
    type_url: str,
    subscribe: Iterable[str] = (),
    unsubscribe: Iterable[str] = (),
    *,
    node: str | None = "node-a",
    nonce: str = "",
    initial: dict[str, str] | None = None,
    error: str | None = None,
) -> discovery_pb2.DeltaDiscoveryRequest:
    request = discovery_pb2.DeltaDiscoveryRequest(
        type_url=type_url,
        resource_names_subscribe=list(subscribe),
        resource_names_unsubscribe=list(unsubscribe),
        response_nonce=nonce,
        initial_resource_versions=initial or {},
    )
    if node is not None:
        request.node.CopyFrom(base_pb2.Node(id=node))
    if error is not None:
        request.error_detail.CopyFrom(status_pb2.Status(code=3, message=error))
    return request


def names_of(response: Any) -> list[str]:
    """Names of the resources in a SotW or delta response, in order."""
    if isinstance(response, discovery_pb2.DeltaDiscoveryResponse):
        return [r.name for r in response.resources]
    return [_unpacked_name(any_msg) for any_msg in response.resources]


def _unpacked_name(body: Any) -> str:
    from envoy.config.cluster.v3 import cluster_pb2
    from envoy.extensions.transport_sockets.tls.v3 import secret_pb2

    for cls in (cluster_pb2.Cluster, secret_pb2.Secret):
        if body.Is(cls.DESCRIPTOR):
            message = cls()
            body.Unpack(message)
            return str(message.name)
    raise AssertionError(f"unexpected resource type {body.type_url}")
