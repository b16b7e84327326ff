"""One-time join tokens: how a node agent proves itself to the signing API the first time.

``mesh-identity token create --node HOST`` makes a random token for ``HOST`` and prints it; the operator puts it
where that host's agent reads it. The signing API's ``Attest`` accepts it once, before it expires, and issues the
agent identity of that host (``spiffe://<td>/mesh-identity/agent/<host>``); from then on the agent renews with
its own SVID.

The store, ``<state_dir>/join-tokens.json`` (0600, replaced atomically, changed under an exclusive lock of
``<state_dir>/join-tokens.lock`` so that the CLI and the server never lose each other's writes), holds only the
SHA-256 of each token, never the token: reading the file buys nothing. A token is 32 random bytes (URL-safe
base64 after the prefix ``mijt-``), so its hash cannot be searched backwards. Tokens used or expired more than
:data:`KEEP_USED` ago are dropped at the next write; at most :data:`MAX_TOKENS` are kept.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import re
import secrets
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from mesh_identity.clock import Clock, utcnow
from mesh_identity.errors import MeshIdentityError, StateError
from mesh_identity.files import ensure_private_dir, write_private

STORE = "join-tokens.json"
LOCK = "join-tokens.lock"
PREFIX = "mijt-"
MAX_TTL = timedelta(hours=24)  # a join token is a bootstrap credential: short-lived by design
MAX_TOKENS = 10_000
KEEP_USED = timedelta(days=1)  # how long a used or expired token stays listed
MAX_STORE_BYTES = 4 * 1024 * 1024
HASH_PREFIX = 12  # hex digits of the hash shown by ``token list`` and in audit lines
_TOKEN = re.compile(r"^mijt-[A-Za-z0-9_-]{43}$")
_HOST = re.compile(r"^[A-Za-z0-9]([A-Za-z0-9._-]{0,126}[A-Za-z0-9])?$")  # the mesh file's instances[].host


class JoinTokenError(MeshIdentityError):
    """A join token that cannot be redeemed. ``reason`` is ``unknown``, ``expired``, ``already used`` or
    ``malformed``; the message says which (and for whom), never the token."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


@dataclass(frozen=True, slots=True)
class JoinTokenInfo:
    """A stored token, as ``token list`` shows it: the host, the times, and a prefix of its hash."""

    digest: str
    host: str
    created: datetime
    expires: datetime
    used: datetime | None

    @property
    def hash_prefix(self) -> str:
        return self.digest[:HASH_PREFIX]

    def state(self, now: datetime) -> str:
        if self.used is not None:
            return "used"
        return "expired" if now >= self.expires else "valid"


def token_digest(token: str) -> str:
    """The SHA-256 (hex) a token is stored and audited by."""
    return hashlib.sha256(token.encode()).hexdigest()


def check_host(host: str) -> str:
    """``host`` when it is a host name as the mesh file's ``instances[].host`` takes it; JoinTokenError else."""
    if not isinstance(host, str) or not _HOST.match(host):
        shown = repr(host[:64] + "..." if isinstance(host, str) and len(host) > 64 else host)
        raise JoinTokenError(
            "malformed", f"node {shown} is not a host name (letters, digits, '.', '_', '-'; 128 at most)"
        )
    return host


class JoinTokens:
    """The join tokens of one control plane (see the module docstring)."""

    def __init__(self, state_dir: Path, *, clock: Clock = utcnow) -> None:
        self.state_dir = state_dir
        self.path = state_dir / STORE
        self.clock = clock

    def create(self, host: str, ttl: timedelta) -> str:
        """A new token for ``host``, valid for ``ttl`` (at most :data:`MAX_TTL`); only its hash is stored."""
        check_host(host)
        if ttl <= timedelta(0):
            raise JoinTokenError("malformed", f"TTL {ttl} is not positive")
        if ttl > MAX_TTL:
            raise JoinTokenError("malformed", f"TTL {ttl} is longer than the {MAX_TTL} a join token may live")
        token = PREFIX + secrets.token_urlsafe(32)
        now = self.clock()
        info = JoinTokenInfo(token_digest(token), host, now, now + ttl, None)
        with self._locked() as tokens:
            live = _pruned(tokens, now)
            if len(live) >= MAX_TOKENS:
                raise JoinTokenError(
                    "malformed", f"{len(live)} join tokens are outstanding, the most kept; let some expire first"
                )
            live[info.digest] = info
            self._write(live)
        return token

    def peek(self, token: str, now: datetime) -> str:
        """The host ``token`` is for, checking it as :meth:`redeem` does but without using it up."""
        info = self._check(self._read().get(_digest_of(token)), now)
        return info.host

    def redeem(self, token: str, now: datetime) -> str:
        """Use ``token`` up and return its host; JoinTokenError when it is unknown, expired or already used."""
        digest = _digest_of(token)
        with self._locked() as tokens:
            info = self._check(tokens.get(digest), now)
            tokens[digest] = JoinTokenInfo(info.digest, info.host, info.created, info.expires, now)
            self._write(_pruned(tokens, now))
        return info.host

    def list(self) -> list[JoinTokenInfo]:
        """Every stored token, oldest first."""
        return sorted(self._read().values(), key=lambda t: (t.created, t.digest))

    # -- the store --------------------------------------------------------------------------------------

    @staticmethod
    def _check(info: JoinTokenInfo | None, now: datetime) -> JoinTokenInfo:
        if info is None:
            raise JoinTokenError("unknown", "the join token is unknown to this control plane")
        short = info.hash_prefix
        if info.used is not None:
            raise JoinTokenError(
                "already used",
                f"the join token {short} for node {info.host!r} was already used at {_time(info.used)}",
            )
        if now >= info.expires:
            raise JoinTokenError(
                "expired", f"the join token {short} for node {info.host!r} expired at {_time(info.expires)}"
            )
        return info

    @contextlib.contextmanager
    def _locked(self) -> Iterator[dict[str, JoinTokenInfo]]:
        ensure_private_dir(self.state_dir)
        fd = os.open(self.state_dir / LOCK, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield self._read()
        finally:
            os.close(fd)  # releases the lock

    def _read(self) -> dict[str, JoinTokenInfo]:
        try:
            fd = os.open(self.path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        except FileNotFoundError:
            return {}
        except OSError as err:
            raise StateError(f"{self.path}: cannot read the join tokens: {err.strerror}") from None
        with os.fdopen(fd, "rb") as handle:
            raw = handle.read(MAX_STORE_BYTES + 1)
        if len(raw) > MAX_STORE_BYTES:
            raise StateError(f"{self.path}: larger than {MAX_STORE_BYTES} bytes; not a join token store")
        try:
            return _parse(json.loads(raw))
        except (ValueError, KeyError, TypeError) as err:
            raise StateError(f"{self.path}: not a valid join token store ({err})") from None

    def _write(self, tokens: dict[str, JoinTokenInfo]) -> None:
        document = {"version": 1, "tokens": [_dump(t) for t in sorted(tokens.values(), key=lambda t: t.created)]}
        write_private(self.path, json.dumps(document, indent=1).encode() + b"\n")


def _digest_of(token: str) -> str:
    if not isinstance(token, str) or not _TOKEN.match(token):
        raise JoinTokenError("malformed", "the join token is malformed (expected mijt- and 43 URL-safe characters)")
    return token_digest(token)


def _pruned(tokens: dict[str, JoinTokenInfo], now: datetime) -> dict[str, JoinTokenInfo]:
    def gone(t: JoinTokenInfo) -> bool:
        ended = t.used if t.used is not None else t.expires
        return now - ended > KEEP_USED

    return {digest: t for digest, t in tokens.items() if not gone(t)}


def _time(value: datetime) -> str:
    return f"{value.astimezone(UTC):%Y-%m-%dT%H:%M:%SZ}"


def _dump(info: JoinTokenInfo) -> dict[str, Any]:
    return {
        "sha256": info.digest,
        "host": info.host,
        "created": info.created.isoformat(),
        "expires": info.expires.isoformat(),
        "used": info.used.isoformat() if info.used is not None else None,
    }


def _parse(document: Any) -> dict[str, JoinTokenInfo]:
    if not isinstance(document, dict) or document.get("version") != 1 or not isinstance(document.get("tokens"), list):
        raise ValueError("expected {version: 1, tokens: [...]}")
    found: dict[str, JoinTokenInfo] = {}
    for entry in document["tokens"]:
        digest = entry["sha256"]
        if not isinstance(digest, str) or not re.fullmatch(r"[0-9a-f]{64}", digest):
            raise ValueError("a token's sha256 is not 64 hex digits")
        used = entry["used"]
        host = entry["host"]
        if not isinstance(host, str) or not _HOST.match(host):
            raise ValueError(f"host {host!r} is not a host name")
        found[digest] = JoinTokenInfo(
            digest,
            host,
            _aware(entry["created"]),
            _aware(entry["expires"]),
            None if used is None else _aware(used),
        )
    return found


def _aware(text: Any) -> datetime:
    value = datetime.fromisoformat(text)
    if value.tzinfo is None:
        raise ValueError(f"time {text!r} has no time zone")
    return value
