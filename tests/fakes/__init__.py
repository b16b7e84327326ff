"""Servers for tests that speak the wire APIs of what cannot be installed here: :mod:`tests.fakes.vault`
(HashiCorp Vault), :mod:`tests.fakes.kube` (a Kubernetes API server) and :mod:`tests.fakes.cert_manager`
(cert-manager's CRDs and controllers, on the Kubernetes one)."""
