"""Where the Vault provider tests run, set up the same way on both: through Vault's HTTP API with hvac.

A :class:`VaultTarget` is a Vault (the test server, or the real one of ``VAULT_ADDR``/``VAULT_TOKEN``) with a
fresh PKI mount (a root CA, or an intermediate under a root mount), a SPIFFE role, and a policy that allows
exactly what the provider needs. :func:`tear_down` removes them again, so a shared dev Vault is left clean.
"""

from __future__ import annotations

import json
import secrets
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import hvac

from mesh_identity.keys import KeyType
from mesh_identity.provider import Mode, ProviderContext
from mesh_identity.spiffe import TrustDomain
from providers.vault.provider import VaultProvider
from tests.fakes.vault import VaultServer

TRUST_DOMAIN = TrustDomain("example.org")
ROLE = "spiffe"


def policy_hcl(paths: dict[str, Iterable[str]]) -> str:
    """An ACL policy in HCL: ``path "x" { capabilities = ["update"] }`` per path."""
    return "".join(f'path "{path}" {{\n  capabilities = {json.dumps(list(caps))}\n}}\n' for path, caps in paths.items())


@dataclass
class VaultTarget:
    address: str
    admin_token: str
    namespace: str | None
    ca_cert: str | None
    server: VaultServer | None
    mount: str
    role: str = ROLE
    policy: str = ""
    mounts: list[str] = field(default_factory=list)
    policies: list[str] = field(default_factory=list)

    def admin(self) -> hvac.Client:
        return hvac.Client(
            url=self.address, token=self.admin_token, namespace=self.namespace, verify=self.ca_cert or True
        )

    def token(self, *, ttl: str = "1h", policies: Iterable[str] | None = None, **extra: Any) -> str:
        """A token with the provider's policy (or ``policies``), created through the API like an operator would."""
        answer = self.admin().auth.token.create(
            policies=list(policies) if policies is not None else [self.policy], ttl=ttl, **extra
        )
        return str(answer["auth"]["client_token"])

    def token_file(self, directory: Path, **token_args: Any) -> Path:
        path = directory / f"vault-token-{secrets.token_hex(3)}"
        path.write_text(self.token(**token_args) + "\n")
        path.chmod(0o600)
        return path

    def options(self, directory: Path, **overrides: Any) -> dict[str, Any]:
        """Provider options for token auth with a fresh token of the provider's policy."""
        options: dict[str, Any] = {
            "address": self.address,
            "pki_mount": self.mount,
            "pki_role": self.role,
        }
        if self.namespace:
            options["namespace"] = self.namespace
        if self.ca_cert:
            options["ca_cert"] = self.ca_cert
        if "token_file" not in overrides and overrides.get("auth_method", "token") == "token":
            options["token_file"] = str(self.token_file(directory))
        options.update(overrides)
        return options

    def provider(self, directory: Path, mode: Mode = Mode.INTERMEDIATE, **overrides: Any) -> VaultProvider:
        from providers.vault.provider import SPEC

        context = ProviderContext(
            trust_domain=TRUST_DOMAIN,
            state_dir=directory,
            key_type=KeyType.ECDSA_P256,
            mode=mode,
            clock=lambda: datetime.now(UTC),
        )
        return VaultProvider(context, SPEC.validate_options(self.options(directory, **overrides)))

    def add_role(self, name: str, **params: Any) -> None:
        self.admin().secrets.pki.create_or_update_role(name, params, mount_point=self.mount)


def _mount(admin: hvac.Client, path: str, max_ttl: str, target: VaultTarget) -> None:
    admin.sys.enable_secrets_engine("pki", path=path, config={"max_lease_ttl": max_ttl})
    target.mounts.append(path)


def set_up(
    address: str,
    admin_token: str,
    *,
    namespace: str | None = None,
    ca_cert: str | None = None,
    server: VaultServer | None = None,
    intermediate: bool = False,
    root_ttl: str = "87600h",
    role_max_ttl: str = "24h",
) -> VaultTarget:
    """A fresh mount (``mi-test-<random>``) with a root CA, or (``intermediate``) an intermediate CA signed by a
    second root mount, Vault knowing both so ``ca_chain`` has two certificates; a role; a policy."""
    suffix = secrets.token_hex(4)
    target = VaultTarget(address, admin_token, namespace, ca_cert, server, mount=f"mi-test-{suffix}")
    admin = target.admin()
    _mount(admin, target.mount, "87600h", target)
    pki = admin.secrets.pki
    if intermediate:
        root_mount = f"mi-test-root-{suffix}"
        _mount(admin, root_mount, "87600h", target)
        root = pki.generate_root(
            "internal",
            "mesh-identity test root",
            extra_params={"ttl": root_ttl, "key_type": "ec"},
            mount_point=root_mount,
        )["data"]["certificate"]
        csr = pki.generate_intermediate(
            "internal",
            "mesh-identity test Vault intermediate",
            extra_params={"key_type": "ec"},
            mount_point=target.mount,
        )["data"]["csr"]
        signed = pki.sign_intermediate(
            csr, "mesh-identity test Vault intermediate", extra_params={"ttl": root_ttl}, mount_point=root_mount
        )["data"]["certificate"]
        pki.set_signed_intermediate(signed.strip() + "\n" + root.strip() + "\n", mount_point=target.mount)
    else:
        pki.generate_root(
            "internal",
            "mesh-identity test root",
            extra_params={"ttl": root_ttl, "key_type": "ec"},
            mount_point=target.mount,
        )
    target.add_role(
        ROLE,
        allowed_uri_sans=f"spiffe://{TRUST_DOMAIN}/*",
        require_cn=False,
        key_type="any",
        max_ttl=role_max_ttl,
    )
    target.policy = f"mi-test-{suffix}"
    admin.sys.create_or_update_policy(
        target.policy,
        policy_hcl(
            {
                f"{target.mount}/root/sign-intermediate": ["update"],
                f"{target.mount}/sign/*": ["update"],
                f"{target.mount}/roles/*": ["read"],
                f"sys/mounts/{target.mount}/tune": ["read"],
            }
        ),
    )
    target.policies.append(target.policy)
    return target


def tear_down(target: VaultTarget) -> None:
    admin = target.admin()
    for mount in reversed(target.mounts):
        admin.sys.disable_secrets_engine(mount)
    for policy in target.policies:
        admin.sys.delete_policy(policy)


# --- shortcuts for tests that need the test server's controls ------------------------------------------------

MESH_POLICY = {
    "pki/root/sign-intermediate": ["update"],
    "pki/sign/*": ["update"],
    "pki/roles/*": ["read"],
    "sys/mounts/pki/tune": ["read"],
}


def set_up_pki(vault: VaultServer, namespace: str = "") -> None:
    """Mount ``pki`` (a root CA) with role ``spiffe`` and policy ``mesh`` straight into the test server."""
    if namespace:
        vault.add_namespace(namespace)
    vault.add_pki_mount("pki", namespace=namespace)
    vault.add_pki_role(
        "pki",
        "spiffe",
        namespace=namespace,
        allowed_uri_sans=["spiffe://example.org/*"],
        require_cn=False,
        key_type="any",
        max_ttl="24h",
    )
    vault.add_policy("mesh", MESH_POLICY, namespace=namespace)
