"""Rotation in real time with short-lived SVIDs: a py-spiffe ``X509Source`` in a long-lived process and an SDS
stream both see every renewal; with the control plane stopped the agent keeps serving what is still valid,
counts its failures, shows its outage budget, and renews again once the control plane is back."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from cryptography import x509

from mesh_identity.svid import serial_of
from tests.agent.conftest import ENTRIES
from tests.agent.harness import ADMIN, FRONTEND, AgentRun, ControlPlane, as_uid, client_script
from tests.agent.test_agent_sds import Stream, secrets_of
from tests.waiting import wait_until

pytestmark = pytest.mark.slow

TTL = "8s"  # the agent renews at half of it: every 4 s or a little sooner (jitter)


@pytest.fixture(scope="module")
def short_plane(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ControlPlane]:
    plane = ControlPlane(tmp_path_factory.mktemp("short-control-plane"), workload_ttl=TTL).start()
    yield plane
    plane.stop()


def test_an_x509_source_and_an_sds_stream_see_each_rotation(short_plane: ControlPlane, fresh_root: Path) -> None:
    run = AgentRun(fresh_root, short_plane, ENTRIES).start(token=short_plane.token())
    source: subprocess.Popen[str] | None = None
    stream: Stream | None = None
    try:
        wait_until(lambda: run.get("/healthz")[0] == 200, "the first SVIDs")
        env = {**os.environ, "SPIFFE_ENDPOINT_SOCKET": f"unix://{run.workload_socket}"}
        source = subprocess.Popen(
            [*as_uid(1001), sys.executable, str(client_script()), "source", "3", "90"],
            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd="/",
        )  # fmt: skip
        stream = Stream(run.sds_socket)
        stream.send([ADMIN])
        pushed: list[str] = []
        while len(set(pushed)) < 3:  # bounded: the stream's own deadline (60 s) ends it
            response = stream.receive()
            chain = secrets_of(response)[ADMIN].tls_certificate.certificate_chain.inline_bytes
            pushed.append(serial_of(x509.load_pem_x509_certificates(chain)[0]))
            stream.send([ADMIN], nonce=response.nonce, version=response.version_info)  # ACK: the next may come
        assert len(pushed) == len(set(pushed))  # each response a new certificate, none sent twice
        out, err = source.communicate(timeout=120)
        lines = [json.loads(line) for line in out.splitlines()]
        assert source.returncode == 0, (out, err)
        seen = [line["source"] for line in lines]
        assert len({s["serial"] for s in seen}) == 3 and all(s["spiffe_id"] == FRONTEND for s in seen)
        assert run.process is not None and run.process.poll() is None  # one agent process throughout
    finally:
        if stream is not None:
            stream.close()
        if source is not None and source.poll() is None:
            source.kill()
            source.wait()
        run.stop()


def test_through_a_control_plane_outage_and_back(tmp_path_factory: pytest.TempPathFactory, fresh_root: Path) -> None:
    plane = ControlPlane(tmp_path_factory.mktemp("outage-control-plane"), workload_ttl="30s").start()
    run = AgentRun(fresh_root, plane, ENTRIES, jitter=0.0).start(token=plane.token())
    try:
        wait_until(lambda: run.get("/healthz")[0] == 200, "the first SVIDs")
        before = serial_now(run)

        def failures() -> float:
            return run.sample("mesh_identity_agent_renewal_failures_total", spiffe_id=ADMIN, own="0") or 0

        plane.stop()
        wait_until(lambda: failures() >= 2, "failed renewals while the control plane is down", 60)
        status, text = run.get("/healthz")
        assert status == 200, text  # still valid: still healthy, still served
        assert serial_now(run) == before
        budget = run.sample("mesh_identity_agent_outage_budget_seconds")
        assert budget is not None and 0 < budget < 30
        assert (run.sample("mesh_identity_agent_consecutive_renewal_failures", spiffe_id=ADMIN, own="0") or 0) >= 2
        _, status_text = run.get("/status")
        assert "UNAVAILABLE" in status_text or "cannot connect" in status_text

        plane.start()
        wait_until(
            lambda: run.sample("mesh_identity_agent_consecutive_renewal_failures", spiffe_id=ADMIN, own="0") == 0,
            "a renewal once the control plane is back",
            60,
        )
        assert serial_now(run) != before
        assert run.get("/healthz")[0] == 200
    finally:
        run.stop()
        plane.stop()


def serial_now(run: AgentRun) -> str:
    code, [svids] = run.client("x509")
    assert code == 0, svids
    return str(next(s["serial"] for s in svids if s["spiffe_id"] == ADMIN))
