"""The built-in CA provider.

By default it keeps a self-signed root in ``<state_dir>/builtin`` (see :mod:`providers.builtin.store`) and signs
the authority's intermediate with it; a restart reloads the same root. With ``root_cert_file``/``root_key_file``
it uses your own root instead, and with ``ca_cert_file``/``ca_key_file``/``bundle_file`` your own intermediate
(which then signs ours, so it must allow a path length of at least 1). Root rotation is supported for the
generated root only.

With ``store: kubernetes`` the generated root is kept in a Kubernetes Secret instead (see
:mod:`providers.builtin.secretstore`): its key encrypted with the passphrase of ``key_encryption_file``,
created with create-or-load semantics and updated only at the resourceVersion it was read at, so replicas share
one root; :meth:`BuiltinProvider.watch_state` follows the changes other replicas make.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable, Mapping
from datetime import timedelta
from pathlib import Path
from typing import Any

from cryptography import x509

from mesh_identity.errors import ConfigError, RotationError, StateError
from mesh_identity.keys import PrivateKey, load_private_key
from mesh_identity.profile import LeafSigner, checked_public_key, is_ca, same_key, sign_ca
from mesh_identity.provider import (
    Capabilities,
    CAProvider,
    Check,
    Health,
    Limits,
    Mode,
    OptionSpec,
    OptionType,
    ProviderContext,
    ProviderSpec,
    SignedCertificate,
)
from mesh_identity.spiffe import SpiffeId
from mesh_identity.svid import TrustBundle, load_certs_pem
from mesh_identity.verify import chain_problem
from providers.builtin.keyfile import DESCRIPTION as KEY_ENCRYPTION
from providers.builtin.secretstore import DEFAULT_SECRET_NAME, SECRET_OPTIONS, SecretRootStore, open_secret_store
from providers.builtin.store import RootState, RootStore

NAME = "builtin"
DEFAULT_PASSPHRASE_ENV = "MESH_IDENTITY_CA_PASSPHRASE"  # noqa: S105 - the name of a variable, not a secret

OPTIONS = (
    OptionSpec("root_ttl", OptionType.DURATION, "lifetime of a generated root CA", default=timedelta(days=365)),
    OptionSpec(
        "passphrase_env",
        OptionType.STRING,
        "environment variable holding the passphrase that encrypts the root key",
        default=DEFAULT_PASSPHRASE_ENV,
    ),
    OptionSpec("passphrase_file", OptionType.PATH, "file holding the root key passphrase (wins over the env)"),
    OptionSpec("root_cert_file", OptionType.PATH, "bring your own root: its certificate (PEM)"),
    OptionSpec("root_key_file", OptionType.PATH, "bring your own root: its private key (PEM)", secret=True),
    OptionSpec("ca_cert_file", OptionType.PATH, "bring your own intermediate: its certificate, then its issuers"),
    OptionSpec("ca_key_file", OptionType.PATH, "bring your own intermediate: its private key (PEM)", secret=True),
    OptionSpec("bundle_file", OptionType.PATH, "the root(s) your own intermediate chains to (PEM)"),
    OptionSpec(
        "store",
        OptionType.STRING,
        "where the generated root is kept: files (the state directory) or kubernetes (a Secret)",
        default="files",
        choices=("files", "kubernetes"),
    ),
    OptionSpec(
        "secret_namespace",
        OptionType.STRING,
        "store kubernetes: the namespace of the CA's Secret (default: the pod's namespace)",
    ),
    OptionSpec(
        "secret_name", OptionType.STRING, "store kubernetes: the name of the CA's Secret", default=DEFAULT_SECRET_NAME
    ),
    OptionSpec("kubeconfig", OptionType.PATH, "store kubernetes: a kubeconfig file (default: the in-cluster config)"),
    OptionSpec(
        "key_encryption_file",
        OptionType.PATH,
        "store kubernetes (required): a file, mounted apart from the Secret, holding the passphrase of the root keys",
    ),
)
CAPABILITIES = Capabilities(modes=frozenset(Mode), root_rotation=True)


class BuiltinProvider(CAProvider):
    name = NAME

    def __init__(self, context: ProviderContext, options: Mapping[str, Any]) -> None:
        self.context = context
        self.options = options
        self._lock = threading.Lock()
        self.created = False
        self.store: RootState | None = None
        self._signer_cert: x509.Certificate
        self._signer_key: PrivateKey
        self._signer_chain: tuple[x509.Certificate, ...] = ()
        self._bundle_roots: tuple[x509.Certificate, ...]
        if options.get("store") == "kubernetes":
            self.store, self.created = open_secret_store(context, options)
            self._use_store()
        elif given := [o for o in SECRET_OPTIONS if options.get(o)]:
            raise ConfigError(f"ca.provider_options.{given[0]}: only with store: kubernetes")
        elif options.get("root_cert_file") or options.get("root_key_file"):
            self._load_own_root()
        elif options.get("ca_cert_file") or options.get("ca_key_file") or options.get("bundle_file"):
            self._load_own_intermediate()
        else:
            if not context.create and not (context.state_dir / "builtin").exists():
                raise StateError(f"no CA state in {context.state_dir}: run 'mesh-identity init' first")
            self.store, self.created = RootStore.open_or_create(
                context.state_dir / "builtin",
                context.trust_domain,
                context.key_type,
                options.get("root_ttl") or timedelta(days=365),
                self._passphrase(),
                context.clock(),
            )
            self._use_store()

    # -- configuration -------------------------------------------------------------------------------------

    def _passphrase(self) -> bytes | None:
        path = self.options.get("passphrase_file")
        if path:
            try:
                text = Path(path).read_bytes().rstrip(b"\r\n")
            except OSError as err:
                raise ConfigError(f"ca.provider_options.passphrase_file: cannot read {path}: {err.strerror}") from None
            if not text:
                raise ConfigError(f"ca.provider_options.passphrase_file: {path} is empty")
            return text
        env = self.options.get("passphrase_env") or DEFAULT_PASSPHRASE_ENV
        value = os.environ.get(env, "")
        return value.encode() if value else None

    def _read(self, option: str) -> bytes:
        path = self.options.get(option)
        if not path:
            raise ConfigError(f"ca.provider_options.{option}: required with the other bring-your-own-CA options")
        try:
            return Path(path).read_bytes()
        except OSError as err:
            raise ConfigError(f"ca.provider_options.{option}: cannot read {path}: {err.strerror}") from None

    def _load_key(self, option: str) -> PrivateKey:
        try:
            return load_private_key(self._read(option), self._passphrase())
        except ValueError as err:
            raise ConfigError(f"ca.provider_options.{option}: {err}") from None

    def _load_certs(self, option: str) -> tuple[x509.Certificate, ...]:
        try:
            certs = load_certs_pem(self._read(option), str(self.options.get(option)))
        except ValueError as err:
            raise ConfigError(f"ca.provider_options.{option}: {err}") from None
        for cert in certs:
            if not is_ca(cert):
                raise ConfigError(
                    f"ca.provider_options.{option}: {cert.subject.rfc4514_string()!r} is not a CA certificate"
                )
        return certs

    def _load_own_root(self) -> None:
        cert = self._load_certs("root_cert_file")[0]
        key = self._load_key("root_key_file")
        if not same_key(cert, key.public_key()):
            raise ConfigError("ca.provider_options.root_key_file: the key does not match root_cert_file")
        if cert.issuer != cert.subject:
            raise ConfigError(
                "ca.provider_options.root_cert_file: not self-signed; use ca_cert_file for an intermediate"
            )
        self._signer_cert, self._signer_key, self._signer_chain, self._bundle_roots = cert, key, (), (cert,)

    def _load_own_intermediate(self) -> None:
        certs = self._load_certs("ca_cert_file")
        key = self._load_key("ca_key_file")
        roots = self._load_certs("bundle_file")
        cert, chain = certs[0], certs[1:]
        if not same_key(cert, key.public_key()):
            raise ConfigError("ca.provider_options.ca_key_file: the key does not match ca_cert_file")
        path_length = cert.extensions.get_extension_for_class(x509.BasicConstraints).value.path_length
        if path_length is not None and path_length < 1:
            raise ConfigError(
                "ca.provider_options.ca_cert_file: its pathLenConstraint is 0, so it cannot sign our intermediate"
            )
        problem = chain_problem(cert, chain, TrustBundle(self.context.trust_domain, roots), self.context.clock())
        if problem is not None:
            raise ConfigError(f"ca.provider_options.ca_cert_file: does not verify against bundle_file: {problem}")
        self._signer_cert, self._signer_key, self._signer_chain, self._bundle_roots = cert, key, chain, roots

    def _use_store(self) -> None:
        assert self.store is not None
        active = self.store.active
        self._signer_cert, self._signer_key, self._signer_chain = active.certificate, active.key, ()
        self._bundle_roots = tuple(r.certificate for r in self.store.roots)

    # -- the contract --------------------------------------------------------------------------------------

    def capabilities(self) -> Capabilities:
        remaining = self._signer_cert.not_valid_after_utc - self.context.clock()
        return Capabilities(frozenset(Mode), max_ttl=remaining, root_rotation=self.store is not None)

    def trust_bundle(self) -> TrustBundle:
        return TrustBundle(self.context.trust_domain, self._bundle_roots)

    def sign_intermediate(self, csr: x509.CertificateSigningRequest, ttl: timedelta) -> SignedCertificate:
        with self._lock:
            cert = sign_ca(
                csr,
                self._signer_cert,
                self._signer_key,
                trust_domain=self.context.trust_domain,
                ttl=ttl,
                now=self.context.clock(),
            )
            return SignedCertificate(cert, self._chain_above(), self.trust_bundle())

    def sign_workload(
        self, csr: x509.CertificateSigningRequest, spiffe_id: SpiffeId, ttl: timedelta
    ) -> SignedCertificate:
        with self._lock:
            signer = LeafSigner(self._signer_cert, self._signer_key)
            leaf = signer.sign(checked_public_key(csr), spiffe_id, ttl, self.context.clock())
            return SignedCertificate(leaf, self._chain_above(), self.trust_bundle())

    def _chain_above(self) -> tuple[x509.Certificate, ...]:
        """What sits between a certificate we sign and the bundle: nothing when a root signs."""
        if self._signer_cert in self._bundle_roots:
            return ()
        return (self._signer_cert, *self._signer_chain)

    def health(self) -> Health:
        now = self.context.clock()
        not_after = self._signer_cert.not_valid_after_utc
        if now >= not_after:
            return Health(False, f"the signing CA expired at {not_after:%Y-%m-%dT%H:%M:%SZ}", now)
        return Health(True, f"signing CA valid until {not_after:%Y-%m-%dT%H:%M:%SZ}", now)

    def limits(self) -> Limits:
        remaining = self._signer_cert.not_valid_after_utc - self.context.clock()
        return Limits(remaining, remaining, self._signer_cert.not_valid_after_utc)

    def doctor(self, workload_ttl: timedelta | None = None, intermediate_ttl: timedelta | None = None) -> list[Check]:
        """Health, then for a generated root: ``retired root keys`` (none should be on disk) and ``root key
        encryption`` (the scheme of the root keys, or that they are not encrypted)."""
        checks = super().doctor(workload_ttl, intermediate_ttl)
        if self.store is None:
            return checks
        if isinstance(self.store, SecretRootStore):
            with self._lock:
                return checks + self.store.doctor()
        with self._lock:
            leftover = self.store.leftover_keys()
            weak = self.store.key_encryption_problems()
            encrypted = self.store.passphrase is not None
        if leftover:
            paths = ", ".join(map(str, leftover))
            it = "it: its root is" if len(leftover) == 1 else "them: their roots are"
            checks.append(
                Check("retired root keys", False, f"{len(leftover)} still on disk: {paths} (delete {it} retired)")
            )
        else:
            checks.append(Check("retired root keys", True, "none on disk (a root's key is deleted when it is retired)"))
        if weak:
            checks.append(
                Check(
                    "root key encryption",
                    False,
                    f"weaker than {KEY_ENCRYPTION}: {'; '.join(weak)} (re-encrypting it at load failed: see the log)",
                )
            )
        elif encrypted:
            checks.append(Check("root key encryption", True, KEY_ENCRYPTION))
        else:
            env = self.options.get("passphrase_env") or DEFAULT_PASSPHRASE_ENV
            checks.append(
                Check(
                    "root key encryption",
                    True,
                    f"not encrypted (set {env} or ca.provider_options.passphrase_file to encrypt it)",
                )
            )
        return checks

    # -- root rotation -------------------------------------------------------------------------------------

    def _rotating_store(self) -> RootState:
        if self.store is None:
            raise RotationError("the built-in provider rotates only a root it generated, not your own CA")
        return self.store

    def root_phase(self) -> str:
        return self.store.phase if self.store is not None else "steady"

    def prepare_root(self) -> x509.Certificate:
        with self._lock:
            store = self._rotating_store()
            try:
                root = store.prepare(
                    self.context.key_type, self.options.get("root_ttl") or timedelta(days=365), self.context.clock()
                )
            except RotationError:  # refused; the Secret store may have read the state again (another replica's)
                self._use_store()
                raise
            self._use_store()
            return root.certificate

    def activate_root(self) -> x509.Certificate:
        with self._lock:
            store = self._rotating_store()
            try:
                root = store.activate()
            except RotationError:
                self._use_store()
                raise
            self._use_store()
            return root.certificate

    def retire_root(self) -> tuple[x509.Certificate, ...]:
        with self._lock:
            store = self._rotating_store()
            try:
                old = store.retire()
            except RotationError:
                self._use_store()
                raise
            self._use_store()
            return tuple(r.certificate for r in old)

    def reload(self) -> None:
        """Re-read the store (from disk, or the Secret): another process, e.g. the CLI or another replica,
        advanced a rotation phase."""
        with self._lock:
            self._rotating_store().load()
            self._use_store()

    def watch_state(self, changed: Callable[[], None]) -> None:
        """Call ``changed`` whenever another process changes the CA state: with store kubernetes, a watch of the
        Secret (stopped by :meth:`close`); then :meth:`reload` reads it. Files and your own CA: never called."""
        if self.store is not None:
            self.store.watch(changed)

    def close(self) -> None:
        """Stop the Secret's watch and close its connection (nothing to do for files)."""
        if self.store is not None:
            self.store.close()


def create(context: ProviderContext, options: Mapping[str, Any]) -> BuiltinProvider:
    return BuiltinProvider(context, options)


SPEC = ProviderSpec(
    name=NAME,
    description="built-in CA: a generated root kept in the state directory, or your own root/intermediate",
    capabilities=CAPABILITIES,
    factory=create,
    options=OPTIONS,
)
