"""The demo's checks of every hop, its rotation log and its live table (plain text)."""

from __future__ import annotations

import collections
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from mesh_identity.demo.mesh import Route
from mesh_identity.demo.view import Frame, Rotation, RotationLog, RouteStats, SidecarRow, Traffic, render, verdict
from mesh_identity.mesh.model import Address, parse_mesh
from mesh_identity.spiffe import TrustDomain

TD = TrustDomain("demo.mesh")
FRONTEND, BACKEND = "spiffe://demo.mesh/ns/default/sa/frontend", "spiffe://demo.mesh/ns/default/sa/backend"
MESH = parse_mesh(
    {
        "services": {
            "frontend": {
                "instances": [{"node": "f-1", "app": "127.0.0.1:20001", "inbound": "127.0.0.1:20002"}],
                "upstreams": [{"service": "backend", "listen": "127.0.0.1:20003"}],
            },
            "backend": {
                "instances": [{"node": "b-1", "app": "127.0.0.1:20004", "inbound": "127.0.0.1:20005"}],
                "upstreams": [{"service": "ratings", "listen": "127.0.0.1:20006"}],
            },
            "ratings": {"instances": [{"node": "r-1", "app": "127.0.0.1:20007", "inbound": "127.0.0.1:20008"}]},
        }
    },
    TD,
)
ROUTE = Route(("frontend", "backend", "ratings"))


def answer(backend_peer: str = FRONTEND, ratings_peer: str | None = BACKEND) -> dict[str, Any]:
    inner = {"service": "ratings", "peer": ratings_peer}
    return {
        "service": "frontend",
        "peer": None,
        "upstream": {"service": "backend", "peer": backend_peer, "upstream": inner},
    }


@pytest.mark.parametrize(
    ("status", "body", "hops", "error"),
    [
        (200, answer(), (("backend", FRONTEND), ("ratings", BACKEND)), None),
        (200, answer(backend_peer=BACKEND), (("backend", BACKEND),), f"backend saw the caller as {BACKEND}, not {FRONTEND}"),
        (200, answer(ratings_peer=None), (("backend", FRONTEND), ("ratings", "None")), f"ratings saw the caller as None, not {BACKEND}"),
        (502, {"service": "frontend", "error": "calling backend: [Errno 111] Connection refused"}, (),
         "frontend: calling backend: [Errno 111] Connection refused"),
        (503, "upstream connect error", (), "HTTP 503: 'upstream connect error'"),
    ],
)  # fmt: skip
def test_verdict_checks_the_caller_each_server_side_saw(
    status: int, body: Any, hops: tuple[Any, ...], error: str | None
) -> None:
    assert verdict(ROUTE, MESH, status, body) == (hops, error)


def test_a_refused_route_is_ok_only_when_the_sidecar_refused() -> None:
    route = Route(("frontend", "backend"), refused=True)
    refused = {"service": "frontend", "peer": None, "upstream": "RBAC: access denied"}
    assert verdict(route, MESH, 502, refused) == ((("backend", "refused frontend (403 RBAC: access denied)"),), None)
    let_in = {"service": "frontend", "peer": None, "upstream": {"service": "backend", "peer": FRONTEND}}
    assert verdict(route, MESH, 200, let_in) == (
        (),
        "backend did not refuse frontend as its policy says: {'service': 'backend', 'peer': "
        "'spiffe://demo.mesh/ns/default/sa/frontend'}",
    )


def test_traffic_counts_per_route_and_keeps_the_failures() -> None:
    answers = iter([(200, answer()), (200, answer(backend_peer=BACKEND)), (200, answer())])
    calls: list[tuple[Address, str]] = []

    def fetch(address: Address, path: str) -> tuple[int, Any]:
        calls.append((address, path))
        try:
            return next(answers)
        except StopIteration:
            traffic.stop()
            raise ConnectionRefusedError("done") from None

    traffic = Traffic(MESH, [ROUTE], fetch, interval=0)
    traffic._run()
    assert calls[0] == (Address("127.0.0.1", 20001), "/call/backend/call/ratings")
    [stats] = traffic.stats()
    assert (stats.ok, stats.failed, stats.answered_by) == (2, 2, collections.Counter({"backend -> ratings": 2}))
    assert stats.last_error == "ConnectionRefusedError: done"
    assert [f.split(" ", 1)[1] for f in traffic.failures] == [
        f"frontend -> backend -> ratings: backend saw the caller as {BACKEND}, not {FRONTEND}",
        "frontend -> backend -> ratings: ConnectionRefusedError: done",
    ]


def test_rotation_log_marks_what_the_sidecars_loaded() -> None:
    log = RotationLog()
    log.record(Rotation(datetime(2026, 1, 1, tzinfo=UTC), FRONTEND, "0a", "1b", ("f-1", "f-2")))
    log.loaded("f-1", {0x1B})
    log.loaded("b-1", {0x1B})
    log.loaded("f-2", {0x0A})
    assert log.entries()[0].loaded_by == {"f-1"}


def test_a_frame_reads_as_plain_text() -> None:
    frame = Frame(
        now=datetime(2026, 11, 26, 12, 0, 4, tzinfo=UTC),
        elapsed=timedelta(seconds=4),
        duration=timedelta(seconds=60),
        header=("trust domain demo.mesh",),
        sidecars=(
            SidecarRow("frontend-1", FRONTEND, "ab12", timedelta(seconds=21), 2, 4242),
            SidecarRow("backend-1", BACKEND, None, None, 1, None, "EXITED (1)"),
        ),
        routes=(
            RouteStats(
                ROUTE,
                10,
                1,
                (("backend", FRONTEND), ("ratings", BACKEND)),
                collections.Counter({"backend-v2 -> ratings": 4, "backend-v1 -> ratings": 6}),
            ),
        ),
        rotations=(
            Rotation(
                datetime(2026, 11, 26, 12, 0, 2, tzinfo=UTC),
                FRONTEND,
                "a" * 32,
                "b" * 32,
                ("frontend-1",),
                {"frontend-1"},
            ),
            Rotation(datetime(2026, 11, 26, 12, 0, 3, tzinfo=UTC), "intermediate CA", "cc", "dd"),
        ),
        last_failure="12:00:01 frontend -> backend -> ratings: boom",
    )
    assert render(frame).splitlines() == [
        "mesh-identity demo  12:00:04  running 4s of 1m",
        "trust domain demo.mesh",
        "",
        "SIDECAR     IDENTITY                                   SERIAL IN ENVOY (/certs)  EXPIRES IN  CERTS LOADED  ENVOY PID",
        "frontend-1  spiffe://demo.mesh/ns/default/sa/frontend  ab12                      21s         2             4242",
        "backend-1   spiffe://demo.mesh/ns/default/sa/backend   EXITED (1)                -           1             -",
        "",
        "ROUTE                           OK  FAILED  EACH SERVER SIDE SAW ITS CALLER AS (XFCC)",
        f"frontend -> backend -> ratings  10  1       backend: {FRONTEND}",
        f"                                            ratings: {BACKEND}",
        "  frontend -> backend -> ratings answered by: backend-v1 -> ratings 6, backend-v2 -> ratings 4",
        "last failure: 12:00:01 frontend -> backend -> ratings: boom",
        "",
        "ROTATIONS: 2 (latest last)",
        f"  12:00:02  {FRONTEND}  aaaaaaaaaaaa -> bbbbbbbbbbbb  loaded by frontend-1",
        f"  12:00:03  intermediate CA{' ' * (len(FRONTEND) - 15)}  cc -> dd",
    ]
