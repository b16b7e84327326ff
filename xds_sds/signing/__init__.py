"""The control plane's signing API (``xds_sds/proto/signing.proto``): CSRs in, X.509-SVIDs and JWT-SVIDs out,
for callers authenticated by their SVID, a one-time join token or a Kubernetes service-account token.

* :mod:`~xds_sds.signing.component`: the part of ``mesh-identity serve`` (a ``Service`` component);
* :mod:`~xds_sds.signing.server`: the gRPC server, its two listeners (mutual TLS; attestation over TLS);
* :mod:`~xds_sds.signing.signer`: what it decides and issues, and the audit of every decision;
* :mod:`~xds_sds.signing.policy`: who may obtain which identity (the registry's hosts);
* :mod:`~xds_sds.signing.peers`: the per-call check of the caller's certificate;
* :mod:`~xds_sds.signing.tokenreview`: Kubernetes tokens, checked with TokenReview;
* :mod:`~xds_sds.signing.tls`: the attestation listener's TLS (and why it takes no client certificate);
* :mod:`~xds_sds.signing.keytimer`: the JWT key rotation timer; :mod:`~xds_sds.signing.metrics`: its metrics.
"""
