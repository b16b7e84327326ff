"""A tiny TCP server and client for the pod runner's capture tests (stdlib only; run as any uid).

``reporter.py serve LABEL PORT``: listens on 0.0.0.0:PORT, prints ``listening PORT`` once it does, and answers
every connection with one line ``LABEL uid=U local=IP:PORT original_dst=IP:PORT`` (``SO_ORIGINAL_DST``: where the
connection was going before a REDIRECT; ``-`` when netfilter has no such record), then closes it.

``reporter.py connect HOST PORT``: connects, prints the line it was answered, exits 0; on an error prints
``error <what>`` and exits 1.
"""

from __future__ import annotations

import os
import socket
import struct
import sys

SO_ORIGINAL_DST = 80  # linux/netfilter_ipv4.h; the socket module does not define it


def original_dst(conn: socket.socket) -> str:
    try:
        raw = conn.getsockopt(socket.SOL_IP, SO_ORIGINAL_DST, 16)
    except OSError:
        return "-"
    port, addr = struct.unpack_from("!2xH4s", raw)
    return f"{socket.inet_ntoa(addr)}:{port}"


def serve(label: str, port: int) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as server:
        server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        server.bind(("0.0.0.0", port))  # inside a test pod's own network namespace
        server.listen(16)
        print(f"listening {port}", flush=True)
        while True:
            conn, _ = server.accept()
            with conn:
                local = "{}:{}".format(*conn.getsockname())
                line = f"{label} uid={os.getuid()} local={local} original_dst={original_dst(conn)}\n"
                conn.sendall(line.encode())


def connect(host: str, port: int) -> int:
    try:
        with socket.create_connection((host, port), timeout=10) as conn:
            data = b""
            while chunk := conn.recv(4096):
                data += chunk
    except OSError as err:
        print(f"error {err}", flush=True)
        return 1
    print(data.decode().strip(), flush=True)
    return 0


def main(argv: list[str]) -> int:
    if len(argv) == 3 and argv[0] == "serve":
        serve(argv[1], int(argv[2]))
        return 0
    if len(argv) == 3 and argv[0] == "connect":
        return connect(argv[1], int(argv[2]))
    print(__doc__, file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
