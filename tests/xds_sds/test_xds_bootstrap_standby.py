"""A bootstrap listing the xDS server's other replicas (``standby_xds``): the primary at priority 0, the standbys
at priority 1 with a TCP health check; without standbys the document is exactly as before. A real Envoy takes
it in tests/e2e/test_ha.py."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from mesh_identity.mesh.model import Address
from tests.pki import TestCa
from xds_sds.resources.bootstrap import write_bootstrap

CA = TestCa.for_trust_domain("example.org")
SERVER = CA.id("/mesh-identity/xds")
PRIMARY = Address("127.0.0.1", 7443)


def _xds_cluster(directory: Path, **more: Any) -> dict[str, Any]:
    files = write_bootstrap(
        CA.svid("/ns/shop/sa/web"), directory, node="web-1", cluster="web", xds=PRIMARY, server_identity=SERVER,
        **more,
    )  # fmt: skip
    [cluster] = json.loads(files.bootstrap.read_text())["staticResources"]["clusters"]
    return dict(cluster)


def _hosts(endpoints: dict[str, Any]) -> list[dict[str, Any]]:
    return [e["endpoint"]["address"]["socketAddress"] for e in endpoints["lbEndpoints"]]


def test_standbys_are_a_second_priority_behind_a_health_check(tmp_path: Path) -> None:
    standbys = [Address("127.0.0.2", 7443), Address("127.0.0.3", 7443)]
    cluster = _xds_cluster(tmp_path / "ha", standby_xds=standbys)
    first, second = cluster["loadAssignment"]["endpoints"]
    assert "priority" not in first and _hosts(first) == [{"address": "127.0.0.1", "portValue": 7443}]
    assert second["priority"] == 1
    assert _hosts(second) == [{"address": a.host, "portValue": a.port} for a in standbys]
    [check] = cluster["healthChecks"]
    assert check == {
        "timeout": "1s",
        "interval": "1s",
        "noTrafficInterval": "1s",
        "unhealthyThreshold": 1,
        "healthyThreshold": 1,
        "tcpHealthCheck": {},
    }


def test_without_standbys_the_document_is_unchanged(tmp_path: Path) -> None:
    plain = (write_bootstrap(
        CA.svid("/ns/shop/sa/web"), tmp_path / "a", node="web-1", xds=PRIMARY, server_identity=SERVER,
    ).bootstrap.read_text())  # fmt: skip
    empty = (write_bootstrap(
        CA.svid("/ns/shop/sa/web"), tmp_path / "b", node="web-1", xds=PRIMARY, server_identity=SERVER, standby_xds=(),
    ).bootstrap.read_text())  # fmt: skip
    assert plain.replace(str(tmp_path / "a"), "DIR") == empty.replace(str(tmp_path / "b"), "DIR")
    assert "healthChecks" not in plain and '"priority"' not in plain
