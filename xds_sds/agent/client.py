"""The agent's client of the control plane's signing API (``xds_sds/proto/signing.proto``).

Two gRPC channels, each through a :class:`~xds_sds.agent.tunnel.Tunnel` that checks the control plane's SPIFFE
ID: ``attest`` (server-authenticated TLS: the first contact, with a join token or a Kubernetes token) and
``signing`` (mutual TLS with the agent's own SVID: renewals, workload SVIDs, JWT-SVIDs, the bundle). Every call
has a deadline; a failure becomes a :class:`ControlPlaneError` that names the call and the status, and says
whether retrying may help. What the server answers is checked by :mod:`xds_sds.agent.issued`, not here.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import grpc
from google.protobuf.message import Message

from mesh_identity.spiffe import SpiffeId
from xds_sds.agent.tunnel import Tunnel
from xds_sds.proto import signing_pb2, signing_pb2_grpc

log = logging.getLogger(__name__)

RPC_TIMEOUT = 10.0  # seconds for one call
CHANNEL_OPTIONS: tuple[tuple[str, int], ...] = (
    # The channel's end is a local tunnel: reconnecting is cheap, and a control plane that is back must be used
    # again soon (the keeper's own backoff decides how often calls are made).
    ("grpc.initial_reconnect_backoff_ms", 100),
    ("grpc.min_reconnect_backoff_ms", 100),
    ("grpc.max_reconnect_backoff_ms", 2000),
    ("grpc.enable_retries", 0),
)
NOT_RETRYABLE = frozenset(
    {
        grpc.StatusCode.INVALID_ARGUMENT,
        grpc.StatusCode.PERMISSION_DENIED,
        grpc.StatusCode.UNAUTHENTICATED,
        grpc.StatusCode.NOT_FOUND,
        grpc.StatusCode.FAILED_PRECONDITION,
        grpc.StatusCode.UNIMPLEMENTED,
    }
)


class ControlPlaneError(Exception):
    """A call to the control plane failed. ``code`` is the gRPC status name; ``retryable`` is False when only a
    change on the control plane (registry, token) or in the config will help."""

    def __init__(self, call: str, code: str, message: str, *, retryable: bool) -> None:
        super().__init__(f"{call}: {code}: {message}")
        self.call = call
        self.code = code
        self.retryable = retryable


class ControlPlaneClient:
    """Calls of the signing API over the two tunnels (started and stopped with the client)."""

    def __init__(self, attest: Tunnel, signing: Tunnel, *, timeout: float = RPC_TIMEOUT) -> None:
        self._tunnels = {"attest": attest, "signing": signing}
        self._timeout = timeout
        self._channels: dict[str, grpc.aio.Channel] = {}
        self._stubs: dict[str, signing_pb2_grpc.SigningStub] = {}

    async def start(self) -> None:
        for name, tunnel in self._tunnels.items():
            await tunnel.start()
            self._open(name)

    async def stop(self) -> None:
        for channel in self._channels.values():
            await channel.close(None)
        self._channels.clear()
        self._stubs.clear()
        for tunnel in self._tunnels.values():
            await tunnel.stop()

    def _open(self, name: str) -> None:
        channel = grpc.aio.insecure_channel(self._tunnels[name].address, options=list(CHANNEL_OPTIONS))
        self._channels[name] = channel
        self._stubs[name] = signing_pb2_grpc.SigningStub(channel)

    async def reconnect(self) -> None:
        """New connections for the signing channel: after the agent's SVID or the trust bundle changed, so that
        the next calls handshake with them (calls in flight finish on the old connection)."""
        old = self._channels.get("signing")
        self._open("signing")
        if old is not None:
            await old.close(grace=self._timeout)

    async def attest(self, request: signing_pb2.AttestRequest) -> signing_pb2.X509Response:
        response: signing_pb2.X509Response = await self._call("attest", "Attest", request)
        return response

    async def sign_x509(self, spiffe_id: SpiffeId, csr_der: bytes) -> signing_pb2.X509Response:
        request = signing_pb2.SignX509Request(spiffe_id=str(spiffe_id), csr=csr_der)
        response: signing_pb2.X509Response = await self._call("signing", "SignX509", request)
        return response

    async def sign_jwt(
        self, spiffe_id: SpiffeId, audience: Sequence[str], ttl_seconds: int = 0
    ) -> signing_pb2.JwtResponse:
        request = signing_pb2.SignJwtRequest(spiffe_id=str(spiffe_id), audience=list(audience), ttl_seconds=ttl_seconds)
        response: signing_pb2.JwtResponse = await self._call("signing", "SignJwt", request)
        return response

    async def fetch_bundle(self) -> signing_pb2.Bundle:
        response: signing_pb2.Bundle = await self._call("signing", "FetchBundle", signing_pb2.BundleRequest())
        return response

    async def _call(self, channel: str, method: str, request: Message) -> Any:
        stub = self._stubs.get(channel)
        if stub is None:
            raise ControlPlaneError(method, "UNAVAILABLE", "the client is not started", retryable=True)
        try:
            return await getattr(stub, method)(request, timeout=self._timeout)
        except grpc.aio.AioRpcError as err:
            code = err.code()
            message = err.details() or ""
            why = self._tunnels[channel].last_error
            if code is grpc.StatusCode.UNAVAILABLE and why:
                message = why
            raise ControlPlaneError(method, code.name, message[:500], retryable=code not in NOT_RETRYABLE) from None
