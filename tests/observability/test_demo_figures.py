"""The demo's view of the sidecars' stats: the figures of each route's hops, and top's table in the frame."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from mesh_identity.demo.mesh import Route
from mesh_identity.demo.view import Frame, RouteStats, SidecarFigures, hop_figures, render
from mesh_identity.mesh.model import Address, parse_mesh
from mesh_identity.spiffe import TrustDomain
from tests.observability.test_route_figures import envoy_text

MESH = parse_mesh(
    {
        "services": {
            "frontend": {
                "instances": [{"node": "f-1", "app": "127.0.0.1:20001", "inbound": "127.0.0.1:20002", "stats": "127.0.0.1:20009"}],
                "upstreams": [{"service": "backend", "listen": "127.0.0.1:20003"}],
            },
            "backend": {
                "instances": [{"node": "b-1", "app": "127.0.0.1:20004", "inbound": "127.0.0.1:20005", "stats": "127.0.0.1:20010"}],
                "upstreams": [{"service": "ratings", "listen": "127.0.0.1:20006"}],
            },
            "ratings": {"instances": [{"node": "r-1", "app": "127.0.0.1:20007", "inbound": "127.0.0.1:20008"}]},
            "ratings-v2": {"instances": [{"node": "r2-1", "app": "127.0.0.1:20011", "inbound": "127.0.0.1:20012"}]},
        },
        "policies": [{"kind": "TrafficSplit", "metadata": {"name": "s", "namespace": "default"},
                      "spec": {"service": "ratings", "backends": [{"service": "ratings", "weight": 50}, {"service": "ratings-v2", "weight": 50}]}}],
    },
    TrustDomain("demo.mesh"),
)  # fmt: skip
ROUTE = Route(("frontend", "backend", "ratings"))


def test_figures_per_hop_and_the_table_in_the_frame() -> None:
    readings = {
        Address("127.0.0.1", 20009): [envoy_text("frontend", "backend", requests=n) for n in (10, 30)],
        Address("127.0.0.1", 20010): [envoy_text("backend", "ratings", requests=n) + envoy_text("backend", "ratings-v2", requests=n) for n in (5, 25)],
    }  # fmt: skip
    figures = SidecarFigures(MESH, read=lambda address: readings[address].pop(0))
    assert set(figures.endpoints) == set(readings)  # the instances with a stats address
    assert figures.sample() == []  # the first reading is the baseline
    rows = figures.sample()
    assert {row.key.name for row in rows} == {"frontend -> backend", "backend -> ratings", "backend -> ratings-v2"}
    hops = hop_figures(ROUTE, MESH, rows)
    assert [row.key.name for row in hops] == ["frontend -> backend", "backend -> ratings", "backend -> ratings-v2"]
    assert hop_figures(Route(("frontend", "backend")), MESH, rows) == hops[:1]
    frame = Frame(
        datetime(2026, 1, 1, tzinfo=UTC), timedelta(seconds=2), None, (), (), (RouteStats(ROUTE, figures=hops),), ()
    )
    text = render(frame)
    assert "TRAFFIC, FROM THE SIDECARS' STATS (as mesh-identity top shows it)" in text
    table = text.split("(as mesh-identity top shows it)\n")[1].split("\n\n")[0].splitlines()
    assert [line.split()[:4] for line in table[1:]] == [
        ["backend", "->", "ratings", "http"], ["backend", "->", "ratings-v2", "http"], ["frontend", "->", "backend", "http"]
    ]  # fmt: skip


def test_a_sidecar_that_cannot_be_read_is_left_out() -> None:
    def read(address: Address) -> str:
        raise ConnectionRefusedError(str(address))

    figures = SidecarFigures(MESH, read=read)
    assert figures.sample() == [] and figures.sample() == []
    assert "TRAFFIC" not in render(
        Frame(datetime(2026, 1, 1, tzinfo=UTC), timedelta(0), None, (), (), (RouteStats(ROUTE),), ())
    )
