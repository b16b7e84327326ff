"""The agent across restarts: it attests once, keeps only its own SVID on disk, renews with it after a restart;
and what it says when it cannot get an SVID."""

from __future__ import annotations

import os
import shutil
import signal
import stat
import subprocess
import sys
import urllib.error
from datetime import UTC, datetime
from pathlib import Path

from cryptography import x509

from mesh_identity.jointokens import JoinTokens
from mesh_identity.svid import spiffe_id_of
from tests.agent.conftest import ENTRIES
from tests.agent.harness import AGENT_ID, ELSEWHERE, FRONTEND, HOST, AgentRun, ControlPlane
from tests.fakes.kube import KubeServer
from tests.waiting import wait_until


def healthy(run: AgentRun) -> bool:
    """Whether the agent answers /healthz with 200; False while its endpoint does not listen yet (after a killed
    agent, ``metrics.addr`` names the dead one's port until the new agent writes its own)."""
    try:
        return run.get("/healthz")[0] == 200
    except (urllib.error.URLError, ConnectionError):
        return False


def serials(run: AgentRun) -> dict[str, str]:
    code, [svids] = run.client("x509")
    assert code == 0, svids
    return {s["spiffe_id"]: s["serial"] for s in svids}


def test_a_restart_renews_with_the_stored_svid_and_needs_no_join_token(
    control_plane: ControlPlane, fresh_root: Path
) -> None:
    run = AgentRun(fresh_root, control_plane, ENTRIES).start(token=control_plane.token())
    try:
        wait_until(lambda: healthy(run), "the first SVIDs")
        before = serials(run)
    finally:
        assert run.stop() == 0
    state = run.state_dir
    assert stat.S_IMODE(state.stat().st_mode) == 0o700
    assert sorted(p.name for p in state.iterdir()) == ["agent-svid.pem", "bundle.pem"]  # no workload key, ever
    for path in state.iterdir():
        assert stat.S_IMODE(path.stat().st_mode) == 0o600
    stored = (state / "agent-svid.pem").read_bytes()
    assert stored.count(b"PRIVATE KEY-----") == 2  # one key (BEGIN and END): the agent's own
    assert str(spiffe_id_of(x509.load_pem_x509_certificates(stored)[0])) == AGENT_ID

    (run.private / "join-token").unlink()
    again = AgentRun(fresh_root, control_plane, ENTRIES).start(token=None)  # no credential in the config
    try:
        wait_until(lambda: healthy(again), "SVIDs after the restart")
        after = serials(again)
        assert after.keys() == before.keys() and not set(after.values()) & set(before.values())  # new keys
    finally:
        again.stop()
    used = [t for t in JoinTokens(control_plane.state_dir).list() if t.host == HOST and t.used is not None]
    assert used, "the token was redeemed"


def test_with_neither_a_valid_svid_nor_a_credential_the_agent_says_why(
    control_plane: ControlPlane, fresh_root: Path
) -> None:
    run = AgentRun(fresh_root, control_plane, ENTRIES).start(token=None)
    try:
        wait_until(lambda: "no credential" in run.get("/healthz")[1], "the reason in /healthz")
        status, text = run.get("/healthz")
        assert status == 503 and "the agent's own SVID has not been issued yet" in text
        wait_until(
            lambda: (run.sample("mesh_identity_agent_renewal_failures_total", spiffe_id=AGENT_ID, own="1") or 0) >= 1,
            "a counted failure",
        )
        assert run.sample("mesh_identity_agent_outage_budget_seconds") == 0
    finally:
        run.stop()


def test_a_used_join_token_is_refused_and_the_agent_keeps_trying(control_plane: ControlPlane, fresh_root: Path) -> None:
    token = control_plane.token()
    JoinTokens(control_plane.state_dir).redeem(token, datetime.now(UTC))
    run = AgentRun(fresh_root, control_plane, ENTRIES).start(token=token)
    try:
        wait_until(lambda: "already used" in run.get("/healthz")[1], "the refusal in /healthz")
        assert token not in run.log() and token not in run.get("/healthz")[1]  # the credential is never shown
    finally:
        run.stop()


def test_an_identity_the_control_plane_refuses_is_reported_and_the_others_served(
    control_plane: ControlPlane, fresh_root: Path
) -> None:
    entries = [(FRONTEND, ["unix:uid:0"]), (ELSEWHERE, ["unix:uid:0"])]  # elsewhere runs on node2, not here
    run = AgentRun(fresh_root, control_plane, entries).start(token=control_plane.token())
    try:
        # before the refusal arrives, /healthz names the SVID as not issued yet; wait for the refusal itself
        wait_until(lambda: "PERMISSION_DENIED" in run.get("/healthz")[1], "the refused SVID in /healthz")
        status, text = run.get("/healthz")
        assert status == 503 and ELSEWHERE in text and "PERMISSION_DENIED" in text
        assert list(serials(run)) == [FRONTEND]
    finally:
        run.stop()


def test_a_second_agent_on_the_same_sockets_is_refused_and_a_stale_socket_is_reclaimed(
    control_plane: ControlPlane, fresh_root: Path
) -> None:
    first = AgentRun(fresh_root, control_plane, ENTRIES).start(token=control_plane.token())
    try:
        wait_until(lambda: healthy(first), "the first agent")
        config = first.write_config(token=None)
        done = subprocess.run(
            [sys.executable, "-m", "xds_sds.agent", "--config", str(config)],
            capture_output=True, text=True, timeout=60, check=False,
        )  # fmt: skip
        assert done.returncode == 1
        lines = done.stderr.strip().splitlines()  # gRPC's own logging may write lines of its own
        assert "Traceback" not in done.stderr, done.stderr
        assert (
            lines[-1] == f"mesh-identity agent: error: {first.workload_socket} is in use: another agent listens there"
        )
        assert first.process is not None
        private = private_dir_of(first.process.pid)
        os.kill(first.process.pid, signal.SIGKILL)  # its sockets stay behind
        first.process.wait(30)
        first.process = None
        assert first.workload_socket.exists()
        second = AgentRun(fresh_root, control_plane, ENTRIES).start(token=None)
        try:
            wait_until(lambda: healthy(second), "the agent started over the stale sockets")
        finally:
            second.stop()
    finally:
        first.stop()
        shutil.rmtree(private, ignore_errors=True)  # what the killed agent could not remove


def private_dir_of(pid: int) -> Path:
    """The private directory of a running agent: where its listening Unix sockets are (from procfs)."""
    inodes = {
        os.readlink(f"/proc/{pid}/fd/{fd}")[len("socket:[") : -1]
        for fd in os.listdir(f"/proc/{pid}/fd")
        if os.readlink(f"/proc/{pid}/fd/{fd}").startswith("socket:[")
    }
    paths = [
        Path(fields[7])
        for fields in (line.split() for line in Path("/proc/net/unix").read_text().splitlines()[1:])
        if len(fields) >= 8 and fields[6] in inodes and fields[7].endswith("/workload.sock")
    ]
    found = [p.parent for p in paths if p.parent.name.startswith("mesh-identity-agent.")]
    assert len(found) == 1, paths
    return found[0]


def test_a_pod_agent_attests_with_its_service_account_token(tmp_path: Path, fresh_root: Path) -> None:
    """In a pod the agent holds a projected service-account token: Attest (TokenReview at the Kubernetes API test
    server) buys the service account's identity, which the agent then serves as its workload's."""
    kube = KubeServer().start()
    plane = ControlPlane(tmp_path / "cp", kubeconfig=kube.write_kubeconfig(tmp_path / "kubeconfig")).start()
    try:
        token = kube.token_reviews.issue("shop", "frontend", audiences=["mesh-identity"])
        run = AgentRun(fresh_root, plane, [(FRONTEND, ["unix:uid:0"])]).start(kubernetes_token=token)
        try:
            wait_until(lambda: healthy(run), "the pod agent's SVIDs")
            assert list(serials(run)) == [FRONTEND]
            own = run.sample("mesh_identity_agent_svid_expiry_timestamp_seconds", spiffe_id=FRONTEND, own="1")
            assert own is not None  # the agent's own identity is the service account's
            assert [r for r in kube.token_reviews.reviews if r["spec"]["token"] == token]
            assert token not in run.log()
        finally:
            run.stop()
    finally:
        plane.stop()
        kube.stop()
