"""Free loopback ports for listeners that must be named before they are opened (Envoy listeners, demo apps).

A port from ``bind(("127.0.0.1", 0))`` comes from the kernel's ephemeral range, which is also where every
outgoing connection (Envoy's, gRPC's, ours) takes its source port: between picking the port and binding it for
real, an outgoing connection may take it ("Address already in use"). So ports are drawn at random from below
the ephemeral range, checked by binding, and never handed out twice by this process.
"""

from __future__ import annotations

import ipaddress
import random
import socket
import threading
from pathlib import Path

LOWEST = 10_000
_RANGE_FILE = Path("/proc/sys/net/ipv4/ip_local_port_range")
_handed_out: set[tuple[str, int]] = set()
_lock = threading.Lock()
_random = random.SystemRandom()


def is_ip_address(host: str) -> bool:
    """Whether ``host`` is an IP address (v4 or v6), not a name."""
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


def is_loopback(host: str) -> bool:
    """Whether ``host`` (a name or an address) is this machine's loopback: ``localhost`` or a loopback IP."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def ephemeral_range() -> tuple[int, int]:
    """The kernel's ephemeral port range (Linux default 32768-60999 where it cannot be read)."""
    try:
        low, high = (int(part) for part in _RANGE_FILE.read_text().split())
    except (OSError, ValueError):
        return 32768, 60999
    return low, high


def _bindable(host: str, port: int) -> bool:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        try:
            sock.bind((host, port))
        except OSError:
            return False
    return True


def free_port(host: str = "127.0.0.1", attempts: int = 500) -> int:
    """A port on ``host`` that can be bound now, outside the ephemeral range, not handed out before."""
    low = LOWEST
    high = ephemeral_range()[0] - 1
    if high - low < 1000:  # an unusual kernel setting: fall back to the ephemeral range above it
        low, high = ephemeral_range()[1] + 1, 65535
    with _lock:
        for _ in range(attempts):
            port = _random.randint(low, high)
            if (host, port) not in _handed_out and _bindable(host, port):
                _handed_out.add((host, port))
                return port
    raise OSError(f"no free port on {host} in {low}-{high} after {attempts} attempts")
