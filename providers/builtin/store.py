"""The built-in CA's roots on disk, and the root rotation phases.

Layout of ``<state_dir>/builtin`` (directory 0700, files 0600)::

    ca.json         {"version": 1, "trust_domain": ..., "roots": ["root-1", ...], "active": "root-1",
                     "phase": "steady" | "prepared" | "activated"}
    root-1.pem      a root certificate
    root-1.key      its key, PKCS#8; with a passphrase, encrypted as :mod:`providers.builtin.keyfile` says
                    (PBKDF2-HMAC-SHA256, 600,000 iterations, AES-256-CBC)
    retired/        the certificates of retired roots, for the record (never their keys)

``ca.json`` is the commit point: new key files are written first, then the manifest is replaced atomically,
so a crash leaves either the old or the new state, never a mix. A new store is built in a temporary directory
and renamed into place.

Retiring a root deletes its key once the manifest no longer lists it (its certificate moves to ``retired/``).
Loading finishes what an earlier version or an interrupted retire left: it deletes ``retired/*.key`` and the
key of any root the manifest dropped (one numbered below its newest root: a higher one may be another
process's prepare, whose files come before its manifest), and it re-encrypts, one file at a time (each
replaced atomically, both forms readable with the same passphrase), keys encrypted with a weaker scheme than
ours (the 2,048 PBKDF2 iterations of earlier versions).
"""

from __future__ import annotations

import contextlib
import json
import logging
import re
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any, Protocol

from cryptography import x509

from mesh_identity.errors import RotationError, StateError
from mesh_identity.files import ensure_private_dir, write_private
from mesh_identity.keys import KeyType, PrivateKey, generate_key, load_private_key, private_key_pem
from mesh_identity.profile import build_root, is_ca, same_key
from mesh_identity.spiffe import TrustDomain
from mesh_identity.svid import cert_pem
from providers.builtin.keyfile import encrypted_key_pem, key_encryption, needs_reencryption

log = logging.getLogger(__name__)

MANIFEST = "ca.json"
RETIRED = "retired"
PHASES = ("steady", "prepared", "activated")
ROOT_NAME = re.compile(r"root-[1-9][0-9]{0,5}")


@dataclass(frozen=True, slots=True)
class Root:
    name: str
    certificate: x509.Certificate
    key: PrivateKey


class RootState(Protocol):
    """What the provider uses of the store of its roots: :class:`RootStore` (files in the state directory) and
    :class:`~providers.builtin.secretstore.SecretRootStore` (a Kubernetes Secret). ``load`` reads the state
    again; the rotation steps persist the next phase or raise RotationError with the state as it was."""

    @property
    def passphrase(self) -> bytes | None: ...
    @property
    def roots(self) -> tuple[Root, ...]: ...
    @property
    def active(self) -> Root: ...
    @property
    def phase(self) -> str: ...
    def load(self) -> None: ...
    def prepare(self, key_type: KeyType, root_ttl: timedelta, now: datetime) -> Root: ...
    def activate(self) -> Root: ...
    def retire(self) -> tuple[Root, ...]: ...
    def leftover_keys(self) -> tuple[object, ...]: ...
    def key_encryption_problems(self) -> list[str]: ...
    def watch(self, changed: Callable[[], None]) -> None: ...
    def close(self) -> None: ...


class RootStore:
    """Roots of the built-in CA. Not thread-safe on its own; the provider serialises writes."""

    def __init__(self, path: Path, trust_domain: TrustDomain, passphrase: bytes | None) -> None:
        self.path = path
        self.trust_domain = trust_domain
        self.passphrase = passphrase
        self.roots: tuple[Root, ...] = ()
        self.active_name = ""
        self.phase = "steady"

    # -- loading and creating ------------------------------------------------------------------------------

    @classmethod
    def open_or_create(
        cls,
        path: Path,
        trust_domain: TrustDomain,
        key_type: KeyType,
        root_ttl: timedelta,
        passphrase: bytes | None,
        now: datetime,
    ) -> tuple[RootStore, bool]:
        """Load the store at ``path``, or create it (atomically) when ``path`` does not exist.
        Returns the store and whether it was created."""
        store = cls(path, trust_domain, passphrase)
        if path.exists():
            store.load()
            return store, False
        ensure_private_dir(path.parent)
        staging = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
        try:
            staging.chmod(0o700)
            key = generate_key(key_type)
            root = Root("root-1", build_root(key, trust_domain, root_ttl, now), key)
            store.path = staging
            store.roots, store.active_name, store.phase = (root,), root.name, "steady"
            store._write_root(root)
            store._write_manifest()
            staging.rename(path)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
        store.path = path
        return store, True

    def load(self) -> None:
        manifest_path = self.path / MANIFEST
        try:
            manifest = json.loads(manifest_path.read_text())
        except FileNotFoundError:
            raise StateError(f"{self.path} is not a CA state directory: {MANIFEST} is missing") from None
        except (OSError, ValueError) as err:
            raise StateError(f"{manifest_path} is corrupt: {err}") from None
        names, active, phase = self._check_manifest(manifest, manifest_path)
        self.roots = tuple(self._load_root(name) for name in names)
        self.active_name, self.phase = active, phase
        self._remove_retired_keys()

    def _check_manifest(self, manifest: Any, where: Path) -> tuple[list[str], str, str]:
        return check_manifest(manifest, where, self.trust_domain)

    def _load_root(self, name: str) -> Root:
        cert_path, key_path = self.path / f"{name}.pem", self.path / f"{name}.key"
        try:
            cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
        except FileNotFoundError:
            raise StateError(f"{cert_path} is missing") from None
        except ValueError:
            raise StateError(f"{cert_path} is corrupt: not a PEM certificate") from None
        try:
            pem = key_path.read_bytes()
            key = load_private_key(pem, self.passphrase)
        except FileNotFoundError:
            raise StateError(f"{key_path} is missing") from None
        except ValueError as err:
            hint = " (set the passphrase: see ca.provider_options.passphrase_env)" if "encrypted" in str(err) else ""
            raise StateError(f"{key_path}: {err}{hint}") from None
        if not is_ca(cert):
            raise StateError(f"{cert_path} is corrupt: not a CA certificate")
        if not same_key(cert, key.public_key()):
            raise StateError(f"{key_path} does not match the certificate {cert_path}")
        root = Root(name, cert, key)
        if self.passphrase and needs_reencryption(pem):
            self._reencrypt(root, pem)
        return root

    def _reencrypt(self, root: Root, pem: bytes) -> None:
        path = self.path / f"{root.name}.key"
        try:
            was = key_encryption(pem)
        except ValueError:
            was = None
        try:
            write_private(path, self._key_pem(root.key))
        except OSError as err:  # the old form still loads: keep serving, doctor says what is left
            log.warning("cannot re-encrypt %s with the current scheme: %s", path, err.strerror)
            return
        log.info("re-encrypted %s (was %s)", path, was.describe() if was else "an unreadable scheme")

    # -- retired roots -------------------------------------------------------------------------------------

    def _dropped(self) -> list[str]:
        """Names of roots whose files remain though the manifest dropped them, numbered below its newest."""
        newest = max(_number(r.name) for r in self.roots)
        names = {r.name for r in self.roots}
        found = {p.stem for p in self.path.glob("root-*.*") if p.suffix in (".key", ".pem")}
        return sorted(n for n in found if ROOT_NAME.fullmatch(n) and n not in names and _number(n) < newest)

    def _retire_files(self, name: str) -> None:
        """Move a retired root's certificate to ``retired/``; delete its key."""
        cert = self.path / f"{name}.pem"
        if cert.exists():
            with contextlib.suppress(FileNotFoundError):  # another process moved it first
                cert.replace(ensure_private_dir(self.path / RETIRED) / cert.name)
        key = self.path / f"{name}.key"
        if key.exists():
            key.unlink(missing_ok=True)
            log.info("deleted the key of retired root %s (%s)", name, key)

    def _remove_retired_keys(self) -> None:
        try:
            for name in self._dropped():
                self._retire_files(name)
            for key in self._retired_keys():
                key.unlink(missing_ok=True)
                log.info("deleted the key of retired root %s (%s)", key.stem, key)
        except OSError as err:  # not fatal: the roots load; doctor names what is left
            log.warning("cannot delete retired root keys in %s: %s", self.path, err.strerror or err)

    def _retired_keys(self) -> list[Path]:
        return sorted(p for p in (self.path / RETIRED).glob("root-*.key") if ROOT_NAME.fullmatch(p.stem))

    def leftover_keys(self) -> tuple[Path, ...]:
        """Keys of retired roots still on disk (none, unless deleting them failed)."""
        dropped = [self.path / f"{n}.key" for n in self._dropped()]
        return tuple(p for p in (*dropped, *self._retired_keys()) if p.exists())

    def key_encryption_problems(self) -> list[str]:
        """Root keys not encrypted with the current scheme although a passphrase is set (re-encrypting them
        on load failed), each as ``<file>: <what protects it>``."""
        if not self.passphrase:
            return []
        problems = []
        for root in self.roots:
            path = self.path / f"{root.name}.key"
            try:
                encryption = key_encryption(path.read_bytes())
            except (OSError, ValueError) as err:
                problems.append(f"{path}: {err}")
                continue
            if encryption is None or not encryption.strong:
                problems.append(f"{path}: {encryption.describe() if encryption else 'not encrypted'}")
        return problems

    # -- writing -------------------------------------------------------------------------------------------

    def _key_pem(self, key: PrivateKey) -> bytes:
        return encrypted_key_pem(key, self.passphrase) if self.passphrase else private_key_pem(key)

    def _write_root(self, root: Root) -> None:
        write_private(self.path / f"{root.name}.pem", cert_pem(root.certificate))
        write_private(self.path / f"{root.name}.key", self._key_pem(root.key))

    def _write_manifest(self) -> None:
        manifest = {
            "version": 1,
            "trust_domain": self.trust_domain.name,
            "roots": [r.name for r in self.roots],
            "active": self.active_name,
            "phase": self.phase,
        }
        write_private(self.path / MANIFEST, json.dumps(manifest, indent=2).encode() + b"\n")

    # -- views ---------------------------------------------------------------------------------------------

    def watch(self, changed: Callable[[], None]) -> None:
        """Nothing: the files are not watched (``changed`` is never called)."""
        del changed

    def close(self) -> None:
        """Nothing to release."""

    @property
    def active(self) -> Root:
        return next(r for r in self.roots if r.name == self.active_name)

    # -- root rotation -------------------------------------------------------------------------------------

    def prepare(self, key_type: KeyType, root_ttl: timedelta, now: datetime) -> Root:
        """Phase 1: a new root joins the bundle; the old one still signs."""
        if self.phase != "steady":
            raise RotationError(f"a root rotation is already in phase {self.phase!r}; finish it first")
        number = 1 + max(_number(r.name) for r in self.roots)
        key = generate_key(key_type)
        root = Root(f"root-{number}", build_root(key, self.trust_domain, root_ttl, now, f"root CA {number}"), key)
        self._write_root(root)
        self.roots, self.phase = (*self.roots, root), "prepared"
        self._write_manifest()
        return root

    def activate(self) -> Root:
        """Phase 2: the newest root signs; both stay in the bundle."""
        if self.phase != "prepared":
            raise RotationError(f"cannot activate: the root rotation is in phase {self.phase!r}, not 'prepared'")
        self.active_name, self.phase = self.roots[-1].name, "activated"
        self._write_manifest()
        return self.active

    def retire(self) -> tuple[Root, ...]:
        """Phase 3: roots other than the active one leave the bundle; once the manifest says so, their keys
        are deleted and their certificates move to ``retired/``."""
        if self.phase != "activated":
            raise RotationError(f"cannot retire: the root rotation is in phase {self.phase!r}, not 'activated'")
        old = tuple(r for r in self.roots if r.name != self.active_name)
        self.roots, self.phase = (self.active,), "steady"
        self._write_manifest()
        try:
            for root in old:
                self._retire_files(root.name)
        except OSError as err:  # retired all the same; the next load, and doctor, see to what is left
            log.warning("root retired, but cleaning up its files in %s failed: %s", self.path, err.strerror or err)
        return old


def check_manifest(manifest: Any, where: object, trust_domain: TrustDomain) -> tuple[list[str], str, str]:
    """The root names, active root and phase of a ``ca.json`` manifest; StateError naming ``where`` (a file, or
    a Secret's data key) and what is wrong."""
    if not isinstance(manifest, dict) or manifest.get("version") != 1:
        raise StateError(f"{where} is corrupt: not a version 1 manifest")
    if manifest.get("trust_domain") != trust_domain.name:
        raise StateError(f"{where} belongs to trust domain {manifest.get('trust_domain')!r}, not {trust_domain}")
    names = manifest.get("roots")
    active = manifest.get("active")
    phase = manifest.get("phase")
    valid_names = isinstance(names, list) and all(isinstance(n, str) and ROOT_NAME.fullmatch(n) for n in names)
    if not names or not valid_names:
        raise StateError(f"{where} is corrupt: 'roots' must list root names like 'root-1'")
    if len(set(names)) != len(names):
        raise StateError(f"{where} is corrupt: 'roots' lists a root twice: {names}")
    if active not in names:
        raise StateError(f"{where} is corrupt: active root {active!r} is not among {names}")
    if phase not in PHASES:
        raise StateError(f"{where} is corrupt: phase {phase!r} is not one of {', '.join(PHASES)}")
    return names, str(active), str(phase)


def _number(name: str) -> int:
    return int(name.split("-", 1)[1])
