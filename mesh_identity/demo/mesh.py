"""The demo's mesh: the mesh file with its ports made free, the demo's config, and the routes its client takes.

:func:`with_free_ports` rewrites every ``IP:PORT`` string of a mesh document to a port that is free now (the
same new port wherever the old one appears, so references stay consistent); :func:`check_ports_free` is the
``--keep-ports`` alternative. :func:`routes` turns the mesh into what the client exercises: every path along
``upstreams`` from a service that no one calls, e.g. ``frontend -> backend -> ratings``; a path stops at a
service whose access policy leaves the caller out (:func:`refuses`), and the client expects a refusal there.
"""

from __future__ import annotations

import re
import socket
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

from mesh_identity.durations import format_duration
from mesh_identity.errors import ConfigError
from mesh_identity.mesh.model import Mesh
from mesh_identity.ports import free_port

_ADDRESS = re.compile(r"^(\d{1,3}(?:\.\d{1,3}){3}|\[[0-9A-Fa-f:]+\]):(\d{1,5})$")
MAX_HOPS = 4


def _addresses(node: Any, path: str) -> Iterator[tuple[str, str, str, int]]:
    """``(key path, text, host, port)`` of every ``IP:PORT`` string in a YAML document."""
    if isinstance(node, dict):
        for key, value in node.items():
            yield from _addresses(value, f"{path}.{key}" if path else str(key))
    elif isinstance(node, list):
        for index, value in enumerate(node):
            yield from _addresses(value, f"{path}[{index}]")
    elif isinstance(node, str) and (match := _ADDRESS.match(node)):
        yield path, node, match.group(1).strip("[]"), int(match.group(2))


def _replace(node: Any, table: dict[str, str]) -> Any:
    if isinstance(node, dict):
        return {key: _replace(value, table) for key, value in node.items()}
    if isinstance(node, list):
        return [_replace(value, table) for value in node]
    if isinstance(node, str):
        return table.get(node, node)
    return node


def _family(host: str) -> socket.AddressFamily:
    return socket.AF_INET6 if ":" in host else socket.AF_INET


def with_free_ports(document: Any) -> Any:
    """``document`` with every address on a port free now, outside the ephemeral range and never handed out twice
    (see :mod:`mesh_identity.ports`)."""
    table: dict[str, str] = {}
    for _, text, host, _ in _addresses(document, ""):
        if text not in table:
            port = free_port(host)
            table[text] = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    return _replace(document, table)


def check_ports_free(document: Any) -> None:
    """ConfigError naming the first address of ``document`` that cannot be bound now."""
    seen: set[str] = set()
    for path, text, host, port in _addresses(document, ""):
        if text in seen:
            continue
        seen.add(text)
        with socket.socket(_family(host), socket.SOCK_STREAM) as sock:
            try:
                sock.bind((host, port))
            except OSError as err:
                raise ConfigError(
                    f"{path}: {text} is busy ({err.strerror}); run the demo without --keep-ports to use free ports"
                ) from None


def demo_config(mesh_file: str, workload_ttl: timedelta, *, agent: bool = False) -> dict[str, Any]:
    """The config of the demo's control plane: built-in CA, short lifetimes, loopback, ports picked at start.
    With ``agent``: node agents make the keys (``xds.secrets: agent``), and the signing API they use listens
    on loopback too."""
    ttl = format_duration(workload_ttl)
    config: dict[str, Any] = {
        "trust_domain": "demo.mesh",
        "state_dir": "state",
        "ca": {
            "provider": "builtin",
            "mode": "intermediate",
            "workload_ttl": ttl,
            "intermediate_ttl": format_duration(workload_ttl * 4),  # so the intermediate rotates too
            "rotate_after": 0.5,
            "jitter": 0.1,
        },
        "metrics": {"listen": "127.0.0.1:0"},
        "xds": {"listen": "127.0.0.1:0"},
        "mesh_file": mesh_file,
        "plugins": {"audit": {"enabled": True}},
    }
    if agent:
        config["xds"]["secrets"] = "agent"
        config["signing"] = {"listen": "127.0.0.1:0", "attest_listen": "127.0.0.1:0"}
    return config


@dataclass(frozen=True, slots=True)
class Route:
    """A path of calls through the mesh; the client asks ``hops[0]``'s app for ``path``.

    ``refused``: the last hop's sidecar refuses its caller (the policy leaves it out), as the demo shows.
    """

    hops: tuple[str, ...]
    refused: bool = False

    @property
    def name(self) -> str:
        return " -> ".join(self.hops)

    @property
    def path(self) -> str:
        return "".join(f"/call/{hop}" for hop in self.hops[1:])


def refuses(mesh: Mesh, caller: str, callee: str) -> bool:
    """Whether the sidecars behind ``callee`` (its split's backends, if it is split) all refuse ``caller``:
    TrafficTargets name them and none lists ``caller``'s identity as a source (route matches not considered)."""
    split = mesh.policy.split_of(callee)
    backends = [callee] if split is None else [b.service for b in split.backends if b.weight > 0]
    identity = mesh.services[caller].identity
    for backend in backends:
        access = mesh.policy.access_to(mesh.services[backend].identity)
        if access is None or any(identity in target.sources for target in access):
            return False
    return bool(backends)


def routes(mesh: Mesh) -> list[Route]:
    """Every path along ``upstreams`` (at most :data:`MAX_HOPS` services, no service twice) from each service
    with instances that no service calls, in the mesh file's order; a path ends where it is refused."""
    called = {u.service for s in mesh.services.values() for u in s.upstreams}
    found: list[Route] = []

    def walk(hops: tuple[str, ...]) -> None:
        refused = len(hops) > 1 and refuses(mesh, hops[-2], hops[-1])
        if len(hops) > 1:
            found.append(Route(hops, refused))
        if len(hops) == MAX_HOPS or refused:
            return
        for upstream in mesh.service(hops[-1]).upstreams:
            if upstream.service not in hops:
                walk((*hops, upstream.service))

    for name, service in mesh.services.items():
        if name not in called and service.instances:
            walk((name,))
    return found
