"""The agent's public Unix sockets: each connection is attested at accept, then relayed to an internal gRPC server.

grpcio's server cannot say which process called over a Unix socket (its peer is just ``unix:``), so the agent
accepts the connection itself (asyncio), reads the kernel's peer credentials and procfs
(:func:`~xds_sds.agent.attestation.attest`), and opens a second connection to the internal gRPC server, whose
socket lies in a directory (0700) that only the agent can enter. Before connecting, that client socket is
bound to a path of its own in the same directory, so the internal server sees ``unix:<that path>`` as the
call's peer, and :class:`Callers` maps that path to the caller attested at accept. Bytes are then copied both
ways, at most :data:`CHUNK` at a time and never faster than the other side takes them; when one side closes,
the other is half-closed, and both are closed once both directions are done (or either fails).

A connection that cannot be attested is closed at once; so is every connection beyond ``max_connections``, and
every connection of a uid beyond ``max_per_uid`` (one local user cannot take every connection).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import stat
from collections import Counter
from collections.abc import Callable
from pathlib import Path

from xds_sds.agent.attestation import PROC, AttestationError, Caller, attest
from xds_sds.agent.errors import AgentError

log = logging.getLogger(__name__)

CHUNK = 64 * 1024
CLOSE_TIMEOUT = 5.0  # seconds to wait for a closed connection to be done (a TLS close_notify that never comes)
MAX_CONNECTIONS = 512
MAX_PER_UID = 128


class Callers:
    """The attested caller of each relayed connection, by the peer address the internal server sees."""

    def __init__(self) -> None:
        self._by_peer: dict[str, Caller] = {}

    def add(self, peer: str, caller: Caller) -> None:
        self._by_peer[peer] = caller

    def remove(self, peer: str) -> None:
        self._by_peer.pop(peer, None)

    def lookup(self, peer: str) -> Caller | None:
        """The caller behind ``peer`` (``context.peer()`` of the internal server), None for anyone else."""
        return self._by_peer.get(peer)

    def __len__(self) -> int:
        return len(self._by_peer)


def _claim(path: Path) -> None:
    """Remove a stale socket at ``path`` (left by an agent that died); refuse a live one or any other file."""
    try:
        st = path.lstat()
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(st.st_mode):
        raise AgentError(f"{path} exists and is not a socket: refusing to replace it")
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.connect(os.fspath(path))
    except ConnectionRefusedError:
        path.unlink()
        return
    except OSError as err:
        raise AgentError(f"{path}: cannot check whether it is in use ({err.strerror})") from None
    finally:
        probe.close()
    raise AgentError(f"{path} is in use: another agent listens there")


class FrontDoor:
    """One public socket (``name`` is ``sds`` or ``workload_api``) relayed to ``internal``.

    :param clients_dir: where the relay's client sockets are bound (inside the agent's private directory).
    :param on_change: called with the number of open connections after each change (for metrics).
    """

    def __init__(
        self,
        name: str,
        public: Path,
        internal: Path,
        clients_dir: Path,
        callers: Callers,
        *,
        max_connections: int = MAX_CONNECTIONS,
        max_per_uid: int = MAX_PER_UID,
        proc: Path = PROC,
        on_change: Callable[[str, int], None] | None = None,
    ) -> None:
        self.name = name
        self.public = public
        self._internal = internal
        self._clients_dir = clients_dir
        self._callers = callers
        self._max = max_connections
        self._max_per_uid = max_per_uid
        self._by_uid: Counter[int] = Counter()
        self._proc = proc
        self._on_change = on_change
        self._server: asyncio.AbstractServer | None = None
        self._open: set[asyncio.Task[None]] = set()
        self._next = 0
        self.accepted = 0
        self.refused = 0

    async def start(self) -> None:
        """Listen on the public socket (mode 0666: attestation, not file modes, decides who gets what)."""
        try:
            self.public.parent.mkdir(parents=True, exist_ok=True)
            _claim(self.public)
            self._server = await asyncio.start_unix_server(self._accepted, path=os.fspath(self.public), limit=CHUNK)
            os.chmod(self.public, 0o666)  # noqa: S103 - the socket is for every local process; callers are attested
        except OSError as err:
            raise AgentError(f"sockets.{self.name}: cannot listen on {self.public}: {err.strerror or err}") from None

    async def stop(self) -> None:
        server, self._server = self._server, None
        await shut(server, self._open, self.public)

    @property
    def connections(self) -> int:
        return len(self._open)

    async def _accepted(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        sock: socket.socket = writer.get_extra_info("socket")
        if len(self._open) >= self._max:
            self.refused += 1
            log.warning("%s: refusing a connection: %d are open already", self.name, len(self._open))
            writer.close()
            return
        try:
            caller = attest(sock, self._proc)  # at once: see the pid-reuse caveat in xds_sds.agent.attestation
        except AttestationError as err:
            self.refused += 1
            log.warning("%s: refusing a connection: %s", self.name, err)
            writer.close()
            return
        if self._by_uid[caller.uid] >= self._max_per_uid:  # one user cannot take every connection
            self.refused += 1
            log.warning("%s: refusing a connection of uid %d: it has %d open", self.name, caller.uid, self._max_per_uid)
            writer.close()
            return
        task = asyncio.current_task()
        assert task is not None
        self._open.add(task)
        self._by_uid[caller.uid] += 1
        self._changed()
        self.accepted += 1
        try:
            await self._relay(caller, reader, writer)
        except asyncio.CancelledError:  # stop(): the server's callback must not see the cancellation
            return
        finally:
            self._open.discard(task)
            self._by_uid[caller.uid] -= 1
            if self._by_uid[caller.uid] <= 0:
                del self._by_uid[caller.uid]
            self._changed()

    def _changed(self) -> None:
        if self._on_change is not None:
            self._on_change(self.name, len(self._open))

    async def _relay(self, caller: Caller, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._next += 1
        bound = self._clients_dir / f"{self.name}.{self._next}"
        peer = f"unix:{bound}"
        inner = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        inner_writer: asyncio.StreamWriter | None = None
        cancelled = False
        try:
            inner.setblocking(False)
            inner.bind(os.fspath(bound))
            self._callers.add(peer, caller)
            await asyncio.get_running_loop().sock_connect(inner, os.fspath(self._internal))
            inner_reader, inner_writer = await asyncio.open_unix_connection(sock=inner, limit=CHUNK)
            log.debug("%s: relaying %s as %s", self.name, caller.describe(), bound.name)
            await asyncio.gather(pipe(reader, inner_writer), pipe(inner_reader, writer))
        except OSError as err:
            log.warning("%s: the connection of %s ended: %s", self.name, caller.describe(), err)
        except asyncio.CancelledError:
            cancelled = True
            raise
        finally:
            self._callers.remove(peer)
            if inner_writer is None:
                inner.close()
            with contextlib.suppress(FileNotFoundError):
                bound.unlink()
            await close_all((writer, inner_writer), abort=cancelled)


async def close_all(writers: tuple[asyncio.StreamWriter | None, ...], *, abort: bool = False) -> None:
    """Close both sides of a relayed connection and wait (at most :data:`CLOSE_TIMEOUT`) until they are;
    ``abort``: drop them at once (the agent is stopping)."""
    sides = [side for side in writers if side is not None]
    for side in sides:
        if abort:
            side.transport.abort()
        else:
            side.close()
    if abort:
        return
    for side in sides:
        with contextlib.suppress(OSError, TimeoutError):
            await asyncio.wait_for(side.wait_closed(), CLOSE_TIMEOUT)


async def pipe(source: asyncio.StreamReader, target: asyncio.StreamWriter) -> None:
    """Copy until ``source`` ends, then half-close ``target``; a broken side ends the copy quietly."""
    try:
        while True:
            data = await source.read(CHUNK)
            if not data:
                break
            target.write(data)
            await target.drain()
        if target.can_write_eof():
            target.write_eof()
    except (ConnectionError, OSError):
        target.close()


async def shut(server: asyncio.AbstractServer | None, open_tasks: set[asyncio.Task[None]], path: Path) -> None:
    """Stop a Unix-socket listener: no new connections, the open ones cancelled and awaited, its socket removed."""
    if server is not None:
        server.close()
    for task in list(open_tasks):
        task.cancel()
    if open_tasks:
        await asyncio.gather(*open_tasks, return_exceptions=True)
    if server is not None:
        await server.wait_closed()
    with contextlib.suppress(FileNotFoundError):
        path.unlink()
