"""A kubelet stand-in for tests: it runs the Pods of the Kubernetes fake as real processes in real network
namespaces (:class:`~tests.fakes.kube.podrunner.PodNetwork`), with their volumes, users and environment, reports
their status to the fake as a kubelet does, and makes Service ClusterIPs reachable from the pods as kube-proxy
does.

:meth:`Kubelet.run_pod` reads the Pod from the fake's store as admitted (an injected Pod has its init container,
sidecars and volumes) and:

1. checks every container first: its image must be in ``images`` (else ``ErrImagePull``), its ``env`` must be
   values or supported ``fieldRef``\\ s (else ``CreateContainerConfigError``), its volume mounts must name volumes;
   a refused pod gets that waiting reason in its status and :class:`KubeletError` names the container;
2. binds the pod to this node (``spec.nodeName``) when it is unbound, gives it a network namespace and an address
   (:meth:`PodNetwork.add_pod <tests.fakes.kube.podrunner.PodNetwork.add_pod>`; the namespace's pod name is a
   short one, ``p<N>``), and writes ``status.podIP``/``podIPs``/``hostIP`` (phase Pending);
3. makes the volumes in the pod's directory (:attr:`RunningPod.directory`)::

       emptyDir                  a directory, mode 0777; medium Memory: a tmpfs mounted there (size: its
                                 sizeLimit), unmounted when the pod stops
       configMap / secret        the object's keys (or its ``items``) as kubelet's atomic writer lays them out
                                 (:mod:`~tests.fakes.kube.volumes`: ``..data`` swapped by one rename); a missing
                                 object is waited for (``volume_timeout``), unless ``optional``
       downwardAPI               ``metadata.name``/``namespace``/``uid``, ``metadata.labels``/``annotations`` (the
                                 whole map as ``key="value"`` lines, Go-quoted, sorted) or one key of them
                                 (``metadata.annotations['k']``: the value as is, empty when absent)
       projected                 any of those, and ``serviceAccountToken``: a token the fake's TokenReviews
                                 issues for the pod's service account, audience and expiry (renewed after 80% of
                                 it, as kubelet does); mode as kubelet's: 0600 owned by the pods' one user when
                                 every container runs as the same ``runAsUser``, 0600 then group-readable by
                                 ``fsGroup`` when there is one, else the volume's ``defaultMode`` (0644)
       hostPath                  an existing path of this machine

   ConfigMap, Secret, downward API and projected volumes are mounted read-only (as kubelet does) and re-projected
   every ``sync_period`` (an update swaps ``..data``: what Envoy's ``watched_directory`` sees); ``fsGroup`` makes
   every volume's files group-owned by it and group-readable;
4. runs the init containers in order, each to completion, then starts the containers, each as::

       ip netns exec <ns> unshare --mount --propagation private sh -c '<mounts>; cd <workdir>;
           exec setpriv --reuid U --regid G --clear-groups|--groups G1,.. -- "$@"' <name> <argv>

   so that the pid of the process is the program's own, in the pod's network namespace, in a mount namespace of
   its own where each of its ``volumeMounts`` is a bind mount of the volume's directory (two containers binding
   one volume share it: a Unix socket made by one is reached by the other). A mount point that does not exist on
   this machine (``/var/run/mesh-identity/sockets``) is made inside the container's mount namespace only, on an
   overlay of its deepest existing ancestor (``/run``) whose upper layer is a tmpfs private to that container:
   nothing is created outside the pod's directory (the script binds from ``/proc/self/fd/3``, the pod's
   directory opened before any overlay, so a volume under an overlaid ancestor is still the real directory). A
   container counts as started once its process is past the script (its mounts are made: :meth:`RunningPod.exec`
   sees them); one whose mounts or working directory cannot be set up is a :class:`KubeletError`. The user is ``securityContext.runAsUser`` (the container's,
   else the pod's, else 0), the group ``runAsGroup`` (else the user's number), supplementary groups the pod's
   ``fsGroup`` and ``supplementalGroups``. Output (stdout and stderr) goes to ``<pod dir>/logs/<container>.log``
   (:meth:`RunningPod.log`, :meth:`RunningPod.wait_for_log`). An init container exiting non-zero fails the pod
   (phase Failed; :class:`KubeletError` with its name, exit code and output);
5. writes phase Running, conditions ``Initialized``, ``ContainersReady`` and ``Ready`` True (there are no probes:
   a container is ready once started) and ``containerStatuses``. A container that exits later is reported
   terminated (Ready False; nothing is restarted); a Pod deleted from the store is stopped.

The argv of a container (Kubernetes' rule, with ``images`` standing for the registry): ``command`` and ``args``
are expanded (``$(VAR)`` from the container's environment, ``$$`` for ``$``), then ``images[image]`` makes the
argv: a list is the image's ENTRYPOINT (the container's ``command`` replaces it; ``args`` follow either), an
:class:`Image` also has a CMD and maps program names to this machine's binaries (``{"envoy": "/usr/local/bin/
envoy"}``: the image's PATH), any other callable is called as ``image(command, args)`` and returns the argv. The
environment is ``PATH`` (this machine's), ``HOME=/``, ``HOSTNAME`` (the pod's name), the kubelet's ``env`` and the
container's ``env``; the working directory is ``workingDir`` else the repository's root.

Services: every Service with an IPv4 ``clusterIP`` is programmed as kube-proxy's iptables mode does, with the
ready endpoints of its EndpointSlices (followed by polling the store every ``poll_interval``), by
:meth:`PodNetwork.set_services <tests.fakes.kube.podrunner.PodNetwork.set_services>` (DNAT scoped to traffic
from the pods' bridge, the hairpin MASQUERADE, ``ip_forward``; the pods' bridge ports are in hairpin mode, as
kubelet sets them, so a pod reaches itself through its Service); :meth:`Kubelet.wait_for_endpoints` waits until
a Service's rules have a given number of endpoints. One kubelet per network follows Services (its ``stop``
removes the network's service rules). Endpoints need not be pods: an EndpointSlice of the bridge's address
(``network.gateway``, this machine as the pods see it) reaches a process of this machine.

:meth:`Kubelet.stop_pod` stops a pod's processes (SIGTERM, SIGKILL after ``grace``; by pid), reports them
terminated, removes its namespace, unmounts and removes its directory; :meth:`Kubelet.stop` does that for every
pod, stops following Services and removes their rules; both are idempotent. :meth:`Kubelet.leftovers` lists what
of it still exists (pids, mounts, directories, namespaces, iptables chains).

Needs root (as :mod:`~tests.fakes.kube.podrunner`), ``iproute2``, ``util-linux`` (``unshare``, ``setpriv``,
``nsenter``, ``mount``), overlayfs and tmpfs, and Debian's ``iptables``. Nothing restarts a container, and there
are no probes, resource limits, DNS or service environment variables.
"""

from __future__ import annotations

import base64
import contextlib
import copy
import dataclasses
import itertools
import os
import re
import shlex
import shutil
import signal
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING

from tests.fakes.kube.errors import ApiError, JsonObj
from tests.fakes.kube.podrunner import (
    Pod,
    PodNetwork,
    PodRunnerError,
    ServiceRoute,
    link_exists,
    netns_names,
    pid_alive,
)
from tests.fakes.kube.store import meta, now
from tests.fakes.kube.tokenreview import API_AUDIENCE
from tests.fakes.kube.volumes import ProjectedVolume, VolumeSourceError, check_path
from tests.fakes.kube.workloads import kind_named

if TYPE_CHECKING:
    from tests.fakes.kube.server import KubeServer

REPO_ROOT = Path(__file__).resolve().parents[3]
DEFAULT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
SERVICE_NAME = "kubernetes.io/service-name"
DEFAULT_TOKEN_SECONDS = 3600
TOKEN_RENEW_FRACTION = 0.8  # kubelet renews a projected token after 80% of its lifetime
READ_ONLY_KINDS = ("configMap", "secret", "downwardAPI", "projected")
VOLUME_KINDS = ("emptyDir", "hostPath", *READ_ONLY_KINDS)
SCRIPT_NAME = "kubelet-container"
SETUP_FAILED = "kubelet stand-in: the container's mounts or working directory could not be set up"
SETUP_EXIT = 125  # as runtimes exit when they cannot start a container
SETUP_TIMEOUT = 30.0

ImageFunction = Callable[[Sequence[str], Sequence[str]], Sequence[str]]
ImageEntry = Sequence[str] | ImageFunction
_File = tuple[bytes, int, int | None]  # a projected file: content, mode, owner (None: root)


class KubeletError(PodRunnerError):
    """A pod the stand-in refuses or could not run; the message names the pod and the container or volume.
    ``reason`` is the waiting reason written to the pod's status (``ErrImagePull``, ...), when there is one."""

    def __init__(self, message: str, *, reason: str = "", container: str = "") -> None:
        super().__init__(message)
        self.reason = reason
        self.container = container


def _tool(name: str) -> str:
    found = shutil.which(name, path=os.environ.get("PATH", DEFAULT_PATH) + ":" + DEFAULT_PATH)
    if found is None:
        raise KubeletError(f"the kubelet stand-in needs {name!r} (iproute2, util-linux) on this machine")
    return found


# -- images and argv -------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Image:
    """An image as the stand-in knows it: ENTRYPOINT, CMD, and the binaries of its PATH (``argv[0]`` of the
    resulting command line, when it is a key, is replaced by this machine's path)."""

    entrypoint: Sequence[str] = ()
    cmd: Sequence[str] = ()
    binaries: Mapping[str, str] = field(default_factory=dict)

    def __call__(self, command: Sequence[str], args: Sequence[str]) -> list[str]:
        # command replaces ENTRYPOINT (and CMD goes with it); args replace CMD
        argv = [*command, *args] if command else [*self.entrypoint, *(args or self.cmd)]
        if argv and argv[0] in self.binaries:
            argv[0] = self.binaries[argv[0]]
        return argv


def container_argv(image: ImageEntry, command: Sequence[str], args: Sequence[str]) -> list[str]:
    """The argv of a container of ``image`` (an entrypoint list, an :class:`Image`, or a function of the
    expanded ``command`` and ``args``); KubeletError if it is empty."""
    make = image if callable(image) else Image(entrypoint=tuple(image))
    argv = list(make(list(command), list(args)))
    if not argv or not all(isinstance(a, str) for a in argv):
        raise KubeletError(f"the command line is {argv!r}: no command, and the image has no entrypoint")
    return argv


def expand(text: str, env: Mapping[str, str]) -> str:
    """Kubernetes' ``$(VAR)`` expansion of a command, an argument or an env value: ``$(NAME)`` is NAME's value
    when it is defined (else left as it is), ``$$`` is ``$``, any other ``$`` stays."""
    out: list[str] = []
    i = 0
    while i < len(text):
        if text[i] == "$" and i + 1 < len(text):
            nxt = text[i + 1]
            if nxt == "$":
                out.append("$")
                i += 2
                continue
            if nxt == "(":
                close = text.find(")", i + 2)
                if close != -1:
                    name = text[i + 2 : close]
                    out.append(env.get(name, f"$({name})"))
                    i = close + 1
                    continue
            out.append("$" + nxt)
            i += 2
            continue
        out.append(text[i])
        i += 1
    return "".join(out)


_GO_ESCAPES = {"\a": "\\a", "\b": "\\b", "\f": "\\f", "\n": "\\n", "\r": "\\r", "\t": "\\t", "\v": "\\v"}


def go_quote(text: str) -> str:
    """``text`` as Go's ``%q`` (``strconv.Quote``) writes it."""
    out = ['"']
    for ch in text:
        code = ord(ch)
        if ch in '"\\':
            out.append("\\" + ch)
        elif ch in _GO_ESCAPES:
            out.append(_GO_ESCAPES[ch])
        elif ch.isprintable():
            out.append(ch)
        elif code < 0x20 or code == 0x7F:
            out.append(f"\\x{code:02x}")
        elif code < 0x10000:
            out.append(f"\\u{code:04x}")
        else:
            out.append(f"\\U{code:08x}")
    out.append('"')
    return "".join(out)


def format_map(values: Mapping[str, str]) -> str:
    """A downward API file of a whole map (labels, annotations): ``key="value"`` lines, sorted, as kubelet's
    ``fieldpath.FormatMap``."""
    return "\n".join(f"{key}={go_quote(str(values[key]))}" for key in sorted(values))


_QUANTITY = re.compile(r"([0-9.]+(?:[eE][0-9]+)?)(Ki|Mi|Gi|Ti|Pi|Ei|k|M|G|T|P|E)?")
_UNITS = {
    None: 1,
    "Ki": 2**10,
    "Mi": 2**20,
    "Gi": 2**30,
    "Ti": 2**40,
    "Pi": 2**50,
    "Ei": 2**60,
    "k": 10**3,
    "M": 10**6,
    "G": 10**9,
    "T": 10**12,
    "P": 10**15,
    "E": 10**18,
}


def parse_quantity(value: object) -> int:
    """A Kubernetes quantity of bytes (``1Mi``, ``64M``, ``1000``) as an int; KubeletError for another form."""
    match = _QUANTITY.fullmatch(str(value))
    if match is None:
        raise KubeletError(f"{value!r} is not a quantity of bytes (such as 1Mi)")
    return int(float(match.group(1)) * _UNITS[match.group(2)])


_KEYED = re.compile(r"metadata\.(labels|annotations)\['(.+)'\]")


def field_value(pod: JsonObj, path: str, *, env: bool, pod_ip: str = "", host_ip: str = "") -> str:
    """The value of a ``fieldRef`` of ``pod`` (an env var's when ``env``, else a downward API file's);
    KubeletError naming the path when kubelet does not support it there."""
    metadata = pod.get("metadata") or {}
    spec = pod.get("spec") or {}
    keyed = _KEYED.fullmatch(path)
    if keyed:
        return str((metadata.get(keyed.group(1)) or {}).get(keyed.group(2), ""))
    if path in ("metadata.name", "metadata.namespace", "metadata.uid"):
        return str(metadata.get(path.split(".", 1)[1], ""))
    if path in ("metadata.labels", "metadata.annotations") and not env:
        return format_map(metadata.get(path.split(".", 1)[1]) or {})
    if env:
        found = {
            "spec.nodeName": spec.get("nodeName") or "",
            "spec.serviceAccountName": spec.get("serviceAccountName") or "default",
            "status.podIP": pod_ip,
            "status.podIPs": pod_ip,
            "status.hostIP": host_ip,
            "status.hostIPs": host_ip,
        }
        if path in found:
            return str(found[path])
    where = "an env var" if env else "a downward API volume"
    raise KubeletError(f"fieldRef {path!r} is not supported in {where} (by Kubernetes, or by the stand-in)")


# -- plans ------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Mount:
    """One of a container's volume mounts: the volume's directory (or a subPath of it) bound at ``target``."""

    volume: str
    source: Path
    target: str
    read_only: bool


@dataclass(frozen=True)
class ContainerPlan:
    """How one container is run: resolved before anything starts, so a refused pod leaves nothing behind."""

    name: str
    image: str
    init: bool
    argv: tuple[str, ...]
    env: Mapping[str, str]
    uid: int
    gid: int
    groups: tuple[int, ...]
    workdir: str
    mounts: tuple[Mount, ...]

    def setpriv(self) -> list[str]:
        groups = ["--groups", ",".join(map(str, self.groups))] if self.groups else ["--clear-groups"]
        return [_tool("setpriv"), "--reuid", str(self.uid), "--regid", str(self.gid), *groups, "--"]


@dataclass
class ContainerProcess:
    """A started container (or init container): its process, its log file, and when it started and ended."""

    plan: ContainerPlan
    popen: subprocess.Popen[bytes]
    log_path: Path
    started_at: str
    finished_at: str = ""

    @property
    def pid(self) -> int:
        return self.popen.pid

    @property
    def exit_code(self) -> int | None:
        """None while it runs; a signal's death as the runtime reports it (128 + the signal)."""
        code = self.popen.poll()
        if code is None:
            return None
        if not self.finished_at:
            self.finished_at = now()
        return 128 - code if code < 0 else code

    def stop(self, grace: float) -> None:
        """SIGTERM, then SIGKILL after ``grace``; by pid; a process that has ended is left alone."""
        if self.popen.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                self.popen.send_signal(signal.SIGTERM)
            try:
                self.popen.wait(grace)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait(grace)
        _ = self.exit_code


@dataclass
class _VolumeState:
    """A projected-kind volume: what it projects, and its tokens until they are due for renewal."""

    name: str
    spec: JsonObj
    directory: Path
    tokens: dict[str, tuple[str, float]] = field(default_factory=dict)  # path -> (token, renew at, monotonic)
    writer: ProjectedVolume | None = None


@dataclass
class RunningPod:
    """A pod the kubelet runs (or tried to): its network pod, address, directory, containers and their logs."""

    kubelet: Kubelet
    namespace: str
    name: str
    uid: str
    net_name: str
    directory: Path
    pod: Pod | None = None
    ip: str = ""
    started_at: str = field(default_factory=now)
    containers: dict[str, ContainerProcess] = field(default_factory=dict)
    init_containers: dict[str, ContainerProcess] = field(default_factory=dict)
    plans: dict[str, ContainerPlan] = field(default_factory=dict)
    state: str = "starting"  # starting, running, failed, stopped
    waiting: dict[str, tuple[str, str]] = field(default_factory=dict)  # container -> (reason, message)
    host_mounts: list[Path] = field(default_factory=list)
    volumes: list[_VolumeState] = field(default_factory=list)
    transitions: dict[str, tuple[str, str]] = field(default_factory=dict)  # condition -> (status, since)
    last_status: JsonObj | None = None
    next_sync: float = 0.0
    stopping: bool = False
    report: bool = True
    stopped: threading.Event = field(default_factory=threading.Event)

    @property
    def key(self) -> tuple[str, str]:
        return (self.namespace, self.name)

    def volume(self, name: str) -> Path:
        """The directory of volume ``name`` on this machine."""
        return self.directory / "volumes" / name

    def log_path(self, container: str) -> Path:
        return self.directory / "logs" / f"{container}.log"

    def log(self, container: str) -> str:
        """Everything container (or init container) ``container`` has written so far (stdout and stderr)."""
        path = self.log_path(container)
        return path.read_text(errors="replace") if path.exists() else ""

    def process(self, container: str) -> ContainerProcess:
        found = self.containers.get(container) or self.init_containers.get(container)
        if found is None:
            raise KubeletError(f"pod {self.namespace}/{self.name} has no started container {container!r}")
        return found

    def wait_for_log(self, container: str, text: str, timeout: float = 30.0) -> str:
        """The first line of ``container``'s log containing ``text``, once there is one; AssertionError with the
        log if the container ends first or ``timeout`` passes."""
        deadline = time.monotonic() + timeout
        while True:
            process = self.containers.get(container) or self.init_containers.get(container)
            ended = process is not None and process.exit_code is not None
            for line in self.log(container).splitlines():
                if text in line:
                    return line
            if ended or time.monotonic() >= deadline:
                code = None if process is None else process.exit_code
                raise AssertionError(
                    f"no line with {text!r} in the log of {self.namespace}/{self.name} {container} "
                    f"(exit code {code}): {self.log(container)!r}"
                )
            time.sleep(0.05)

    def exec(
        self, container: str, argv: Sequence[str], *, uid: int | None = None, check: bool = True, timeout: float = 30.0
    ) -> subprocess.CompletedProcess[str]:
        """``kubectl exec``: run ``argv`` in the network and mount namespaces of running ``container``, as its
        user (or ``uid``), with its environment and working directory; PodRunnerError if it fails and ``check``."""
        process = self.process(container)
        if process.exit_code is not None:
            raise KubeletError(f"pod {self.namespace}/{self.name} container {container!r} is not running")
        plan = process.plan
        if uid is not None:
            plan = dataclasses.replace(plan, uid=uid, gid=uid, groups=())
        cmd = [
            _tool("nsenter"),
            "--target",
            str(process.pid),
            "--mount",
            "--net",
            f"--wdns={plan.workdir}",
            *plan.setpriv(),
            *argv,
        ]
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=dict(plan.env), check=False)
        if check and done.returncode != 0:
            raise PodRunnerError(f"exec {list(argv)!r} in {container} exited {done.returncode}: {done.stderr.strip()}")
        return done


# -- the kubelet ------------------------------------------------------------------------------------------------


class Kubelet:
    """See the module docstring. ``images`` maps image names to entrypoint lists, :class:`Image` values or
    functions ``(command, args) -> argv``; ``env`` is added to every container's environment (before its own).
    ``services`` follows Services and programs their ClusterIPs on ``network``."""

    def __init__(
        self,
        server: KubeServer,
        network: PodNetwork,
        images: Mapping[str, ImageEntry],
        node_name: str = "node1",
        *,
        env: Mapping[str, str] | None = None,
        workdir: Path = REPO_ROOT,
        services: bool = True,
        volume_timeout: float = 30.0,
        init_timeout: float = 120.0,
        grace: float = 5.0,
        sync_period: float = 1.0,
        poll_interval: float = 0.1,
    ) -> None:
        for image, entry in images.items():
            if isinstance(entry, str) or not (callable(entry) or all(isinstance(a, str) for a in entry)):
                raise KubeletError(f"images[{image!r}]: an argv list or a function is required, got {entry!r}")
        self.server = server
        self.store = server.store
        self.network = network
        self.images = dict(images)
        self.node_name = node_name
        self.env = dict(env or {})
        self.workdir = str(workdir)
        self.services = services
        self.volume_timeout = volume_timeout
        self.init_timeout = init_timeout
        self.grace = grace
        self.sync_period = sync_period
        self.poll_interval = poll_interval
        try:
            self.pod_kind = kind_named(server.kinds, "Pod")
            self.service_kind = kind_named(server.kinds, "Service") if services else None
            self.slice_kind = kind_named(server.kinds, "EndpointSlice") if services else None
        except KeyError as err:
            raise KubeletError(f"the API server does not serve {err} (workload_kinds())") from None
        self.config_map_kind = kind_named(server.kinds, "ConfigMap")
        self.secret_kind = kind_named(server.kinds, "Secret")
        self.tools = {name: _tool(name) for name in ("ip", "unshare", "sh", "setpriv", "nsenter", "mount", "umount")}
        self.directory = Path(tempfile.mkdtemp(prefix=f"kubelet-{network.prefix}-"))
        self.errors: list[str] = []  # what the background loop could not do (status writes, services)
        self._lock = threading.RLock()
        self._pods: dict[tuple[str, str], RunningPod] = {}
        self._started: list[ContainerProcess] = []  # every process ever started, for leftovers()
        self._net_pods: list[tuple[str, str]] = []  # (netns, veth) of every network pod made
        self._names = itertools.count()
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None
        self._synced = threading.Condition()
        self._stopped = False

    # -- lifecycle
    def start(self) -> Kubelet:
        """Start following Services and watching pods (run_pod does it if it has not been done)."""
        with self._lock:
            if self._stopped:
                raise KubeletError("the kubelet is stopped")
            if self._thread is None:
                if self.services:
                    self.network.set_services(())  # the chains exist from now on, even with no Service yet
                self._thread = threading.Thread(target=self._loop, name=f"kubelet-{self.node_name}", daemon=True)
                self._thread.start()
        return self

    def __enter__(self) -> Kubelet:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def stop(self) -> None:
        """Stop every pod (by pid), stop following Services and remove their rules, remove the kubelet's
        directory; idempotent. KubeletError (after trying everything) if something could not be removed."""
        with self._lock:
            self._stopped = True
        self._stopping.set()
        if self._thread is not None:
            self._thread.join(timeout=30)
        errors: list[str] = []
        for key in list(self._pods):
            try:
                self.stop_pod(*key)
            except PodRunnerError as err:
                errors.append(str(err))
        if self.services:
            errors += self.network.clear_services()
        self._remove_directory(self.directory, errors)
        if errors:
            raise KubeletError("the kubelet left something behind: " + "; ".join(errors))

    def leftovers(self) -> list[str]:
        """What of this kubelet still exists: ``pid``, ``mount``, ``directory``, ``netns``, ``link`` and the
        services' ``iptables`` entries."""
        found = [
            f"pid {p.pid} ({p.plan.name})" for p in self._started if p.popen.poll() is None and pid_alive(p.popen.pid)
        ]
        found += [f"mount {path}" for path in _mounts_under(self.directory)]
        if self.directory.exists():
            found.append(f"directory {self.directory}")
        namespaces = netns_names()
        found += [f"netns {netns}" for netns, _ in self._net_pods if netns in namespaces]
        found += [f"link {veth}" for _, veth in self._net_pods if link_exists(veth)]
        if self.services:
            found += self.network.service_leftovers()
        return found

    # -- pods
    def pod(self, namespace: str, name: str) -> RunningPod:
        """The running pod ``namespace/name`` (KubeletError if this kubelet does not run it)."""
        with self._lock:
            found = self._pods.get((namespace, name))
        if found is None:
            raise KubeletError(f"pod {namespace}/{name} is not run by this kubelet")
        return found

    @property
    def pods(self) -> list[RunningPod]:
        with self._lock:
            return list(self._pods.values())

    def run_pod(self, namespace: str, name: str) -> RunningPod:
        """Run the stored Pod ``namespace/name`` (see the module docstring) and return it once its containers
        have started; KubeletError naming the container or volume otherwise (the pod stays known, with its logs,
        until :meth:`stop_pod`)."""
        self.start()
        where = f"pod {namespace}/{name}"
        try:
            pod = self.store.get(self.pod_kind, namespace, name)
        except ApiError:
            raise KubeletError(f"{where}: not found in the API server") from None
        spec = pod.get("spec") or {}
        node = spec.get("nodeName")
        if node and node != self.node_name:
            raise KubeletError(f"{where}: bound to node {node!r}, this kubelet is {self.node_name!r}")
        if spec.get("hostNetwork"):
            raise KubeletError(f"{where}: hostNetwork pods are not supported by the stand-in")
        with self._lock:
            if (namespace, name) in self._pods:
                raise KubeletError(f"{where}: already run by this kubelet (stop_pod it first)")
            running = RunningPod(
                self,
                namespace,
                name,
                meta(pod).get("uid", ""),
                f"p{next(self._names)}",
                self.directory / "pods" / f"{namespace}_{name}",
            )
        try:
            self._plans(running, pod, pod_ip="")  # every container checked before anything is made
        except KubeletError as err:
            if err.container:
                running.waiting[err.container] = (err.reason, str(err))
                self._write_status(running, pod, raise_errors=False)
            raise
        with self._lock:
            self._pods[running.key] = running
        try:
            if not node:
                pod = self.store.update(self.pod_kind, namespace, name, _bind(self.node_name))
            running.pod = self.network.add_pod(running.net_name)
            self._net_pods.append((running.pod.netns, running.pod.host_veth))
            running.ip = str(running.pod.ip)
            (running.directory / "logs").mkdir(parents=True)
            self._write_status(running, pod)
            self._make_volumes(running, pod)
            pod = self.store.get(self.pod_kind, namespace, name)
            plans = self._plans(running, pod, pod_ip=running.ip)
            for plan in plans:
                running.plans[plan.name] = plan
            for plan in plans:
                if plan.init:
                    self._run_init(running, pod, plan)
            for plan in plans:
                if not plan.init:
                    running.containers[plan.name] = self._start(running, plan)
            running.state = "running"
            running.next_sync = time.monotonic() + self.sync_period
            self._write_status(running, pod)
        except KubeletError as err:
            if err.container and err.container not in running.init_containers:  # could not be started
                running.waiting[err.container] = (err.reason or "CreateContainerError", str(err))
                self._write_status(running, None, raise_errors=False)
            raise
        except (PodRunnerError, ApiError, OSError, subprocess.SubprocessError) as err:
            raise KubeletError(f"{where}: {err}") from err
        return running

    def stop_pod(self, namespace: str, name: str, *, report: bool = True) -> None:
        """Stop pod ``namespace/name``'s processes (SIGTERM, SIGKILL after ``grace``; by pid), report them
        terminated (``report``, if the Pod still exists), remove its namespace, mounts and directory; a pod not
        run (or already stopped) is left alone. KubeletError (after trying everything) naming what remains."""
        with self._lock:
            running = self._pods.get((namespace, name))
            stopping = running is not None and running.stopping
            if running is not None and not stopping:
                running.stopping = True
                running.report = report
        if running is None:
            return
        if stopping:  # another thread (the loop, for a deleted Pod) is at it: wait for it to finish
            running.stopped.wait(self.grace * 2 + 30)
            return
        try:
            self._stop_pod(running)
        finally:
            with self._lock:
                self._pods.pop((namespace, name), None)
            running.stopped.set()

    def _stop_pod(self, running: RunningPod) -> None:
        namespace, name, report = running.namespace, running.name, running.report
        errors: list[str] = []
        processes = [*running.containers.values(), *running.init_containers.values()]
        for process in processes:
            if process.popen.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    process.popen.send_signal(signal.SIGTERM)
        for process in processes:
            try:
                process.stop(self.grace)
            except (OSError, subprocess.SubprocessError) as err:
                errors.append(f"stop pid {process.pid}: {err}")
        if running.state != "failed":
            running.state = "stopped"
        if report:
            try:
                self._write_status(running, None)
            except KubeletError as err:
                errors.append(str(err))
        try:
            self.network.remove_pod(running.net_name)
        except PodRunnerError as err:
            errors.append(str(err))
        for path in reversed(running.host_mounts):
            if path in _mounts_under(path):
                done = subprocess.run(
                    [self.tools["umount"], str(path)], capture_output=True, text=True, timeout=30, check=False
                )
                if done.returncode != 0:
                    errors.append(f"umount {path}: {done.stderr.strip()}")
        self._remove_directory(running.directory, errors)
        if errors:
            raise KubeletError(f"pod {namespace}/{name}: stopping left something behind: " + "; ".join(errors))

    def wait_for_endpoints(self, namespace: str, service: str, count: int, timeout: float = 10.0) -> list[ServiceRoute]:
        """Wait until every port of Service ``namespace/service`` is programmed with ``count`` endpoints; return
        its routes. AssertionError (with what is programmed, and the loop's errors) after ``timeout``."""
        if self._thread is None:
            self.start()
        deadline = time.monotonic() + timeout
        with self._synced:
            while True:
                routes = self._routes_of(namespace, service)
                if routes and all(len(r.endpoints) == count for r in routes):
                    return routes
                left = deadline - time.monotonic()
                if left <= 0:
                    raise AssertionError(
                        f"Service {namespace}/{service} is programmed as {routes!r}, not with {count} endpoints "
                        f"(errors: {self.errors[-3:]!r})"
                    )
                self._synced.wait(left)

    def _routes_of(self, namespace: str, service: str) -> list[ServiceRoute]:
        if self.service_kind is None:
            raise KubeletError("this kubelet does not follow Services (services=False)")
        try:
            found = self.store.get(self.service_kind, namespace, service)
        except ApiError:
            return []
        ips = set(_cluster_ips(found))
        ports = {
            (p.get("port"), str(p.get("protocol", "TCP")).lower()) for p in (found.get("spec") or {}).get("ports") or []
        }
        return [r for r in self.network.routes if r.cluster_ip in ips and (r.port, r.protocol) in ports]

    # -- plans
    def _plans(self, running: RunningPod, pod: JsonObj, *, pod_ip: str) -> list[ContainerPlan]:
        spec = pod.get("spec") or {}
        where = f"pod {running.namespace}/{running.name}"
        volumes = {v.get("name"): v for v in spec.get("volumes") or []}
        for volume in volumes.values():
            kinds = [k for k in VOLUME_KINDS if k in volume]
            if len(kinds) != 1:
                other = sorted(set(volume) - {"name"})
                raise KubeletError(
                    f"{where}: volume {volume.get('name')!r}: the stand-in supports {', '.join(VOLUME_KINDS)}, not {other}"
                )
        pod_security = spec.get("securityContext") or {}
        fs_group = pod_security.get("fsGroup")
        supplemental = [int(g) for g in pod_security.get("supplementalGroups") or []]
        groups = tuple(dict.fromkeys([*([int(fs_group)] if fs_group is not None else []), *supplemental]))
        plans = []
        for init, key in ((True, "initContainers"), (False, "containers")):
            for container in spec.get(key) or []:
                name = container.get("name", "")
                what = f"{where}: {'init container' if init else 'container'} {name!r}"
                image = container.get("image", "")
                if image not in self.images:
                    raise KubeletError(
                        f"{what}: image {image!r} is not in the kubelet's images map ({sorted(self.images)})",
                        reason="ErrImagePull",
                        container=name,
                    )
                try:
                    env = self._env(container, pod, pod_ip)
                    command = [expand(str(a), env) for a in container.get("command") or []]
                    args = [expand(str(a), env) for a in container.get("args") or []]
                    argv = container_argv(self.images[image], command, args)
                except KubeletError as err:
                    raise KubeletError(f"{what}: {err}", reason="CreateContainerConfigError", container=name) from None
                security = container.get("securityContext") or {}
                uid = security.get("runAsUser", pod_security.get("runAsUser"))
                uid = 0 if uid is None else int(uid)
                gid = security.get("runAsGroup", pod_security.get("runAsGroup"))
                non_root = security.get("runAsNonRoot", pod_security.get("runAsNonRoot"))
                if non_root and uid == 0:
                    raise KubeletError(
                        f"{what}: container has runAsNonRoot and image will run as root",
                        reason="CreateContainerConfigError",
                        container=name,
                    )
                mounts = []
                for mount in container.get("volumeMounts") or []:
                    volume = volumes.get(mount.get("name"))
                    target = str(mount.get("mountPath", ""))
                    if volume is None:
                        raise KubeletError(
                            f"{what}: volumeMount {mount.get('name')!r} names no volume of the pod",
                            reason="CreateContainerConfigError",
                            container=name,
                        )
                    if not target.startswith("/") or any(c in target for c in ",:\n"):
                        raise KubeletError(
                            f"{what}: mountPath {target!r} is not an absolute path the stand-in can mount",
                            reason="CreateContainerConfigError",
                            container=name,
                        )
                    source = running.volume(volume["name"])
                    if "hostPath" in volume:
                        source = Path((volume["hostPath"] or {}).get("path", ""))
                    if mount.get("subPath"):
                        source = source / check_path(str(mount["subPath"]))
                    read_only = bool(mount.get("readOnly")) or any(k in volume for k in READ_ONLY_KINDS)
                    mounts.append(Mount(volume["name"], source, target, read_only))
                try:
                    _overlay_roots(mounts)
                except KubeletError as err:
                    raise KubeletError(f"{what}: {err}", reason="CreateContainerConfigError", container=name) from None
                plans.append(
                    ContainerPlan(
                        name=name,
                        image=image,
                        init=init,
                        argv=tuple(argv),
                        env=env,
                        uid=uid,
                        gid=uid if gid is None else int(gid),
                        groups=groups,
                        workdir=str(container.get("workingDir") or self.workdir),
                        mounts=tuple(sorted(mounts, key=lambda m: len(PurePosixPath(m.target).parts))),
                    )
                )
        return plans

    def _env(self, container: JsonObj, pod: JsonObj, pod_ip: str) -> dict[str, str]:
        spec = pod.get("spec") or {}
        env = {
            "PATH": os.environ.get("PATH", DEFAULT_PATH),
            "HOME": "/",
            "HOSTNAME": spec.get("hostname") or meta(pod).get("name", ""),
            **self.env,
        }
        if container.get("envFrom"):
            raise KubeletError("envFrom is not supported by the stand-in (env with value or fieldRef only)")
        for entry in container.get("env") or []:
            name = entry.get("name", "")
            source = entry.get("valueFrom")
            if source is None:
                env[name] = expand(str(entry.get("value", "")), env)
                continue
            kinds = sorted(source)
            if kinds != ["fieldRef"]:
                raise KubeletError(
                    f"env {name!r}: valueFrom {', '.join(kinds)} is not supported by the stand-in (fieldRef only)"
                )
            path = str((source.get("fieldRef") or {}).get("fieldPath", ""))
            try:
                env[name] = field_value(pod, path, env=True, pod_ip=pod_ip, host_ip=str(self.network.gateway))
            except KubeletError as err:
                raise KubeletError(f"env {name!r}: {err}") from None
        return env

    # -- volumes
    def _make_volumes(self, running: RunningPod, pod: JsonObj) -> None:
        spec = pod.get("spec") or {}
        where = f"pod {running.namespace}/{running.name}"
        fs_group = (spec.get("securityContext") or {}).get("fsGroup")
        for volume in spec.get("volumes") or []:
            name = volume["name"]
            directory = running.volume(name)
            if "hostPath" in volume:
                path = Path((volume["hostPath"] or {}).get("path", ""))
                if not path.is_absolute() or not path.exists():
                    raise KubeletError(
                        f"{where}: volume {name!r}: hostPath {str(path)!r} does not exist on this machine"
                    )
                continue
            directory.mkdir(parents=True)
            if "emptyDir" in volume:
                empty = volume["emptyDir"] or {}
                if empty.get("medium") == "Memory":
                    options = "mode=0777"
                    if empty.get("sizeLimit"):
                        options += f",size={parse_quantity(empty['sizeLimit'])}"
                    running.host_mounts.append(directory)
                    _run(
                        [
                            self.tools["mount"],
                            "-t",
                            "tmpfs",
                            "-o",
                            options,
                            f"kubelet-{self.network.prefix}",
                            str(directory),
                        ]
                    )
                directory.chmod(0o777)
                if fs_group is not None:
                    os.chown(directory, -1, int(fs_group))
                    directory.chmod(0o2777)
                continue
            state = _VolumeState(name, volume, directory, writer=ProjectedVolume(directory))
            deadline = time.monotonic() + self.volume_timeout
            while True:
                try:
                    self._project(running, pod, state)
                    break
                except _Missing as missing:
                    if time.monotonic() >= deadline:
                        raise KubeletError(
                            f"{where}: volume {name!r}: {missing} (waited {self.volume_timeout:g}s)"
                        ) from None
                    time.sleep(0.1)
                except (KubeletError, VolumeSourceError) as err:
                    raise KubeletError(f"{where}: volume {name!r}: {err}") from None
            running.volumes.append(state)

    def _project(self, running: RunningPod, pod: JsonObj, state: _VolumeState) -> bool:
        """Write volume ``state``'s payload (atomically); whether it changed. _Missing for an absent object."""
        spec = pod.get("spec") or {}
        volume = state.spec
        files: dict[str, _File] = {}  # path -> (content, mode, owner uid)
        if "projected" in volume:
            projected = volume["projected"] or {}
            default = int(projected.get("defaultMode", 0o644))
            for index, source in enumerate(projected.get("sources") or []):
                kinds = sorted(source)
                if kinds == ["configMap"]:
                    files.update(self._object_files(running.namespace, source["configMap"], "ConfigMap", default))
                elif kinds == ["secret"]:
                    files.update(self._object_files(running.namespace, source["secret"], "Secret", default))
                elif kinds == ["downwardAPI"]:
                    files.update(_downward_files(pod, source["downwardAPI"], default))
                elif kinds == ["serviceAccountToken"]:
                    files.update(self._token_file(running, pod, state, source["serviceAccountToken"], default))
                else:
                    raise KubeletError(
                        f"projected source {index} ({', '.join(kinds)}) is not supported by the stand-in"
                    )
        elif "configMap" in volume:
            source = volume["configMap"] or {}
            files = self._object_files(running.namespace, source, "ConfigMap", int(source.get("defaultMode", 0o644)))
        elif "secret" in volume:
            source = volume["secret"] or {}
            named = {**source, "name": source.get("secretName", "")}
            files = self._object_files(running.namespace, named, "Secret", int(source.get("defaultMode", 0o644)))
        elif "downwardAPI" in volume:
            source = volume["downwardAPI"] or {}
            files = _downward_files(pod, source, int(source.get("defaultMode", 0o644)))
        assert state.writer is not None
        changed = state.writer.update({path: content for path, (content, _, _) in files.items()})
        current = state.writer.data_dir()
        fs_group = (spec.get("securityContext") or {}).get("fsGroup")
        if changed and current is not None:
            for path, (_, mode, owner) in files.items():
                target = current / path
                group = -1 if fs_group is None else int(fs_group)
                os.chown(target, -1 if owner is None else owner, group)
                target.chmod(mode | (0o040 if fs_group is not None else 0))
        return changed

    def _object_files(self, namespace: str, source: JsonObj, kind: str, default: int) -> dict[str, _File]:
        name = str(source.get("name", ""))
        store_kind = self.config_map_kind if kind == "ConfigMap" else self.secret_kind
        try:
            obj = self.store.get(store_kind, namespace, name)
        except ApiError:
            if source.get("optional"):
                return {}
            raise _Missing(f'{kind.lower()} "{name}" not found in namespace {namespace}') from None
        if kind == "ConfigMap":
            data = {k: str(v).encode() for k, v in (obj.get("data") or {}).items()}
            data.update({k: base64.b64decode(v) for k, v in (obj.get("binaryData") or {}).items()})
        else:
            data = {k: base64.b64decode(v) for k, v in (obj.get("data") or {}).items()}
        items = source.get("items")
        if items is None:
            return {check_path(k): (v, default, None) for k, v in data.items()}
        files: dict[str, _File] = {}
        for item in items:
            key = item.get("key", "")
            if key not in data:
                if source.get("optional"):
                    continue
                raise _Missing(f"{kind} {namespace}/{name} has no key {key!r} (volume items)")
            files[check_path(str(item.get("path", "")))] = (data[key], int(item.get("mode", default)), None)
        return files

    def _token_file(
        self, running: RunningPod, pod: JsonObj, state: _VolumeState, source: JsonObj, default: int
    ) -> dict[str, _File]:
        spec = pod.get("spec") or {}
        path = check_path(str(source.get("path", "")))
        seconds = int(source.get("expirationSeconds", DEFAULT_TOKEN_SECONDS))
        cached = state.tokens.get(path)
        if cached is None or time.monotonic() >= cached[1]:
            token = self.server.token_reviews.issue(
                running.namespace,
                spec.get("serviceAccountName") or "default",
                audiences=[source.get("audience") or API_AUDIENCE],
                ttl=timedelta(seconds=seconds),
                pod=running.name,
            )
            cached = (token, time.monotonic() + TOKEN_RENEW_FRACTION * seconds)
            state.tokens[path] = cached
        fs_user = _fs_user(spec)
        fs_group = (spec.get("securityContext") or {}).get("fsGroup")
        mode = 0o600 if fs_user is not None or fs_group is not None else default
        return {path: (cached[0].encode(), mode, fs_user)}

    def _sync_volumes(self, running: RunningPod) -> None:
        try:
            pod = self.store.get(self.pod_kind, running.namespace, running.name)
        except ApiError:
            return
        for state in running.volumes:
            try:
                self._project(running, pod, state)
            except (_Missing, KubeletError, VolumeSourceError, OSError) as err:
                self._error(f"pod {running.namespace}/{running.name} volume {state.name!r}: {err}")

    # -- containers
    def _command(self, running: RunningPod, plan: ContainerPlan) -> list[str]:
        """The argv that runs ``plan`` in its pod (see the module docstring). The script opens the pod's
        directory (and each hostPath) first and mounts from ``/proc/self/fd/N``: a volume's directory stays the
        real one even under an overlaid ancestor (an overlay's lower layer does not show later changes)."""
        assert running.pod is not None
        mount, tag, q = self.tools["mount"], f"kubelet-{self.network.prefix}", shlex.quote
        lines = [f"exec 3< {q(str(running.directory))}"]
        fds: dict[Path, int] = {}

        def real(path: Path) -> str:
            if path.is_relative_to(running.directory):
                return f"/proc/self/fd/3/{path.relative_to(running.directory)}"
            if path not in fds:
                fds[path] = 4 + len(fds)
                if fds[path] > 9:
                    raise KubeletError(f"container {plan.name!r}: more than 6 hostPath mounts")
                lines.append(f"exec {fds[path]}< {q(str(path))}")
            return f"/proc/self/fd/{fds[path]}"

        sources = [real(m.source) for m in plan.mounts]
        overlays = _overlay_roots(plan.mounts)
        if overlays:
            own = running.directory / "containers" / plan.name
            own.mkdir(parents=True)
            lines.append(f"{mount} -t tmpfs -o mode=0755 {tag} {q(str(own))}")
            for index, root in enumerate(overlays):
                upper, work = real(own / f"{index}-upper"), real(own / f"{index}-work")
                lines.append(f"mkdir {q(upper)} {q(work)}")
                options = f"lowerdir={root},upperdir={upper},workdir={work}"
                lines.append(f"{mount} -t overlay -o {q(options)} {tag} {q(root)}")
        for volume, source in zip(plan.mounts, sources, strict=True):
            target = q(volume.target)
            if volume.source.is_dir() or not volume.source.exists():
                lines.append(f"mkdir -p {target}")
            else:
                lines.append(f'{{ [ -e {target} ] || {{ mkdir -p "$(dirname {target})" && : > {target}; }}; }}')
            lines.append(f"{mount} --no-canonicalize --bind {q(source)} {target}")
            if volume.read_only:
                lines.append(f"{mount} -o remount,bind,ro {target}")
        lines.append(f"cd {q(plan.workdir)}")
        failed = f"{{ echo {q(SETUP_FAILED)} >&2; exit {SETUP_EXIT}; }}"
        closes = " ".join(f"{fd}<&-" for fd in (3, *fds.values()))
        script = " &&\n".join(lines) + f" ||\n{failed}\nexec {closes}\nexec " + shlex.join(plan.setpriv()) + ' "$@"'
        return [
            self.tools["ip"],
            "netns",
            "exec",
            running.pod.netns,
            self.tools["unshare"],
            "--mount",
            "--propagation",
            "private",
            self.tools["sh"],
            "-c",
            script,
            SCRIPT_NAME,
            *plan.argv,
        ]

    def _start(self, running: RunningPod, plan: ContainerPlan) -> ContainerProcess:
        for mount in plan.mounts:
            if mount.volume and not mount.source.exists() and mount.source.parent.exists():
                mount.source.mkdir(parents=True)  # a subPath of an emptyDir, as kubelet makes it
        cmd = self._command(running, plan)
        log_path = running.log_path(plan.name)
        with open(log_path, "ab") as log:
            popen = subprocess.Popen(
                cmd, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, env=dict(plan.env), cwd="/"
            )
        process = ContainerProcess(plan, popen, log_path, now())
        self._started.append(process)
        # started once its mounts are made: when the process is past the wrappers (ip, unshare, the script); an
        # empty command line is a process in the middle of an exec
        wrappers = [cmd, cmd[4:], cmd[8:], []]
        deadline = time.monotonic() + SETUP_TIMEOUT
        while popen.poll() is None and _cmdline(popen.pid) in wrappers and time.monotonic() < deadline:
            time.sleep(0.005)
        if process.exit_code == SETUP_EXIT and SETUP_FAILED in running.log(plan.name):
            raise KubeletError(
                f"pod {running.namespace}/{running.name}: container {plan.name!r} could not be started: "
                f"{running.log(plan.name).strip()}",
                container=plan.name,
            )
        return process

    def _run_init(self, running: RunningPod, pod: JsonObj, plan: ContainerPlan) -> None:
        process = self._start(running, plan)
        running.init_containers[plan.name] = process
        late = ""
        try:
            process.popen.wait(self.init_timeout)
        except subprocess.TimeoutExpired:
            process.stop(self.grace)
            late = f" (stopped after {self.init_timeout:g}s)"
        code = process.exit_code
        if code != 0:
            running.state = "failed"
            self._write_status(running, pod)
            output = running.log(plan.name).strip()
            raise KubeletError(
                f"pod {running.namespace}/{running.name}: init container {plan.name!r} exited {code}{late}: {output}",
                container=plan.name,
            )

    # -- status
    def _write_status(self, running: RunningPod, pod: JsonObj | None, *, raise_errors: bool = True) -> None:
        """Write the status of ``running`` to the store (only when it changed), unless the Pod is gone or is
        another one of the same name now."""
        if pod is None:
            try:
                pod = self.store.get(self.pod_kind, running.namespace, running.name)
            except ApiError:
                return
        status = self._status(running, pod)
        if status == running.last_status:
            return

        def change(current: JsonObj) -> JsonObj:
            if meta(current).get("uid") != running.uid:
                raise _Replaced
            current["status"] = copy.deepcopy(status)
            return current

        try:
            self.store.update(self.pod_kind, running.namespace, running.name, change, subresource="status")
            running.last_status = status
        except (_Replaced, ApiError) as err:
            if raise_errors and isinstance(err, ApiError) and err.code != 404:
                raise KubeletError(f"pod {running.namespace}/{running.name}: status not written: {err}") from err

    def _condition(self, running: RunningPod, kind: str, value: bool) -> JsonObj:
        status = "True" if value else "False"
        before = running.transitions.get(kind)
        if before is None or before[0] != status:
            running.transitions[kind] = (status, now())
        return {"type": kind, "status": status, "lastTransitionTime": running.transitions[kind][1]}

    def _status(self, running: RunningPod, pod: JsonObj) -> JsonObj:
        spec = pod.get("spec") or {}
        init_specs = spec.get("initContainers") or []
        specs = spec.get("containers") or []
        inits_done = all(
            (p := running.init_containers.get(c["name"])) is not None and p.exit_code == 0 for c in init_specs
        )
        codes = [p.exit_code for p in running.containers.values()]
        started = running.state in ("running", "stopped") and len(running.containers) == len(specs)
        all_running = running.state == "running" and started and all(c is None for c in codes)
        if running.state == "failed" or (running.state == "stopped" and not started):
            phase = "Failed"
        elif not started:
            phase = "Pending"
        elif all(c is not None for c in codes):
            phase = "Succeeded" if all(c == 0 for c in codes) else "Failed"
        else:
            phase = "Running"
        status: JsonObj = {
            "phase": phase,
            "conditions": [
                self._condition(running, "PodReadyToStartContainers", running.pod is not None),
                self._condition(running, "Initialized", inits_done),
                self._condition(running, "ContainersReady", all_running),
                self._condition(running, "Ready", all_running),
                self._condition(running, "PodScheduled", True),
            ],
            "hostIP": str(self.network.gateway),
            "hostIPs": [{"ip": str(self.network.gateway)}],
            "startTime": running.started_at,
            "qosClass": _qos_class(spec),
        }
        if running.ip:
            status["podIP"] = running.ip
            status["podIPs"] = [{"ip": running.ip}]
        if init_specs:
            status["initContainerStatuses"] = [
                self._container_status(running, c, running.init_containers.get(c["name"]), "PodInitializing")
                for c in init_specs
            ]
        waiting = "PodInitializing" if init_specs and not inits_done else "ContainerCreating"
        status["containerStatuses"] = [
            self._container_status(running, c, running.containers.get(c["name"]), waiting) for c in specs
        ]
        return status

    def _container_status(
        self, running: RunningPod, container: JsonObj, process: ContainerProcess | None, waiting: str
    ) -> JsonObj:
        name = container["name"]
        found: JsonObj = {
            "name": name,
            "image": container.get("image", ""),
            "imageID": f"standin://{container.get('image', '')}",
            "restartCount": 0,
            "ready": False,
            "started": False,
        }
        if process is None:
            reason, message = running.waiting.get(name, (waiting, ""))
            found["state"] = {"waiting": {"reason": reason, **({"message": message} if message else {})}}
            return found
        found["containerID"] = f"standin://{process.pid}"
        code = process.exit_code
        if code is None:
            found.update(ready=True, started=True)
            found["state"] = {"running": {"startedAt": process.started_at}}
        else:
            found["state"] = {
                "terminated": {
                    "exitCode": code,
                    "reason": "Completed" if code == 0 else "Error",
                    "startedAt": process.started_at,
                    "finishedAt": process.finished_at or now(),
                    "containerID": f"standin://{process.pid}",
                }
            }
        return found

    # -- the background loop: services, exited containers, deleted pods, volume syncs
    def _loop(self) -> None:
        while not self._stopping.wait(self.poll_interval):
            if self.services:
                try:
                    routes = self._desired_routes()
                    if routes != self.network.routes:
                        self.network.set_services(routes)
                except (PodRunnerError, ApiError, OSError, subprocess.SubprocessError) as err:
                    self._error(f"services: {err}")
            for running in self.pods:
                if running.state != "running" or running.stopping:
                    continue
                try:
                    self._watch_pod(running)
                except (PodRunnerError, ApiError, OSError, subprocess.SubprocessError) as err:
                    self._error(f"pod {running.namespace}/{running.name}: {err}")
            with self._synced:
                self._synced.notify_all()

    def _watch_pod(self, running: RunningPod) -> None:
        try:
            pod = self.store.get(self.pod_kind, running.namespace, running.name)
        except ApiError:
            pod = None
        if pod is None or meta(pod).get("uid") != running.uid or meta(pod).get("deletionTimestamp"):
            self.stop_pod(running.namespace, running.name, report=pod is not None)
            return
        self._write_status(running, pod)
        if time.monotonic() >= running.next_sync:
            running.next_sync = time.monotonic() + self.sync_period
            self._sync_volumes(running)

    def _desired_routes(self) -> tuple[ServiceRoute, ...]:
        assert self.service_kind is not None and self.slice_kind is not None
        routes: list[ServiceRoute] = []
        slices: dict[tuple[str, str], list[JsonObj]] = {}
        for found in self.store.select(self.slice_kind, None, lambda _obj: True):
            owner = (meta(found).get("labels") or {}).get(SERVICE_NAME)
            if owner and found.get("addressType", "IPv4") == "IPv4":
                slices.setdefault((meta(found).get("namespace", ""), owner), []).append(found)
        for service in self.store.select(self.service_kind, None, lambda _obj: True):
            key = (meta(service).get("namespace", ""), meta(service)["name"])
            for port in (service.get("spec") or {}).get("ports") or []:
                protocol = str(port.get("protocol", "TCP")).lower()
                if protocol not in ("tcp", "udp"):
                    continue
                endpoints: set[tuple[str, int]] = set()
                for found in slices.get(key, []):
                    numbers = [
                        p.get("port")
                        for p in found.get("ports") or []
                        if (p.get("name") or "") == (port.get("name") or "")
                        and str(p.get("protocol", "TCP")).lower() == protocol
                    ]
                    if not numbers or numbers[0] is None:
                        continue
                    for endpoint in found.get("endpoints") or []:
                        if (endpoint.get("conditions") or {}).get("ready") is False:
                            continue
                        endpoints.update((address, int(numbers[0])) for address in endpoint.get("addresses") or [])
                for ip in _cluster_ips(service):
                    routes.append(ServiceRoute(ip, int(port["port"]), protocol, tuple(sorted(endpoints))))
        return tuple(routes)

    # -- helpers
    def _error(self, message: str) -> None:
        self.errors.append(message)
        del self.errors[:-100]

    def _remove_directory(self, directory: Path, errors: list[str]) -> None:
        if not directory.exists():
            return
        mounted = _mounts_under(directory)
        if mounted:
            errors.append(f"{directory}: still mounted: {', '.join(map(str, mounted))}")
            return
        try:
            shutil.rmtree(directory)
        except OSError as err:
            errors.append(f"remove {directory}: {err}")


class _Missing(Exception):
    """An object a volume projects is not there (yet)."""


class _Replaced(Exception):
    """The stored Pod is another one now (deleted and created again)."""


def _run(argv: Sequence[str]) -> None:
    done = subprocess.run(list(argv), capture_output=True, text=True, timeout=30, check=False)
    if done.returncode != 0:
        raise KubeletError(f"{shlex.join(argv)!r} exited {done.returncode}: {done.stderr.strip()}")


def _bind(node: str) -> Callable[[JsonObj], JsonObj]:
    def change(current: JsonObj) -> JsonObj:
        current.setdefault("spec", {}).setdefault("nodeName", node)
        return current

    return change


def _cmdline(pid: int) -> list[str]:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as found:
            raw = found.read()
    except OSError:
        return []
    return [part.decode(errors="replace") for part in raw.split(b"\0")[:-1]]


def _mounts_under(directory: Path) -> list[Path]:
    """The mount points of this machine's mount namespace at or under ``directory``."""
    found = []
    prefix = str(directory)
    with open("/proc/self/mountinfo") as mountinfo:
        for line in mountinfo:
            point = line.split()[4].encode().decode("unicode_escape")
            if point == prefix or point.startswith(prefix + "/"):
                found.append(Path(point))
    return found


def _overlay_roots(mounts: Sequence[Mount]) -> list[str]:
    """The existing directories to overlay (in a container's own mount namespace) so that the mount points of
    ``mounts`` that do not exist on this machine can be made there: each one's deepest existing ancestor, those
    inside another left out. KubeletError when that would be ``/``."""
    roots: set[str] = set()
    targets = [m.target for m in mounts]
    for mount in mounts:
        path = PurePosixPath(mount.target)
        if os.path.exists(path) or any(path != PurePosixPath(t) and PurePosixPath(t) in path.parents for t in targets):
            continue  # there already, or made inside another of the container's mounts
        ancestor = next(p for p in path.parents if os.path.isdir(p))
        real = os.path.realpath(ancestor)
        if real == "/" or any(c in real for c in ",:"):
            raise KubeletError(
                f"mountPath {mount.target!r}: no ancestor but {real!r} exists on this machine to make it in"
            )
        roots.add(real)
    return sorted(r for r in roots if not any(r != o and r.startswith(o + "/") for o in roots))


def _downward_files(pod: JsonObj, source: JsonObj, default: int) -> dict[str, _File]:
    files: dict[str, _File] = {}
    for item in source.get("items") or []:
        path = check_path(str(item.get("path", "")))
        if "fieldRef" not in item:
            raise KubeletError(f"downward API item {path!r}: only fieldRef is supported by the stand-in")
        value = field_value(pod, str((item["fieldRef"] or {}).get("fieldPath", "")), env=False)
        files[path] = (value.encode(), int(item.get("mode", default)), None)
    return files


def _fs_user(spec: JsonObj) -> int | None:
    """kubelet's ``FsUserFrom``: the one ``runAsUser`` of every (init) container, else None."""
    pod_user = (spec.get("securityContext") or {}).get("runAsUser")
    users = set()
    for container in [*(spec.get("initContainers") or []), *(spec.get("containers") or [])]:
        user = (container.get("securityContext") or {}).get("runAsUser", pod_user)
        if user is None:
            return None
        users.add(int(user))
    return users.pop() if len(users) == 1 else None


def _qos_class(spec: JsonObj) -> str:
    containers = [*(spec.get("initContainers") or []), *(spec.get("containers") or [])]
    resources = [c.get("resources") or {} for c in containers]
    if not any(r.get("requests") or r.get("limits") for r in resources):
        return "BestEffort"
    for r in resources:
        limits, requests = r.get("limits") or {}, {**(r.get("limits") or {}), **(r.get("requests") or {})}
        if any(limits.get(k) is None or requests.get(k) != limits.get(k) for k in ("cpu", "memory")):
            return "Burstable"
    return "Guaranteed"


def _cluster_ips(service: JsonObj) -> Iterator[str]:
    spec = service.get("spec") or {}
    if spec.get("type") == "ExternalName":
        return
    for ip in spec.get("clusterIPs") or [spec.get("clusterIP")]:
        if ip and ip != "None" and ":" not in str(ip):
            yield str(ip)


__all__ = [
    "ContainerPlan",
    "ContainerProcess",
    "Image",
    "ImageEntry",
    "Kubelet",
    "KubeletError",
    "Mount",
    "RunningPod",
    "container_argv",
    "expand",
    "field_value",
    "format_map",
    "go_quote",
    "parse_quantity",
]
