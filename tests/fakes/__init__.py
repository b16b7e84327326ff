"""Servers for tests that speak the wire APIs of what cannot be installed here (Vault, Kubernetes)."""
