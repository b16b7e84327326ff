"""SDS for the Envoys of this host (``envoy.service.secret.v3.SecretDiscoveryService``), on the agent's ``sds``
socket: the certificate and key of each identity the agent keeps, and the trust bundle, under the names the
control plane would use (:func:`~xds_sds.protocol.auth.tls_secret_name`,
:func:`~xds_sds.protocol.auth.bundle_secret_name`).

The protocol is the xDS server's own (:class:`~xds_sds.protocol.sotw.SotwStream` for ``StreamSecrets``, which
Envoy uses by default, :class:`~xds_sds.protocol.delta.DeltaStream` for ``DeltaSecrets``, and ``FetchSecrets``):
ACKs and NACKs are tracked, a NACKed version is not sent again, a new SVID is pushed as soon as the key keeper
has it. What differs is who the peer is: not a client certificate but the process the relay attested. A caller
whose selectors match no entry is refused (``PERMISSION_DENIED``) when its stream opens, and so is a request
that names the certificate of an identity the caller does not hold; the trust bundle is for every caller that
holds some identity. Envoy's node id says nothing here (any is accepted): every Envoy of the host reads the same
secrets, and which of them it may have is decided by its attested selectors alone.
"""

from __future__ import annotations

import asyncio
import logging
from collections import Counter as Tally
from collections.abc import AsyncIterator, Callable, Sequence
from typing import Any, Protocol, TypeVar

import grpc
from envoy.service.discovery.v3 import discovery_pb2
from envoy.service.secret.v3 import sds_pb2
from google.protobuf.message import DecodeError, Message
from prometheus_client import CollectorRegistry

from mesh_identity.spiffe import SpiffeId, TrustDomain
from xds_sds.agent.keeper import Keeper
from xds_sds.agent.relay import Callers
from xds_sds.agent.selectors import Entry, granted
from xds_sds.protocol.acks import AckTracker
from xds_sds.protocol.auth import bundle_secret_name, tls_secret_name
from xds_sds.protocol.cache import Resource, SnapshotCache, TypeSnapshot, Watcher
from xds_sds.protocol.delta import DeltaStream
from xds_sds.protocol.metrics import XdsMetrics
from xds_sds.protocol.session import Env, RequestError, Session
from xds_sds.protocol.sotw import SotwStream
from xds_sds.protocol.text import escaped
from xds_sds.protocol.typeurls import SECRET
from xds_sds.resources.secrets import tls_certificate_secret, validation_context_secret

log = logging.getLogger(__name__)

SDS_SERVICE: str = sds_pb2.DESCRIPTOR.services_by_name["SecretDiscoveryService"].full_name
HOST_NODE = "host"  # the one key of the agent's snapshot cache

Req = TypeVar("Req", bound=Message)
Resp = TypeVar("Resp", bound=Message)
Req_contra = TypeVar("Req_contra", bound=Message, contravariant=True)
Resp_co = TypeVar("Resp_co", bound=Message, covariant=True)
Context = grpc.aio.ServicerContext[Any, Any]


class _Protocol(Protocol[Req_contra, Resp_co]):
    def on_request(self, request: Req_contra) -> None: ...

    def responses(self) -> Sequence[Resp_co]: ...


class HostCache(SnapshotCache):
    """The secrets of the host, the same whatever node id a stream names (see the module docstring)."""

    def get(self, node_id: str, type_url: str) -> TypeSnapshot:
        return super().get(HOST_NODE, type_url)

    def watch(self, node_id: str, watcher: Watcher) -> Callable[[], None]:
        return super().watch(HOST_NODE, lambda _node, types: watcher(node_id, types))


class GrantAuthorizer:
    """What one attested caller may receive: the certificates of its identities, and the trust bundle."""

    def __init__(self, grants: Sequence[SpiffeId], trust_domain: TrustDomain) -> None:
        self._names = frozenset(tls_secret_name(spiffe_id) for spiffe_id in grants)
        self._bundle = bundle_secret_name(trust_domain)

    def node_denied(self, identity: SpiffeId, node_id: str) -> str | None:
        return None

    def resource_denied(self, identity: SpiffeId, node_id: str, type_url: str, name: str) -> str | None:
        if type_url == SECRET and (name in self._names or name == self._bundle):
            return None
        return f"secret {name!r} is not the certificate of an identity this caller holds, nor the trust bundle"


class AgentSds:
    """The SDS service over a :class:`~xds_sds.agent.keeper.Keeper`, for the callers of ``callers``."""

    def __init__(
        self, keeper: Keeper, callers: Callers, entries: Sequence[Entry], registry: CollectorRegistry | None = None
    ) -> None:
        self.keeper = keeper
        self.callers = callers
        self.entries = tuple(entries)
        self.cache = HostCache()
        self.acks = AckTracker()
        self.metrics = XdsMetrics(registry)
        self._nodes: Tally[str] = Tally()
        self._unsubscribe = keeper.subscribe(self.refresh)
        self.refresh()

    def close(self) -> None:
        self._unsubscribe()

    def refresh(self) -> None:
        """Put the keeper's current SVIDs and bundle into the cache (the streams push what changed)."""
        resources: dict[str, Message | Resource] = {}
        for spiffe_id in self.keeper.config.identities:
            svid = self.keeper.current(spiffe_id)
            if svid is not None:
                resources[tls_secret_name(spiffe_id)] = tls_certificate_secret(svid)
        bundle = self.keeper.bundle
        if bundle is not None:
            resources[bundle_secret_name(bundle.trust_domain)] = validation_context_secret(bundle)
        self.cache.set_resources(HOST_NODE, SECRET, resources)

    def handler(self) -> grpc.GenericRpcHandler:
        request, response = discovery_pb2.DiscoveryRequest, discovery_pb2.DiscoveryResponse
        delta_request, delta_response = discovery_pb2.DeltaDiscoveryRequest, discovery_pb2.DeltaDiscoveryResponse
        handlers: dict[str, grpc.RpcMethodHandler[Any, Any]] = {
            "StreamSecrets": grpc.stream_stream_rpc_method_handler(
                self.stream_secrets, request.FromString, response.SerializeToString
            ),
            "DeltaSecrets": grpc.stream_stream_rpc_method_handler(
                self.delta_secrets, delta_request.FromString, delta_response.SerializeToString
            ),
            "FetchSecrets": grpc.unary_unary_rpc_method_handler(self.fetch_secrets, None, response.SerializeToString),
        }
        methods = set(sds_pb2.DESCRIPTOR.services_by_name["SecretDiscoveryService"].methods_by_name)
        if methods != set(handlers):
            raise RuntimeError(f"{SDS_SERVICE} has the methods {sorted(methods)}, the agent serves {sorted(handlers)}")
        return grpc.method_handlers_generic_handler(SDS_SERVICE, handlers)

    async def stream_secrets(self, requests: AsyncIterator[discovery_pb2.DiscoveryRequest], context: Context) -> None:
        await self._run("sds", SotwStream, requests, context, lambda r: list(r.resource_names))

    async def delta_secrets(
        self, requests: AsyncIterator[discovery_pb2.DeltaDiscoveryRequest], context: Context
    ) -> None:
        await self._run("sds-delta", DeltaStream, requests, context, lambda r: list(r.resource_names_subscribe))

    def _session(self, context: Context) -> tuple[Session, GrantAuthorizer]:
        caller = self.callers.lookup(context.peer())
        if caller is None:
            raise RequestError(grpc.StatusCode.PERMISSION_DENIED, "the caller was not attested")
        grants = granted(self.entries, caller.selectors)
        if not grants:
            raise RequestError(
                grpc.StatusCode.PERMISSION_DENIED, f"no registration entry matches this caller ({caller.describe()})"
            )
        authorizer = GrantAuthorizer(grants, self.keeper.trust_domain)
        env = Env(
            self.cache,
            self.acks,
            authorizer,
            metrics=self.metrics,
            served_types=frozenset({SECRET}),
            clock=self.keeper.now,
        )
        return Session(env, grants[0], caller.describe(), SECRET), authorizer

    @staticmethod
    def _check_names(session: Session, authorizer: GrantAuthorizer, names: Sequence[str]) -> None:
        denied = [name for name in names if authorizer.resource_denied(session.identity, "", SECRET, name)]
        if denied:
            reason = authorizer.resource_denied(session.identity, "", SECRET, denied[0]) or ""
            more = f" (and {len(denied) - 1} more)" if len(denied) > 1 else ""
            session.deny(f"Secret {denied[0]}{more}", "Secret", reason)
            raise RequestError(grpc.StatusCode.PERMISSION_DENIED, reason + more)

    async def _run(
        self,
        service: str,
        make: Callable[[Session], _Protocol[Req, Resp]],
        requests: AsyncIterator[Req],
        context: Context,
        names_of: Callable[[Req], list[str]],
    ) -> None:
        """One stream: requests in, responses out whenever the protocol has some (after a request or a change of
        the secrets), until the client closes it or a request is refused."""
        session: Session | None = None
        wake = asyncio.Event()
        pending: list[Req] = []
        ended: list[str | None] = []
        reader: asyncio.Task[None] | None = None
        cancel_watch: Callable[[], None] | None = None
        node: str | None = None
        self.metrics.streams.labels(service).inc()
        try:
            session, authorizer = self._session(context)
            protocol = make(session)
            loop = asyncio.get_running_loop()

            def changed(node_id: str, type_urls: frozenset[str]) -> None:
                loop.call_soon_threadsafe(wake.set)

            async def read() -> None:
                why: str | None = None
                try:
                    async for request in requests:
                        pending.append(request)
                        wake.set()
                except DecodeError:
                    why = "malformed request: it is not a valid discovery request message"
                finally:
                    ended.append(why)
                    wake.set()

            reader = asyncio.create_task(read())
            while True:
                await wake.wait()
                wake.clear()
                while pending:
                    request = pending.pop(0)
                    self._check_names(session, authorizer, names_of(request))
                    protocol.on_request(request)
                    if cancel_watch is None and session.node_id is not None:
                        node = session.node_id
                        self._nodes[node] += 1
                        cancel_watch = self.cache.watch(node, changed)
                for response in protocol.responses():
                    await context.write(response)
                if ended:
                    if ended[0] is not None:
                        raise RequestError(grpc.StatusCode.INVALID_ARGUMENT, ended[0])
                    return
        except RequestError as err:
            self.metrics.refused.labels(err.code.name).inc()
            who = session.peer if session is not None else context.peer()
            log.warning("refused an SDS stream (%s): %s", who, escaped(err.message))
            await context.abort(err.code, err.message)
        finally:
            if reader is not None:
                reader.cancel()
            if cancel_watch is not None:
                cancel_watch()
            if node is not None:
                self._nodes[node] -= 1
                if self._nodes[node] <= 0:
                    del self._nodes[node]
                    self.acks.forget(node)  # bounded: only the nodes with a stream open are remembered
            self.metrics.streams.labels(service).dec()

    async def fetch_secrets(self, data: bytes, context: Context) -> discovery_pb2.DiscoveryResponse:
        try:
            session, authorizer = self._session(context)
            try:
                request = discovery_pb2.DiscoveryRequest.FromString(data)
            except DecodeError:
                raise RequestError(
                    grpc.StatusCode.INVALID_ARGUMENT, "malformed request: it is not a valid discovery request message"
                ) from None
            session.bind_node(request.node.id)
            type_url = session.check_type(request.type_url)
            session.check_names(type_url, request.resource_names)
            self._check_names(session, authorizer, request.resource_names)
        except RequestError as err:
            self.metrics.refused.labels(err.code.name).inc()
            log.warning("refused FetchSecrets (%s): %s", context.peer(), escaped(err.message))
            await context.abort(err.code, err.message)
            raise  # abort() raises; never reached
        snap = session.snapshot(type_url)
        selected = session.select(type_url, snap, frozenset(request.resource_names))
        session.sent(type_url)
        return discovery_pb2.DiscoveryResponse(
            version_info=snap.version, resources=[r.body for r in selected.values()], type_url=type_url
        )
