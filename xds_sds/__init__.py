"""Envoy delivery: xDS (ADS over mTLS) and SDS for the mesh's sidecars, in three layers.

* :mod:`xds_sds.protocol`: the gRPC discovery server, snapshot cache, ACK tracking, peer authorisation;
* :mod:`xds_sds.resources`: Envoy listeners, clusters, routes, RBAC, TLS contexts, secrets and bootstraps,
  built from the mesh model;
* :mod:`xds_sds.mesh`: the integration: the workload registry and the rotation engine feed the server.

Each layer imports only the ones below it (an import-linter contract holds this). Part of mesh-identity; it
depends on the core (``mesh_identity``), never the other way round.
"""
