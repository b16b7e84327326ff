"""The xDS protocol layer: the ADS (SotW and delta) and SDS gRPC server over mTLS, and what it serves from.

:mod:`~xds_sds.protocol.cache` (per-proxy versioned snapshots), :mod:`~xds_sds.protocol.server`
(:class:`~xds_sds.protocol.server.DiscoveryServer`, grpc.aio on its own loop), :mod:`~xds_sds.protocol.sotw`
and :mod:`~xds_sds.protocol.delta` (the two stream state machines), :mod:`~xds_sds.protocol.session` (what
every stream shares), :mod:`~xds_sds.protocol.acks` (who ACKed what), :mod:`~xds_sds.protocol.auth` (peer
identity, per-node authorisation, secret names), :mod:`~xds_sds.protocol.credentials` (the server's
reloadable TLS material), :mod:`~xds_sds.protocol.typeurls` and :mod:`~xds_sds.protocol.metrics`.

Knows nothing of meshes or Envoy resource contents: it serves opaque packed resources per node.
"""
