"""The control plane's signing API (``xds_sds/proto/signing.proto``): CSRs in, X.509-SVIDs and JWT-SVIDs out,
for callers authenticated by their SVID, a one-time join token or a Kubernetes service-account token."""
