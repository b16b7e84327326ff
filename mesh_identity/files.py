"""Writing secrets and state safely: directories 0700, files 0600, written whole or not at all."""

from __future__ import annotations

import contextlib
import errno
import os
import secrets
import stat
import tempfile
from collections.abc import Iterator
from pathlib import Path


def ensure_private_dir(path: Path) -> Path:
    """Create ``path`` (and parents) with mode 0700; tighten it if it exists with looser bits."""
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    if path.stat().st_mode & 0o077:
        path.chmod(0o700)
    return path


def write_private(path: Path, data: bytes, mode: int = 0o600) -> None:
    """Atomically replace ``path`` with ``data``: a temp file in the same directory, fsync, rename."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, mode)
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        Path(tmp).replace(path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


# -- writing inside a directory someone else may also write to -------------------------------------------------
#
# A directory we write secrets into may be reachable by others (a sidecar's bootstrap directory, which its
# operator or the sidecar's user can change). There we never follow a symbolic link and never write where
# this process's uid is not the owner: every step is relative to an open directory descriptor (``dir_fd``,
# ``O_NOFOLLOW``), so swapping a directory or a file for a link between our checks changes nothing, and the
# new file is renamed into place within that same directory.

_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC


class UnsafePathError(OSError):
    """A directory or file is a symbolic link, or not owned by this process's uid: we do not write there."""


def _owned(st: os.stat_result, shown: str) -> None:
    uid = os.geteuid()
    if st.st_uid != uid:
        raise UnsafePathError(
            f"{shown} is owned by uid {st.st_uid}, not this server's uid {uid}: refusing to write there"
        )


def _lstat_at(name: str, dir_fd: int | None) -> os.stat_result | None:
    try:
        return os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
    except FileNotFoundError:
        return None


@contextlib.contextmanager
def owned_dir(
    path: Path | str, *, dir_fd: int | None = None, create: bool = False, shown: str | None = None
) -> Iterator[int]:
    """Open the directory ``path`` (relative to ``dir_fd`` when given) without following a link at its last
    component; refuse it unless this process's uid owns it. ``create`` makes it (mode 0700) when missing;
    ``shown`` is its path in messages. Yields the descriptor, closed afterwards. Raises
    :class:`UnsafePathError` (an ``OSError``) for a link, a non-directory or another owner."""
    shown = shown or str(path)
    name = os.fspath(path)
    st = _lstat_at(name, dir_fd)
    if st is None and create:
        with contextlib.suppress(FileExistsError):
            os.mkdir(name, 0o700, dir_fd=dir_fd)
        st = _lstat_at(name, dir_fd)
    if st is not None and stat.S_ISLNK(st.st_mode):
        raise UnsafePathError(f"{shown} is a symbolic link: refusing to follow it")
    try:
        fd = os.open(name, _DIR_FLAGS, dir_fd=dir_fd)
    except OSError as err:  # swapped since the lstat: O_NOFOLLOW still held
        if err.errno not in (errno.ELOOP, errno.ENOTDIR):
            raise
        now = _lstat_at(name, dir_fd)
        link = now is not None and stat.S_ISLNK(now.st_mode)
        what = "a symbolic link: refusing to follow it" if link else "not a directory"
        raise UnsafePathError(f"{shown} is {what}") from None
    try:
        _owned(os.fstat(fd), shown)
        yield fd
    finally:
        os.close(fd)


def write_private_at(dir_fd: int, name: str, data: bytes, mode: int = 0o600, *, shown: str | None = None) -> None:
    """Atomically replace the file ``name`` in the open directory ``dir_fd`` with ``data`` (see
    :func:`owned_dir`): a new file created there (``O_EXCL|O_NOFOLLOW``), fsync, renamed over ``name`` within
    the same directory. An existing ``name`` that is not a regular file of this uid is refused
    (:class:`UnsafePathError`); ``shown`` is its path in messages."""
    shown = shown or name
    st = _lstat_at(name, dir_fd)
    if st is not None:
        if stat.S_ISLNK(st.st_mode):
            raise UnsafePathError(f"{shown} is a symbolic link, not a regular file: refusing to replace it")
        if not stat.S_ISREG(st.st_mode):
            raise UnsafePathError(f"{shown} is not a regular file: refusing to replace it")
        _owned(st, shown)
    tmp = f".{name}.{secrets.token_hex(8)}.tmp"
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
    handle = os.fdopen(os.open(tmp, flags, mode, dir_fd=dir_fd), "wb")
    try:
        with handle:
            os.fchmod(handle.fileno(), mode)
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, name, src_dir_fd=dir_fd, dst_dir_fd=dir_fd)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp, dir_fd=dir_fd)
        raise
