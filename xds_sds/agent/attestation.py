"""Workload attestation: who is on the other end of a Unix socket, from the kernel and procfs.

At accept the kernel says which process connected (``SO_PEERCRED``: pid, uid, gid, as they were at
``connect()``). The agent then reads, at once, what procfs says of that pid: the executable
(``/proc/<pid>/exe``) and, where the caller runs in Kubernetes, its pod's UID (``/proc/<pid>/cgroup``).

The pid-reuse caveat: a pid names a process only while it lives. A caller that connects and exits at once
leaves its pid free, and another process could get it before procfs is read, so that the agent would read that
other process's executable. Where the kernel offers it (Linux 6.5+, ``SO_PEERPIDFD``) the agent takes a pidfd of
the connecting process itself and, after reading procfs, checks that this process is still alive: a live
process keeps its pid, so what was read was the caller's. Without it, the agent opens a pidfd of the pid at
accept, which narrows the window to the moment between ``connect()`` and ``accept()`` but cannot close it. The
uid and gid come from the kernel and are never subject to this race.

Other limits, as for every ``SO_PEERCRED`` attestor: the facts are those of the process that *connected*; a
process that then passes the connected socket to another (``SCM_RIGHTS``), or calls ``execve`` on another
executable, keeps the identity of the connection. procfs must be that of the agent's pid namespace (a caller
in a pid namespace the agent cannot see has pid 0: it is attested by uid and gid only). An agent that is not
root cannot read the executable of other users' processes; those callers have no ``unix:path`` selector.
"""

from __future__ import annotations

import os
import re
import signal
import socket
import struct
from dataclasses import dataclass
from pathlib import Path

from xds_sds.agent.selectors import Selector

SO_PEERPIDFD = getattr(socket, "SO_PEERPIDFD", 77)  # Linux 6.5; Python 3.11 does not name it
MAX_CGROUP_BYTES = 64 * 1024
_POD = re.compile(r"pod([0-9a-f]{8}[-_][0-9a-f]{4}[-_][0-9a-f]{4}[-_][0-9a-f]{4}[-_][0-9a-f]{12})")
PROC = Path("/proc")


class AttestationError(Exception):
    """The caller cannot be attested (the socket has no peer credentials, or the caller exited meanwhile)."""


@dataclass(frozen=True, slots=True)
class Caller:
    """What the kernel and procfs said about a connected process, at accept."""

    pid: int
    uid: int
    gid: int
    exe: str | None = None
    pod_uid: str | None = None

    @property
    def selectors(self) -> frozenset[Selector]:
        found = {Selector.uid(self.uid), Selector.gid(self.gid)}
        if self.exe is not None and self.exe.startswith("/") and os.path.normpath(self.exe) == self.exe:
            found.add(Selector.path(self.exe))
        if self.pod_uid is not None:
            found.add(Selector.pod_uid(self.pod_uid))
        return frozenset(found)

    def describe(self) -> str:
        """For logs: ``pid 4242 uid 1001 gid 1001 /usr/bin/python3.11``."""
        parts = [f"pid {self.pid}", f"uid {self.uid}", f"gid {self.gid}"]
        if self.exe is not None:
            parts.append(repr(self.exe) if not self.exe.isprintable() else self.exe)
        if self.pod_uid is not None:
            parts.append(f"pod {self.pod_uid}")
        return " ".join(parts)


def peer_credentials(sock: socket.socket) -> tuple[int, int, int]:
    """``(pid, uid, gid)`` of the process that connected ``sock`` (a Unix stream socket)."""
    try:
        raw = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    except OSError as err:
        raise AttestationError(f"the socket has no peer credentials ({err.strerror})") from None
    pid, uid, gid = struct.unpack("3i", raw)
    if uid == -1 or gid == -1:  # the kernel's "no credentials": not a connected Unix socket
        raise AttestationError("the socket has no peer credentials (it is not a connected Unix socket)")
    return pid, uid & 0xFFFFFFFF, gid & 0xFFFFFFFF


def _peer_pidfd(sock: socket.socket, pid: int) -> int | None:
    """A pidfd of the connecting process (``SO_PEERPIDFD``), else of ``pid`` now; None when neither works."""
    try:
        fd = int(sock.getsockopt(socket.SOL_SOCKET, SO_PEERPIDFD))
    except OSError:
        fd = -1
    if fd >= 0:
        return fd
    if pid <= 0:
        return None
    try:
        return os.pidfd_open(pid)
    except OSError:
        return None


def _alive(pidfd: int) -> bool:
    try:
        signal.pidfd_send_signal(pidfd, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # it exists; we may not signal it
        return True
    return True


def attest(sock: socket.socket, proc: Path = PROC) -> Caller:
    """Attest the process that connected ``sock``: call this right at accept (see the module docstring)."""
    pid, uid, gid = peer_credentials(sock)
    if pid <= 0:
        return Caller(0, uid, gid)
    pidfd = _peer_pidfd(sock, pid)
    try:
        exe = executable_of(proc, pid)
        pod = pod_uid_of(cgroup_of(proc, pid))
        if pidfd is not None and not _alive(pidfd):
            raise AttestationError(f"the caller (pid {pid}, uid {uid}) exited while it was being attested")
    finally:
        if pidfd is not None:
            os.close(pidfd)
    return Caller(pid, uid, gid, exe, pod)


def executable_of(proc: Path, pid: int) -> str | None:
    """The target of ``/proc/<pid>/exe``; None when it cannot be read (gone, a kernel thread, not permitted)."""
    try:
        return os.readlink(proc / str(pid) / "exe")
    except OSError:
        return None


def cgroup_of(proc: Path, pid: int) -> str:
    """The text of ``/proc/<pid>/cgroup`` (at most :data:`MAX_CGROUP_BYTES`); empty when it cannot be read."""
    try:
        with open(proc / str(pid) / "cgroup", "rb") as handle:
            return handle.read(MAX_CGROUP_BYTES).decode("utf-8", "replace")
    except OSError:
        return ""


def pod_uid_of(cgroup: str) -> str | None:
    """The Kubernetes pod UID in a ``/proc/<pid>/cgroup`` text, as the kubelet names pod cgroups: ``pod<UID>``
    with dashes (cgroupfs driver) or underscores (systemd driver: ``kubepods-besteffort-pod<UID>.slice``). None
    when there is none, or when the lines name more than one pod."""
    found: set[str] = set()
    for line in cgroup.splitlines():
        _, _, path = line.partition(":")
        _, _, path = path.partition(":")
        for match in _POD.finditer(path):
            found.add(match.group(1).replace("_", "-"))
    return found.pop() if len(found) == 1 else None
