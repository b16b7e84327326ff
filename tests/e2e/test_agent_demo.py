"""``mesh-identity demo --agent`` as the README runs it: a real subprocess, real Envoys, one real node agent."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from tests.e2e.test_demo import SUMMARY, demo, envoy_pids, gone, output

pytestmark = pytest.mark.e2e

AGENT = re.compile(r"^node agent: pid (\d+), host demo, SDS on (\S+), log (\S+)$")
XDS = re.compile(r"^xDS: (\d+) responses sent to the sidecars, (\d+) with a private key$")
KEYS = re.compile(
    r"^keys: made by the node agent on host demo \(pid (\d+)\), SDS on \S+; xDS responses sent: (\d+), "
    r"with a private key: (\d+)$"
)


def test_demo_agent_runs_a_minute_with_keys_only_on_the_node(tmp_path: Path) -> None:
    proc = demo(tmp_path, "--agent", "--duration", "60")
    try:
        code = proc.wait(300)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    lines = output(tmp_path)
    assert code == 0, "\n".join(lines[-60:])
    [agent] = [m for line in lines if (m := AGENT.match(line))]
    agent_pid = int(agent.group(1))
    pids = envoy_pids(lines)
    assert set(pids) == {"frontend-1", "backend-1", "ratings-1", "ratings-v2-1", "batch-1"}
    assert all(gone(pid) for pid in [*pids.values(), agent_pid])
    [summary] = [m for line in lines if (m := SUMMARY.match(line))]
    ok, failed, loaded, issued, _ = map(int, summary.groups())
    assert (failed, ok > 100) == (0, True)
    assert 1 <= loaded <= issued  # rotations the agent made, loaded by the sidecars
    [xds] = [m for line in lines if (m := XDS.match(line))]
    assert int(xds.group(1)) >= 5 * 4 and xds.group(2) == "0"
    frames = [m for line in lines if (m := KEYS.match(line))]
    assert frames and all(int(m.group(1)) == agent_pid and m.group(3) == "0" for m in frames)
    assert lines[-3:] == ["result: ok", "stopping: client, sidecars, agent, apps, control plane", "stopped"]
    last = max(i for i, line in enumerate(lines) if line.startswith("frontend -> backend -> ratings "))
    assert re.match(
        r"^frontend -> backend -> ratings +\d+ +0 +backend: spiffe://demo\.mesh/ns/shop/sa/frontend$", lines[last]
    )
    refused = max(
        i for i, line in enumerate(lines) if re.match(r"batch -> backend +\d+ +\d+ ", line)
    )  # not the traffic table
    assert re.match(
        r"^batch -> backend +[1-9]\d* +0 +backend: refused batch \(403 RBAC: access denied\)$", lines[refused]
    )
    # the sidecars' bootstraps hold no certificate: nothing but envoy.json and Envoy's own files
    sidecars = tmp_path / "demo" / "state" / "sidecars"
    for node in pids:
        assert not (sidecars / node / "sds").exists()
        assert "PRIVATE KEY" not in (sidecars / node / "envoy.json").read_text()
