"""What the demo measures and shows: the client's requests per route, rotations, and the live table.

* :class:`Traffic`: the client. It sends requests along every :class:`~mesh_identity.demo.mesh.Route`, one
  after another in a thread, and checks every hop of every answer with :func:`verdict`: each server side must
  have seen its caller's SPIFFE ID (the ``x-forwarded-client-cert`` header its sidecar set from the verified
  client certificate). Counters are per route, and per answering service (traffic splits show there). On a
  route the policy refuses (``Route.refused``), a request counts as ok when the last hop's sidecar refused it.
* :class:`RotationLog`: the certificate rotations, and which sidecars loaded each new certificate.
* :class:`SidecarFigures`: the figures ``mesh-identity top`` shows (requests/s, error %, p50, p99 of every hop),
  read from the stats endpoints of the sidecars whose instance has a ``stats`` address; :class:`Traffic` hands
  each route the figures of its hops, and :func:`render` shows them as top's table.
* :func:`render`: one frame of plain text from a :class:`Frame`; the same text on a terminal (redrawn in
  place) and in a pipe (frames one after another).
"""

from __future__ import annotations

import collections
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

from mesh_identity.demo.mesh import Route
from mesh_identity.durations import format_duration
from mesh_identity.errors import ConfigError
from mesh_identity.mesh.model import Address, Mesh
from xds_sds.mesh.figures import RouteCounts, RouteFigures, RouteKey, figures, merge, read_stats, route_counts, table

Hop = tuple[str, str]  # (the service that answered, the SPIFFE ID it saw calling)
DENIED = "RBAC: access denied"  # what a sidecar answers (403) to a caller its access policy leaves out
Fetch = Callable[[Address, str], tuple[int, Any]]


def verdict(route: Route, mesh: Mesh, status: int, answer: Any) -> tuple[tuple[Hop, ...], str | None]:
    """The hops an answer shows, and what is wrong with it (None when every hop saw the right caller)."""
    if not isinstance(answer, dict):
        return (), f"HTTP {status}: {answer!r}"[:200]
    hops: list[Hop] = []
    caller, level = route.hops[0], answer
    for callee in route.hops[1:]:
        upstream = level.get("upstream")
        if route.refused and callee == route.hops[-1]:
            if upstream == DENIED:
                return (*hops, (callee, f"refused {caller} (403 {DENIED})")), None
            return tuple(hops), f"{callee} did not refuse {caller} as its policy says: {str(upstream)[:120]}"
        if not isinstance(upstream, dict):
            return tuple(hops), f"{caller}: {level.get('error') or f'HTTP {status}, no answer from its upstream'}"
        served_by, peer = str(upstream.get("service")), str(upstream.get("peer"))
        hops.append((served_by, peer))
        expected = str(mesh.services[caller].identity) if caller in mesh.services else "?"
        if peer != expected:
            return tuple(hops), f"{served_by} saw the caller as {peer}, not {expected}"
        if served_by not in mesh.services:
            return tuple(hops), f"the answer came from {served_by!r}, not a service of the mesh"
        caller, level = served_by, upstream
    if status != 200:
        return tuple(hops), f"HTTP {status}: {answer.get('error')}"
    return tuple(hops), None


@dataclass
class RouteStats:
    route: Route
    ok: int = 0
    failed: int = 0
    hops: tuple[Hop, ...] = ()
    answered_by: collections.Counter[str] = field(default_factory=collections.Counter)  # by the services that
    # answered, e.g. "backend-v2 -> ratings": more than one where a traffic split sends requests different ways
    last_error: str | None = None
    figures: tuple[RouteFigures, ...] = ()  # of its hops, from the sidecars' stats (none without stats endpoints)

    def copy(self) -> RouteStats:
        return RouteStats(
            self.route, self.ok, self.failed, self.hops, self.answered_by.copy(), self.last_error, self.figures
        )


class SidecarFigures:
    """The traffic figures of the sidecars of ``mesh`` that have a stats endpoint, since the last :meth:`sample`."""

    def __init__(self, mesh: Mesh, read: Callable[[Address], str] = lambda a: read_stats(a, timeout=1.0)) -> None:
        self.endpoints = [i.stats for s in mesh.services.values() for i in s.instances if i.stats is not None]
        self.read = read
        self._last: tuple[float, dict[RouteKey, RouteCounts]] | None = None

    def sample(self) -> list[RouteFigures]:
        """Read every endpoint; the figures since the previous call (none at the first, or without endpoints)."""
        if not self.endpoints:
            return []
        readings = []
        for endpoint in self.endpoints:
            try:
                readings.append(route_counts(self.read(endpoint)))
            except (OSError, ValueError):
                continue  # a sidecar that cannot be read now: its routes show again at the next sample
        now, counts = time.monotonic(), merge(readings)
        last, self._last = self._last, (now, counts)
        if last is None or now <= last[0]:
            return []
        return figures(last[1], counts, now - last[0])


def hop_figures(route: Route, mesh: Mesh, rows: Sequence[RouteFigures]) -> tuple[RouteFigures, ...]:
    """The rows of ``route``'s hops: caller to callee, or to each backend of the callee's traffic split."""
    found = []
    for caller, callee in zip(route.hops, route.hops[1:], strict=False):
        split = mesh.policy.split_of(callee)
        callees = {callee} if split is None else {b.service for b in split.backends}
        found += [row for row in rows if row.key.source_service == caller and row.key.destination_service in callees]
    return tuple(found)


class Traffic:
    """The demo's client (see the module docstring). ``fetch`` sends ``GET path`` to an app."""

    def __init__(self, mesh: Mesh, routes: Sequence[Route], fetch: Fetch, *, interval: float = 0.1) -> None:
        self.mesh = mesh
        self.fetch = fetch
        self.interval = interval
        self._stats = [RouteStats(route) for route in routes]
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.failures: collections.deque[str] = collections.deque(maxlen=20)
        self.sidecar_figures = SidecarFigures(mesh)

    def entry(self, route: Route) -> Address:
        service = self.mesh.services[route.hops[0]]
        found = next((i.app for i in service.instances if i.app is not None), None)
        if found is None:
            raise ConfigError(f"services.{service.name}: the demo sends its requests to an app; this one has none")
        return found

    def probe(self, route: Route) -> tuple[tuple[Hop, ...], str | None]:
        """One request along ``route``, not counted."""
        try:
            status, answer = self.fetch(self.entry(route), route.path)
        except (OSError, ValueError) as err:
            return (), f"{type(err).__name__}: {err}"
        return verdict(route, self.mesh, status, answer)

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="demo-client", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()

    def _run(self) -> None:
        while not self._stop.is_set():
            for stats in self._stats:
                if self._stop.is_set():
                    return
                hops, error = self.probe(stats.route)
                with self._lock:
                    if hops:
                        stats.hops = hops
                    if error is None:
                        stats.ok += 1
                        stats.answered_by[" -> ".join(served for served, _ in hops)] += 1
                    else:
                        stats.failed += 1
                        stats.last_error = error
                        self.failures.append(f"{time.strftime('%H:%M:%S')} {stats.route.name}: {error}")
                self._stop.wait(self.interval)

    def stats(self) -> list[RouteStats]:
        """Each route's counters, with the figures of its hops since the last call (from the sidecars' stats)."""
        rows = self.sidecar_figures.sample()
        with self._lock:
            copies = [s.copy() for s in self._stats]
        for stats in copies:
            stats.figures = hop_figures(stats.route, self.mesh, rows)
        return copies

    def totals(self) -> tuple[int, int]:
        with self._lock:
            return sum(s.ok for s in self._stats), sum(s.failed for s in self._stats)


@dataclass
class Rotation:
    at: datetime
    subject: str
    old: str
    new: str
    nodes: tuple[str, ...] = ()  # the sidecars that should load it (none: the server's or a CA's)
    loaded_by: set[str] = field(default_factory=set)


class RotationLog:
    """Rotations as they happen (recorded from the rotation engine's callbacks, any thread)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._entries: list[Rotation] = []

    def record(self, rotation: Rotation) -> None:
        with self._lock:
            self._entries.append(rotation)

    def loaded(self, node: str, serials: set[int]) -> None:
        """``node``'s sidecar has these serials loaded: mark the rotations it was waiting for."""
        with self._lock:
            for entry in self._entries:
                if node in entry.nodes and int(entry.new, 16) in serials:
                    entry.loaded_by.add(node)

    def entries(self) -> list[Rotation]:
        with self._lock:
            return [Rotation(e.at, e.subject, e.old, e.new, e.nodes, set(e.loaded_by)) for e in self._entries]


@dataclass(frozen=True, slots=True)
class SidecarRow:
    node: str
    identity: str
    serial: str | None  # what Envoy's /certs shows for the identity (the newest), None if unreadable
    expires_in: timedelta | None
    serials_seen: int
    pid: int | None
    problem: str | None = None


@dataclass(frozen=True, slots=True)
class Frame:
    now: datetime
    elapsed: timedelta
    duration: timedelta | None
    header: tuple[str, ...]
    sidecars: tuple[SidecarRow, ...]
    routes: tuple[RouteStats, ...]
    rotations: tuple[Rotation, ...]
    last_failure: str | None = None


def _table(rows: Sequence[Sequence[str]]) -> list[str]:
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return ["  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip() for row in rows]


def _left(value: timedelta | None) -> str:
    if value is None:
        return "-"
    return format_duration(value) if value.total_seconds() > 0 else "EXPIRED"


def render(frame: Frame, *, rotations_shown: int = 6) -> str:
    """One frame of the live view (plain text, no colours)."""
    running = format_duration(frame.elapsed)
    of = f" of {format_duration(frame.duration)}" if frame.duration is not None else " (Ctrl-C stops)"
    lines = [f"mesh-identity demo  {frame.now:%H:%M:%S}  running {running}{of}", *frame.header, ""]
    sidecars = [("SIDECAR", "IDENTITY", "SERIAL IN ENVOY (/certs)", "EXPIRES IN", "CERTS LOADED", "ENVOY PID")]
    for row in frame.sidecars:
        sidecars.append(
            (
                row.node,
                row.identity,
                row.problem or row.serial or "-",
                _left(row.expires_in),
                str(row.serials_seen),
                str(row.pid or "-"),
            )
        )
    lines += _table(sidecars)
    lines.append("")
    routes = [("ROUTE", "OK", "FAILED", "EACH SERVER SIDE SAW ITS CALLER AS (XFCC)")]
    for stats in frame.routes:
        hops = [f"{served}: {peer}" for served, peer in stats.hops] or ["-"]
        routes.append((stats.route.name, str(stats.ok), str(stats.failed), hops[0]))
        routes += [("", "", "", hop) for hop in hops[1:]]
    lines += _table(routes)
    split = [s for s in frame.routes if len(s.answered_by) > 1]
    for stats in split:
        shares = ", ".join(f"{name} {count}" for name, count in sorted(stats.answered_by.items()))
        lines.append(f"  {stats.route.name} answered by: {shares}")
    if frame.last_failure:
        lines.append(f"last failure: {frame.last_failure}")
    measured = {row.key: row for stats in frame.routes for row in stats.figures}
    if measured:
        lines.append("")
        lines.append("TRAFFIC, FROM THE SIDECARS' STATS (as mesh-identity top shows it)")
        lines += table([measured[key] for key in sorted(measured)])
    lines.append("")
    lines.append(f"ROTATIONS: {len(frame.rotations)}" + (" (latest last)" if frame.rotations else ""))
    rows = []
    for rotation in frame.rotations[-rotations_shown:]:
        status = ""
        if rotation.nodes:
            waiting = sorted(set(rotation.nodes) - rotation.loaded_by)
            parts = [f"loaded by {', '.join(sorted(rotation.loaded_by))}"] if rotation.loaded_by else []
            parts += [f"waiting for {', '.join(waiting)}"] if waiting else []
            status = "; ".join(parts)
        serials = f"{rotation.old[:12]} -> {rotation.new[:12]}"
        rows.append((f"  {rotation.at:%H:%M:%S}", rotation.subject, serials, status))
    if rows:
        lines += _table(rows)
    return "\n".join(lines)
