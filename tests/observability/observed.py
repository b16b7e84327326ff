"""A live mesh with its observability on, for the tests of tests/observability.

The control plane is what ``mesh-identity serve`` runs (``compose.build`` at ``Stage.SERVER``, with its prober and
its Prometheus targets file), the mesh is the demo's shape plus a TCP service, every instance has a stats
address and a JSON access log, and every sidecar is a real Envoy bootstrapped with its stats endpoint. One
sidecar (``backend-1``) reaches the xDS server through a :class:`~tests.observability.relay.Relay` the tests
can cut. :class:`Traffic` sends requests along every route (some of them fail on purpose) until stopped.

Routes: frontend -> backend -> ratings (split 80/20 with ratings-v2), frontend -> ledger (TCP, echo), and
batch -> backend, which backend's policy refuses (403). ``/call/backend/call/ratings/nope`` makes ratings
answer 404, backend 502: a 5xx on frontend -> backend.
"""

from __future__ import annotations

import contextlib
import threading
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mesh_identity.compose import Stage, System, build
from mesh_identity.config import parse_config
from mesh_identity.demo.apps import DemoApp, get_json
from mesh_identity.mesh.model import Address, Mesh, Protocol, parse_mesh
from mesh_identity.registry.base import StaticRegistry
from mesh_identity.spiffe import TrustDomain
from tests.apps.echo import EchoApp, echo
from tests.e2e.harness import Envoy, free_address
from tests.observability.relay import Relay
from tests.waiting import wait_until
from xds_sds.resources.bootstrap import write_bootstrap

TD = TrustDomain("obs.mesh")
RELAYED = "backend-1"
WORKLOAD_TTL = "1m"  # the prober's grace is then 7.5 s and it probes every 3 s (see xds_sds.mesh.prober)
SHAPE = {  # service: (protocol, upstreams)
    "frontend": ("http", ["backend", "ledger"]),
    "backend": ("http", ["ratings"]),
    "ratings": ("http", []),
    "ratings-v2": ("http", []),
    "batch": ("http", ["backend"]),
    "ledger": ("tcp", []),
}
ROUTES = (  # (caller, callee) as the caller's sidecar reports them (each side of the split on its own)
    ("frontend", "backend"),
    ("frontend", "ledger"),
    ("backend", "ratings"),
    ("backend", "ratings-v2"),
    ("batch", "backend"),
)


def identity(service: str) -> str:
    return f"spiffe://{TD.name}/ns/shop/sa/{service}"


def _policy(kind: str, name: str, spec: dict[str, Any]) -> dict[str, Any]:
    return {"kind": kind, "metadata": {"name": name, "namespace": "shop"}, "spec": spec}


def mesh_document(workdir: Path) -> dict[str, Any]:
    services = {}
    for name, (protocol, upstreams) in SHAPE.items():
        node = f"{name}-1"
        services[name] = {
            "identity": {"namespace": "shop", "service_account": name},
            "protocol": protocol,
            "instances": [
                {
                    "node": node,
                    "app": str(free_address()),
                    "inbound": str(free_address()),
                    "stats": str(free_address()),
                    "access_log": str(workdir / f"{node}.access.log"),
                }
            ],
            "upstreams": [{"service": u, "listen": str(free_address())} for u in upstreams],
        }
    sa = {"kind": "ServiceAccount", "namespace": "shop"}
    policies = [
        _policy("HTTPRouteGroup", "everything", {"matches": [{"name": "all", "pathRegex": "/.*", "methods": ["*"]}]}),
        _policy(
            "TrafficTarget",
            "frontend-to-backend",
            {
                "destination": {**sa, "name": "backend"},
                "sources": [{**sa, "name": "frontend"}],
                "rules": [{"kind": "HTTPRouteGroup", "name": "everything"}],
            },
        ),
        _policy(
            "TrafficSplit",
            "ratings-canary",
            {
                "service": "ratings",
                "backends": [{"service": "ratings", "weight": 80}, {"service": "ratings-v2", "weight": 20}],
            },
        ),
    ]
    return {"services": services, "policies": policies}


@dataclass
class ObservedMesh:
    system: System
    mesh: Mesh
    workdir: Path
    relay: Relay
    envoys: dict[str, Envoy] = field(default_factory=dict)

    @property
    def state_dir(self) -> Path:
        return self.system.config.state_dir

    @property
    def metrics_address(self) -> str:
        assert self.system.service is not None
        return self.system.service.url.removeprefix("http://")

    def instance(self, service: str) -> Any:
        return self.mesh.service(service).instances[0]

    def outbound(self, client: str, upstream: str) -> Address:
        return next(u.listen for u in self.mesh.service(client).upstreams if u.service == upstream)

    def access_log(self, node: str) -> Path:
        return self.workdir / f"{node}.access.log"


@contextlib.contextmanager
def observed_mesh(workdir: Path) -> Iterator[ObservedMesh]:
    """Start the control plane, the apps and one Envoy per sidecar (see the module docstring); stop them all."""
    workdir.mkdir(parents=True, exist_ok=True)
    config = parse_config(
        {
            "trust_domain": TD.name,
            "state_dir": "state",
            "ca": {"workload_ttl": WORKLOAD_TTL, "rotate_after": 0.5, "jitter": 0.1},
            "metrics": {"listen": "127.0.0.1:0"},
            "xds": {"listen": "127.0.0.1:0"},
            "plugins": {"audit": {"enabled": False}},
        },
        workdir,
    )
    mesh = parse_mesh(mesh_document(workdir), TD)
    system = build(config, Stage.SERVER, create=True, registry=StaticRegistry(mesh))
    service, xds = system.service, system.xds
    assert service is not None and xds is not None and xds.sidecars is not None
    with contextlib.ExitStack() as stack:
        service.start()
        stack.callback(service.stop)
        relay = Relay(xds.address).start()
        stack.callback(relay.stop)
        observed = ObservedMesh(system, mesh, workdir, relay)
        for svc in mesh.services.values():
            instance = svc.instances[0]
            if svc.protocol is Protocol.HTTP:
                app: DemoApp | EchoApp = DemoApp(svc.name, instance.app, {u.service: u.listen for u in svc.upstreams})
            else:
                app = EchoApp(svc.name, instance.app)
            stack.callback(app.start().stop)
        for svc in mesh.services.values():
            instance = svc.instances[0]
            directory = workdir / "sidecars" / instance.node
            files = write_bootstrap(
                service.engine.source(svc.identity).svid(), directory, node=instance.node, cluster=svc.name,
                xds=relay.address if instance.node == RELAYED else xds.address,
                server_identity=xds.server_identity, stats=instance.stats,
            )  # fmt: skip
            xds.sidecars.register(instance.node, directory)  # serve renews its bootstrap certificate
            envoy = Envoy(files.bootstrap, directory, name=instance.node)
            stack.callback(envoy.stop)
            observed.envoys[instance.node] = envoy.start()
        for svc in mesh.services.values():
            expected = {f"inbound|{svc.name}", *(f"outbound|{u.service}" for u in svc.upstreams)}
            envoy = observed.envoys[svc.instances[0].node]
            wait_until(lambda e=envoy, x=expected: x <= set(e.listeners()), f"{svc.name}'s listeners")
        wait_until(
            lambda: _status(observed.instance("frontend").app, "/call/backend/call/ratings") == 200,
            "a first request along frontend -> backend -> ratings",
        )
        yield observed


def _status(address: Address, path: str) -> int | None:
    try:
        return get_json(address, path)[0]
    except (OSError, ValueError):
        return None


class Traffic:
    """Requests along every route, one after another in a thread, until the context ends. ``results`` counts
    ``(route, outcome)`` pairs; no outcome is asserted here (some routes fail on purpose)."""

    def __init__(self, observed: ObservedMesh, pause: float = 0.02) -> None:
        self.observed = observed
        self.pause = pause
        self.results: Counter[tuple[str, str]] = Counter()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="observed-traffic", daemon=True)

    def __enter__(self) -> Traffic:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(30)

    def _run(self) -> None:
        frontend = self.observed.instance("frontend").app
        batch = self.observed.instance("batch").app
        ledger = self.observed.outbound("frontend", "ledger")
        calls = (
            ("frontend ok", lambda: _status(frontend, "/call/backend/call/ratings")),
            ("frontend 5xx", lambda: _status(frontend, "/call/backend/call/ratings/nope")),
            ("frontend ok", lambda: _status(frontend, "/call/backend/call/ratings")),
            ("batch refused", lambda: _status(batch, "/call/backend")),
            ("ledger echo", lambda: 200 if _echo(ledger) else None),
        )
        while not self._stop.is_set():
            for name, call in calls:
                self.results[name, str(call())] += 1
                if self._stop.wait(self.pause):
                    return


def _echo(address: Address) -> bool:
    try:
        return echo(address, b"ping") == b"ping"
    except OSError:
        return False
