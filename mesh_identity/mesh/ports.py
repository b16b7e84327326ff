"""The ports of a sidecar inside a pod (Kubernetes): one definition for the registry's translation, the capture
rules of injection and the Envoy config of captured traffic."""

from __future__ import annotations

INBOUND_PORT = 15003  # the sidecar's mTLS listener on the pod's IP (OSM's inbound port); captured inbound lands here
OUTBOUND_CAPTURE_PORT = 15001  # the sidecar's outbound capture listener (original_dst): captured outbound lands here
ADMIN_PORT = 15000  # Envoy's admin, on loopback only
STATS_PORT = 15090  # Envoy's Prometheus endpoint, scraped from outside the pod
AGENT_HEALTH_PORT = 15021  # the node agent's /healthz and /metrics in an injected pod, on loopback only
