"""Agent memory: the RSS of one agent process holding 10 SVIDs and serving 10 Workload API streams (goal: at most
40 MiB).

    .venv/bin/python bench/agent_rss.py                 # python -m xds_sds.agent
    .venv/bin/python bench/agent_rss.py --entry cli     # python -m mesh_identity agent (the whole CLI loaded)

A real control plane (``compose.build`` with a signing section) runs in this process with 10 services on the
agent's host; the agent has one entry per service, all for this uid, so one caller holds 10 SVIDs. A py-spiffe
client process (``tests/agent/spiffe_client.py streams 10``) opens 10 ``FetchX509SVID`` streams
(``stream_x509_contexts``), each sent all 10 SVIDs. Once the agent's metrics show the 10 streams, its
``/proc/<pid>/status`` (VmRSS, VmHWM) and ``smaps_rollup`` (Pss, private memory) are read every 0.2 s for
``--seconds`` and the highest values reported, with the RSS of a bare interpreter that imported the agent's
modules (what the imports alone cost).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests.agent.harness import HOST, TD, AgentRun, ControlPlane, client_script, public_dir, service  # noqa: E402
from tests.waiting import wait_until  # noqa: E402

COUNT = 10


def status_kib(pid: int) -> dict[str, int]:
    found: dict[str, int] = {}
    for name in (f"/proc/{pid}/status", f"/proc/{pid}/smaps_rollup"):
        for line in Path(name).read_text().splitlines():
            key, _, value = line.partition(":")
            parts = value.split()
            if len(parts) == 2 and parts[1] == "kB":
                found[key] = max(found.get(key, 0), int(parts[0]))
    return found


def imports_rss() -> int:
    code = "import xds_sds.agent.launch, pathlib; print(pathlib.Path('/proc/self/status').read_text())"
    text = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True).stdout
    line = next(line for line in text.splitlines() if line.startswith("VmRSS:"))
    return int(line.split()[1])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--entry", choices=("module", "cli"), default="module")
    parser.add_argument("--seconds", type=float, default=5.0)
    args = parser.parse_args()
    mesh = {
        "services": {f"svc{i}": service("bench", f"svc{i}", f"svc{i}-1", HOST, 20000 + 10 * i) for i in range(COUNT)}
    }
    base = Path(tempfile.mkdtemp(prefix="agent-rss-bench-"))
    plane = ControlPlane(base / "cp", mesh=mesh).start()
    root = public_dir("mi-bench-")
    entries = [(f"spiffe://{TD}/ns/bench/sa/svc{i}", [f"unix:uid:{os.getuid()}"]) for i in range(COUNT)]
    run = AgentRun(root, plane, entries)
    clients: subprocess.Popen[str] | None = None
    try:
        config = run.write_config(token=plane.token())
        command = (
            [sys.executable, "-m", "mesh_identity", "agent", "--config", str(config)]
            if args.entry == "cli"
            else [sys.executable, "-m", "xds_sds.agent", "--config", str(config)]
        )
        with run.log_path.open("ab") as log:
            run.process = subprocess.Popen(
                command, cwd=ROOT, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT
            )
        wait_until(run.serving, "the agent's sockets", 60)
        wait_until(lambda: run.sample("mesh_identity_agent_svids") == COUNT + 1, "10 SVIDs and the agent's own", 60)
        env = {**os.environ, "SPIFFE_ENDPOINT_SOCKET": f"unix://{run.workload_socket}"}
        clients = subprocess.Popen(
            [sys.executable, str(client_script()), "streams", str(COUNT)],
            env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
        )  # fmt: skip
        wait_until(
            lambda: run.sample("mesh_identity_agent_workload_api_streams", method="FetchX509SVID") == COUNT,
            "10 Workload API streams",
            60,
        )
        pid = run.process.pid
        peak: dict[str, int] = {}
        deadline = time.monotonic() + args.seconds
        while time.monotonic() < deadline:
            for key, value in status_kib(pid).items():
                peak[key] = max(peak.get(key, 0), value)
            time.sleep(0.2)
        streams = run.sample("mesh_identity_agent_workload_api_streams", method="FetchX509SVID")
        out = clients.communicate(input="", timeout=60)[0]
        updates = json.loads(out.splitlines()[-1])["updates"]
    finally:
        if clients is not None and clients.poll() is None:
            clients.kill()
        run.stop()
        plane.stop()
        shutil.rmtree(root, ignore_errors=True)
        shutil.rmtree(base, ignore_errors=True)
    imports = imports_rss()
    private = peak.get("Private_Dirty", 0) + peak.get("Private_Clean", 0)
    entry = "python -m mesh_identity agent" if args.entry == "cli" else "python -m xds_sds.agent"
    print(f"agent RSS with {COUNT} SVIDs and {int(streams or 0)} Workload API streams ({entry})")
    print(f"  VmRSS  {peak['VmRSS'] / 1024:7.1f} MiB   (peak VmHWM {peak['VmHWM'] / 1024:.1f} MiB)")
    print(f"  Pss    {peak.get('Pss', 0) / 1024:7.1f} MiB   private {private / 1024:.1f} MiB")
    print(f"  a bare interpreter that imported the agent's modules: VmRSS {imports / 1024:.1f} MiB")
    print(f"  messages each stream received: {updates}")
    print(json.dumps({"entry": args.entry, "kib": peak, "imports_kib": imports, "streams": streams}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
