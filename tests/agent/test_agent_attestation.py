"""Workload attestation from the kernel and procfs, on real Unix sockets with real processes."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from mesh_identity.spiffe import SpiffeId
from xds_sds.agent.attestation import AttestationError, Caller, attest, peer_credentials, pod_uid_of
from xds_sds.agent.selectors import Entry, Selector, SelectorError, granted

POD = "3f2b8c1e-0c5d-4a8e-9f7a-2b1c3d4e5f60"
FRONTEND = SpiffeId.parse("spiffe://example.org/ns/shop/sa/frontend")
BACKEND = SpiffeId.parse("spiffe://example.org/ns/shop/sa/backend")


def test_a_connected_process_is_attested_by_uid_gid_executable() -> None:
    left, right = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    with left, right:
        caller = attest(left)
    assert (caller.pid, caller.uid, caller.gid) == (os.getpid(), os.getuid(), os.getgid())
    assert caller.exe == os.path.realpath(sys.executable)
    assert caller.selectors >= {
        Selector.uid(os.getuid()),
        Selector.gid(os.getgid()),
        Selector.path(os.path.realpath(sys.executable)),
    }


@pytest.fixture
def public_dir() -> Iterator[Path]:
    """A directory other uids can reach (pytest's tmp_path is under a 0700 directory)."""
    path = Path(tempfile.mkdtemp(prefix="mi-attest-", dir="/tmp"))
    path.chmod(0o755)
    yield path
    shutil.rmtree(path, ignore_errors=True)


def test_a_child_as_another_uid_is_seen_as_that_uid(public_dir: Path) -> None:
    path = public_dir / "s.sock"
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(str(path))
    path.chmod(0o666)
    server.listen(1)
    server.settimeout(30)
    code = f"import socket,time; s=socket.socket(socket.AF_UNIX); s.connect({str(path)!r}); s.recv(1)"
    child = subprocess.Popen(
        ["setpriv", "--reuid", "1234", "--regid", "2345", "--clear-groups", sys.executable, "-c", code]
    )
    try:
        conn, _ = server.accept()
        with conn:
            caller = attest(conn)
            assert (caller.pid, caller.uid, caller.gid) == (child.pid, 1234, 2345)
            assert caller.exe == os.path.realpath(sys.executable)
            conn.sendall(b"x")
    finally:
        child.wait(30)
        server.close()


def test_a_caller_that_exited_before_accept_is_refused(tmp_path: Path) -> None:
    """The pid-reuse guard: the connecting process is gone when the agent reads procfs, so nothing read there
    can be trusted to be the caller's (the kernel's pidfd of the connecting process says it is dead)."""
    path = tmp_path / "s.sock"
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(str(path))
    server.listen(1)
    server.settimeout(30)
    code = f"import socket; s=socket.socket(socket.AF_UNIX); s.connect({str(path)!r})"
    subprocess.run([sys.executable, "-c", code], check=True)  # connected, exited and reaped
    conn, _ = server.accept()
    with conn, server:
        pid, _, _ = peer_credentials(conn)
        with pytest.raises(AttestationError, match=rf"the caller \(pid {pid}, uid \d+\) exited while it was being"):
            attest(conn)


@pytest.mark.parametrize("family", [socket.AF_INET, socket.AF_UNIX])
def test_a_socket_without_a_peer_has_no_credentials(family: int) -> None:
    with (
        socket.socket(family, socket.SOCK_STREAM) as sock,
        pytest.raises(AttestationError, match="no peer credentials"),
    ):
        attest(sock)


@pytest.mark.parametrize(
    ("cgroup", "pod"),
    [
        (
            "0::/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod3f2b8c1e_0c5d_4a8e_9f7a_2b1c3d4e5f60"
            ".slice/cri-containerd-0123abcd.scope\n",
            POD,
        ),
        (f"12:memory:/kubepods/besteffort/pod{POD}/0123abcd\n11:cpu:/kubepods/besteffort/pod{POD}/0123abcd\n", POD),
        (f"0::/kubepods/pod{POD}/abc\n", POD),
        ("0::/user.slice/user-1000.slice/session-2.scope\n", None),
        ("", None),
        (f"0::/kubepods/pod{POD}/a\n1:cpu:/kubepods/pod{POD.replace('3f', '4f')}/b\n", None),  # two pods: ambiguous
        ("0::/kubepods/podNOT-A-UID/a\n", None),
    ],
)
def test_pod_uid_from_cgroup(cgroup: str, pod: str | None) -> None:
    assert pod_uid_of(cgroup) == pod


def test_attestation_reads_the_pod_from_procfs(tmp_path: Path) -> None:
    """``attest`` reads ``<proc>/<pid>/cgroup`` (a directory laid out like procfs stands in for a pod)."""
    proc = tmp_path / "proc"
    me = proc / str(os.getpid())
    me.mkdir(parents=True)
    (me / "cgroup").write_text(f"0::/kubepods/burstable/pod{POD}/c0ffee\n")
    left, right = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    with left, right:
        caller = attest(left, proc)
    assert caller.pod_uid == POD and caller.exe is None
    assert Selector.pod_uid(POD) in caller.selectors


def test_entries_grant_when_every_selector_matches() -> None:
    entries = [
        Entry(FRONTEND, frozenset({Selector.uid(1001)})),
        Entry(BACKEND, frozenset({Selector.uid(1001), Selector.path("/usr/bin/envoy")})),
        Entry(FRONTEND, frozenset({Selector.gid(50)})),
    ]
    plain = Caller(10, 1001, 1001, "/usr/bin/python3")
    envoy = Caller(11, 1001, 50, "/usr/bin/envoy")
    assert granted(entries, plain.selectors) == (FRONTEND,)
    assert granted(entries, envoy.selectors) == (FRONTEND, BACKEND)  # entry order, each identity once
    assert granted(entries, Caller(12, 1002, 1002).selectors) == ()


def test_selector_text_and_entries_without_selectors() -> None:
    assert str(Selector.parse("k8s:pod-uid:" + POD)) == "k8s:pod-uid:" + POD
    with pytest.raises(SelectorError, match="has no selectors"):
        Entry(FRONTEND, frozenset())
    with pytest.raises(SelectorError, match="is not a selector"):
        Selector.parse("docker:label:x")
