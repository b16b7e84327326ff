"""The mesh integration layer: the protocol server fed from the registry and the rotation engine.

:mod:`~xds_sds.mesh.publisher` (:class:`~xds_sds.mesh.publisher.MeshPublisher`: the mesh model, the SVIDs
and the bundle turned into per-proxy snapshots on a :class:`~xds_sds.protocol.server.DiscoveryServer`),
:mod:`~xds_sds.mesh.component` (:class:`~xds_sds.mesh.component.XdsComponent`: the xDS part of ``serve``,
subscribed to the workload registry and the engine) and :mod:`~xds_sds.mesh.sidecars` (the bootstrap
certificates of local sidecars, kept renewed).
"""
