"""The built-in CA's roots on disk, and the root rotation phases.

Layout of ``<state_dir>/builtin`` (directory 0700, files 0600)::

    ca.json         {"version": 1, "trust_domain": ..., "roots": ["root-1", ...], "active": "root-1",
                     "phase": "steady" | "prepared" | "activated"}
    root-1.pem      a root certificate
    root-1.key      its key, PKCS#8, encrypted when a passphrase is set

``ca.json`` is the commit point: new key files are written first, then the manifest is replaced atomically,
so a crash leaves either the old or the new state, never a mix. A new store is built in a temporary directory
and renamed into place.
"""

from __future__ import annotations

import json
import re
import shutil
import tempfile
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

from cryptography import x509

from mesh_identity.errors import RotationError, StateError
from mesh_identity.files import ensure_private_dir, write_private
from mesh_identity.keys import KeyType, PrivateKey, generate_key, load_private_key, private_key_pem
from mesh_identity.profile import build_root, is_ca, same_key
from mesh_identity.spiffe import TrustDomain
from mesh_identity.svid import cert_pem

MANIFEST = "ca.json"
PHASES = ("steady", "prepared", "activated")
ROOT_NAME = re.compile(r"root-[1-9][0-9]{0,5}")


@dataclass(frozen=True, slots=True)
class Root:
    name: str
    certificate: x509.Certificate
    key: PrivateKey


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

    def _check_manifest(self, manifest: Any, where: Path) -> tuple[list[str], str, str]:
        if not isinstance(manifest, dict) or manifest.get("version") != 1:
            raise StateError(f"{where} is corrupt: not a version 1 manifest")
        if manifest.get("trust_domain") != self.trust_domain.name:
            raise StateError(
                f"{where} belongs to trust domain {manifest.get('trust_domain')!r}, not {self.trust_domain}"
            )
        names = manifest.get("roots")
        active = manifest.get("active")
        phase = manifest.get("phase")
        valid_names = isinstance(names, list) and all(isinstance(n, str) and ROOT_NAME.fullmatch(n) for n in names)
        if not names or not valid_names:
            raise StateError(f"{where} is corrupt: 'roots' must list root names like 'root-1'")
        if active not in names:
            raise StateError(f"{where} is corrupt: active root {active!r} is not among {names}")
        if phase not in PHASES:
            raise StateError(f"{where} is corrupt: phase {phase!r} is not one of {', '.join(PHASES)}")
        return names, str(active), str(phase)

    def _load_root(self, name: str) -> Root:
        cert_path, key_path = self.path / f"{name}.pem", self.path / f"{name}.key"
        try:
            cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
        except FileNotFoundError:
            raise StateError(f"{cert_path} is missing") from None
        except ValueError:
            raise StateError(f"{cert_path} is corrupt: not a PEM certificate") from None
        try:
            key = load_private_key(key_path.read_bytes(), self.passphrase)
        except FileNotFoundError:
            raise StateError(f"{key_path} is missing") from None
        except ValueError as err:
            hint = " (set the passphrase: see ca.provider_options.passphrase_env)" if "encrypted" in str(err) else ""
            raise StateError(f"{key_path}: {err}{hint}") from None
        if not is_ca(cert):
            raise StateError(f"{cert_path} is corrupt: not a CA certificate")
        if not same_key(cert, key.public_key()):
            raise StateError(f"{key_path} does not match the certificate {cert_path}")
        return Root(name, cert, key)

    # -- writing -------------------------------------------------------------------------------------------

    def _write_root(self, root: Root) -> None:
        write_private(self.path / f"{root.name}.pem", cert_pem(root.certificate))
        write_private(self.path / f"{root.name}.key", private_key_pem(root.key, self.passphrase))

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

    @property
    def active(self) -> Root:
        return next(r for r in self.roots if r.name == self.active_name)

    # -- root rotation -------------------------------------------------------------------------------------

    def prepare(self, key_type: KeyType, root_ttl: timedelta, now: datetime) -> Root:
        """Phase 1: a new root joins the bundle; the old one still signs."""
        if self.phase != "steady":
            raise RotationError(f"a root rotation is already in phase {self.phase!r}; finish it first")
        number = 1 + max(int(r.name.split("-", 1)[1]) for r in self.roots)
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
        """Phase 3: roots other than the active one leave the bundle (files move to ``retired/``)."""
        if self.phase != "activated":
            raise RotationError(f"cannot retire: the root rotation is in phase {self.phase!r}, not 'activated'")
        old = tuple(r for r in self.roots if r.name != self.active_name)
        self.roots, self.phase = (self.active,), "steady"
        self._write_manifest()
        retired = ensure_private_dir(self.path / "retired")
        for root in old:
            for suffix in (".pem", ".key"):
                source = self.path / f"{root.name}{suffix}"
                if source.exists():
                    source.replace(retired / source.name)
        return old
