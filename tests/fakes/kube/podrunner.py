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
what of it still exists. Use it as a context manager. :meth:`PodNetwork.remove_pod` removes one pod early.

Service ClusterIPs, as kube-proxy's iptables mode makes them (:meth:`PodNetwork.set_services`, which the kubelet
stand-in of :mod:`tests.fakes.kube.kubelet` calls as EndpointSlices change): in this machine's root namespace,
chains of this network's own (``<prefix>-SVC``, ``<prefix>-MASQ`` in ``nat``, ``<prefix>-FWD`` in ``filter``)
reached only from traffic entering from (or, for ``-MASQ``, leaving to) this network's bridge::

    nat PREROUTING  -i <bridge> -> <prefix>-SVC: -d <clusterIP> --dport <port> DNAT to one ready endpoint
                                          (``statistic --mode random``: each equally likely)
    nat POSTROUTING -o <bridge> -> <prefix>-MASQ: MASQUERADE of what was DNATed from a clusterIP (the hairpin:
                                          replies come back through the host, which undoes the DNAT)
    filter FORWARD  -i <bridge> -> <prefix>-FWD: REJECT a clusterIP not DNATed (no ready endpoint, or a port the
                                          Service does not have); ACCEPT bridge to bridge (a host whose FORWARD
                                          policy is DROP, as Docker sets it); REJECT anything else forwarded from
                                          the pods (they never reach another network through this machine)

and ``net.ipv4.ip_forward=1`` while any network (of any process on this machine) has services: the first one
keeps the value it found in :data:`FORWARDING_STATE`, the last one to clear its services writes it back.
:meth:`PodNetwork.clear_services` (and teardown) deletes the jumps and the chains by name. Each pod's bridge port
is in hairpin mode (as kubelet sets it), so that a pod reaches itself through a ClusterIP.

Needs root, ``iproute2`` and ``setpriv`` (util-linux); the capture rules and the services need Debian's
``iptables`` (``.ci/setup`` installs it). Only addresses inside the namespaces it creates are used.
"""

from __future__ import annotations

import contextlib
import fcntl
import ipaddress
import itertools
import json
import os
import re
import selectors
import signal
import subprocess
import tempfile
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import IO

IFNAMSIZ = 15  # the longest Linux interface name
POD_NAME = re.compile(r"[a-z][a-z0-9]{0,7}")
COMMAND_TIMEOUT = 30.0  # a bound for one `ip`/`iptables` command; not a speed requirement
STOP_TIMEOUT = 5.0

_counter = itertools.count()
IP_FORWARD = "/proc/sys/net/ipv4/ip_forward"
PROTOCOLS = ("tcp", "udp")

# net.ipv4.ip_forward is one per machine, shared by the pod networks of every process: the value before the first
# of them set it is kept in this file (under flock), and the last one to clear its services (no chain <prefix>-SVC
# of a live process left) writes it back and removes the file
FORWARDING_STATE = Path(tempfile.gettempdir()) / "mesh-identity-podrunner-ip_forward"
_SERVICE_CHAIN = re.compile(r"-N (mi(\d+)-\d+)-SVC")


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


def _run_input(argv: Sequence[str], text: str) -> None:
    done = subprocess.run(list(argv), input=text, capture_output=True, text=True, timeout=COMMAND_TIMEOUT, check=False)
    if done.returncode != 0:
        raise PodRunnerError(f"{' '.join(argv)!r} exited {done.returncode}: {done.stderr.strip()}\ninput:\n{text}")


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


def _iptables(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return _run(["iptables", "-w", *args], check=check)


def chain_exists(table: str, chain: str) -> bool:
    return _iptables("-t", table, "-S", chain, check=False).returncode == 0


@dataclass(frozen=True)
class ServiceRoute:
    """One port of a Service's ClusterIP and the endpoints (pod IP, port) it is DNATed to (none: rejected)."""

    cluster_ip: str
    port: int
    protocol: str = "tcp"
    endpoints: tuple[tuple[str, int], ...] = ()

    def __post_init__(self) -> None:
        try:
            ipaddress.IPv4Address(self.cluster_ip)
        except ValueError:
            raise PodRunnerError(f"cluster_ip: an IPv4 address is required, got {self.cluster_ip!r}") from None
        if isinstance(self.port, bool) or not isinstance(self.port, int) or not 1 <= self.port <= 65535:
            raise PodRunnerError(f"port: 1..65535 is required, got {self.port!r}")
        if self.protocol not in PROTOCOLS:
            raise PodRunnerError(f"protocol: one of {', '.join(PROTOCOLS)} is required, got {self.protocol!r}")
        for endpoint in self.endpoints:
            ip, port = endpoint
            try:
                ipaddress.IPv4Address(ip)
            except ValueError:
                raise PodRunnerError(f"endpoints: an IPv4 address is required, got {ip!r}") from None
            if isinstance(port, bool) or not isinstance(port, int) or not 1 <= port <= 65535:
                raise PodRunnerError(f"endpoints: port 1..65535 is required, got {port!r} for {ip}")


@contextlib.contextmanager
def _forwarding_state() -> Iterator[IO[str]]:
    """The state file, open and locked (flock: other processes and threads wait)."""
    for _attempt in range(100):
        handle = open(FORWARDING_STATE, "a+")  # noqa: SIM115 - closed below (closing releases the lock)
        try:
            fcntl.flock(handle, fcntl.LOCK_EX)
            try:
                current = os.stat(FORWARDING_STATE).st_ino == os.fstat(handle.fileno()).st_ino
            except FileNotFoundError:
                current = False
            if current:  # not the file the last user removed while this one waited for it
                handle.seek(0)
                yield handle
                return
        finally:
            handle.close()
    raise PodRunnerError(f"{FORWARDING_STATE}: could not lock it")


def service_users(other_than: str = "") -> list[str]:
    """The prefixes of pod networks of live processes that have services (their ``-SVC`` chain), but one."""
    found = []
    for line in _iptables("-t", "nat", "-S").stdout.splitlines():
        match = _SERVICE_CHAIN.fullmatch(line.strip())
        if match and match.group(1) != other_than and pid_alive(int(match.group(2))):
            found.append(match.group(1))
    return found


def pid_alive(pid: int) -> bool:
    """Whether a process of that pid exists (one of another user's counts)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _enable_forwarding() -> None:
    with _forwarding_state() as state:
        current = Path(IP_FORWARD).read_text().strip()
        if not state.read().strip():  # the first user: keep the value it found
            state.seek(0)
            state.truncate()
            state.write(current)
            state.flush()
        if current != "1":
            Path(IP_FORWARD).write_text("1")


def _restore_forwarding(user: str) -> None:
    """Write back the value the first user found, unless another network (of any process) still has services."""
    with _forwarding_state() as state:
        if service_users(other_than=user):
            return
        before = state.read().strip()
        if before and Path(IP_FORWARD).read_text().strip() != before:
            Path(IP_FORWARD).write_text(before)
        FORWARDING_STATE.unlink()


def _forward_policies() -> dict[str, str]:
    """The filter FORWARD policy of each iptables backend in use (``nft``; ``legacy`` only when its filter table
    exists already: asking would load it)."""
    found = {}
    try:
        legacy = "filter" in Path("/proc/net/ip_tables_names").read_text().split()
    except OSError:
        legacy = False
    for backend in ("nft", "legacy") if legacy else ("nft",):
        try:
            done = _run([f"iptables-{backend}", "-w", "-S", "FORWARD"], check=False)
        except FileNotFoundError:
            continue
        for line in done.stdout.splitlines():
            if line.startswith("-P FORWARD "):
                found[backend] = line.split()[2]
    return found


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
        self._veths = itertools.count()
        self._check_name(self.bridge, "bridge")
        self.service_chains = {"nat": (f"{self.prefix}-SVC", f"{self.prefix}-MASQ"), "filter": (f"{self.prefix}-FWD",)}
        self.routes: tuple[ServiceRoute, ...] = ()  # what set_services last programmed
        self._services_lock = threading.Lock()
        self._services_installed = False
        self._services_touched = False
        self._closed = False

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
        pod = Pod(self, name, f"{self.prefix}-{name}", ip, f"{self.prefix}v{next(self._veths)}")
        self._check_name(pod.host_veth, "veth")
        self.pods[name] = pod  # registered before anything exists, so that teardown removes a half-made pod
        _ip("netns", "add", pod.netns)
        _ip("link", "add", pod.host_veth, "type", "veth", "peer", "name", "eth0", "netns", pod.netns)
        _ip("link", "set", pod.host_veth, "master", self.bridge, "up")
        # hairpin, as kubelet sets it: a pod reaching itself through a ClusterIP is DNATed back out of its own port
        _ip("link", "set", pod.host_veth, "type", "bridge_slave", "hairpin", "on")
        _ip("-n", pod.netns, "addr", "add", f"{ip}/{self.subnet.prefixlen}", "dev", "eth0")
        _ip("-n", pod.netns, "link", "set", "eth0", "up")
        _ip("-n", pod.netns, "link", "set", "lo", "up")
        _ip("-n", pod.netns, "route", "add", "default", "via", str(self.gateway))
        return pod

    def remove_pod(self, name: str) -> None:
        """Remove pod ``name``: stop what still runs inside its namespace (by pid), delete the namespace and its
        veth by name; a pod already removed is left alone. Its address is not handed out again."""
        pod = self.pods.get(name)
        if pod is None:
            return
        errors = self._remove(pod, netns_names())
        if errors:
            raise PodRunnerError(f"remove_pod {name!r} left something behind: " + "; ".join(errors))
        del self.pods[name]

    def _remove(self, pod: Pod, namespaces: set[str]) -> list[str]:
        errors = []
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
        return errors

    # -- services (see the module docstring)
    def _jumps(self) -> list[tuple[str, str, list[str]]]:
        svc, masq = self.service_chains["nat"]
        (fwd,) = self.service_chains["filter"]
        return [
            ("nat", "PREROUTING", ["-i", self.bridge, "-j", svc]),
            ("nat", "POSTROUTING", ["-o", self.bridge, "-j", masq]),
            ("filter", "FORWARD", ["-i", self.bridge, "-j", fwd]),
        ]

    def _restore_input(self, routes: Sequence[ServiceRoute]) -> str:
        svc, masq = self.service_chains["nat"]
        (fwd,) = self.service_chains["filter"]
        nat = ["*nat", f":{svc} - [0:0]", f":{masq} - [0:0]"]
        for route in routes:
            match = f"-d {route.cluster_ip}/32 -p {route.protocol} -m {route.protocol} --dport {route.port}"
            count = len(route.endpoints)
            for index, (ip, port) in enumerate(route.endpoints):
                left = count - index  # the first of the remaining endpoints takes 1/left of what reaches it
                chance = "" if left == 1 else f" -m statistic --mode random --probability {1 / left:.10f}"
                nat.append(f"-A {svc} {match}{chance} -j DNAT --to-destination {ip}:{port}")
        cluster_ips = sorted({route.cluster_ip for route in routes}, key=ipaddress.IPv4Address)
        nat += [f"-A {masq} -m conntrack --ctstate DNAT --ctorigdst {ip}/32 -j MASQUERADE" for ip in cluster_ips]
        nat.append("COMMIT")
        filt = ["*filter", f":{fwd} - [0:0]"]
        filt += [f"-A {fwd} -d {ip}/32 -j REJECT --reject-with icmp-port-unreachable" for ip in cluster_ips]
        filt.append(f"-A {fwd} -i {self.bridge} -o {self.bridge} -j ACCEPT")
        filt.append(f"-A {fwd} -i {self.bridge} -j REJECT --reject-with icmp-port-unreachable")
        filt.append("COMMIT")
        return "\n".join([*nat, *filt]) + "\n"

    def set_services(self, routes: Sequence[ServiceRoute]) -> None:
        """Make the ClusterIPs of ``routes`` (the whole set: what is not listed is removed) reachable from the
        pods, in one ``iptables-restore`` (atomic per table); the first call creates the chains and their jumps
        and sets ``net.ipv4.ip_forward``. PodRunnerError after teardown, or if another iptables backend of this
        machine drops forwarded traffic (its rules would apply too)."""
        routes = tuple(routes)
        for route in routes:
            if not isinstance(route, ServiceRoute):
                raise PodRunnerError(f"routes: ServiceRoute values are required, got {route!r}")
        with self._services_lock:
            if self._closed or not self._created_bridge:
                raise PodRunnerError("set_services: the network is not started (or torn down)")
            if not self._services_installed:
                policies = _forward_policies()
                dropping = sorted(b for b, policy in policies.items() if policy != "ACCEPT")
                current = _run(["iptables", "--version"]).stdout
                ours = "nft" if "nf_tables" in current else "legacy"
                if any(backend != ours for backend in dropping):
                    raise PodRunnerError(
                        f"FORWARD policy {policies} of iptables-{'/'.join(dropping)}: this runner's rules are in "
                        f"iptables-{ours} and cannot accept what the other backend drops"
                    )
                self._services_installed = True  # from here teardown removes whatever exists
                self._services_touched = True
                # the chains first: from then on another process's teardown sees this one needs ip_forward
                _run_input(["iptables-restore", "-w", "--noflush"], self._restore_input(()))
                _enable_forwarding()
                for table, chain, rule in self._jumps():
                    _iptables("-t", table, "-I", chain, "1", *rule)
            _run_input(["iptables-restore", "-w", "--noflush"], self._restore_input(routes))
            self.routes = routes

    def clear_services(self) -> list[str]:
        """Delete the jumps and chains of :meth:`set_services` by name and restore ``ip_forward``; idempotent.
        Returns what could not be removed (teardown raises with it)."""
        errors: list[str] = []
        with self._services_lock:
            if not self._services_installed:  # never made, or already removed: nothing of ours can exist
                return errors
            for table, chain, rule in self._jumps():
                for _attempt in range(10):  # each -D removes one copy; there is at most one
                    if _iptables("-t", table, "-D", chain, *rule, check=False).returncode != 0:
                        break
            for table, chains in self.service_chains.items():
                for chain in chains:
                    if chain_exists(table, chain):
                        _iptables("-t", table, "-F", chain, check=False)
                        done = _iptables("-t", table, "-X", chain, check=False)
                        if done.returncode != 0:
                            errors.append(f"iptables -t {table} -X {chain}: {done.stderr.strip()}")
            try:
                _restore_forwarding(self.prefix)
            except OSError as err:
                errors.append(f"restore {IP_FORWARD}: {err}")
            self._services_installed = bool(errors)  # a second call tries again
            self.routes = ()
        return errors

    def service_leftovers(self) -> list[str]:
        """What of the services' rules still exists: ``iptables <table> <chain>`` and ``iptables <table>
        <builtin chain> jump ...`` entries, and ``sysctl net.ipv4.ip_forward`` when nothing needs it any more but it
        was not written back."""
        if not self._services_touched:  # the names are this network's own: nothing else makes them
            return []
        found = [
            f"iptables {table} {chain}"
            for table, chains in self.service_chains.items()
            for chain in chains
            if chain_exists(table, chain)
        ]
        for table, chain in {(t, c) for t, c, _ in self._jumps()}:
            listed = _iptables("-t", table, "-S", chain, check=False).stdout.splitlines()
            found += [f"iptables {table} {chain} jump {line!r}" for line in listed if f" -j {self.prefix}-" in line]
        if not found and FORWARDING_STATE.exists() and not service_users(other_than=self.prefix):
            found.append(f"sysctl net.ipv4.ip_forward (its value before is still in {FORWARDING_STATE})")
        return found

    def leftovers(self) -> list[str]:
        """What of this network still exists on the machine: ``netns <name>``, ``link <name>`` and the services'
        ``iptables ...`` entries."""
        namespaces = netns_names()
        found = [f"netns {pod.netns}" for pod in self.pods.values() if pod.netns in namespaces]
        found += [f"link {pod.host_veth}" for pod in self.pods.values() if link_exists(pod.host_veth)]
        if link_exists(self.bridge):
            found.append(f"link {self.bridge}")
        return found + self.service_leftovers()

    def teardown(self) -> None:
        """Stop every process, delete every namespace, veth and the bridge by name; idempotent. Raises
        PodRunnerError (after trying everything) if something could not be stopped or removed."""
        errors: list[str] = []
        with self._services_lock:
            self._closed = True  # a kubelet still following Services cannot make the chains again
        errors += self.clear_services()
        for process in self.processes:
            try:
                process.stop()
            except (OSError, subprocess.SubprocessError) as err:
                errors.append(f"stop pid {process.pid}: {err}")
        namespaces = netns_names()
        for pod in self.pods.values():
            errors += self._remove(pod, namespaces)
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
