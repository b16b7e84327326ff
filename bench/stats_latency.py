"""Latency through the mesh with the observability config against the same mesh without it, in one run.

    .venv/bin/python bench/stats_latency.py                         # 5 rounds of 2,000 requests per mesh
    .venv/bin/python bench/stats_latency.py --rounds 7 --requests 3000 --scrape 1

Two meshes of the same shape run side by side on loopback, each a client service calling a server service
through two real Envoy sidecars (the client's outbound listener, mTLS, the server's inbound listener with its
RBAC filter), with one xDS server and one CA:

* **observed**: every instance has ``stats`` and ``access_log`` (a file): labelled stat prefixes, tag
  extraction and latency buckets, the stats listener, JSON access logs on both sidecars;
* **stats**: ``stats`` only (no access logs), to tell the two costs apart;
* **plain**: the same mesh without them (the config every sidecar had before).

The apps are a minimal HTTP responder (one ``sendall`` per answer, ``TCP_NODELAY``), so the figures are the
mesh's, not a Python web server's. Each round sends ``--requests`` requests through each mesh over one keep-alive
connection per mesh, interleaved request by request (observed, stats, plain, plain, stats, observed, ...), so
all see the same load on the machine; ``--scrape N`` also reads the stats endpoints of the observed and stats
meshes every N seconds meanwhile (what Prometheus does). Reported: p50 and p99 of each mesh per round and over
all rounds, as ratios to plain (goal: observed / plain <= 1.05 at p50 and p99).
"""

from __future__ import annotations

import argparse
import contextlib
import http.client
import shutil
import socket
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from mesh_identity.mesh.model import Address, Instance, Mesh, Protocol, Service, Upstream  # noqa: E402
from mesh_identity.spiffe import SpiffeId, TrustDomain  # noqa: E402
from tests.e2e.conftest import AuthorityIssuer, builtin_authority  # noqa: E402
from tests.e2e.harness import SERVER_PATH, Envoy, free_address  # noqa: E402
from tests.waiting import wait_until  # noqa: E402
from xds_sds.mesh.figures import read_stats  # noqa: E402
from xds_sds.mesh.publisher import MeshPublisher  # noqa: E402
from xds_sds.resources.bootstrap import write_bootstrap  # noqa: E402

TD = TrustDomain("bench.mesh")
ANSWER = b"HTTP/1.1 200 OK\r\ncontent-type: text/plain\r\ncontent-length: 2\r\n\r\nok"


class Responder:
    """A minimal HTTP/1.1 server: every request (read up to its blank line) answered with one ``sendall``."""

    def __init__(self, address: Address) -> None:
        self.sock = socket.create_server((address.host, address.port))
        self.thread = threading.Thread(target=self._accept, daemon=True)

    def start(self) -> Responder:
        self.thread.start()
        return self

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        buffer = b""
        with conn:
            while True:
                try:
                    chunk = conn.recv(65536)
                except OSError:
                    return
                if not chunk:
                    return
                buffer += chunk
                while b"\r\n\r\n" in buffer:
                    _, buffer = buffer.split(b"\r\n\r\n", 1)
                    conn.sendall(ANSWER)

    def stop(self) -> None:
        with contextlib.suppress(OSError):
            self.sock.shutdown(socket.SHUT_RDWR)
        self.sock.close()


def mesh_of(prefix: str, workdir: Path, *, stats: bool, access_log: bool) -> Mesh:
    def instance(name: str) -> Instance:
        extra: dict[str, object] = {"stats": free_address()} if stats else {}
        if access_log:
            extra["access_log"] = str(workdir / f"{prefix}-{name}.access.log")
        return Instance(f"{prefix}-{name}-1", free_address(), free_address(), **extra)  # type: ignore[arg-type]

    client = Service(
        f"{prefix}-client", SpiffeId.for_kubernetes(TD, "bench", f"{prefix}-client"), Protocol.HTTP,
        (instance("client"),), (Upstream(f"{prefix}-server", free_address()),),
    )  # fmt: skip
    server = Service(
        f"{prefix}-server",
        SpiffeId.for_kubernetes(TD, "bench", f"{prefix}-server"),
        Protocol.HTTP,
        (instance("server"),),
    )
    return Mesh(TD, {client.name: client, server.name: server})


@contextlib.contextmanager
def running(workdir: Path) -> Iterator[dict[str, tuple[Mesh, list[Envoy]]]]:
    issuer = AuthorityIssuer(builtin_authority(workdir / "ca", TD))
    meshes = {
        "observed": mesh_of("o", workdir, stats=True, access_log=True),
        "stats": mesh_of("s", workdir, stats=True, access_log=False),
        "plain": mesh_of("p", workdir, stats=False, access_log=False),
    }
    both = Mesh(TD, {name: s for mesh in meshes.values() for name, s in mesh.services.items()})
    xds = MeshPublisher(both, issuer.issue(SpiffeId(TD, SERVER_PATH)))
    xds.update_bundle(issuer.bundle())
    with contextlib.ExitStack() as stack:
        for service in both.services.values():
            xds.update_identity(issuer.issue(service.identity))
            stack.callback(Responder(service.instances[0].app).start().stop)
        xds.start()
        stack.callback(xds.stop, None)
        envoys: dict[str, tuple[Mesh, list[Envoy]]] = {}
        for name, mesh in meshes.items():
            started = []
            for service in mesh.services.values():
                instance = service.instances[0]
                files = write_bootstrap(
                    issuer.issue(service.identity), workdir / instance.node, node=instance.node, cluster=service.name,
                    xds=xds.address, server_identity=xds.server_identity, stats=instance.stats,
                )  # fmt: skip
                envoy = Envoy(files.bootstrap, workdir / instance.node, name=instance.node, log_level="warning")
                stack.callback(envoy.stop)
                started.append(envoy.start())
            envoys[name] = (mesh, started)
        for mesh, _ in envoys.values():
            listen = next(iter(mesh.services.values())).upstreams[0].listen
            wait_until(lambda a=listen: _ok(a), f"a first request through {listen}", 60)
        yield envoys


def _ok(address: Address) -> bool:
    try:
        connection = http.client.HTTPConnection(address.host, address.port, timeout=5)
        connection.request("GET", "/")
        return connection.getresponse().read() == b"ok"
    except OSError:
        return False


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def measure(listens: dict[str, Address], requests: int) -> dict[str, list[float]]:
    connections = {name: http.client.HTTPConnection(a.host, a.port, timeout=10) for name, a in listens.items()}
    for connection in connections.values():
        connection.connect()
        connection.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    times: dict[str, list[float]] = {name: [] for name in listens}
    try:
        for i in range(requests):
            order = list(listens) if i % 2 == 0 else list(reversed(listens))
            for name in order:
                connection = connections[name]
                start = time.perf_counter()
                connection.request("GET", "/")
                body = connection.getresponse().read()
                times[name].append((time.perf_counter() - start) * 1000)
                if body != b"ok":
                    raise RuntimeError(f"{name}: unexpected answer {body!r}")
    finally:
        for connection in connections.values():
            connection.close()
    return times


HEAD = ("round", "plain p50", "stats", "observed", "plain p99", "stats", "observed")


def row(name: str, times: dict[str, list[float]]) -> tuple[float, float]:
    """Print one line of the table (p50 and p99 of plain; of the others, their ratio to plain); returns the
    observed/plain ratios at p50 and p99."""
    cells = [name]
    ratios = []
    for q in (0.5, 0.99):
        plain = percentile(times["plain"], q)
        cells.append(f"{plain:.3f}ms")
        for other in ("stats", "observed"):
            ratio = percentile(times[other], q) / plain
            cells.append(f"x{ratio:.3f}")
        ratios.append(ratio)
    print("  ".join(f"{c:>11}" for c in cells))
    return ratios[0], ratios[1]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--requests", type=int, default=2000, help="per mesh and round")
    parser.add_argument(
        "--scrape", type=float, default=0.0, metavar="SECONDS", help="read the observed stats every N s"
    )
    args = parser.parse_args()
    workdir = Path(tempfile.mkdtemp(prefix="stats-latency-"))
    try:
        with running(workdir) as envoys:
            listens = {
                name: next(iter(mesh.services.values())).upstreams[0].listen for name, (mesh, _) in envoys.items()
            }
            stop = threading.Event()
            scraped = [0]

            def scrape() -> None:
                endpoints = [
                    s.instances[0].stats for m in ("observed", "stats") for s in envoys[m][0].services.values()
                ]
                while not stop.wait(args.scrape):
                    for endpoint in endpoints:
                        assert endpoint is not None
                        read_stats(endpoint)
                        scraped[0] += 1

            scraper = threading.Thread(target=scrape, daemon=True)
            if args.scrape > 0:
                scraper.start()
            measure(listens, 200)  # warm up both
            all_times: dict[str, list[float]] = {name: [] for name in listens}
            print("  ".join(f"{h:>11}" for h in HEAD))
            for number in range(1, args.rounds + 1):
                times = measure(listens, args.requests)
                for name, values in times.items():
                    all_times[name] += values
                row(str(number), times)
            stop.set()
            r50, r99 = row("all", all_times)
            means = {name: statistics.mean(values) for name, values in all_times.items()}
            print("means: " + ", ".join(f"{name} {mean:.3f}ms" for name, mean in means.items()))
            lines = sum(len(p.read_text().splitlines()) for p in workdir.glob("*.access.log"))
            print(f"access log lines written: {lines}; stats scrapes during the run: {scraped[0]}")
            verdict = "met" if r50 <= 1.05 and r99 <= 1.05 else "NOT met"
            print(f"goal observed/plain <= 1.05 at p50 and p99: {verdict}")
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
