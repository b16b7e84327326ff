"""Kubelet's ConfigMap and Secret volumes: a directory laid out and updated the way kubelet's atomic writer
(``pkg/volume/util/atomic_writer.go``) does it, so that what reads a mounted file in a pod can be tested against
the real layout and the real update.

The layout of a volume directory::

    ..2026_12_02_10_00_00.123456789/   the payload: one file per key (mode 0644, or ``default_mode``); dir 0755
    ..data -> ..2026_12_02_10_00_00.123456789
    ca.crt -> ..data/ca.crt            a user-visible name: a link through ``..data``, made once

An update (:meth:`ProjectedVolume.update`) writes the whole new payload into a new timestamped directory, makes a
link ``..data_tmp`` to it and renames that over ``..data`` (one ``rename(2)``: atomic), then adds the user-visible
links of new names, removes those of names that left, and removes the previous timestamped directory. A reader
opening ``ca.crt`` at any moment gets the old payload or the new one, whole. The rename is a move into the volume
directory (inotify ``IN_MOVED_TO`` of ``..data``): what Envoy's ``watched_directory`` reacts to. An update whose
payload equals what is there writes nothing (as kubelet).

:meth:`ProjectedVolume.sync_from` projects a ConfigMap (``data`` as UTF-8, ``binaryData`` decoded) or a Secret
(``data`` decoded) read through the real ``kubernetes`` client from the Kubernetes API test server, optionally only
some keys at given paths (the volume's ``items``), as kubelet does on each sync of a pod's volumes.
"""

from __future__ import annotations

import base64
import os
import secrets
import shutil
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Literal

import kubernetes

from tests.fakes.kube.server import KubeServer

DATA_DIR = "..data"
NEW_DATA_DIR = "..data_tmp"
DEFAULT_MODE = 0o644  # a ConfigMap or Secret volume's defaultMode when none is given
MAX_NAME = 255
MAX_PATH = 4096

VolumeKind = Literal["ConfigMap", "Secret"]


class VolumeSourceError(Exception):
    """The object a volume projects is missing, or a payload path is one kubelet refuses."""


def check_path(path: str) -> str:
    """``path`` if kubelet would project a file there (relative, no ``..`` element, not starting ``..``, names of at
    most 255 characters, at most 4096 in all); VolumeSourceError naming what is wrong otherwise."""
    if not path:
        raise VolumeSourceError("a payload path is empty")
    if path.startswith("/"):
        raise VolumeSourceError(f"payload path {path!r} is absolute; it must be relative to the volume")
    if len(path) > MAX_PATH:
        raise VolumeSourceError(f"payload path {path[:40]!r}... is longer than {MAX_PATH} characters")
    parts = path.split("/")
    if ".." in parts:
        raise VolumeSourceError(f"payload path {path!r} contains '..'")
    if parts[0].startswith(".."):
        raise VolumeSourceError(f"payload path {path!r} starts with '..' (kubelet keeps those names for itself)")
    if any(len(part) > MAX_NAME for part in parts):
        raise VolumeSourceError(f"payload path {path!r} has a name longer than {MAX_NAME} characters")
    if any(not part or part == "." for part in parts):
        raise VolumeSourceError(f"payload path {path!r} has an empty or '.' element")
    return path


class ProjectedVolume:
    """One ConfigMap or Secret volume directory, written as kubelet writes it (see the module docstring).

    :param directory: the volume's directory (the pod's mount point); created when missing.
    :param default_mode: the mode of every projected file (the volume's ``defaultMode``).
    """

    def __init__(self, directory: Path, *, default_mode: int = DEFAULT_MODE) -> None:
        self.directory = directory
        self.default_mode = default_mode
        self.updates = 0  # payloads written (an unchanged one is not)

    def path(self, key: str) -> Path:
        """The user-visible path of ``key`` (what a container opens)."""
        return self.directory / check_path(key)

    def data_dir(self) -> Path | None:
        """The timestamped directory ``..data`` points to now, or None before the first write."""
        try:
            return self.directory / os.readlink(self.directory / DATA_DIR)
        except FileNotFoundError:
            return None

    def payload(self) -> dict[str, bytes]:
        """What the volume holds now, by payload path (read through ``..data``)."""
        current = self.data_dir()
        if current is None:
            return {}
        found = {}
        for root, _dirs, files in os.walk(current):
            for name in files:
                full = Path(root) / name
                found[str(full.relative_to(current))] = full.read_bytes()
        return found

    def update(self, payload: Mapping[str, bytes]) -> bool:
        """Project ``payload`` (payload path -> content): the atomic swap of ``..data``. Returns False (and writes
        nothing) when the volume already holds exactly that payload."""
        for path in payload:
            check_path(path)
        self.directory.mkdir(parents=True, exist_ok=True)
        old = self.data_dir()
        if old is not None and self.payload() == dict(payload):
            return False
        new = self._new_timestamped_dir()
        try:
            for path, content in payload.items():
                target = new / path
                target.parent.mkdir(parents=True, exist_ok=True)
                target.write_bytes(content)
                target.chmod(self.default_mode)  # the mode whatever the umask
            link = self.directory / NEW_DATA_DIR
            link.unlink(missing_ok=True)
            link.symlink_to(new.name)
            os.rename(link, self.directory / DATA_DIR)  # the one atomic step: readers see old or new
        except BaseException:
            shutil.rmtree(new, ignore_errors=True)
            (self.directory / NEW_DATA_DIR).unlink(missing_ok=True)
            raise
        visible = {path.split("/")[0] for path in payload}
        for name in visible:
            entry = self.directory / name
            if not entry.is_symlink():
                entry.symlink_to(f"{DATA_DIR}/{name}")
        if old is not None:
            for entry in self.directory.iterdir():
                if entry.is_symlink() and not entry.name.startswith("..") and entry.name not in visible:
                    entry.unlink()
            shutil.rmtree(old)
        self.updates += 1
        return True

    def sync_from(
        self,
        kube: KubeServer,
        kind: VolumeKind,
        namespace: str,
        name: str,
        *,
        items: Mapping[str, str] | None = None,
        optional: bool = False,
    ) -> bool:
        """Project the ConfigMap or Secret ``namespace/name`` as kubelet does, read through the real client.

        :param items: only these keys, each at the given payload path (a volume's ``items``); a key missing
            from the object is an error, as kubelet's.
        :param optional: a missing object projects an empty volume instead of failing (``optional: true``).
        :return: whether the volume changed (see :meth:`update`).
        """
        data = read_object_data(kube, kind, namespace, name, optional=optional)
        if items is not None:
            missing = sorted(set(items) - set(data))
            if missing:
                raise VolumeSourceError(
                    f"{kind} {namespace}/{name} has no key {', '.join(repr(k) for k in missing)} (volume items)"
                )
            data = {check_path(path): data[key] for key, path in items.items()}
        return self.update(data)

    def _new_timestamped_dir(self) -> Path:
        stamp = time.strftime("..%Y_%m_%d_%H_%M_%S.", time.gmtime())
        for _attempt in range(100):
            candidate = self.directory / f"{stamp}{secrets.randbelow(10**9):09d}"
            try:
                candidate.mkdir()
            except FileExistsError:
                continue
            candidate.chmod(0o755)
            return candidate
        raise FileExistsError(f"no free timestamped directory name in {self.directory}")


def read_object_data(
    kube: KubeServer, kind: VolumeKind, namespace: str, name: str, *, optional: bool = False
) -> dict[str, bytes]:
    """The keys of a ConfigMap (``data`` UTF-8, ``binaryData``) or a Secret (``data``) as file contents, read with
    the real ``kubernetes`` client; VolumeSourceError when the object is missing (an empty dict if ``optional``)."""
    with kubernetes.client.ApiClient(kube.client_configuration()) as api:
        core = kubernetes.client.CoreV1Api(api)
        try:
            if kind == "ConfigMap":
                config_map = core.read_namespaced_config_map(name, namespace)
                texts: dict[str, str] = config_map.data or {}
                binary: Mapping[str, bytes | str] = config_map.binary_data or {}  # base64, as on the wire
                out = {key: value.encode() for key, value in texts.items()}
                out.update({key: base64.b64decode(value) for key, value in binary.items()})
                return out
            secret = core.read_namespaced_secret(name, namespace)
            encoded: Mapping[str, bytes | str] = secret.data or {}  # base64, as on the wire
            return {key: base64.b64decode(value) for key, value in encoded.items()}
        except kubernetes.client.ApiException as err:
            if err.status == 404:
                if optional:
                    return {}
                raise VolumeSourceError(f'{kind.lower()} "{name}" not found in namespace {namespace}') from None
            raise
