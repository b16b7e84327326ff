"""TLS contexts of the sidecars: every hop presents the workload SVID and checks the peer's SPIFFE ID.

Certificates and bundles are never inlined here: the contexts name SDS secrets (see :mod:`xds_sds.resources.secrets`)
that arrive over the proxy's ADS stream, so a rotation replaces a secret and nothing else.
"""

from __future__ import annotations

from envoy.config.core.v3 import base_pb2
from envoy.extensions.transport_sockets.tls.v3 import common_pb2, secret_pb2, tls_pb2
from envoy.type.matcher.v3 import string_pb2
from google.protobuf import wrappers_pb2

from mesh_identity.spiffe import SpiffeId
from xds_sds.protocol.auth import bundle_secret_name, tls_secret_name
from xds_sds.resources.packing import ads, pack

TRANSPORT_SOCKET = "envoy.transport_sockets.tls"


def uri_san_matcher(*, exact: str | None = None, prefix: str | None = None) -> common_pb2.SubjectAltNameMatcher:
    matcher = string_pb2.StringMatcher(exact=exact) if exact is not None else string_pb2.StringMatcher(prefix=prefix)
    return common_pb2.SubjectAltNameMatcher(san_type=common_pb2.SubjectAltNameMatcher.URI, matcher=matcher)


def common_context(identity: SpiffeId, peers: list[common_pb2.SubjectAltNameMatcher]) -> tls_pb2.CommonTlsContext:
    """Present ``identity``'s SVID; accept peers chaining to the trust bundle whose URI SAN matches ``peers``."""
    return tls_pb2.CommonTlsContext(
        tls_params=common_pb2.TlsParameters(tls_minimum_protocol_version=common_pb2.TlsParameters.TLSv1_2),
        tls_certificate_sds_secret_configs=[
            secret_pb2.SdsSecretConfig(name=tls_secret_name(identity), sds_config=ads())
        ],
        combined_validation_context=tls_pb2.CommonTlsContext.CombinedCertificateValidationContext(
            default_validation_context=common_pb2.CertificateValidationContext(match_typed_subject_alt_names=peers),
            validation_context_sds_secret_config=secret_pb2.SdsSecretConfig(
                name=bundle_secret_name(identity.trust_domain), sds_config=ads()
            ),
        ),
    )


def downstream(
    identity: SpiffeId, peers: list[common_pb2.SubjectAltNameMatcher] | None = None
) -> base_pb2.TransportSocket:
    """Server side of a sidecar's inbound port: a client certificate from the mesh is required.

    ``peers`` defaults to any SPIFFE ID of the trust domain; per-identity access control is the job of the
    RBAC filters (they match the same URI SAN).
    """
    accepted = peers if peers is not None else [uri_san_matcher(prefix=f"{identity.trust_domain.id}/")]
    context = tls_pb2.DownstreamTlsContext(
        common_tls_context=common_context(identity, accepted),
        require_client_certificate=wrappers_pb2.BoolValue(value=True),
    )
    return base_pb2.TransportSocket(name=TRANSPORT_SOCKET, typed_config=pack(context))


def upstream(identity: SpiffeId, peer: SpiffeId) -> base_pb2.TransportSocket:
    """Client side towards an upstream sidecar: present ``identity``, accept only ``peer``'s SPIFFE ID."""
    context = tls_pb2.UpstreamTlsContext(
        common_tls_context=common_context(identity, [uri_san_matcher(exact=str(peer))])
    )
    return base_pb2.TransportSocket(name=TRANSPORT_SOCKET, typed_config=pack(context))
