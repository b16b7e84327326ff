"""Thousands of streams opening at once (every proxy reconnecting after a control-plane restart)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from mesh_identity.svid import X509Svid
from tests.pki import TestCa
from xds_sds.protocol.server import DiscoveryServer

HERE = Path(__file__).parent


def test_a_burst_of_streams_beyond_grpc_default_pending_limit_is_served(
    server: DiscoveryServer, ca: TestCa, svid_a: X509Svid, tmp_path: Path
) -> None:
    (tmp_path / "ca.pem").write_bytes(ca.pem())
    (tmp_path / "chain.pem").write_bytes(svid_a.cert_chain_pem())
    (tmp_path / "key.pem").write_bytes(svid_a.key_pem())
    streams = 2500  # gRPC core refuses calls beyond 1,000 pending by default
    result = subprocess.run(
        [sys.executable, str(HERE / "burst_client.py"), server.target, str(tmp_path), str(streams)],
        capture_output=True,
        text=True,
        timeout=240,
        check=False,
        cwd=HERE.parent.parent,
    )
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout) == {"answered": streams, "errors": []}
