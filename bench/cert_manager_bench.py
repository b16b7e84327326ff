"""Per-workload issuance through cert-manager (the test API server and signer) against the built-in provider.

Run:  .venv/bin/python bench/cert_manager_bench.py [--n 200] [--rounds 3] [--concurrency 1 4] [--in-process]

Both providers issue SVIDs through the public ``Authority.issue`` API in per-workload mode (every SVID signed
by the provider from a CSR), interleaved round by round in this process; the best round of each is reported.
The cert-manager side goes through the real ``kubernetes`` client to ``tests/fakes/kube/`` over HTTPS
on loopback, where the cert-manager stand-in (``tests/fakes/cert_manager/``) approves and signs each
CertificateRequest. By default the API server and the signer run in a child process, as they would be
separate processes in a cluster; ``--in-process`` keeps them in this one (they then share its GIL).

For cert-manager it also reports where the time of one issuance goes, summed over all issuances:
  api calls   the create and delete round trips
  waiting     the watch from creation to Ready (approval, signing and status writes by the signer)
  local       everything else (key generation, CSR, checks of the returned chain)
and the share of the Kubernetes round trips (api calls + waiting) in the total.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path

from mesh_identity.authority import Authority, AuthoritySettings
from mesh_identity.clock import utcnow
from mesh_identity.keys import KeyType
from mesh_identity.provider import Mode, ProviderContext
from mesh_identity.spiffe import SpiffeId, TrustDomain
from providers.builtin.provider import SPEC as BUILTIN
from providers.cert_manager.kube import Timings
from providers.cert_manager.provider import SPEC as CERT_MANAGER
from providers.cert_manager.provider import CertManagerProvider

ROOT = Path(__file__).resolve().parent.parent
TD = TrustDomain("example.org")
IDS = [SpiffeId.for_kubernetes(TD, "bench", f"svc-{i}") for i in range(64)]
NAMESPACE = "mesh-identity"


@contextmanager
def fake_cluster(kubeconfig: Path) -> Iterator[None]:
    """The test API server with the cert-manager stand-in and a CA Issuer, in this process."""
    sys.path.insert(0, str(ROOT))  # the test fakes live in tests/, which is not an installed package
    from tests.fakes.cert_manager import CertManagerSigner
    from tests.fakes.kube import KubeServer
    from tests.pki import TestCa

    with KubeServer(history_limit=1000, request_log_limit=1000) as server, CertManagerSigner(server) as signer:
        signer.add_ca_issuer("mesh-ca", TestCa.create("bench root"), namespace=NAMESPACE)
        server.write_kubeconfig(kubeconfig, namespace=NAMESPACE)
        yield


def serve(kubeconfig: Path) -> None:
    """The child process: serve until stdin closes."""
    with fake_cluster(kubeconfig):
        print("ready", flush=True)
        sys.stdin.read()


@contextmanager
def cluster(tmp: Path, in_process: bool) -> Iterator[Path]:
    kubeconfig = tmp / "kubeconfig"
    if in_process:
        with fake_cluster(kubeconfig):
            yield kubeconfig
        return
    child = subprocess.Popen(
        [sys.executable, __file__, "--serve", str(kubeconfig)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        cwd=ROOT,
    )
    try:
        assert child.stdout is not None
        if child.stdout.readline().strip() != "ready":
            raise SystemExit("the test API server did not start")
        yield kubeconfig
    finally:
        assert child.stdin is not None
        child.stdin.close()
        child.wait(timeout=30)


def run(issue: Callable[[SpiffeId], object], n: int, concurrency: int) -> tuple[float, float]:
    """Issue ``n`` SVIDs with ``concurrency`` threads: (issuances per second, summed latency in seconds)."""
    latencies: list[float] = []
    lock = threading.Lock()

    def one(index: int) -> None:
        started = time.perf_counter()
        issue(IDS[index % len(IDS)])
        elapsed = time.perf_counter() - started
        with lock:
            latencies.append(elapsed)

    started = time.perf_counter()
    if concurrency == 1:
        for index in range(n):
            one(index)
    else:
        with ThreadPoolExecutor(concurrency) as pool:
            list(pool.map(one, range(n)))
    return n / (time.perf_counter() - started), sum(latencies)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=200, help="issuances per round and side")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 4])
    parser.add_argument("--in-process", action="store_true", help="run the API server and signer in this process")
    parser.add_argument("--serve", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve:
        serve(args.serve)
        return
    with tempfile.TemporaryDirectory() as tmp_name, cluster(Path(tmp_name), args.in_process) as kubeconfig:
        tmp = Path(tmp_name)
        builtin_context = ProviderContext(TD, tmp / "builtin", KeyType.ECDSA_P256, Mode.PER_WORKLOAD, utcnow)
        builtin = Authority(
            BUILTIN.factory(builtin_context, BUILTIN.validate_options({})), AuthoritySettings(TD, Mode.PER_WORKLOAD)
        )
        builtin.start()
        cm_context = ProviderContext(TD, tmp / "cert-manager", KeyType.ECDSA_P256, Mode.PER_WORKLOAD, utcnow)
        provider = CERT_MANAGER.factory(
            cm_context,
            CERT_MANAGER.validate_options({"kubeconfig": str(kubeconfig), "issuer_name": "mesh-ca", "timeout": "30s"}),
        )
        assert isinstance(provider, CertManagerProvider)
        cert_manager = Authority(provider, AuthoritySettings(TD, Mode.PER_WORKLOAD))
        cert_manager.start()
        where = "in this process" if args.in_process else "in a child process"
        print(f"per-workload issuance, best of {args.rounds} x {args.n}; API server and signer {where}")
        print(
            f"{'concurrency':>11} {'builtin /s':>11} {'cert-manager /s':>16} {'ratio':>6} {'api calls':>10} "
            f"{'waiting':>8} {'local':>6} {'k8s share':>10}"
        )
        for concurrency in args.concurrency:
            best_builtin = best_cm = 0.0
            best_split = (0.0, 0.0, 0.0)
            for _ in range(args.rounds):
                best_builtin = max(best_builtin, run(builtin.issue, args.n, concurrency)[0])
                provider.api.timings = Timings()
                rate, latency = run(cert_manager.issue, args.n, concurrency)
                if rate > best_cm:
                    timings = provider.api.timings
                    best_cm = rate
                    best_split = (timings.call_seconds, timings.wait_seconds, latency)
            calls, waiting, latency = best_split
            local = max(0.0, latency - calls - waiting)
            print(
                f"{concurrency:>11} {best_builtin:11.0f} {best_cm:16.1f} {best_cm / best_builtin:6.3f} "
                f"{calls / latency:10.0%} {waiting / latency:8.0%} {local / latency:6.0%} "
                f"{(calls + waiting) / latency:10.0%}"
            )
        provider.close()


if __name__ == "__main__":
    main()
