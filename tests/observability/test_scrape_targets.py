"""The Prometheus file SD of the sidecars' stats endpoints, kept by the control plane; and ``mesh-identity top``'s
use of it when something is wrong (the live mesh test shows it working)."""

from __future__ import annotations

import json
import stat
from pathlib import Path
from types import MappingProxyType

import pytest

from mesh_identity.cli.main import main
from mesh_identity.mesh.model import Address, Instance, Mesh, Protocol, Service
from mesh_identity.registry.base import StaticRegistry
from mesh_identity.spiffe import SpiffeId, TrustDomain
from tests.e2e.harness import free_address
from xds_sds.mesh.targets import ScrapeTargets, read_targets, scrape_targets, targets_path

TD = TrustDomain("example.org")


def mesh_of(*names: str, stats: bool = True) -> Mesh:
    services = {
        name: Service(
            name,
            SpiffeId.for_kubernetes(TD, "shop", name),
            Protocol.HTTP,
            (
                Instance(
                    f"{name}-1",
                    Address("127.0.0.1", 8000 + i),
                    Address("127.0.0.1", 9000 + i),
                    stats=Address("127.0.0.1", 15090 + i) if stats else None,
                ),
            ),
        )
        for i, name in enumerate(names)
    }
    return Mesh(TD, MappingProxyType(services))


def test_the_file_follows_the_registry(tmp_path: Path) -> None:
    registry = StaticRegistry(mesh_of("web", "api"))
    targets = ScrapeTargets(registry, tmp_path / "state")
    targets.start()
    try:
        path = targets_path(tmp_path / "state")
        assert path == tmp_path / "state" / "prometheus" / "sidecars.json"
        assert stat.S_IMODE(path.stat().st_mode) == 0o644
        assert json.loads(path.read_text()) == [
            {"targets": ["127.0.0.1:15091"], "labels": {"service": "api", "identity": "spiffe://example.org/ns/shop/sa/api", "node": "api-1"}},
            {"targets": ["127.0.0.1:15090"], "labels": {"service": "web", "identity": "spiffe://example.org/ns/shop/sa/web", "node": "web-1"}},
        ]  # fmt: skip
        registry.replace(mesh_of("web"))
        assert [labels["node"] for _, labels in read_targets(path)] == ["web-1"]
        before = path.stat().st_ino
        registry.replace(mesh_of("web"))  # the same targets: not rewritten
        assert path.stat().st_ino == before
    finally:
        targets.stop()
    registry.replace(mesh_of("web", "api"))  # stopped: no longer followed, and the file stays
    assert [labels["node"] for _, labels in read_targets(path)] == ["web-1"]


def test_instances_without_stats_are_not_targets() -> None:
    assert scrape_targets(mesh_of("web", stats=False)) == []


@pytest.mark.parametrize(
    ("content", "error"),
    [
        ("{}", "a file SD document is a list of groups, not dict"),
        ("[{}]", "group 0 has no 'targets' list"),
        ('[{"targets": ["nohost"]}]', "group 0: target 'nohost' is not HOST:PORT"),
        ('[{"targets": ["a:1"], "labels": {"x": 1}}]', "group 0: 'labels' is not a mapping of strings"),
        ("[", "is not JSON"),
    ],
)
def test_a_bad_targets_file_is_named(tmp_path: Path, content: str, error: str) -> None:
    path = tmp_path / "sidecars.json"
    path.write_text(content)
    with pytest.raises(ValueError, match=error):
        read_targets(path)


def run(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    code = main(["top", *args])
    out, err = capsys.readouterr()
    return code, out, err


def test_top_says_what_is_wrong(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    missing = tmp_path / "none.json"
    assert run(capsys, "--targets", str(missing), "--once") == (
        2,
        "",
        f"mesh-identity: error: --targets: cannot read {missing}: No such file or directory\n",
    )
    empty = tmp_path / "empty.json"
    empty.write_text("[]")
    code, _, err = run(capsys, "--targets", str(empty), "--once")
    assert (code, err) == (
        2,
        f"mesh-identity: error: --targets: {empty} lists no sidecar (give instances a 'stats' address in the mesh file)\n",
    )
    assert run(capsys, "--targets", str(empty), "--interval", "0")[::2] == (
        2,
        "mesh-identity: error: --interval: 0.0 is not a positive number of seconds\n",
    )
    gone = tmp_path / "gone.json"
    address = free_address()  # nothing listens there
    gone.write_text(json.dumps([{"targets": [str(address)], "labels": {"node": "web-1"}}]))
    code, out, err = run(capsys, "--targets", str(gone), "--once", "--interval", "0.1")
    assert (code, out) == (1, "")
    assert err.startswith(f"mesh-identity: error: no sidecar's stats could be read: web-1 ({address}): ")
