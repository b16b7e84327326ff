"""What the agent keeps on disk: its own SVID and key, and the last trust bundle; nothing of any workload.

``<state_dir>`` (0700, owned by the agent's uid, never followed through a symbolic link) holds:

* ``agent-svid.pem`` (0600): the agent's own certificate chain (leaf first) and its private key, in one file so
  that they are replaced together (atomically); after a restart the agent renews with it over mTLS instead of
  attesting again (a join token is accepted only once);
* ``bundle.pem`` (0600): the trust domain's roots as last received from the control plane, which verify the
  control plane after a restart even when its root has rotated since the config's bundle file was written.

Workload keys are never written anywhere: they live in the agent's memory and reach their workload over the
local sockets only.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509

from mesh_identity.files import owned_dir, write_private_at
from mesh_identity.keys import PrivateKey, load_private_key
from mesh_identity.spiffe import TrustDomain
from mesh_identity.svid import TrustBundle, X509Svid, certs_pem, load_certs_pem

log = logging.getLogger(__name__)

SVID_FILE = "agent-svid.pem"
BUNDLE_FILE = "bundle.pem"
MAX_FILE_BYTES = 256 * 1024
_READ = os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC


@dataclass(frozen=True, slots=True)
class Stored:
    """The agent's SVID as read back: chain (leaf first) and key, not yet checked against anything."""

    chain: tuple[x509.Certificate, ...]
    key: PrivateKey


class AgentStore:
    """Reads and writes the files of ``state_dir`` (see the module docstring)."""

    def __init__(self, state_dir: Path) -> None:
        self.state_dir = state_dir

    @property
    def svid_file(self) -> Path:
        """The chain and key in one PEM file: what the TLS client to the control plane presents."""
        return self.state_dir / SVID_FILE

    def save_svid(self, svid: X509Svid) -> None:
        data = certs_pem((svid.leaf, *svid.chain)) + svid.key_pem()
        with owned_dir(self.state_dir, create=True) as fd:
            os.fchmod(fd, 0o700)
            write_private_at(fd, SVID_FILE, data, shown=str(self.svid_file))

    def load_svid(self) -> Stored | None:
        """The stored SVID; None when there is none, or when the file cannot be used (logged: the agent then
        attests again)."""
        data = self._read(SVID_FILE)
        if data is None:
            return None
        try:
            chain = load_certs_pem(data, str(self.svid_file))
            key = load_private_key(data)
        except ValueError as err:
            log.warning("ignoring %s: %s", self.svid_file, err)
            return None
        if not chain:
            log.warning("ignoring %s: it holds no certificate", self.svid_file)
            return None
        return Stored(chain, key)

    def save_bundle(self, bundle: TrustBundle) -> None:
        with owned_dir(self.state_dir, create=True) as fd:
            write_private_at(fd, BUNDLE_FILE, bundle.pem(), shown=str(self.state_dir / BUNDLE_FILE))

    def load_bundle(self, trust_domain: TrustDomain) -> TrustBundle | None:
        data = self._read(BUNDLE_FILE)
        if data is None:
            return None
        try:
            return TrustBundle(trust_domain, load_certs_pem(data, str(self.state_dir / BUNDLE_FILE)))
        except ValueError as err:
            log.warning("ignoring %s: %s", self.state_dir / BUNDLE_FILE, err)
            return None

    def _read(self, name: str) -> bytes | None:
        if not self.state_dir.exists():
            return None
        with owned_dir(self.state_dir) as dir_fd:
            try:
                fd = os.open(name, _READ, dir_fd=dir_fd)
            except FileNotFoundError:
                return None
            with os.fdopen(fd, "rb") as handle:
                data = handle.read(MAX_FILE_BYTES + 1)
        if len(data) > MAX_FILE_BYTES:
            log.warning("ignoring %s: larger than %d bytes", self.state_dir / name, MAX_FILE_BYTES)
            return None
        return data
