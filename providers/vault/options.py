"""The Vault provider's options (``ca.provider_options``) and the checks across them.

Example::

    ca:
      provider: vault
      mode: intermediate            # or per-workload
      provider_options:
        address: https://vault.example.org:8200
        namespace: team-a           # Vault Enterprise, optional
        auth_method: approle        # token (default), approle or kubernetes
        approle_role_id: 7f0c...
        approle_secret_id_file: /etc/mesh-identity/vault-secret-id
        ca_cert: /etc/mesh-identity/vault-ca.pem
        pki_mount: pki_int
        pki_role: spiffe            # needed in per-workload mode

Secrets never sit in the config: the token, secret ID and service-account JWT are read from files (or, for a
token, an environment variable) each time the provider logs in, so a rotated file is picked up.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from mesh_identity.errors import ConfigError
from mesh_identity.ports import is_loopback
from mesh_identity.provider import OptionSpec, OptionType

PREFIX = "ca.provider_options"
KUBERNETES_JWT = Path("/var/run/secrets/kubernetes.io/serviceaccount/token")
AUTH_METHODS = ("token", "approle", "kubernetes")

OPTIONS = (
    OptionSpec("address", OptionType.STRING, "Vault's address, e.g. https://vault.example.org:8200", required=True),
    OptionSpec("namespace", OptionType.STRING, "Vault Enterprise namespace the mount and auth method live in"),
    OptionSpec(
        "auth_method",
        OptionType.STRING,
        "how to log in: token, approle or kubernetes",
        default="token",
        choices=AUTH_METHODS,
    ),
    OptionSpec("token_file", OptionType.PATH, "token auth: file holding the token (re-read when the token expires)"),
    OptionSpec(
        "token_env", OptionType.STRING, "token auth: environment variable holding the token", default="VAULT_TOKEN"
    ),
    OptionSpec("approle_role_id", OptionType.STRING, "approle auth: the role ID"),
    OptionSpec("approle_secret_id_file", OptionType.PATH, "approle auth: file holding the secret ID"),
    OptionSpec("approle_mount", OptionType.STRING, "approle auth: where the method is mounted", default="approle"),
    OptionSpec("kubernetes_role", OptionType.STRING, "kubernetes auth: the Vault role to log in as"),
    OptionSpec(
        "kubernetes_jwt_file",
        OptionType.PATH,
        "kubernetes auth: the service-account token file",
        default=KUBERNETES_JWT,
    ),
    OptionSpec(
        "kubernetes_mount", OptionType.STRING, "kubernetes auth: where the method is mounted", default="kubernetes"
    ),
    OptionSpec(
        "ca_cert", OptionType.PATH, "PEM bundle of the CA(s) that signed Vault's TLS certificate (default: system CAs)"
    ),
    OptionSpec("client_cert", OptionType.PATH, "client certificate (PEM) when Vault's listener asks for one"),
    OptionSpec("client_key", OptionType.PATH, "the client certificate's private key (PEM)"),
    OptionSpec(
        "tls_server_name", OptionType.STRING, "name to verify in Vault's certificate, when not the address's host"
    ),
    OptionSpec(
        "tls_skip_verify", OptionType.BOOL, "not supported: Vault's certificate is always verified", default=False
    ),
    OptionSpec("pki_mount", OptionType.STRING, "path of the PKI secrets engine", default="pki"),
    OptionSpec("pki_role", OptionType.STRING, "PKI role for per-workload signing (<pki_mount>/sign/<pki_role>)"),
    OptionSpec(
        "common_name", OptionType.STRING, "per-workload: common_name sent with each CSR (for roles with require_cn)"
    ),
    OptionSpec("trust_bundle_file", OptionType.PATH, "extra root CA(s), when Vault's ca_chain does not end at a root"),
    OptionSpec(
        "request_timeout", OptionType.DURATION, "timeout of one request to Vault", default=timedelta(seconds=10)
    ),
)


@dataclass(frozen=True, slots=True)
class VaultSettings:
    """Validated, typed options."""

    address: str
    namespace: str | None = None
    auth_method: str = "token"
    token_file: Path | None = None
    token_env: str = "VAULT_TOKEN"  # noqa: S105 - the name of a variable, not a secret
    approle_role_id: str | None = None
    approle_secret_id_file: Path | None = None
    approle_mount: str = "approle"
    kubernetes_role: str | None = None
    kubernetes_jwt_file: Path = KUBERNETES_JWT
    kubernetes_mount: str = "kubernetes"
    ca_cert: Path | None = None
    client_cert: Path | None = None
    client_key: Path | None = None
    tls_server_name: str | None = None
    pki_mount: str = "pki"
    pki_role: str | None = None
    common_name: str | None = None
    trust_bundle_file: Path | None = None
    request_timeout: timedelta = timedelta(seconds=10)

    @classmethod
    def from_options(cls, options: Mapping[str, Any]) -> VaultSettings:
        """Build from options that passed the schema; ConfigError with every problem, one per line."""
        found = problems(options)
        if found:
            raise ConfigError("\n".join(found))
        values = {k: v for k, v in options.items() if k in cls.__dataclass_fields__ and v is not None}
        values["address"] = str(values["address"]).rstrip("/")
        for mount in ("pki_mount", "approle_mount", "kubernetes_mount"):
            if mount in values:
                values[mount] = str(values[mount]).strip("/")
        if values.get("namespace"):
            values["namespace"] = str(values["namespace"]).strip("/")
        return cls(**values)

    @property
    def tls(self) -> bool:
        return self.address.startswith("https://")

    @property
    def namespace_label(self) -> str:
        """`` in namespace 'x'`` or nothing, for messages."""
        return f" in namespace {self.namespace!r}" if self.namespace else ""


def problems(options: Mapping[str, Any]) -> list[str]:
    """What is wrong across the options (each a message naming the option key); empty when all is well."""
    found: list[str] = []
    address = str(options.get("address") or "")
    parts = urlsplit(address)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        found.append(f"{PREFIX}.address: {address!r} is not an http(s)://host[:port] URL")
    elif parts.path.strip("/"):
        found.append(f"{PREFIX}.address: {address!r} has a path; give only scheme, host and port")
    elif parts.scheme == "http" and not is_loopback(parts.hostname):
        found.append(
            f"{PREFIX}.address: {address!r} is plaintext HTTP to another host, which would send the Vault token "
            "in clear; use https:// (plain http is accepted on loopback only)"
        )
    if options.get("tls_skip_verify"):
        found.append(
            f"{PREFIX}.tls_skip_verify: not supported: Vault's TLS certificate is always verified; set ca_cert to "
            "the CA that signed it (and tls_server_name if its name differs from the address)"
        )
    if parts.scheme == "http":
        for key in ("ca_cert", "client_cert", "client_key", "tls_server_name"):
            if options.get(key):
                found.append(f"{PREFIX}.{key}: set, but address {address!r} is not https://")
    if bool(options.get("client_cert")) != bool(options.get("client_key")):
        found.append(f"{PREFIX}.client_cert: client_cert and client_key go together; give both or neither")
    method = options.get("auth_method") or "token"
    if method == "approle":
        for key in ("approle_role_id", "approle_secret_id_file"):
            if not options.get(key):
                found.append(f"{PREFIX}.{key}: required with auth_method approle")
    if method == "kubernetes" and not options.get("kubernetes_role"):
        found.append(f"{PREFIX}.kubernetes_role: required with auth_method kubernetes")
    if method != "approle":
        found += [f"{PREFIX}.{k}: only used with auth_method approle" for k in ("approle_role_id",) if options.get(k)]
    if method != "kubernetes" and options.get("kubernetes_role"):
        found.append(f"{PREFIX}.kubernetes_role: only used with auth_method kubernetes")
    return found
