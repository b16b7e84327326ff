"""The running server of ``mesh-identity serve``: the service, its HTTP endpoint, status and metrics.

:mod:`~mesh_identity.server.service` (rotation engine + registry membership + root rotation + components such
as the xDS server), :mod:`~mesh_identity.server.status` (one snapshot for ``/status`` and the metrics),
:mod:`~mesh_identity.server.document` (the ``/status`` document as typed values, ``to_json``/``from_json``),
:mod:`~mesh_identity.server.metrics` (Prometheus), :mod:`~mesh_identity.server.endpoint` (the monitoring and
admin listener) and :mod:`~mesh_identity.server.client` (what the CLI uses to talk to a running server).
"""
