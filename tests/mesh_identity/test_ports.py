from __future__ import annotations

import socket

from mesh_identity.ports import ephemeral_range, free_port


def test_free_ports_are_bindable_distinct_and_below_the_ephemeral_range() -> None:
    low = ephemeral_range()[0]
    ports = [free_port() for _ in range(200)]
    assert len(set(ports)) == 200
    for port in ports[:20]:
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", port))
    if low > 11_000:
        assert all(10_000 <= p < low for p in ports)
