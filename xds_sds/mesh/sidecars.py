"""The bootstrap directories of the sidecars a server knows, so that it can keep their certificates fresh.

A sidecar's bootstrap certificate (see :mod:`xds_sds.resources.bootstrap`) authenticates it to the xDS server each time
it (re)connects, so it must stay valid as long as the sidecar runs, and chain to a root the server trusts after
a root rotation. The server owns that: every bootstrap directory written for a node is registered under
``<state_dir>/sidecars/<node>``, either as the directory itself or as a symbolic link to where
``mesh-identity bootstrap --out DIR`` wrote it. ``mesh-identity serve`` renews the certificate of every
registered sidecar of an identity whenever that identity rotates, and the trust bundle of all of them whenever
the bundle changes. A sidecar that is not registered (its directory moved or deleted) is skipped. Renewal
resolves the registry link to the bootstrap directory; from there it follows no link (not the directory itself,
not its ``sds/``, not a file) and writes only where the server's uid owns (:mod:`xds_sds.resources.bootstrap`).
A sidecar whose directory was tampered with is logged and skipped; the others are renewed.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Iterable
from pathlib import Path

from mesh_identity.files import ensure_private_dir
from mesh_identity.mesh.model import Address
from mesh_identity.spiffe import SpiffeId
from mesh_identity.svid import TrustBundle, X509Svid
from xds_sds.resources.bootstrap import (
    BOOTSTRAP_FILE,
    BootstrapFiles,
    renew_bootstrap,
    renew_bootstrap_bundle,
    write_bootstrap,
)

log = logging.getLogger(__name__)

SIDECARS_DIR = "sidecars"


class SidecarDirs:
    """The registry of bootstrap directories, ``<state_dir>/sidecars/<node>``."""

    def __init__(self, state_dir: Path) -> None:
        self.root = state_dir / SIDECARS_DIR

    def default_dir(self, node: str) -> Path:
        return self.root / node

    def register(self, node: str, directory: Path) -> None:
        """Remember that ``node``'s bootstrap lives in ``directory`` (a link unless it is the default place)."""
        ensure_private_dir(self.root)
        entry = self.default_dir(node)
        target = directory.resolve()
        if entry.resolve() == target:
            return
        if entry.is_symlink():
            entry.unlink()
        elif entry.exists():
            raise FileExistsError(f"{entry} is a directory of its own: remove it to bootstrap {node} elsewhere")
        temp = self.root / f".{node}.link"
        temp.unlink(missing_ok=True)
        temp.symlink_to(target)
        os.replace(temp, entry)

    def directory(self, node: str) -> Path | None:
        """Where ``node``'s bootstrap is, or None when it is not registered (or no longer there)."""
        entry = self.default_dir(node)
        if not (entry / BOOTSTRAP_FILE).is_file():
            return None
        return entry.resolve()

    def write(
        self,
        svid: X509Svid,
        *,
        node: str,
        cluster: str,
        xds: Address,
        server_identity: SpiffeId,
        out_dir: Path | None = None,
        admin: Address | None = None,
        delta: bool = False,
        stats: Address | None = None,
        ca_dir: Path | None = None,
    ) -> BootstrapFiles:
        """Write ``node``'s bootstrap to ``out_dir`` (default ``<state_dir>/sidecars/<node>``) and register it
        (``ca_dir``: see :func:`~xds_sds.resources.bootstrap.write_bootstrap`; its bundle is not renewed here)."""
        directory = out_dir if out_dir is not None else self.default_dir(node)
        if out_dir is None:
            ensure_private_dir(directory)
        # The operator named this directory: a link there is followed once, here; below it nothing is.
        directory = directory.resolve()
        files = write_bootstrap(
            svid, directory, node=node, cluster=cluster, xds=xds, server_identity=server_identity,
            admin=admin, delta=delta, stats=stats, ca_dir=ca_dir,
        )  # fmt: skip
        self.register(node, directory)
        return files

    def renew(self, svid: X509Svid, nodes: Iterable[str]) -> list[str]:
        """Give the registered sidecars among ``nodes`` the bootstrap certificate ``svid``; returns those renewed."""
        return self._renew_each(nodes, "bootstrap certificate", lambda directory: renew_bootstrap(svid, directory))

    def renew_bundle(self, bundle: TrustBundle, nodes: Iterable[str]) -> list[str]:
        """Give the registered sidecars among ``nodes`` the trust bundle that verifies the xDS server."""
        return self._renew_each(nodes, "trust bundle", lambda directory: renew_bootstrap_bundle(bundle, directory))

    def _renew_each(self, nodes: Iterable[str], what: str, renew: Callable[[Path], object]) -> list[str]:
        """Apply ``renew`` to the directory of each registered sidecar among ``nodes``; returns those renewed
        (a failure is logged and skips that node; ``renew`` answering False means nothing was there to renew)."""
        renewed = []
        for node in nodes:
            directory = self.directory(node)
            if directory is None:
                continue
            try:
                done = renew(directory)
            except OSError as err:
                log.warning("cannot renew the %s of %s in %s: %s", what, node, directory, err)
                continue
            if done is not False:
                renewed.append(node)
        return renewed
