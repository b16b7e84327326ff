"""SDS secrets: a workload's certificate and key, and a trust domain's bundle as a validation context.

Names follow :mod:`xds_sds.protocol.auth`: the certificate secret is named by the SPIFFE ID, the bundle by the trust
domain's ID. The key is inlined in the secret, which only ever goes to the proxy of that identity.
"""

from __future__ import annotations

from envoy.config.core.v3 import base_pb2
from envoy.extensions.transport_sockets.tls.v3 import common_pb2, secret_pb2

from mesh_identity.svid import TrustBundle, X509Svid
from xds_sds.protocol.auth import bundle_secret_name, tls_secret_name


def tls_certificate_secret(svid: X509Svid) -> secret_pb2.Secret:
    """The ``TlsCertificate`` secret of ``svid``: its chain (leaf first) and private key."""
    return secret_pb2.Secret(
        name=tls_secret_name(svid.spiffe_id),
        tls_certificate=common_pb2.TlsCertificate(
            certificate_chain=base_pb2.DataSource(inline_bytes=svid.cert_chain_pem()),
            private_key=base_pb2.DataSource(inline_bytes=svid.key_pem()),
        ),
    )


def validation_context_secret(bundle: TrustBundle) -> secret_pb2.Secret:
    """The validation context secret of a trust domain: its roots as trusted CAs."""
    return secret_pb2.Secret(
        name=bundle_secret_name(bundle.trust_domain),
        validation_context=common_pb2.CertificateValidationContext(
            trusted_ca=base_pb2.DataSource(inline_bytes=bundle.pem())
        ),
    )


def bundle_roots_pem(secret: secret_pb2.Secret) -> bytes:
    """The trusted roots (PEM) inside a validation context secret."""
    return bytes(secret.validation_context.trusted_ca.inline_bytes)
