"""The relay behind the agent's public sockets, on real Unix sockets: the internal server learns who called from
the address the relay bound, bytes go both ways, and connections beyond the limits are closed at once."""

from __future__ import annotations

import asyncio
import os
import socket
import sys
from pathlib import Path

import pytest

from xds_sds.agent.errors import AgentError
from xds_sds.agent.relay import Callers, FrontDoor


async def _echo_door(tmp_path: Path, **limits: int) -> tuple[FrontDoor, Callers, list[str], asyncio.AbstractServer]:
    private = tmp_path / "private"
    (private / "c").mkdir(parents=True, mode=0o700)
    callers = Callers()
    seen: list[str] = []

    async def echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        peer = writer.get_extra_info("peername")
        caller = callers.lookup(f"unix:{peer}")
        seen.append(caller.describe() if caller else "unknown")
        while data := await reader.read(1024):
            writer.write(data.upper())
            await writer.drain()
        writer.close()

    inner = await asyncio.start_unix_server(echo, path=str(private / "inner.sock"))
    door = FrontDoor("test", tmp_path / "public.sock", private / "inner.sock", private / "c", callers, **limits)
    await door.start()
    return door, callers, seen, inner


def test_the_internal_server_sees_the_attested_caller_and_bytes_flow_both_ways(tmp_path: Path) -> None:
    async def scenario() -> None:
        door, callers, seen, inner = await _echo_door(tmp_path)
        try:
            reader, writer = await asyncio.open_unix_connection(str(tmp_path / "public.sock"))
            writer.write(b"hello " * 50_000)  # more than one chunk each way
            writer.write_eof()
            echoed = await asyncio.wait_for(reader.read(), 30)
            assert echoed == b"HELLO " * 50_000
            writer.close()
            assert seen == [f"pid {os.getpid()} uid {os.getuid()} gid {os.getgid()} {os.path.realpath(sys.executable)}"]
            await asyncio.sleep(0)
            assert oct((tmp_path / "public.sock").stat().st_mode & 0o777) == "0o666"
        finally:
            await door.stop()
            inner.close()
        assert len(callers) == 0 and list((tmp_path / "private" / "c").iterdir()) == []  # nothing left behind
        assert not (tmp_path / "public.sock").exists()

    asyncio.run(scenario())


def test_connections_beyond_the_uid_limit_are_closed_at_once(tmp_path: Path) -> None:
    async def scenario() -> None:
        door, _, _, inner = await _echo_door(tmp_path, max_per_uid=1)
        try:
            _, first = await asyncio.open_unix_connection(str(tmp_path / "public.sock"))
            await asyncio.sleep(0.05)  # the relay's first connection is open (not a timing assertion: a wait)
            second_reader, second = await asyncio.open_unix_connection(str(tmp_path / "public.sock"))
            assert await asyncio.wait_for(second_reader.read(), 30) == b""  # closed without a byte
            assert door.refused == 1 and door.accepted == 1
            first.close()
            second.close()
        finally:
            await door.stop()
            inner.close()

    asyncio.run(scenario())


def test_a_public_path_that_is_not_a_socket_is_refused(tmp_path: Path) -> None:
    (tmp_path / "public.sock").write_text("not a socket")
    door = FrontDoor("test", tmp_path / "public.sock", tmp_path / "inner.sock", tmp_path, Callers())
    with pytest.raises(AgentError, match="exists and is not a socket: refusing to replace it"):
        asyncio.run(door.start())
    assert (tmp_path / "public.sock").read_text() == "not a socket"


def test_an_unknown_peer_is_no_caller() -> None:
    callers = Callers()
    assert callers.lookup("unix:") is None
    with socket.socket(socket.AF_UNIX) as _:
        assert callers.lookup("unix:/tmp/whatever") is None
