"""A pod runner for tests: a small kubelet stand-in made of real Linux network namespaces.

:class:`PodNetwork` makes a bridge on this machine (``10.99.0.1/24`` by default) and, for each pod
(:meth:`PodNetwork.add_pod`), a network namespace with its own loopback, a veth pair whose pod end is ``eth0``
with the address ``10.99.0.N/24`` and a default route via the bridge. In a pod, :meth:`Pod.run` runs an argv
list (``ip netns exec <ns> [setpriv --reuid U --regid U --clear-groups] argv``) to completion, as an init
container runs: ``pod.run(["sh", "-c", command])`` runs the webhook's init container command exactly as written;
:meth:`Pod.start` starts a long-running process (a container) as a given UID and returns a :class:`PodProcess`,
stopped by its pid.

Every name includes this process's pid and a per-network counter (``mi<pid>-<k>...``), so two runs on one
machine never touch each other's bridges, namespaces or veths. :meth:`PodNetwork.teardown` stops the processes
it started (by pid, then any pid still inside one of its namespaces), deletes the namespaces, the veths and the
bridge by name, tolerates parts that are already gone (so it is idempotent and safe after a failed setup), and
raises after it has tried everything if something could not be removed. :meth:`PodNetwork.leftovers` lists
what of it still exists. Use it as a context manager.

Needs root, ``iproute2`` and ``setpriv`` (util-linux); the capture rules need Debian's ``iptables``
(``.ci/setup`` installs it). Only addresses inside the namespaces it creates are used.
"""

from __future__ import annotations

import contextlib
import ipaddress
import itertools
import json
import os
import re
import selectors
import signal
import subprocess
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from types import TracebackType

IFNAMSIZ = 15  # the longest Linux interface name
POD_NAME = re.compile(r"[a-z][a-z0-9]{0,7}")
COMMAND_TIMEOUT = 30.0  # a bound for one `ip`/`iptables` command; not a speed requirement
STOP_TIMEOUT = 5.0

_counter = itertools.count()


class PodRunnerError(Exception):
    """A pod runner command failed, or an input was refused; the message names the command or the field."""


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return _run(["ip", *args], check=check)


def _run(
    argv: Sequence[str], *, check: bool = True, timeout: float = COMMAND_TIMEOUT
) -> subprocess.CompletedProcess[str]:
    done = subprocess.run(list(argv), capture_output=True, text=True, timeout=timeout, check=False)
    if check and done.returncode != 0:
        raise PodRunnerError(f"{' '.join(argv)!r} exited {done.returncode}: {(done.stderr or done.stdout).strip()}")
    return done


def _validate_argv(argv: Sequence[str], what: str) -> list[str]:
    if isinstance(argv, str) or not argv or not all(isinstance(a, str) and a for a in argv):
        raise PodRunnerError(f"{what}: an argv list of non-empty strings is required, got {argv!r}")
    return list(argv)


def _validate_uid(uid: int | None) -> int | None:
    if uid is not None and (isinstance(uid, bool) or not isinstance(uid, int) or not 0 <= uid <= 65534):
        raise PodRunnerError(f"uid: an integer 0..65534 is required, got {uid!r}")
    return uid


def netns_names() -> set[str]:
    """The network namespaces ``ip netns list`` shows (names only)."""
    return {line.split()[0] for line in _ip("netns", "list").stdout.splitlines() if line.strip()}


def link_exists(name: str) -> bool:
    return _ip("link", "show", "dev", name, check=False).returncode == 0


@dataclass
class PodProcess:
    """A process started in a pod; its pid is the program's own (``ip netns exec`` and ``setpriv`` exec it)."""

    argv: list[str]
    popen: subprocess.Popen[bytes]
    _buffer: bytearray = field(default_factory=bytearray)
    output: list[str] = field(default_factory=list)

    @property
    def pid(self) -> int:
        return self.popen.pid

    def expect_line(self, text: str, timeout: float = 30.0) -> str:
        """Read the process's output (stdout and stderr) until a line containing ``text``; return that line.
        AssertionError with everything read so far if the process exits first or ``timeout`` passes."""
        assert self.popen.stdout is not None
        for line in self.output:
            if text in line:
                return line
        deadline = time.monotonic() + timeout
        fd = self.popen.stdout.fileno()
        with selectors.DefaultSelector() as sel:
            sel.register(fd, selectors.EVENT_READ)
            while (left := deadline - time.monotonic()) > 0:
                if not sel.select(left):
                    continue
                chunk = os.read(fd, 65536)
                if not chunk:
                    break
                self._buffer += chunk
                while b"\n" in self._buffer:
                    raw, _, rest = self._buffer.partition(b"\n")
                    self._buffer = bytearray(rest)
                    line = raw.decode(errors="replace")
                    self.output.append(line)
                    if text in line:
                        return line
        raise AssertionError(
            f"no line with {text!r} from {self.argv!r} (exit code {self.popen.poll()}); output: {self.output!r}"
        )

    def stop(self) -> None:
        """SIGTERM, then SIGKILL after a bound; by pid; a process that has already exited is left alone."""
        if self.popen.poll() is None:
            self.popen.send_signal(signal.SIGTERM)
            try:
                self.popen.wait(STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait(STOP_TIMEOUT)
        if self.popen.stdout is not None:
            self.popen.stdout.close()


@dataclass
class Pod:
    """One pod: its network namespace, its address and the host end of its veth pair."""

    network: PodNetwork
    name: str
    netns: str
    ip: ipaddress.IPv4Address
    host_veth: str

    def command(self, argv: Sequence[str], uid: int | None = None) -> list[str]:
        """The argv that runs ``argv`` in this pod's namespace, as ``uid`` (and its gid, no supplementary groups)."""
        argv = _validate_argv(argv, "argv")
        uid = _validate_uid(uid)
        switch = [] if uid is None else ["setpriv", "--reuid", str(uid), "--regid", str(uid), "--clear-groups", "--"]
        return ["ip", "netns", "exec", self.netns, *switch, *argv]

    def run(
        self, argv: Sequence[str], uid: int | None = None, *, check: bool = True, timeout: float = COMMAND_TIMEOUT
    ) -> subprocess.CompletedProcess[str]:
        """Run ``argv`` in the pod to completion (an init container); PodRunnerError if it fails and ``check``."""
        return _run(self.command(argv, uid), check=check, timeout=timeout)

    def start(self, argv: Sequence[str], uid: int | None = None) -> PodProcess:
        """Start ``argv`` in the pod as ``uid`` (a container); the network stops it at teardown."""
        cmd = self.command(argv, uid)
        process = PodProcess(cmd, subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT))
        self.network.processes.append(process)
        return process


class PodNetwork:
    """A bridge and the pods on it; see the module docstring. ``subnet`` is a /24 (or larger) IPv4 network: the
    bridge takes its first address, the pods the next ones."""

    def __init__(self, subnet: str = "10.99.0.0/24") -> None:
        try:
            self.subnet = ipaddress.IPv4Network(subnet)
        except ValueError as err:
            raise PodRunnerError(f"subnet: an IPv4 network such as 10.99.0.0/24 is required, got {subnet!r}") from err
        if self.subnet.prefixlen > 24:
            raise PodRunnerError(f"subnet: a /24 or larger is required, got {subnet!r}")
        self.prefix = f"mi{os.getpid()}-{next(_counter)}"
        self.bridge = f"{self.prefix}b"
        self._hosts = self.subnet.hosts()
        self.gateway = next(self._hosts)
        self.pods: dict[str, Pod] = {}
        self.processes: list[PodProcess] = []
        self._created_bridge = False
        self._check_name(self.bridge, "bridge")

    def _check_name(self, name: str, what: str) -> None:
        if len(name) > IFNAMSIZ:
            raise PodRunnerError(f"{what} name {name!r} is longer than {IFNAMSIZ} characters")

    def _check_subnet_free(self) -> None:
        routes = json.loads(_ip("-j", "-4", "route", "show", "table", "all").stdout or "[]")
        for route in routes:
            dst = route.get("dst", "default")
            if dst == "default":
                continue
            try:
                net = ipaddress.IPv4Network(dst, strict=False)
            except ValueError:
                continue
            if net.overlaps(self.subnet) and not net.is_loopback:
                raise PodRunnerError(
                    f"subnet {self.subnet} overlaps the route {dst} dev {route.get('dev')} on this machine "
                    "(another pod network, or a real one): pass another subnet="
                )

    def start(self) -> PodNetwork:
        """Create the bridge with the gateway address; PodRunnerError if the subnet is already routed here."""
        self._check_subnet_free()
        _ip("link", "add", self.bridge, "type", "bridge")
        self._created_bridge = True
        _ip("addr", "add", f"{self.gateway}/{self.subnet.prefixlen}", "dev", self.bridge)
        _ip("link", "set", self.bridge, "up")
        return self

    def add_pod(self, name: str) -> Pod:
        """A new pod ``name`` (``[a-z][a-z0-9]{0,7}``, unique in this network) with the next free address."""
        if not isinstance(name, str) or not POD_NAME.fullmatch(name):
            raise PodRunnerError(f"pod name: 1-8 lowercase letters or digits, starting with a letter, got {name!r}")
        if name in self.pods:
            raise PodRunnerError(f"pod name: {name!r} already exists in {self.bridge}")
        if not self._created_bridge:
            raise PodRunnerError("add_pod: start() the network first")
        try:
            ip = next(self._hosts)
        except StopIteration:
            raise PodRunnerError(f"add_pod: no address left in {self.subnet}") from None
        pod = Pod(self, name, f"{self.prefix}-{name}", ip, f"{self.prefix}v{len(self.pods)}")
        self._check_name(pod.host_veth, "veth")
        self.pods[name] = pod  # registered before anything exists, so that teardown removes a half-made pod
        _ip("netns", "add", pod.netns)
        _ip("link", "add", pod.host_veth, "type", "veth", "peer", "name", "eth0", "netns", pod.netns)
        _ip("link", "set", pod.host_veth, "master", self.bridge, "up")
        _ip("-n", pod.netns, "addr", "add", f"{ip}/{self.subnet.prefixlen}", "dev", "eth0")
        _ip("-n", pod.netns, "link", "set", "eth0", "up")
        _ip("-n", pod.netns, "link", "set", "lo", "up")
        _ip("-n", pod.netns, "route", "add", "default", "via", str(self.gateway))
        return pod

    def leftovers(self) -> list[str]:
        """What of this network still exists on the machine: ``netns <name>`` and ``link <name>`` entries."""
        namespaces = netns_names()
        found = [f"netns {pod.netns}" for pod in self.pods.values() if pod.netns in namespaces]
        found += [f"link {pod.host_veth}" for pod in self.pods.values() if link_exists(pod.host_veth)]
        if link_exists(self.bridge):
            found.append(f"link {self.bridge}")
        return found

    def teardown(self) -> None:
        """Stop every process, delete every namespace, veth and the bridge by name; idempotent. Raises
        PodRunnerError (after trying everything) if something could not be stopped or removed."""
        errors: list[str] = []
        for process in self.processes:
            try:
                process.stop()
            except (OSError, subprocess.SubprocessError) as err:
                errors.append(f"stop pid {process.pid}: {err}")
        namespaces = netns_names()
        for pod in self.pods.values():
            if pod.netns in namespaces:
                # anything still inside (a child a container left behind) is ours: stop it by pid
                for pid in _ip("netns", "pids", pod.netns, check=False).stdout.split():
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(int(pid), signal.SIGKILL)
                done = _ip("netns", "del", pod.netns, check=False)
                if done.returncode != 0:
                    errors.append(f"netns del {pod.netns}: {done.stderr.strip()}")
            if link_exists(pod.host_veth):
                done = _ip("link", "del", pod.host_veth, check=False)
                if done.returncode != 0 and link_exists(pod.host_veth):
                    errors.append(f"link del {pod.host_veth}: {done.stderr.strip()}")
        if link_exists(self.bridge):
            done = _ip("link", "del", self.bridge, check=False)
            if done.returncode != 0:
                errors.append(f"link del {self.bridge}: {done.stderr.strip()}")
        if errors:
            raise PodRunnerError("teardown left something behind: " + "; ".join(errors))

    def __enter__(self) -> PodNetwork:
        try:
            return self.start()
        except BaseException:
            self.teardown()
            raise

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.teardown()
