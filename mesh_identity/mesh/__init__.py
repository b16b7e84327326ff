"""The mesh model: services, their identities, sidecars, addresses and upstreams, and SMI policy.

:mod:`~mesh_identity.mesh.model` (the typed model and the mesh file's parser), :mod:`~mesh_identity.mesh.smi`
(SMI documents parsed into :mod:`~mesh_identity.mesh.policy`), :mod:`~mesh_identity.mesh.regex` (what RE2, and
so Envoy, accepts). Every workload registry (:mod:`mesh_identity.registry`) describes its workloads in this
model; the xDS layer builds Envoy config from it.
"""
