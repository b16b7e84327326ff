"""The cert-manager CA provider: certificates signed by a cert-manager Issuer or ClusterIssuer through
CertificateRequests, with the ``kubernetes`` client (see :mod:`providers.cert_manager.provider`)."""
