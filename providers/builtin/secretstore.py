"""The built-in CA's roots in a Kubernetes Secret (``ca.provider_options.store: kubernetes``).

The Secret ``<secret_namespace>/<secret_name>`` (default ``mesh-identity-ca`` in the pod's namespace), type
``Opaque``, labelled ``app.kubernetes.io/managed-by: mesh-identity`` and ``app.kubernetes.io/component: ca``,
holds in ``data``::

    ca.json       the manifest of :mod:`providers.builtin.store`: version, trust_domain, roots, active, phase
    root-N.pem    a root certificate
    root-N.key    its key, always encrypted as :mod:`providers.builtin.keyfile` says, with the passphrase in
                  ``key_encryption_file``: a file mounted apart from the Secret, so that reading the Secret is
                  not enough to sign

Creating is create-or-load: the Secret is read; when it is absent, a root is generated and the Secret created;
when that create answers AlreadyExists (another replica won), the winner's Secret is read and its root used.
Every later write (prepare, activate, retire) is one replace at the resourceVersion the state was read at: the
whole next state, in one object, or nothing. When the Secret changed since (409), the state is read again and
the step refused with a RotationError; any other failure leaves the state as it was. A retired root leaves the
Secret, key and certificate, in the write that drops it from the manifest (the log names it).

Everything read is checked, with messages naming ``Secret <ns>/<name>`` and the data key: base64, the manifest,
each listed root's certificate and key (PEM, a CA, of this trust domain, encrypted, the passphrase, the key
matching its certificate). Decrypting a key costs about 0.2 s (the KDF), so a key whose data is unchanged
since the last read is not decrypted again.
"""

from __future__ import annotations

import base64
import binascii
import json
import logging
import re
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

from cryptography import x509

from mesh_identity.errors import ConfigError, RotationError, StateError
from mesh_identity.keys import KeyType, PrivateKey, generate_key, load_private_key
from mesh_identity.profile import build_root, is_ca, same_key
from mesh_identity.provider import Check, ProviderContext
from mesh_identity.registry.kube.client import SERVICE_ACCOUNT_DIR, KubeClient, connect_for
from mesh_identity.registry.kube.errors import (
    KubeAlreadyExistsError,
    KubeApiError,
    KubeConflictError,
    KubeForbiddenError,
    KubeUnauthorizedError,
)
from mesh_identity.registry.kube.objects import JsonObj
from mesh_identity.registry.kube.resources import SECRETS
from mesh_identity.spiffe import TrustDomain
from mesh_identity.svid import cert_pem
from providers.builtin.keyfile import DESCRIPTION as KEY_ENCRYPTION
from providers.builtin.keyfile import encrypted_key_pem, key_encryption
from providers.builtin.secretwatch import SecretWatch
from providers.builtin.store import MANIFEST, Root, check_manifest

log = logging.getLogger(__name__)

DEFAULT_SECRET_NAME = "mesh-identity-ca"  # noqa: S105 - the name of a Secret, not a secret
LABELS = {"app.kubernetes.io/managed-by": "mesh-identity", "app.kubernetes.io/component": "ca"}
DNS_SUBDOMAIN = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*")
DNS_LABEL = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?")
FILE_OPTIONS = ("root_cert_file", "root_key_file", "ca_cert_file", "ca_key_file", "bundle_file", "passphrase_file")
SECRET_OPTIONS = ("secret_namespace", "kubeconfig", "key_encryption_file")
ROOT_DATA = re.compile(r"(root-[1-9][0-9]{0,5})\.(pem|key)")


# -- the options -------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class SecretOptions:
    """Where the Secret is and how to reach it, from ``ca.provider_options``."""

    namespace: str
    name: str
    kubeconfig: Path | None
    key_encryption_file: Path
    passphrase: bytes = field(repr=False)


def secret_options(options: Mapping[str, Any], service_account_dir: Path) -> SecretOptions:
    """Check the options of ``store: kubernetes``; ConfigError naming the option."""
    given = [o for o in FILE_OPTIONS if options.get(o)]
    if given:
        raise ConfigError(
            f"ca.provider_options.{given[0]}: not with store: kubernetes (the root is generated and kept in the "
            "Secret; the key's passphrase comes from key_encryption_file)"
        )
    name = options.get("secret_name") or DEFAULT_SECRET_NAME
    if len(name) > 253 or not DNS_SUBDOMAIN.fullmatch(name):
        raise ConfigError(
            f"ca.provider_options.secret_name: {name!r} is not a valid Secret name (a DNS subdomain: lower-case "
            "letters, digits, '-' and '.', at most 253 characters)"
        )
    namespace = options.get("secret_namespace") or _pod_namespace(service_account_dir)
    if len(namespace) > 63 or not DNS_LABEL.fullmatch(namespace):
        raise ConfigError(f"ca.provider_options.secret_namespace: {namespace!r} is not a valid namespace name")
    path = options.get("key_encryption_file")
    if not path:
        raise ConfigError(
            "ca.provider_options.key_encryption_file: required with store: kubernetes (a file mounted apart from "
            "the Secret, holding the passphrase that encrypts the root keys)"
        )
    try:
        passphrase = Path(path).read_bytes().rstrip(b"\r\n")
    except OSError as err:
        raise ConfigError(f"ca.provider_options.key_encryption_file: cannot read {path}: {err.strerror}") from None
    if not passphrase.strip():
        raise ConfigError(f"ca.provider_options.key_encryption_file: {path} is empty")
    kubeconfig = options.get("kubeconfig")
    return SecretOptions(namespace, name, Path(kubeconfig) if kubeconfig else None, Path(path), passphrase)


def _pod_namespace(service_account_dir: Path) -> str:
    path = service_account_dir / "namespace"
    try:
        namespace = path.read_text().strip()
    except OSError:
        namespace = ""
    if not namespace:
        raise ConfigError(
            f"ca.provider_options.secret_namespace: not set, and not running in a pod ({path} is not readable): "
            "name the namespace of the CA's Secret"
        )
    return namespace


def open_secret_store(
    context: ProviderContext,
    options: Mapping[str, Any],
    service_account_dir: Path | None = None,
    environ: Mapping[str, str] | None = None,
) -> tuple[SecretRootStore, bool]:
    """The provider's Secret store from its options (create-or-load); returns it and whether it created the
    Secret. The store owns the client it connects (:meth:`SecretRootStore.close`). ``service_account_dir``
    (default :data:`SERVICE_ACCOUNT_DIR`, read when called) has the pod's namespace and in-cluster credentials."""
    service_account_dir = service_account_dir or SERVICE_ACCOUNT_DIR
    settings = secret_options(options, service_account_dir)
    client = connect_for(
        "ca.provider_options.kubeconfig", settings.kubeconfig, environ=environ, service_account_dir=service_account_dir
    )
    try:
        return SecretRootStore.open_or_create(
            client,
            settings,
            context.trust_domain,
            context.key_type,
            options.get("root_ttl") or timedelta(days=365),
            context.clock(),
            create=context.create,
        )
    except BaseException:
        client.close()
        raise


# -- the state ---------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class SecretState:
    """The CA state as one version of the Secret holds it. ``keys`` are the encrypted PEM keys as written;
    ``extra`` the data keys of roots the manifest does not list; ``metadata`` the Secret's, as read."""

    roots: tuple[Root, ...]
    active: str
    phase: str
    keys: Mapping[str, bytes]
    version: str = ""
    metadata: Mapping[str, Any] = field(default_factory=dict)
    extra: tuple[str, ...] = ()


class SecretRootStore:
    """The roots of the built-in CA in a Secret (see the module docstring). The provider serialises writes;
    reads of the state see one version whole (a write builds the next state, writes it, then swaps it in)."""

    def __init__(self, client: KubeClient, settings: SecretOptions, trust_domain: TrustDomain) -> None:
        self.client = client
        self.settings = settings
        self.namespace = settings.namespace
        self.name = settings.name
        self.trust_domain = trust_domain
        self._state = SecretState((), "", "steady", {})
        self._decrypted: dict[tuple[str, bytes], PrivateKey] = {}
        self._writing = threading.Lock()
        self._watch_lock = threading.Lock()
        self._watch: SecretWatch | None = None

    @property
    def where(self) -> str:
        return f"Secret {self.namespace}/{self.name}"

    @property
    def passphrase(self) -> bytes:
        return self.settings.passphrase

    # -- views -------------------------------------------------------------------------------------------

    @property
    def state(self) -> SecretState:
        return self._state

    @property
    def roots(self) -> tuple[Root, ...]:
        return self._state.roots

    @property
    def phase(self) -> str:
        return self._state.phase

    @property
    def active_name(self) -> str:
        return self._state.active

    @property
    def active(self) -> Root:
        state = self._state
        return next(r for r in state.roots if r.name == state.active)

    @property
    def resource_version(self) -> str:
        """The resourceVersion of the Secret the state was last read or written at."""
        return self._state.version

    # -- loading and creating ----------------------------------------------------------------------------

    @classmethod
    def open_or_create(
        cls,
        client: KubeClient,
        settings: SecretOptions,
        trust_domain: TrustDomain,
        key_type: KeyType,
        root_ttl: timedelta,
        now: datetime,
        *,
        create: bool = True,
    ) -> tuple[SecretRootStore, bool]:
        """Load the Secret, or create it with a new root when it does not exist (``create``), or, when another
        writer created it first, load that one. Returns the store and whether this call created the Secret."""
        store = cls(client, settings, trust_domain)
        found = store._read()
        if found is not None:
            store._state = store._parse(found)
            return store, False
        if not create:
            raise StateError(f"no CA state: {store.where} does not exist (run 'mesh-identity init' first)")
        key = generate_key(key_type)
        root = Root("root-1", build_root(key, trust_domain, root_ttl, now), key)
        state = SecretState((root,), root.name, "steady", {root.name: encrypted_key_pem(key, store.passphrase)})
        try:
            answer = client.create(SECRETS, store.namespace, store._body(state))
        except KubeAlreadyExistsError:
            log.info("%s was created by another replica first; loading its root", store.where)
            found = store._read()
            if found is None:
                raise StateError(
                    f"{store.where} was created by another writer and deleted again; start again"
                ) from None
            store._state = store._parse(found)
            return store, False
        except (KubeForbiddenError, KubeUnauthorizedError) as err:
            raise ConfigError(f"cannot create {store.where} for the CA's first root: {err}") from None
        except KubeApiError as err:
            raise StateError(f"cannot create {store.where} for the CA's first root: {err}") from None
        store._state = store._written(state, answer)
        log.info("created %s with a new root CA", store.where)
        return store, True

    def load(self) -> None:
        """Read the Secret again (another replica, or the CLI, may have advanced a rotation phase); the state is
        unchanged when that fails."""
        found = self._read()
        if found is None:
            raise StateError(f"{self.where} does not exist any more (it holds the CA's roots: was it deleted?)")
        self._state = self._parse(found)

    reload = load

    def _read(self) -> JsonObj | None:
        try:
            return self.client.read(SECRETS, self.namespace, self.name)
        except (KubeForbiddenError, KubeUnauthorizedError) as err:
            raise ConfigError(f"cannot read the CA state from {self.where}: {err}") from None
        except KubeApiError as err:
            raise StateError(f"cannot read the CA state from {self.where}: {err}") from None

    # -- reading the Secret ------------------------------------------------------------------------------

    def _parse(self, obj: JsonObj) -> SecretState:
        """The state ``obj`` (the Secret as read) holds; StateError naming the Secret and the data key."""
        where = self.where
        metadata = obj.get("metadata")
        version = metadata.get("resourceVersion") if isinstance(metadata, dict) else None
        if not isinstance(metadata, dict) or not isinstance(version, str) or not version:
            raise StateError(f"{where}: the answer has no metadata.resourceVersion")
        if obj.get("type", "Opaque") != "Opaque":
            raise StateError(f"{where} is of type {obj.get('type')!r}, not Opaque: not the CA's state")
        data = obj.get("data") or {}
        if not isinstance(data, dict):
            raise StateError(f"{where}: data is not a mapping")
        if MANIFEST not in data:
            raise StateError(f"{where} holds no CA state: data key {MANIFEST} is missing")
        decoded = {str(k): self._decode(str(k), v) for k, v in data.items()}
        try:
            manifest = json.loads(decoded[MANIFEST])
        except (UnicodeDecodeError, ValueError) as err:
            raise StateError(f"{where} data key {MANIFEST} is corrupt: {err}") from None
        names, active, phase = check_manifest(manifest, f"{where} data key {MANIFEST}", self.trust_domain)
        roots = tuple(self._root(name, decoded) for name in names)
        keys = {name: decoded[f"{name}.key"] for name in names}
        self._decrypted = {(f"{r.name}.key", keys[r.name]): r.key for r in roots}  # retired roots' keys go
        extra = tuple(sorted(k for k in decoded if (m := ROOT_DATA.fullmatch(k)) and m.group(1) not in names))
        return SecretState(roots, active, phase, keys, version, dict(metadata), extra)

    def _decode(self, key: str, value: Any) -> bytes:
        if not isinstance(value, str):
            raise StateError(f"{self.where} data key {key} is not a base64 string")
        try:
            return base64.b64decode(value, validate=True)
        except (binascii.Error, ValueError):
            raise StateError(f"{self.where} data key {key} is not base64") from None

    def _root(self, name: str, data: Mapping[str, bytes]) -> Root:
        where = self.where
        cert_key, key_key = f"{name}.pem", f"{name}.key"
        for needed in (cert_key, key_key):
            if needed not in data:
                raise StateError(f"{where}: root {name} is listed in {MANIFEST} but data key {needed} is missing")
        try:
            cert = x509.load_pem_x509_certificate(data[cert_key])
        except ValueError:
            raise StateError(f"{where} data key {cert_key} is corrupt: not a PEM certificate") from None
        if not is_ca(cert):
            raise StateError(f"{where} data key {cert_key} is corrupt: not a CA certificate")
        if str(self.trust_domain.id) not in _uris(cert):
            raise StateError(f"{where} data key {cert_key}: the root is not of trust domain {self.trust_domain}")
        pem = data[key_key]
        key = self._decrypt(key_key, pem)
        if not same_key(cert, key.public_key()):
            raise StateError(f"{where} data key {key_key} does not match the certificate {cert_key}")
        return Root(name, cert, key)

    def _decrypt(self, key_key: str, pem: bytes) -> PrivateKey:
        cached = self._decrypted.get((key_key, pem))
        if cached is not None:
            return cached
        try:
            encryption = key_encryption(pem)
        except ValueError as err:
            raise StateError(f"{self.where} data key {key_key}: {err}") from None
        if encryption is None:
            raise StateError(
                f"{self.where} data key {key_key} is not encrypted: a root key in a Secret must be (with the "
                "passphrase of ca.provider_options.key_encryption_file)"
            )
        try:
            key = load_private_key(pem, self.passphrase)
        except ValueError as err:
            raise StateError(
                f"{self.where} data key {key_key}: {err} (is ca.provider_options.key_encryption_file "
                f"{self.settings.key_encryption_file} the passphrase the Secret was written with?)"
            ) from None
        self._decrypted[(key_key, pem)] = key
        return key

    # -- writing the Secret ------------------------------------------------------------------------------

    def _body(self, state: SecretState) -> JsonObj:
        """The Secret holding ``state``; its metadata is the one read (with our labels), so the replace is made
        at that resourceVersion."""
        manifest = {
            "version": 1,
            "trust_domain": self.trust_domain.name,
            "roots": [r.name for r in state.roots],
            "active": state.active,
            "phase": state.phase,
        }
        data = {MANIFEST: json.dumps(manifest, indent=2).encode() + b"\n"}
        for root in state.roots:
            data[f"{root.name}.pem"] = cert_pem(root.certificate)
            data[f"{root.name}.key"] = state.keys[root.name]
        metadata = {k: v for k, v in state.metadata.items() if k != "managedFields"}
        metadata.update(name=self.name, namespace=self.namespace)
        metadata["labels"] = {**(metadata.get("labels") or {}), **LABELS}
        return {
            "apiVersion": "v1",
            "kind": "Secret",
            "metadata": metadata,
            "type": "Opaque",
            "data": {k: base64.b64encode(v).decode() for k, v in data.items()},
        }

    def _written(self, state: SecretState, answer: JsonObj) -> SecretState:
        metadata = answer.get("metadata")
        version = metadata.get("resourceVersion") if isinstance(metadata, dict) else None
        if not isinstance(metadata, dict) or not isinstance(version, str) or not version:
            raise StateError(f"{self.where} was written, but the answer has no metadata.resourceVersion")
        for root in state.roots:
            self._decrypted[(f"{root.name}.key", bytes(state.keys[root.name]))] = root.key
        return replace(state, version=version, metadata=dict(metadata), extra=())

    def _write(self, state: SecretState, step: str) -> None:
        """Replace the Secret with ``state`` at the resourceVersion the current state was read at, then swap it
        in; RotationError (nothing written) when that fails."""
        current = self._state
        body = self._body(replace(state, metadata=current.metadata))
        failure: KubeApiError | None = None
        with self._writing:  # the watch asks for the version in between: our own write is not another's change
            try:
                answer = self.client.replace(SECRETS, self.namespace, body)
            except KubeApiError as err:
                failure = err
            else:
                self._state = self._written(state, answer)
        if isinstance(failure, KubeConflictError):
            again = ""
            try:
                self.load()
                again = f"; read it again: phase {self.phase!r}, roots {', '.join(r.name for r in self.roots)}"
            except (StateError, ConfigError) as err:
                again = f"; reading it again failed: {err}"
            raise RotationError(
                f"cannot {step}: {self.where} changed since it was read at resourceVersion {current.version} "
                f"(another replica?); nothing was written{again}"
            )
        if failure is not None:
            raise RotationError(f"cannot {step}: writing {self.where} failed, nothing changed: {failure}")

    # -- root rotation -----------------------------------------------------------------------------------

    def prepare(self, key_type: KeyType, root_ttl: timedelta, now: datetime) -> Root:
        """Phase 1: a new root joins the bundle; the old one still signs."""
        state = self._state
        if state.phase != "steady":
            raise RotationError(f"a root rotation is already in phase {state.phase!r}; finish it first")
        number = 1 + max(int(r.name.split("-", 1)[1]) for r in state.roots)
        key = generate_key(key_type)
        root = Root(f"root-{number}", build_root(key, self.trust_domain, root_ttl, now, f"root CA {number}"), key)
        keys = {**state.keys, root.name: encrypted_key_pem(key, self.passphrase)}
        self._write(replace(state, roots=(*state.roots, root), phase="prepared", keys=keys), "prepare a root")
        return root

    def activate(self) -> Root:
        """Phase 2: the newest root signs; both stay in the bundle."""
        state = self._state
        if state.phase != "prepared":
            raise RotationError(f"cannot activate: the root rotation is in phase {state.phase!r}, not 'prepared'")
        self._write(replace(state, active=state.roots[-1].name, phase="activated"), "activate the root")
        return self.active

    def retire(self) -> tuple[Root, ...]:
        """Phase 3: roots other than the active one leave the bundle and the Secret (certificate and key)."""
        state = self._state
        if state.phase != "activated":
            raise RotationError(f"cannot retire: the root rotation is in phase {state.phase!r}, not 'activated'")
        active = next(r for r in state.roots if r.name == state.active)
        old = tuple(r for r in state.roots if r.name != state.active)
        retired = replace(state, roots=(active,), phase="steady", keys={active.name: state.keys[active.name]})
        self._write(retired, "retire the old root")
        for root in old:
            log.info("retired root %s: its certificate and key left %s", root.name, self.where)
        return old

    # -- doctor ------------------------------------------------------------------------------------------

    def leftover_keys(self) -> tuple[str, ...]:
        """Data keys of roots the manifest does not list (none unless something else wrote them): the next
        write drops them."""
        return tuple(f"{self.where} data key {k}" for k in self._state.extra)

    def key_encryption_problems(self) -> list[str]:
        """Root keys in the Secret not encrypted with the current scheme (an older or foreign writer's)."""
        problems = []
        for name, pem in self._state.keys.items():
            try:
                encryption = key_encryption(pem)
            except ValueError as err:
                problems.append(f"{self.where} data key {name}.key: {err}")
                continue
            if encryption is None or not encryption.strong:
                shown = encryption.describe() if encryption else "not encrypted"
                problems.append(f"{self.where} data key {name}.key: {shown}")
        return problems

    def doctor(self) -> list[Check]:
        """``CA Secret`` (read now: reachable, allowed, and what it holds checks), ``root key encryption``,
        ``retired root keys`` and, once watched, ``CA Secret watch``."""
        checks = []
        try:
            found = self._read()
            if found is None:
                raise StateError(f"{self.where} does not exist")
            now = self._parse(found)
        except (StateError, ConfigError) as err:
            checks.append(Check("CA Secret", False, str(err)))
        else:
            behind = "" if now.version == self._state.version else " (changed since this process read it)"
            names = ", ".join(r.name for r in now.roots)
            checks.append(
                Check("CA Secret", True, f"{self.where}: readable, phase {now.phase!r}, roots {names}{behind}")
            )
        problems = self.key_encryption_problems()
        if problems:
            checks.append(Check("root key encryption", False, f"weaker than {KEY_ENCRYPTION}: {'; '.join(problems)}"))
        else:
            checks.append(
                Check(
                    "root key encryption",
                    True,
                    f"{KEY_ENCRYPTION}, with the passphrase of {self.settings.key_encryption_file}",
                )
            )
        leftover = self.leftover_keys()
        if leftover:
            checks.append(Check("retired root keys", False, f"still in the Secret: {', '.join(leftover)}"))
        else:
            checks.append(Check("retired root keys", True, f"none in {self.where}"))
        with self._watch_lock:
            watch = self._watch
        if watch is not None:
            error = watch.error
            detail = f"failing: {error}" if error else f"following {self.where}"
            checks.append(Check("CA Secret watch", error is None, detail))
        return checks

    # -- following other writers -------------------------------------------------------------------------

    def watch(self, changed: Callable[[], None]) -> None:
        """Call ``changed`` (from the watch's thread) whenever another writer changes the Secret; :meth:`load`
        then reads the new state."""
        with self._watch_lock:
            if self._watch is None:
                self._watch = SecretWatch(self.client, self.namespace, self.name, self._known_version)
            watch = self._watch
        watch.add(changed)

    def _known_version(self) -> str:
        with self._writing:
            return self._state.version

    @property
    def watching(self) -> SecretWatch | None:
        """The watch of the Secret, once :meth:`watch` started it."""
        with self._watch_lock:
            return self._watch

    def close(self) -> None:
        """Stop the watch and close the connection."""
        with self._watch_lock:
            watch, self._watch = self._watch, None
        if watch is not None:
            watch.stop()
        self.client.close()


def _uris(cert: x509.Certificate) -> list[str]:
    """The URI SANs of ``cert`` (a root of ours has its trust domain's SPIFFE ID)."""
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return []
    return list(san.get_values_for_type(x509.UniformResourceIdentifier))
