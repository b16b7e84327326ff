"""SDS fan-out benchmark: K simulated proxies subscribed to their secrets; rotate every identity; time until
every stream has acknowledged its new secret; server memory per connected stream.

    .venv/bin/python bench/sds_fanout.py                       # K = 100, 1000, 10000
    .venv/bin/python bench/sds_fanout.py --proxies 1000 --identities 50

For each K a fresh server process runs our DiscoveryServer (mTLS, BindingAuthorizer) in its xDS thread.
The proxies are ADS state-of-the-world streams opened by separate client processes (``--clients``, about
1,000 streams each: one client process cannot hold 10,000 streams). Proxies belong to
``--identities`` identities (a service with many instances); each identity's proxies share one TLS connection
with that identity's client certificate, so there are as many connections as identities. Each stream asks
for its identity's certificate secret and the trust bundle, and ACKs every response.

Measured in the server process:
* connect: from starting the clients until every stream has its first response;
* rotate: from the trigger (new SVIDs already signed, handed to the cache one identity after another) until
  the server has recorded, for every proxy, an ACK of the new certificate's version;
* memory per stream: (server RSS with all streams open - RSS before any client connected) / K.
The machine's cores are shared by server and clients, as they would be on one host.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from cryptography import x509  # noqa: E402
from cryptography.hazmat.primitives import hashes  # noqa: E402
from cryptography.hazmat.primitives.asymmetric import ec  # noqa: E402
from cryptography.x509.oid import NameOID  # noqa: E402

from mesh_identity.spiffe import SpiffeId, TrustDomain  # noqa: E402
from mesh_identity.svid import TrustBundle, X509Svid, cert_pem  # noqa: E402

TD = TrustDomain("bench.test")
SERVER_NAME = "localhost"


# -- a small CA -------------------------------------------------------------------------------------------------


class Ca:
    def __init__(self) -> None:
        self.key = ec.generate_private_key(ec.SECP256R1())
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "bench root")])
        now = datetime.now(UTC)
        self.cert = (
            x509.CertificateBuilder()
            .subject_name(name)
            .issuer_name(name)
            .public_key(self.key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - timedelta(minutes=5))
            .not_valid_after(now + timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(self.key, hashes.SHA256())
        )
        self.bundle = TrustBundle(TD, (self.cert,))

    def svid(self, spiffe_id: SpiffeId, dns: str | None = None) -> X509Svid:
        key = ec.generate_private_key(ec.SECP256R1())
        now = datetime.now(UTC)
        names: list[x509.GeneralName] = [x509.UniformResourceIdentifier(str(spiffe_id))]
        if dns:
            names.append(x509.DNSName(dns))
        cert = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "bench")]))
            .issuer_name(self.cert.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - timedelta(minutes=1))
            .not_valid_after(now + timedelta(hours=1))
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(  # the X.509-SVID leaf profile, which the xDS server requires of its callers
                x509.KeyUsage(True, False, False, False, False, False, False, False, False), critical=True
            )
            .add_extension(
                x509.ExtendedKeyUsage([x509.ExtendedKeyUsageOID.SERVER_AUTH, x509.ExtendedKeyUsageOID.CLIENT_AUTH]),
                critical=False,
            )
            .add_extension(x509.SubjectAlternativeName(names), critical=False)
            .sign(self.key, hashes.SHA256())
        )
        return X509Svid(spiffe_id, cert, (), key, self.bundle, "bench")


def rss_kib() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError("no VmRSS")


def identity(i: int) -> SpiffeId:
    return SpiffeId.from_segments(TD, "ns", "bench", "sa", f"svc{i}")


# -- client process ---------------------------------------------------------------------------------------------


async def client_main(target: str, certdir: Path, nodes: list[tuple[str, int]]) -> None:
    import grpc
    from envoy.config.core.v3 import base_pb2
    from envoy.service.discovery.v3 import ads_pb2_grpc, discovery_pb2

    from xds_sds.protocol.typeurls import SECRET

    roots = (certdir / "ca.pem").read_bytes()
    channels: dict[int, grpc.aio.Channel] = {}
    for _, ident in nodes:
        if ident not in channels:
            creds = grpc.ssl_channel_credentials(
                roots, (certdir / f"{ident}.key").read_bytes(), (certdir / f"{ident}.pem").read_bytes()
            )
            channels[ident] = grpc.aio.secure_channel(
                target, creds, options=[("grpc.ssl_target_name_override", SERVER_NAME)]
            )
    ready = 0
    errors = 0

    async def stream(node: str, ident: int) -> None:
        nonlocal ready, errors
        names = [str(identity(ident)), str(TD.id)]
        stub = ads_pb2_grpc.AggregatedDiscoveryServiceStub(channels[ident])
        call = stub.StreamAggregatedResources()
        first = True
        try:
            await call.write(
                discovery_pb2.DiscoveryRequest(node=base_pb2.Node(id=node), type_url=SECRET, resource_names=names)
            )
            async for response in call:
                await call.write(
                    discovery_pb2.DiscoveryRequest(
                        type_url=SECRET,
                        resource_names=names,
                        version_info=response.version_info,
                        response_nonce=response.nonce,
                    )
                )
                if first:
                    first = False
                    ready += 1
                    if ready == len(nodes):
                        print("READY", flush=True)
        except grpc.aio.AioRpcError as err:
            errors += 1
            print(f"ERROR {node} {err.code()} {err.details()}", file=sys.stderr, flush=True)
            if first and ready + errors == len(nodes):  # every stream has answered or failed: say so, not hang
                print(f"FAILED {errors} of {len(nodes)} streams did not open", flush=True)

    tasks = [asyncio.create_task(stream(node, ident)) for node, ident in nodes]
    loop = asyncio.get_running_loop()
    await loop.run_in_executor(None, sys.stdin.read)  # the server closes our stdin to stop us
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    for channel in channels.values():
        await channel.close()


# -- server process ---------------------------------------------------------------------------------------------


def run_one(proxies: int, identities: int, clients: int, options: list[tuple[str, int]]) -> dict[str, float]:
    from xds_sds.protocol.acks import AckEvent, AckTracker
    from xds_sds.protocol.auth import BindingAuthorizer, tls_secret_name
    from xds_sds.protocol.cache import Resource, SnapshotCache
    from xds_sds.protocol.credentials import ServerTls
    from xds_sds.protocol.server import DEFAULT_OPTIONS, DiscoveryServer
    from xds_sds.protocol.typeurls import SECRET
    from xds_sds.resources.secrets import tls_certificate_secret, validation_context_secret

    ca = Ca()
    certdir = Path(tempfile.mkdtemp(prefix="sds-fanout-"))
    (certdir / "ca.pem").write_bytes(cert_pem(ca.cert))
    svids = {i: ca.svid(identity(i)) for i in range(identities)}
    for i, svid in svids.items():
        (certdir / f"{i}.pem").write_bytes(svid.cert_chain_pem())
        (certdir / f"{i}.key").write_bytes(svid.key_pem())
    nodes = [(f"proxy-{n}", n % identities) for n in range(proxies)]
    binding = {node: identity(ident) for node, ident in nodes}

    cache = SnapshotCache()
    bundle = validation_context_secret(ca.bundle)
    secrets = {i: tls_certificate_secret(svid) for i, svid in svids.items()}
    for node, ident in nodes:
        cache.set_resources(node, SECRET, {tls_secret_name(identity(ident)): secrets[ident], str(TD.id): bundle})
    acks = AckTracker()
    server = DiscoveryServer(cache, ServerTls.from_svid(ca.svid(SpiffeId(TD, "/xds"), dns=SERVER_NAME)),
                             BindingAuthorizer(binding), acks=acks, options=(*DEFAULT_OPTIONS, *options))  # fmt: skip
    server.start()
    baseline = rss_kib()

    per_client = math.ceil(proxies / clients)
    started = time.monotonic()
    procs = []
    for c in range(clients):
        share = nodes[c * per_client : (c + 1) * per_client]
        if not share:
            break
        procs.append(
            subprocess.Popen(
                [sys.executable, __file__, "--client", server.target, str(certdir), json.dumps(share)],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                text=True,
            )
        )
    for proc in procs:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        if line.strip() != "READY":
            raise RuntimeError(f"a client failed to open its streams: {line!r}")
    connected = time.monotonic() - started
    time.sleep(1.0)  # let the initial ACKs settle before measuring memory
    with_streams = rss_kib()
    assert len(server.streams()) == proxies, len(server.streams())

    new_svids = {i: ca.svid(identity(i)) for i in range(identities)}
    new_secrets = {
        i: Resource.pack(tls_secret_name(identity(i)), tls_certificate_secret(s)) for i, s in new_svids.items()
    }
    expected = {i: r.version for i, r in new_secrets.items()}
    done = threading.Event()
    acked: set[str] = set()
    lock = threading.Lock()
    ident_of = dict(nodes)

    def on_ack(event: AckEvent) -> None:
        if event.nack is not None:
            return
        ident = ident_of.get(event.node_id)
        if ident is None:
            return
        got = acks.acked(event.node_id, SECRET, tls_secret_name(identity(ident)))
        if got is not None and got.version == expected[ident]:
            with lock:
                acked.add(event.node_id)
                if len(acked) == proxies:
                    done.set()

    acks.subscribe(on_ack)
    trigger = time.monotonic()
    for node, ident in nodes:
        cache.update_resources(node, SECRET, {tls_secret_name(identity(ident)): new_secrets[ident]})
    handed = time.monotonic() - trigger
    finished = done.wait(120)
    rotate = time.monotonic() - trigger
    for proc in procs:
        assert proc.stdin is not None
        proc.stdin.close()
    for proc in procs:
        proc.wait(60)
    server.stop(None)
    shutil.rmtree(certdir, ignore_errors=True)
    return {
        "proxies": proxies,
        "identities": identities,
        "clients": len(procs),
        "connect_s": round(connected, 3),
        "cache_updated_s": round(handed, 3),
        "rotate_all_acked_s": round(rotate, 3) if finished else float("nan"),
        "acked": len(acked),
        "rss_baseline_mib": round(baseline / 1024, 1),
        "rss_streams_mib": round(with_streams / 1024, 1),
        "kib_per_stream": round((with_streams - baseline) / proxies, 1),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--proxies", type=int, nargs="+", default=[100, 1000, 10_000])
    parser.add_argument("--identities", type=int, default=100, help="identities (connections), at most K")
    parser.add_argument("--streams-per-client", type=int, default=1000)
    parser.add_argument("--option", action="append", default=[], metavar="NAME=INT", help="an extra gRPC server option")
    parser.add_argument("--client", nargs=3, help=argparse.SUPPRESS)
    parser.add_argument("--one", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.client:
        target, certdir, share = args.client
        asyncio.run(client_main(target, Path(certdir), [tuple(x) for x in json.loads(share)]))
        return 0
    if args.one:
        [k] = args.proxies
        options = [(name, int(value)) for name, _, value in (o.partition("=") for o in args.option)]
        result = run_one(k, min(args.identities, k), max(1, math.ceil(k / args.streams_per_client)), options)
        print(json.dumps(result), flush=True)
        return 0
    print(f"{'K':>6} {'ids':>4} {'procs':>5} {'connect s':>9} {'cache s':>7} {'rotate->all ACK s':>17} {'acked':>6} "
          f"{'RSS base MiB':>12} {'RSS MiB':>8} {'KiB/stream':>10}")  # fmt: skip
    for k in args.proxies:
        out = subprocess.run(
            [sys.executable, __file__, "--one", "--proxies", str(k), "--identities", str(args.identities),
             "--streams-per-client", str(args.streams_per_client), *(f"--option={o}" for o in args.option)],
            capture_output=True, text=True, check=False,
        )  # fmt: skip
        if out.returncode != 0:
            print(out.stdout + out.stderr)
            return 1
        r = json.loads(out.stdout.strip().splitlines()[-1])
        print(f"{r['proxies']:>6} {r['identities']:>4} {r['clients']:>5} {r['connect_s']:>9} {r['cache_updated_s']:>7} "
              f"{r['rotate_all_acked_s']:>17} {r['acked']:>6} {r['rss_baseline_mib']:>12} "
              f"{r['rss_streams_mib']:>8} {r['kib_per_stream']:>10}", flush=True)  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
