"""TLS contexts of the sidecars: every hop presents the workload SVID and checks the peer's SPIFFE ID.

Certificates and bundles are never inlined here: the contexts name SDS secrets (see :mod:`xds_sds.resources.secrets`),
so a rotation replaces a secret and nothing else. Where the certificate secret comes from is the mesh's
``xds.secrets`` (:class:`~mesh_identity.config.SecretSource`):

* ``control-plane``: over the proxy's ADS stream, from the control plane, which made its key;
* ``agent``: from the node agent next to the proxy, over SDS on the static cluster :data:`AGENT_CLUSTER` (a
  ``pipe`` address: the agent's Unix socket, see :mod:`xds_sds.resources.bootstrap`); the key never leaves
  that host.

The trust bundle (public: roots only) comes over ADS in both modes, under the same name the agent would use:
the sidecars' acknowledgements of it are the evidence root rotation waits for.
"""

from __future__ import annotations

from envoy.config.core.v3 import base_pb2, config_source_pb2, grpc_service_pb2
from envoy.extensions.transport_sockets.tls.v3 import common_pb2, secret_pb2, tls_pb2
from envoy.type.matcher.v3 import string_pb2
from google.protobuf import wrappers_pb2

from mesh_identity.config import SecretSource
from mesh_identity.spiffe import SpiffeId
from xds_sds.protocol.auth import bundle_secret_name, tls_secret_name
from xds_sds.resources.packing import ads, pack

TRANSPORT_SOCKET = "envoy.transport_sockets.tls"
AGENT_CLUSTER = "mesh-identity-agent"  # the bootstrap's static cluster whose one endpoint is the agent's SDS socket


def agent_sds() -> config_source_pb2.ConfigSource:
    """Fetch from the node agent: SDS (state of the world, v3) over gRPC on the cluster :data:`AGENT_CLUSTER`."""
    api = config_source_pb2.ApiConfigSource
    return config_source_pb2.ConfigSource(
        api_config_source=api(
            api_type=api.GRPC,
            transport_api_version=config_source_pb2.ApiVersion.V3,
            grpc_services=[
                grpc_service_pb2.GrpcService(
                    envoy_grpc=grpc_service_pb2.GrpcService.EnvoyGrpc(cluster_name=AGENT_CLUSTER)
                )
            ],
        ),
        resource_api_version=config_source_pb2.ApiVersion.V3,
    )


def certificate_source(secrets: SecretSource) -> config_source_pb2.ConfigSource:
    """Where a sidecar fetches its certificate secret: the ADS stream, or the node agent (see the module docstring)."""
    return agent_sds() if secrets is SecretSource.AGENT else ads()


def uri_san_matcher(*, exact: str | None = None, prefix: str | None = None) -> common_pb2.SubjectAltNameMatcher:
    matcher = string_pb2.StringMatcher(exact=exact) if exact is not None else string_pb2.StringMatcher(prefix=prefix)
    return common_pb2.SubjectAltNameMatcher(san_type=common_pb2.SubjectAltNameMatcher.URI, matcher=matcher)


def common_context(
    identity: SpiffeId,
    peers: list[common_pb2.SubjectAltNameMatcher],
    secrets: SecretSource = SecretSource.CONTROL_PLANE,
) -> tls_pb2.CommonTlsContext:
    """Present ``identity``'s SVID (fetched as ``secrets`` says); accept peers chaining to the trust bundle whose
    URI SAN matches ``peers``."""
    return tls_pb2.CommonTlsContext(
        tls_params=common_pb2.TlsParameters(tls_minimum_protocol_version=common_pb2.TlsParameters.TLSv1_2),
        tls_certificate_sds_secret_configs=[
            secret_pb2.SdsSecretConfig(name=tls_secret_name(identity), sds_config=certificate_source(secrets))
        ],
        combined_validation_context=tls_pb2.CommonTlsContext.CombinedCertificateValidationContext(
            default_validation_context=common_pb2.CertificateValidationContext(match_typed_subject_alt_names=peers),
            validation_context_sds_secret_config=secret_pb2.SdsSecretConfig(
                name=bundle_secret_name(identity.trust_domain), sds_config=ads()
            ),
        ),
    )


def downstream(
    identity: SpiffeId,
    peers: list[common_pb2.SubjectAltNameMatcher] | None = None,
    secrets: SecretSource = SecretSource.CONTROL_PLANE,
) -> base_pb2.TransportSocket:
    """Server side of a sidecar's inbound port: a client certificate from the mesh is required.

    ``peers`` defaults to any SPIFFE ID of the trust domain; per-identity access control is the job of the
    RBAC filters (they match the same URI SAN).
    """
    accepted = peers if peers is not None else [uri_san_matcher(prefix=f"{identity.trust_domain.id}/")]
    context = tls_pb2.DownstreamTlsContext(
        common_tls_context=common_context(identity, accepted, secrets),
        require_client_certificate=wrappers_pb2.BoolValue(value=True),
    )
    return base_pb2.TransportSocket(name=TRANSPORT_SOCKET, typed_config=pack(context))


def upstream(
    identity: SpiffeId, peer: SpiffeId, secrets: SecretSource = SecretSource.CONTROL_PLANE
) -> base_pb2.TransportSocket:
    """Client side towards an upstream sidecar: present ``identity``, accept only ``peer``'s SPIFFE ID."""
    context = tls_pb2.UpstreamTlsContext(
        common_tls_context=common_context(identity, [uri_san_matcher(exact=str(peer))], secrets)
    )
    return base_pb2.TransportSocket(name=TRANSPORT_SOCKET, typed_config=pack(context))
