"""Sidecar injection: the admission webhook that adds the Envoy sidecar, the node agent and the init container
whose iptables rules (:mod:`~mesh_identity.inject.rules`) send the pod's traffic through Envoy."""
