"""Signing API throughput over the network, against ``cfssl serve``, in one run.

    .venv/bin/python bench/signing.py                       # 8 client processes, 10 s per measurement
    .venv/bin/python bench/signing.py --clients 16 --seconds 20

Both servers sign the same CSRs (P-256, made before the run) with a P-256 CA, over TLS on loopback, at the same
concurrency: ``--clients`` client processes, each with one connection and one request in flight at a time (CSR
in, certificate out), pinned to the cores the server does not use.

* ours: the signing API (:class:`~xds_sds.signing.server.SigningServer`) in a process of its own, with the
  built-in CA in intermediate mode, the real audit plugin (a JSON line per decision and per certificate), the
  authorisation from a registry: each client is the node agent of a host and asks ``SignX509`` for a workload
  that the registry places on that host, over mutual TLS with its agent SVID;
* cfssl: ``cfssl serve`` (Debian ``golang-cfssl``) with ``-tls-cert``, ``POST /api/v1/cfssl/sign`` with the CSR
  in PEM over persistent HTTPS connections (``http.client``). cfssl 1.2 checks less: it drops the URI SAN and
  makes no authorisation decision.

Measured: completed requests per second over the window (every client starts and stops at the same instants,
after a warm-up), the server's CPU use over the window (``/proc/<pid>/stat``: 1.0 = one core busy), and the
median latency seen by the clients. Two settings: the server pinned to core 0 and the clients to core 1
("one core"), then nothing pinned ("two cores": the server may use both, and shares them with its clients).
Our server is one process: its Python work holds one core's worth of the GIL; gRPC's threads (TLS, HTTP/2) run
beside it.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import ssl
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import timedelta
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from cryptography import x509  # noqa: E402
from cryptography.hazmat.primitives import hashes, serialization  # noqa: E402
from cryptography.hazmat.primitives.asymmetric import ec  # noqa: E402
from cryptography.x509.oid import NameOID  # noqa: E402

TD_NAME = "bench.test"
PEM = serialization.Encoding.PEM
DER = serialization.Encoding.DER


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())


def _csrs(count: int, identity: str) -> list[bytes]:
    """``count`` DER CSRs of fresh P-256 keys, each naming ``identity`` as its only SAN."""
    out = []
    for _ in range(count):
        key = ec.generate_private_key(ec.SECP256R1())
        builder = x509.CertificateSigningRequestBuilder().subject_name(
            x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "bench")])
        )
        builder = builder.add_extension(
            x509.SubjectAlternativeName([x509.UniformResourceIdentifier(identity)]), critical=False
        )
        out.append(builder.sign(key, hashes.SHA256()).public_bytes(DER))
    return out


def _server_tls(directory: Path) -> tuple[Path, Path, Path]:
    """A self-signed CA and a ``localhost`` server certificate it signs (what both servers present)."""
    from tests.pki import TestCa

    ca = TestCa.create("bench TLS CA")
    cert, key = ca.leaf(dns=["localhost"], ips=["127.0.0.1"], ttl=timedelta(hours=2), common_name="localhost")
    (directory / "tls-ca.pem").write_bytes(ca.pem())
    (directory / "tls.pem").write_bytes(cert.public_bytes(PEM))
    (directory / "tls-key.pem").write_bytes(_key_pem(key))
    return directory / "tls-ca.pem", directory / "tls.pem", directory / "tls-key.pem"


def _announce(ready_file: Path, port: int) -> None:
    """Write the port the server listens on, whole or not at all (the parent polls for the file)."""
    partial = ready_file.with_suffix(".partial")
    partial.write_text(str(port))
    partial.replace(ready_file)


def serve_noop(directory: Path, ready_file: Path) -> None:
    """The floor: a ``grpc.aio`` server with the same TLS whose SignX509 does no work at all (two fixed bytes
    for a chain), to show what gRPC in Python costs per call on this machine."""
    import asyncio

    import grpc

    from xds_sds.proto import signing_pb2, signing_pb2_grpc

    class Noop(signing_pb2_grpc.SigningServicer):
        async def SignX509(self, request: Any, context: Any) -> signing_pb2.X509Response:
            return signing_pb2.X509Response(spiffe_id=request.spiffe_id, cert_chain=[b"a", b"b"])

    async def run() -> None:
        server = grpc.aio.server()
        signing_pb2_grpc.add_SigningServicer_to_server(Noop(), server)
        credentials = grpc.ssl_server_credentials(
            [((directory / "tls-key.pem").read_bytes(), (directory / "tls.pem").read_bytes())],
            root_certificates=(directory / "roots.pem").read_bytes(),
            require_client_auth=True,
        )
        port = server.add_secure_port("127.0.0.1:0", credentials)
        await server.start()
        _announce(ready_file, port)
        stop = asyncio.Event()
        asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
        await stop.wait()
        await server.stop(None)

    asyncio.run(run())


def _cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


# -- our server (a process of its own) ----------------------------------------------------------------------------


def serve_ours(directory: Path, clients: int, ready_file: Path) -> None:
    """The signing API over the built-in CA; writes the agents' credentials and the port, then serves."""
    from mesh_identity.authority import Authority, AuthoritySettings
    from mesh_identity.clock import utcnow
    from mesh_identity.config import JwtConfig
    from mesh_identity.jointokens import JoinTokens
    from mesh_identity.jwtkeys import JwtAuthority
    from mesh_identity.keys import KeyType
    from mesh_identity.mesh.model import parse_mesh
    from mesh_identity.provider import Mode, ProviderContext
    from mesh_identity.registry.base import StaticRegistry, agent_identity
    from mesh_identity.server.service import Fanout
    from mesh_identity.spiffe import TrustDomain
    from mesh_identity.svid import certs_pem
    from plugins.manager import Plugins
    from providers.builtin.provider import SPEC as BUILTIN
    from xds_sds.protocol.credentials import ServerTls
    from xds_sds.signing.server import SigningServer
    from xds_sds.signing.signer import Signer
    from xds_sds.signing.tls import AttestTls

    td = TrustDomain(TD_NAME)
    state = directory / "state"
    plugins = Plugins.load()
    plugins.configure({"trust_domain": td.name, "state_dir": state, "plugins": {}})
    context = ProviderContext(td, state / "ca", KeyType.ECDSA_P256, Mode.INTERMEDIATE, utcnow, True)
    provider = BUILTIN.factory(context, BUILTIN.validate_options({}))
    authority = Authority(provider, AuthoritySettings(td, Mode.INTERMEDIATE), events=plugins)
    authority.start()
    services = {
        f"app{i}": {
            "identity": {"namespace": "bench", "service_account": f"app{i}"},
            "instances": [
                {
                    "node": f"app{i}-1",
                    "app": f"127.0.0.1:{30000 + i}",
                    "inbound": f"127.0.0.1:{20000 + i}",
                    "host": f"host{i}",
                }
            ],
        }
        for i in range(clients)
    }
    registry = StaticRegistry(parse_mesh({"services": services}, td))
    jwt = JwtAuthority(td, state, settings=JwtConfig())
    jwt.start()
    signer = Signer(
        authority,
        registry,
        tokens=JoinTokens(state),
        reviewer=None,
        jwt=jwt,
        bundle=authority.bundle,
        ttl=timedelta(hours=1),
        max_csr_bytes=8192,
        events=Fanout(plugins),
    )
    for i in range(clients):
        svid = authority.issue(agent_identity(td, f"host{i}"))
        (directory / f"agent{i}.pem").write_bytes(svid.cert_chain_pem())
        (directory / f"agent{i}-key.pem").write_bytes(svid.key_pem())
    (directory / "roots.pem").write_bytes(certs_pem(authority.bundle().authorities))
    chain = (directory / "tls.pem").read_bytes()
    key = (directory / "tls-key.pem").read_bytes()
    server = SigningServer(
        signer,
        ServerTls(chain, key, authority.bundle().pem()),
        AttestTls(chain, key),
        listen="127.0.0.1:0",
        attest_listen="127.0.0.1:0",
    )
    port, _ = server.start()
    _announce(ready_file, port)
    stop = [False]
    signal.signal(signal.SIGTERM, lambda *_: stop.__setitem__(0, True))
    while not stop[0]:
        time.sleep(0.2)
    server.stop(None)


# -- clients ----------------------------------------------------------------------------------------------------


def client(kind: str, index: int, port: int, directory: Path, start: float, end: float, out: Path) -> None:
    """One connection, one request at a time, counting the answers completed inside ``[start, end)``."""
    csrs = json.loads((directory / f"csrs{index}.json").read_text())
    ders = [bytes.fromhex(c) for c in csrs]
    latencies: list[float] = []
    done = 0
    if kind in ("ours", "noop"):
        import grpc

        from xds_sds.proto import signing_pb2, signing_pb2_grpc

        creds = grpc.ssl_channel_credentials(
            (directory / "tls-ca.pem").read_bytes(),
            (directory / f"agent{index}-key.pem").read_bytes(),
            (directory / f"agent{index}.pem").read_bytes(),
        )
        channel = grpc.secure_channel(
            f"127.0.0.1:{port}", creds, options=[("grpc.ssl_target_name_override", "localhost")]
        )
        stub = signing_pb2_grpc.SigningStub(channel)
        identity = f"spiffe://{TD_NAME}/ns/bench/sa/app{index}"
        requests = [signing_pb2.SignX509Request(spiffe_id=identity, csr=d) for d in ders]

        def call(n: int) -> None:
            response = stub.SignX509(requests[n % len(requests)], timeout=30)
            if len(response.cert_chain) < 2:
                raise RuntimeError("no chain")

    else:
        import http.client

        context = ssl.create_default_context(cafile=str(directory / "tls-ca.pem"))
        connection = http.client.HTTPSConnection("localhost", port, context=context, timeout=30)
        bodies = [
            json.dumps({"certificate_request": x509.load_der_x509_csr(d).public_bytes(PEM).decode()}).encode()
            for d in ders
        ]
        headers = {"Content-Type": "application/json"}

        def call(n: int) -> None:
            connection.request("POST", "/api/v1/cfssl/sign", bodies[n % len(bodies)], headers)
            response = connection.getresponse()
            answer = json.loads(response.read())
            if response.status != 200 or not answer.get("success"):
                raise RuntimeError(f"cfssl answered {response.status}: {answer.get('errors')}")

    n = 0
    while time.time() < start:  # warm-up: the connection, the handshake, the first requests
        call(n)
        n += 1
    while (now := time.time()) < end:
        call(n)
        n += 1
        finished = time.time()
        if finished < end:
            done += 1
            latencies.append(finished - now)
    out.write_text(json.dumps({"done": done, "p50": statistics.median(latencies) if latencies else None}))


# -- one measurement --------------------------------------------------------------------------------------------


def _pinned(command: list[str], cores: set[int] | None) -> list[str]:
    """``command`` run by ``taskset`` on ``cores`` (it execs the command: the same pid, every thread pinned)."""
    return command if cores is None else ["taskset", "-c", ",".join(map(str, sorted(cores))), *command]


def measure(
    kind: str, directory: Path, args: argparse.Namespace, server_cores: set[int] | None, client_cores: set[int] | None
) -> dict[str, Any]:
    """Start the server (``ours`` or ``cfssl``), run the clients, stop the server; the figures."""
    ready = directory / f"{kind}.port"
    ready.unlink(missing_ok=True)
    if kind in ("ours", "noop"):
        command = [sys.executable, __file__, f"--serve-{kind}", str(directory), "--clients", str(args.clients)]
        server = subprocess.Popen(_pinned(command, server_cores))
        deadline = time.time() + 120
        while not ready.exists():
            if time.time() > deadline or server.poll() is not None:
                server.kill()
                raise RuntimeError(f"the {kind} server did not start")
            time.sleep(0.1)
        port = int(ready.read_text())
    else:
        port = _free_port()
        command = [
            "cfssl",
            "serve",
            "-address",
            "127.0.0.1",
            "-port",
            str(port),
            "-ca",
            str(directory / "cfssl-ca.pem"),
            "-ca-key",
            str(directory / "cfssl-ca-key.pem"),
            "-config",
            str(directory / "cfssl-config.json"),
            "-tls-cert",
            str(directory / "tls.pem"),
            "-tls-key",
            str(directory / "tls-key.pem"),
            "-loglevel",
            "5",
        ]
        server = subprocess.Popen(_pinned(command, server_cores), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.time() + 30
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                if time.time() > deadline or server.poll() is not None:
                    server.kill()
                    raise RuntimeError("cfssl serve did not start") from None
                time.sleep(0.1)
    try:
        start = time.time() + args.warmup + 0.5 * args.clients**0.5
        end = start + args.seconds
        outs = [directory / f"{kind}-client{i}.json" for i in range(args.clients)]
        procs = []
        for i, out in enumerate(outs):
            out.unlink(missing_ok=True)
            command = [
                sys.executable,
                __file__,
                "--client",
                kind,
                str(i),
                str(port),
                str(directory),
                repr(start),
                repr(end),
                str(out),
            ]
            procs.append(subprocess.Popen(_pinned(command, client_cores)))
        while time.time() < start:
            time.sleep(0.01)
        cpu_before = _cpu_seconds(server.pid)
        while time.time() < end:
            time.sleep(0.01)
        cpu_after = _cpu_seconds(server.pid)
        for proc in procs:
            if proc.wait(timeout=args.seconds + 120) != 0:
                raise RuntimeError(f"a {kind} client failed")
    finally:
        server.send_signal(signal.SIGTERM)
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()
    results = [json.loads(out.read_text()) for out in outs]
    done = sum(r["done"] for r in results)
    return {
        "rate": done / args.seconds,
        "server_cpu": (cpu_after - cpu_before) / args.seconds,
        "p50_ms": 1000 * statistics.median(r["p50"] for r in results if r["p50"] is not None),
    }


def prepare(directory: Path, args: argparse.Namespace) -> None:
    _server_tls(directory)
    (directory / "cfssl-csr.json").write_text(
        json.dumps({"CN": "bench cfssl CA", "key": {"algo": "ecdsa", "size": 256}})
    )
    made = subprocess.run(
        ["cfssl", "genkey", "-initca", str(directory / "cfssl-csr.json")], capture_output=True, check=True
    )
    ca = json.loads(made.stdout)
    (directory / "cfssl-ca.pem").write_text(ca["cert"])
    (directory / "cfssl-ca-key.pem").write_text(ca["key"])
    (directory / "cfssl-config.json").write_text(
        json.dumps(
            {"signing": {"default": {"expiry": "1h", "usages": ["digital signature", "server auth", "client auth"]}}}
        )
    )
    for i in range(args.clients):
        identity = f"spiffe://{TD_NAME}/ns/bench/sa/app{i}"
        (directory / f"csrs{i}.json").write_text(json.dumps([c.hex() for c in _csrs(args.csrs, identity)]))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--clients", type=int, default=8, help="client processes, one connection each")
    parser.add_argument("--seconds", type=float, default=10.0, help="length of each measurement window")
    parser.add_argument("--warmup", type=float, default=2.0, help="seconds of requests before the window")
    parser.add_argument("--csrs", type=int, default=200, help="distinct CSRs per client (used in turn)")
    parser.add_argument("--floor", action="store_true", help="also measure a gRPC server that does no work")
    parser.add_argument("--rounds", type=int, default=3, help="measurements of each server per setting, alternated")
    parser.add_argument("--serve-ours", metavar="DIR", help=argparse.SUPPRESS)
    parser.add_argument("--serve-noop", metavar="DIR", help=argparse.SUPPRESS)
    parser.add_argument("--client", nargs=7, metavar="ARG", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve_ours:
        directory = Path(args.serve_ours)
        serve_ours(directory, args.clients, directory / "ours.port")
        return 0
    if args.serve_noop:
        directory = Path(args.serve_noop)
        serve_noop(directory, directory / "noop.port")
        return 0
    if args.client:
        kind, index, port, directory, start, end, out = args.client
        client(kind, int(index), int(port), Path(directory), float(start), float(end), Path(out))
        return 0
    if shutil.which("cfssl") is None:
        print("cfssl is not installed (Debian golang-cfssl)", file=sys.stderr)
        return 2
    cores = sorted(os.sched_getaffinity(0))
    with tempfile.TemporaryDirectory(prefix="signing-bench-") as tmp:
        directory = Path(tmp)
        prepare(directory, args)
        print(
            f"{args.clients} client processes, one connection and one request in flight each; "
            f"{args.seconds:g} s windows; cores {cores}"
        )
        settings: list[tuple[str, set[int] | None, set[int] | None]] = [
            ("one core", {cores[0]}, set(cores[1:]) or None)
        ]
        if len(cores) > 1:
            settings.append(("two cores", None, None))
        kinds = ("cfssl", "ours", "noop")
        rates: dict[tuple[str, str], list[float]] = {}
        ratios: dict[str, list[float]] = {}
        for label, server_cores, client_cores in settings:
            for round_ in range(1, args.rounds + 1):
                got = {}
                for kind in kinds:
                    if kind == "noop" and not args.floor:
                        continue
                    figures = measure(kind, directory, args, server_cores, client_cores)
                    got[kind] = figures["rate"]
                    rates.setdefault((label, kind), []).append(figures["rate"])
                    print(
                        f"  {label:9}  round {round_}  {kind:5}  {figures['rate']:7.0f} /s   server CPU "
                        f"{figures['server_cpu']:.2f}   client p50 {figures['p50_ms']:.2f} ms",
                        flush=True,
                    )
                ratios.setdefault(label, []).append(got["ours"] / got["cfssl"])
        median = {key: statistics.median(values) for key, values in rates.items()}
        print("medians:")
        for (label, kind), value in median.items():
            print(f"  {label:9}  {kind:5}  {value:7.0f} /s")
        for label, values in ratios.items():
            shown = " ".join(f"{v:.2f}" for v in values)
            print(f"ours / cfssl, {label}: {statistics.median(values):.2f} (rounds: {shown})")
        if len(cores) > 1:
            scale = median[("two cores", "ours")] / median[("one core", "ours")]
            print(f"ours, two cores / one core: {scale:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
