"""The Kubernetes API test server for the built-in CA's Secret store (``store: kubernetes``): it serves Secrets
validated on every write against the official schemas (``kubernetes_validate`` strict, the versions of
:data:`tests.fakes.kube.workloads.SCHEMA_VERSIONS`), so every Secret the store writes is one a real API server
takes; providers reach it through a kubeconfig, with the real ``kubernetes`` client."""

from __future__ import annotations

import base64
import dataclasses
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from providers.builtin.provider import BuiltinProvider
from tests.fakes.kube import SECRET, KubeServer
from tests.fakes.kube.workloads import checked

NAMESPACE_NAME = "mesh-identity"
SECRET_NAME = "mesh-identity-ca"
PASSPHRASE = "correct horse battery staple"
VALIDATED_SECRET = dataclasses.replace(SECRET, validate=checked())


@dataclasses.dataclass
class SecretCluster:
    """The server, a kubeconfig for it, and the Secret as stored."""

    server: KubeServer
    kubeconfig: Path
    key_file: Path

    def secret(self, namespace: str = NAMESPACE_NAME, name: str = SECRET_NAME) -> dict[str, Any] | None:
        found = [o for o in self.server.objects(VALIDATED_SECRET, namespace) if o["metadata"]["name"] == name]
        return found[0] if found else None

    def data(self, namespace: str = NAMESPACE_NAME) -> dict[str, bytes]:
        secret = self.secret(namespace)
        assert secret is not None
        return {k: base64.b64decode(v) for k, v in secret["data"].items()}

    def manifest(self, namespace: str = NAMESPACE_NAME) -> dict[str, Any]:
        loaded: dict[str, Any] = json.loads(self.data(namespace)["ca.json"])
        return loaded


MakeProvider = Callable[..., BuiltinProvider]
