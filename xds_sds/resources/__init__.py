"""Envoy resource builders: what one sidecar receives, built from the mesh model, and its bootstrap.

:mod:`~xds_sds.resources.proxy` (everything one sidecar gets), :mod:`~xds_sds.resources.listeners`,
:mod:`~xds_sds.resources.clusters`, :mod:`~xds_sds.resources.routes`, :mod:`~xds_sds.resources.rbac` (SMI
access control), :mod:`~xds_sds.resources.tls` and :mod:`~xds_sds.resources.secrets` (SDS),
:mod:`~xds_sds.resources.names`, :mod:`~xds_sds.resources.packing` (Any packing, addresses, config sources) and
:mod:`~xds_sds.resources.bootstrap` (a sidecar's Envoy bootstrap). Pure functions of the model: no I/O but the
bootstrap files.
"""
