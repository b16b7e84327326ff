"""Agent start to first usable SVID: p50 and p99 over N starts (goal: p50 <= 0.3 s, p99 <= 1 s; Istio's anchor:
a p50 of 3.2 s to the first certificate over SDS).

    .venv/bin/python bench/agent_start.py                    # 100 starts of each mode, python -m xds_sds.agent
    .venv/bin/python bench/agent_start.py --starts 20 --entry cli   # through mesh-identity agent

A real control plane (``compose.build`` with a signing section) runs in this process; each start is a new agent
process with one entry (this uid) and its own sockets. From the moment the process is spawned the bench polls,
every millisecond, both sockets at once:

* Workload API: until ``FetchX509SVID`` (with the security header) returns its first message, an SVID;
* SDS: until ``StreamSecrets`` for the identity's certificate answers with that secret.

Modes: ``restart`` (the agent's own SVID is in its state directory from a first run: it renews over mTLS and
signs the workload's CSR; the common case), ``cold`` (an empty state directory and a new join token each time:
attestation, then the workload SVID). Each start is stopped (SIGTERM) before the next. The time to import the
agent's modules (``python -c 'import xds_sds.agent.launch'``, the same interpreter, until the imports are done) is
measured after each start, under the same load, so that what the agent itself takes after its imports can be
read off. The machine's two cores are shared by the control plane, the agent and the bench's pollers, as they
would be on one host.
"""

from __future__ import annotations

import argparse
import json
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import grpc  # noqa: E402
from envoy.config.core.v3 import base_pb2  # noqa: E402
from envoy.service.discovery.v3 import discovery_pb2  # noqa: E402
from envoy.service.secret.v3 import sds_pb2_grpc  # noqa: E402

from tests.agent.harness import ADMIN, AgentRun, ControlPlane, public_dir  # noqa: E402
from xds_sds.proto import workload_pb2  # noqa: E402

SECRET = "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.Secret"
POLL = 0.001
LIMIT = 30.0  # seconds: a start that takes longer is a failure


def first_svid(socket_path: Path, t0: float, out: dict[str, float]) -> None:
    deadline = t0 + LIMIT
    while time.perf_counter() < deadline:
        if socket_path.exists():
            with grpc.insecure_channel(f"unix:{socket_path}") as channel:
                call = channel.unary_stream(
                    "/SpiffeWorkloadAPI/FetchX509SVID",
                    request_serializer=workload_pb2.X509SVIDRequest.SerializeToString,
                    response_deserializer=workload_pb2.X509SVIDResponse.FromString,
                )(workload_pb2.X509SVIDRequest(), metadata=(("workload.spiffe.io", "true"),), timeout=LIMIT)
                try:
                    message = next(iter(call))
                except grpc.RpcError:
                    message = None
                if message is not None and message.svids:
                    out["workload_api"] = time.perf_counter() - t0
                    call.cancel()
                    return
        time.sleep(POLL)


def first_secret(socket_path: Path, t0: float, out: dict[str, float]) -> None:
    deadline = t0 + LIMIT
    request = discovery_pb2.DiscoveryRequest(node=base_pb2.Node(id="bench"), type_url=SECRET, resource_names=[ADMIN])
    while time.perf_counter() < deadline:
        if socket_path.exists():
            with grpc.insecure_channel(f"unix:{socket_path}") as channel:
                stream = sds_pb2_grpc.SecretDiscoveryServiceStub(channel).StreamSecrets(iter([request]), timeout=LIMIT)
                try:
                    response = next(iter(stream))
                except (grpc.RpcError, StopIteration):
                    response = None
                if response is not None and response.resources:
                    out["sds"] = time.perf_counter() - t0
                    stream.cancel()
                    return
        time.sleep(POLL)


def one_start(run: AgentRun, command: list[str]) -> dict[str, float]:
    out: dict[str, float] = {}
    for path in (run.workload_socket, run.sds_socket):
        path.unlink(missing_ok=True)
    t0 = time.perf_counter()
    with run.log_path.open("ab") as log:
        process = subprocess.Popen(command, cwd=ROOT, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT)
    pollers = [
        threading.Thread(target=first_svid, args=(run.workload_socket, t0, out)),
        threading.Thread(target=first_secret, args=(run.sds_socket, t0, out)),
    ]
    for poller in pollers:
        poller.start()
    for poller in pollers:
        poller.join()
    process.send_signal(signal.SIGTERM)
    try:
        process.wait(30)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()
    if len(out) != 2:
        raise SystemExit(f"a start did not serve within {LIMIT}s; see {run.log_path}")
    return out


def percentile(values: list[float], fraction: float) -> float:
    ordered = sorted(values)
    index = min(len(ordered) - 1, max(0, round(fraction * len(ordered) + 0.5) - 1))
    return ordered[index]


def import_time() -> float:
    """Seconds from spawning an interpreter to its having imported the agent's modules (CLOCK_MONOTONIC is the
    same clock in every process; the interpreter's exit is not counted)."""
    code = "import xds_sds.agent.launch, time; print(time.monotonic())"
    t0 = time.monotonic()
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=True, capture_output=True, text=True)
    return float(done.stdout) - t0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--starts", type=int, default=100)
    parser.add_argument("--entry", choices=("module", "cli"), default="module")
    parser.add_argument("--modes", default="restart,cold")
    args = parser.parse_args()
    base = Path(tempfile.mkdtemp(prefix="agent-start-bench-"))
    plane = ControlPlane(base / "cp").start()
    root = public_dir("mi-bench-")
    results: dict[str, dict[str, float]] = {}
    imports: list[float] = []
    try:
        run = AgentRun(root, plane, [(ADMIN, ["unix:uid:0"])])
        for mode in args.modes.split(","):
            samples: dict[str, list[float]] = {"workload_api": [], "sds": []}
            if mode == "restart":
                config = run.write_config(token=plane.token())
                one_start(run, _command(args.entry, config))  # attests; its SVID stays in the state directory
            for _ in range(args.starts):
                if mode == "cold":
                    shutil.rmtree(run.state_dir, ignore_errors=True)
                    config = run.write_config(token=plane.token())
                else:
                    config = run.write_config(token=None)
                out = one_start(run, _command(args.entry, config))
                imports.append(import_time())  # interleaved: the same load as the starts around it
                for key, value in out.items():
                    samples[key].append(value)
            for key, values in samples.items():
                results[f"{mode}/{key}"] = {
                    "p50": percentile(values, 0.5),
                    "p99": percentile(values, 0.99),
                    "min": min(values),
                    "max": max(values),
                }
    finally:
        plane.stop()
        shutil.rmtree(root, ignore_errors=True)
        shutil.rmtree(base, ignore_errors=True)
    entry = "python -m xds_sds.agent" if args.entry == "module" else "python -m mesh_identity agent"
    print(f"agent start to first usable SVID ({args.starts} starts per mode, {entry})")
    print(f"{'mode/first':<22} {'p50 s':>8} {'p99 s':>8} {'min s':>8} {'max s':>8}")
    for key, figures in results.items():
        print(f"{key:<22} {figures['p50']:>8.3f} {figures['p99']:>8.3f} {figures['min']:>8.3f} {figures['max']:>8.3f}")
    spawn = percentile(imports, 0.5)
    print(
        f"interpreter start + importing the agent's modules alone, p50 of {len(imports)} (one after each start): "
        f"{spawn:.3f} s"
    )
    print(json.dumps({"entry": args.entry, "starts": args.starts, "results": results, "imports_p50": spawn}))
    return 0


def _command(entry: str, config: Path) -> list[str]:
    if entry == "cli":
        return [sys.executable, "-m", "mesh_identity", "agent", "--config", str(config)]
    return [sys.executable, "-m", "xds_sds.agent", "--config", str(config)]


if __name__ == "__main__":
    sys.exit(main())
