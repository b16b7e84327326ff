"""Mass rotation: N identities renewed at once (as after a root activation) against the raw issuance loop.

Run:  .venv/bin/python bench/mass_rotation.py [--n 10000] [--rounds 3] [--memory 10000,100000]

Throughput: a running Service (authority, rotation engine with its scheduler and one job per identity, metrics)
manages N identities, each with a subscriber that PEM-encodes every new SVID as the SDS server does. One round
times ``engine.rotate_all()``: per identity a fresh key, a new leaf, the event, the metrics, the source update
and its subscriber, and moving the identity's job to its new due time. The reference is the raw `cryptography`
loop of bench/issuance.py (keygen, build the same leaf profile, sign, PEM-encode leaf and key), N times. Both
run interleaved in this one process on one core; the figure is the ratio of the best round of each (goal >= 0.8).

Memory: for each N, a fresh process starts the service with no identity, then adds N; the growth of its
resident set (which includes OpenSSL's allocations, unlike tracemalloc) divided by N is the memory held per
scheduled identity: its SVID (certificate and key), its source, its APScheduler job and its rotation state.
"""

from __future__ import annotations

import argparse
import gc
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric import ec

sys.path.insert(0, str(Path(__file__).resolve().parent))

from issuance import raw_generated  # the Foundation benchmark's raw loop, reused as is

from mesh_identity.assembly import build_provider, build_service
from mesh_identity.config import Config, parse_config
from mesh_identity.server.service import Service
from mesh_identity.spiffe import SpiffeId, TrustDomain
from mesh_identity.svid import X509Svid
from providers.builtin.provider import SPEC

TD = TrustDomain("example.org")


def config_in(directory: Path) -> Config:
    return parse_config(
        {"trust_domain": TD.name, "state_dir": "state", "metrics": {"listen": "127.0.0.1:0"}}, directory
    )


def service_in(directory: Path, n: int) -> Service:
    config = config_in(directory)
    identities = [SpiffeId.for_kubernetes(TD, f"ns{i % 100}", f"sa{i}") for i in range(n)]
    provider = build_provider(config, SPEC, SPEC.validate_options({}))
    return build_service(config, provider, identities=identities)


def push(svid: X509Svid) -> None:
    """What an SDS subscriber does with a new SVID: encode it."""
    svid.cert_chain_pem()
    svid.key_pem()


def throughput(n: int, rounds: int) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        service = service_in(Path(tmp), n)
        service.start()
        try:
            for source in service.engine.sources():
                source.subscribe(push)
            signing = service.authority.signing_ca
            assert signing is not None
            ca_key = signing.signer.issuer_key
            assert isinstance(ca_key, ec.EllipticCurvePrivateKey)
            raw_once = raw_generated(signing.certificate, ca_key)
            raw_rates, engine_rates = [], []
            for round_no in range(1, rounds + 1):
                gc.collect()
                start = time.perf_counter()
                for _ in range(n):
                    raw_once()
                raw_rates.append(n / (time.perf_counter() - start))
                gc.collect()
                start = time.perf_counter()
                summary = service.engine.rotate_all()
                engine_rates.append(n / (time.perf_counter() - start))
                assert summary.rotated == n, summary
                assert not summary.failed, summary
                print(f"round {round_no}: raw {raw_rates[-1]:,.0f}/s, engine {engine_rates[-1]:,.0f}/s", flush=True)
            jobs = len(service.engine.job_times())
        finally:
            service.stop()
    best_raw, best_engine = max(raw_rates), max(engine_rates)
    ratios = sorted(e / r for e, r in zip(engine_rates, raw_rates, strict=True))
    print(f"identities: {n} ({jobs} scheduler jobs: one per identity, the intermediate, the health check)")
    print(f"raw loop (best):      {best_raw:,.0f} issuances/s")
    print(f"rotate_all (best):    {best_engine:,.0f} rotations/s  ({n / best_engine:.2f} s for all)")
    print(f"ratio:                {best_engine / best_raw:.2f}  (goal >= 0.80; best of each side)")
    print(f"round ratios:         {', '.join(f'{r:.2f}' for r in ratios)} (median {ratios[len(ratios) // 2]:.2f})")


def rss_kib() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError("no VmRSS in /proc/self/status")


def memory_child(n: int) -> None:
    """In a fresh process: the RSS growth of adding ``n`` identities to a started service."""
    with tempfile.TemporaryDirectory() as tmp:
        service = service_in(Path(tmp), 0)
        service.start()
        try:
            # warm up every code path once so that first-use allocations are not counted per identity
            service.engine.add(SpiffeId.for_kubernetes(TD, "warm", "up"))
            service.engine.rotate_all()
            service.snapshot()
            gc.collect()
            before = rss_kib()
            start = time.perf_counter()
            service.engine.add_all(SpiffeId.for_kubernetes(TD, f"ns{i % 100}", f"sa{i}") for i in range(n))
            added = time.perf_counter() - start
            gc.collect()
            after = rss_kib()
            jobs = len(service.engine.job_times())
        finally:
            service.stop()
    print(json.dumps({"n": n, "rss_before_kib": before, "rss_after_kib": after, "jobs": jobs, "add_seconds": added}))


def memory(sizes: list[int]) -> None:
    for n in sizes:
        proc = subprocess.run(
            [sys.executable, __file__, "--memory-child", str(n)], capture_output=True, text=True, check=True
        )
        result = json.loads(proc.stdout.strip().splitlines()[-1])
        per = (result["rss_after_kib"] - result["rss_before_kib"]) / n
        print(
            f"memory, {n:>7,} identities: {per:.1f} KiB per scheduled identity "
            f"(RSS {result['rss_before_kib'] / 1024:.0f} -> {result['rss_after_kib'] / 1024:.0f} MiB, "
            f"{result['jobs']:,} jobs, added in {result['add_seconds']:.1f} s)"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=10_000, help="identities rotated at once")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--memory", default="10000,100000", help="identity counts for the memory figure ('' skips)")
    parser.add_argument("--memory-child", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.memory_child is not None:
        memory_child(args.memory_child)
        return
    throughput(args.n, args.rounds)
    if args.memory:
        memory([int(part) for part in args.memory.split(",")])


if __name__ == "__main__":
    main()
