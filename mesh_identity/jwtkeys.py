"""The JWT-SVID signing keys of a trust domain: ES256 keys on disk, rotated with overlap.

Each key has a signing window ``[signs_from, signs_until)`` of ``key_ttl``; the windows follow one another
without a gap, so exactly one key signs at any moment. A key's life:

1. **published**: made and put in the bundle ``key_ttl / 2`` before its window opens (when the signing key is
   half way through its own), so every validator that refreshes its bundle meets it before any token it signs;
2. **signing**: from ``signs_from``, for ``key_ttl``;
3. **retired**: still in the bundle until ``signs_until + max_ttl``, when the last token it could have signed
   (no token lives longer than ``max_ttl``) has expired; then dropped from the bundle and deleted from disk.

After a downtime past the hand-over, the signing key signs on until a new key has been published for
``key_ttl / 2``: a key never signs before validators could have seen it.

Layout of ``<state_dir>/jwt`` (directory 0700, files 0600, never through a symbolic link, see
:mod:`mesh_identity.files`)::

    keys.json     {"version": 1, "trust_domain": ..., "keys": [{"kid", "published", "signs_from",
                   "signs_until"}, ...]}   (oldest first)
    <kid>.key     each key, PKCS#8 PEM; its kid is the RFC 7638 thumbprint of its public key

``keys.json`` is the commit point: a new key file is written before the manifest that names it, a dropped key
is deleted after the manifest that no longer names it; a key file the manifest does not name is a leftover of
such a step and is deleted on start. A key file that is missing, unreadable, looser than 0600, not a P-256
key, or whose key does not hash to its kid is a :class:`StateError`: never replaced, since tokens and
validators depend on it. The first key set is built in a temporary directory renamed into place.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import secrets
import shutil
import stat
import threading
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field, replace
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric import ec

from mesh_identity.clock import Clock, utcnow
from mesh_identity.config import JwtConfig
from mesh_identity.durations import format_duration
from mesh_identity.errors import ConfigError, StateError
from mesh_identity.files import ensure_private_dir, owned_dir, write_private_at
from mesh_identity.jwtsvid import JwtBundle, JwtSvid, JwtSvidError, sign_jwt_svid, thumbprint
from mesh_identity.keys import load_private_key, private_key_pem
from mesh_identity.spiffe import SpiffeId, TrustDomain

log = logging.getLogger(__name__)

DIRECTORY = "jwt"
MANIFEST = "keys.json"
KEY_SUFFIX = ".key"
MAX_KEYS = 64  # far above the 2-4 a schedule holds: a bound on what a damaged manifest makes us load
_MAX_FILE_BYTES = 256 * 1024
_KID = re.compile(r"[A-Za-z0-9_-]{43}")  # an unpadded base64url SHA-256
_READ_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC


@dataclass(frozen=True, slots=True)
class SigningKey:
    """One ES256 key and its schedule."""

    key_id: str
    private_key: ec.EllipticCurvePrivateKey = field(repr=False, compare=False)
    published: datetime
    signs_from: datetime
    signs_until: datetime

    def signs_at(self, now: datetime) -> bool:
        return self.signs_from <= now < self.signs_until


# -- the schedule: pure functions of the key list and now ----------------------------------------------------


def publish_lead(settings: JwtConfig) -> timedelta:
    """How long a key is in the bundle before it signs."""
    return settings.key_ttl / 2


def signer_at(keys: Sequence[SigningKey], now: datetime) -> SigningKey | None:
    return next((k for k in keys if k.signs_at(now)), None)


def drop_time(key: SigningKey, settings: JwtConfig) -> datetime:
    """When the last token ``key`` could have signed has expired."""
    return key.signs_until + settings.max_ttl


def successor_time(keys: Sequence[SigningKey], settings: JwtConfig) -> datetime:
    """When the next key must be published: ``key_ttl / 2`` before the newest key's window closes."""
    return keys[-1].signs_until - publish_lead(settings)


def next_change(keys: Sequence[SigningKey], settings: JwtConfig) -> datetime:
    """The next moment the key set changes: the next key's publication, or a retired key's drop."""
    return min([successor_time(keys, settings), *(drop_time(k, settings) for k in keys[:-1])])


def advance(
    keys: Sequence[SigningKey],
    now: datetime,
    settings: JwtConfig,
    new_key: Callable[[], ec.EllipticCurvePrivateKey] = lambda: ec.generate_private_key(ec.SECP256R1()),
) -> tuple[list[SigningKey], SigningKey | None, list[SigningKey]]:
    """The key set at ``now``: ``(keys, the key published now or None, the keys dropped now)``. A key made
    by ``new_key`` becomes the next key when one is due (the newest key's window closes within ``key_ttl / 2``); after a
    downtime the newest key's window is stretched so the next one still gets its ``key_ttl / 2`` of notice."""
    out = list(keys)
    added = None
    if now >= successor_time(out, settings):
        newest = out[-1]
        start = max(newest.signs_until, now + publish_lead(settings))
        if start > newest.signs_until:
            out[-1] = replace(newest, signs_until=start)
        key = new_key()
        added = SigningKey(thumbprint(key.public_key()), key, now, start, start + settings.key_ttl)
        out.append(added)
    dropped = [k for k in out[:-1] if now >= drop_time(k, settings)]
    return [k for k in out if k not in dropped], added, dropped


# -- the authority -------------------------------------------------------------------------------------------


class JwtAuthority:
    """Signs the JWT-SVIDs of one trust domain and keeps its JWT bundle. Thread-safe.

    Call :meth:`start` once, then :meth:`rotate_if_due` at :meth:`next_rotation` (it returns True when the
    bundle changed: publish it again). :meth:`issue` never changes the key set.
    """

    def __init__(
        self, trust_domain: TrustDomain, state_dir: Path, *, settings: JwtConfig, clock: Clock = utcnow
    ) -> None:
        zero = timedelta(0)
        if not zero < settings.ttl <= settings.max_ttl:
            raise ConfigError("jwt.ttl must be positive and at most jwt.max_ttl")
        if settings.key_ttl < settings.max_ttl * 2:
            raise ConfigError("jwt.key_ttl must be at least twice jwt.max_ttl")
        self.trust_domain = trust_domain
        self.state_dir = state_dir
        self.path = state_dir / DIRECTORY
        self.settings = settings
        self.clock = clock
        self._lock = threading.Lock()
        self._keys: tuple[SigningKey, ...] = ()

    # -- public API ------------------------------------------------------------------------------------------

    def start(self) -> None:
        """Load the key set from ``<state_dir>/jwt/``, or create it; then do whatever rotation is due.
        StateError when the directory or a key file is unsafe, missing or damaged."""
        with self._lock, self._state_dir() as state_fd:
            exists = _lstat(DIRECTORY, state_fd)
            if exists is not None and stat.S_ISDIR(exists.st_mode) and not _has(MANIFEST, state_fd, DIRECTORY):
                self._remove_if_empty(state_fd)
            if _lstat(DIRECTORY, state_fd) is None:
                self._keys = tuple(self._create(state_fd))
                log.info(
                    "created the JWT signing key %s of %s in %s", self._keys[0].key_id, self.trust_domain, self.path
                )
            else:
                with self._open(state_fd) as fd:
                    self._keys = tuple(self._load(fd))
            self._clean_staging(state_fd)
            self._rotate(self.clock())

    def issue(self, spiffe_id: SpiffeId, audience: Sequence[str], ttl: timedelta | None = None) -> JwtSvid:
        """A JWT-SVID for ``spiffe_id`` (of this trust domain) and ``audience``, valid for ``ttl`` (default
        ``jwt.ttl``, at most ``jwt.max_ttl``), signed by the current key."""
        lifetime = self.settings.ttl if ttl is None else ttl
        if not isinstance(spiffe_id, SpiffeId) or not spiffe_id.member_of(self.trust_domain):
            raise JwtSvidError(f"{spiffe_id} is not an identity of trust domain {self.trust_domain}")
        if not isinstance(lifetime, timedelta) or lifetime <= timedelta(0):
            raise JwtSvidError(f"a JWT-SVID lifetime must be positive, not {lifetime}")
        if lifetime > self.settings.max_ttl:
            raise JwtSvidError(
                f"a JWT-SVID lifetime of {format_duration(lifetime)} is longer than jwt.max_ttl "
                f"({format_duration(self.settings.max_ttl)})"
            )
        if isinstance(audience, str) or not audience:
            raise JwtSvidError("a JWT-SVID needs at least one audience (a list of strings)")
        keys = self._started()
        now = self.clock()
        signer = signer_at(keys, now)
        if signer is None:
            raise JwtSvidError(
                f"no JWT signing key of {self.trust_domain} signs at {now.isoformat(timespec='seconds')}: "
                f"rotation was due at {successor_time(keys, self.settings).isoformat(timespec='seconds')}"
            )
        return sign_jwt_svid(
            signer.private_key, signer.key_id, spiffe_id, audience, issued_at=now, expiry=now + lifetime
        )

    def bundle(self) -> JwtBundle:
        """Every key a validator may meet: the retired ones whose tokens may still be live, the signing one,
        and the next one (published before it signs)."""
        return JwtBundle(self.trust_domain, {k.key_id: k.private_key.public_key() for k in self._started()})

    def rotate_if_due(self) -> bool:
        """Publish the next key and drop expired retired keys when due. True when the bundle changed."""
        with self._lock:
            self._started()
            return self._rotate(self.clock())

    def next_rotation(self) -> datetime:
        """When :meth:`rotate_if_due` next has work (it may be now or past, when due)."""
        return next_change(self._started(), self.settings)

    @property
    def keys(self) -> tuple[SigningKey, ...]:
        """The key set, oldest first."""
        return self._keys

    # -- rotation --------------------------------------------------------------------------------------------

    def _started(self) -> tuple[SigningKey, ...]:
        keys = self._keys
        if not keys:
            raise JwtSvidError(f"the JWT authority of {self.trust_domain} is not started")
        return keys

    def _rotate(self, now: datetime) -> bool:
        keys, added, dropped = advance(self._keys, now, self.settings)
        if added is None and not dropped:
            return False
        with self._state_dir() as state_fd, self._open(state_fd) as fd:
            if added is not None:
                self._write_key(fd, added)
            self._write_manifest(fd, keys)
            self._keys = tuple(keys)
            for key in dropped:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(key.key_id + KEY_SUFFIX, dir_fd=fd)
        if added is not None:
            log.info(
                "published the next JWT signing key %s of %s; it signs from %s",
                added.key_id,
                self.trust_domain,
                added.signs_from.isoformat(timespec="seconds"),
            )
        for key in dropped:
            log.info("dropped the retired JWT signing key %s of %s and deleted it", key.key_id, self.trust_domain)
        return True

    # -- the directory ---------------------------------------------------------------------------------------

    @contextlib.contextmanager
    def _state_dir(self) -> Iterator[int]:
        try:  # the configured path may be a link (the operator's choice); nothing inside it is followed
            ensure_private_dir(self.state_dir)
            with owned_dir(self.state_dir.resolve()) as fd:
                yield fd
        except OSError as err:
            raise StateError(f"{self.state_dir}: {err.strerror or err}") from None

    @contextlib.contextmanager
    def _open(self, state_fd: int) -> Iterator[int]:
        try:
            with owned_dir(DIRECTORY, dir_fd=state_fd, shown=str(self.path)) as fd:
                if os.fstat(fd).st_mode & 0o077:
                    os.fchmod(fd, 0o700)
                yield fd
        except OSError as err:
            raise StateError(f"{self.path}: {err.strerror or err}") from None

    def _remove_if_empty(self, state_fd: int) -> None:
        """A ``jwt`` directory without a manifest: made by someone else, or left by an older run. Empty, it is
        taken over; with files in it, it is refused (they may be keys that validators still trust)."""
        with self._open(state_fd) as fd:
            names = os.listdir(fd)
        if names:
            raise StateError(
                f"{self.path} holds files but no {MANIFEST}: refusing to guess which keys are in use "
                "(move the directory away to start a new key set)"
            )
        try:
            os.rmdir(DIRECTORY, dir_fd=state_fd)
        except OSError as err:
            raise StateError(f"{self.path}: {err.strerror or err}") from None

    def _create(self, state_fd: int) -> list[SigningKey]:
        now = self.clock()
        key = ec.generate_private_key(ec.SECP256R1())
        first = SigningKey(thumbprint(key.public_key()), key, now, now, now + self.settings.key_ttl)
        staging = f".{DIRECTORY}.{secrets.token_hex(8)}"
        try:
            os.mkdir(staging, 0o700, dir_fd=state_fd)
            with owned_dir(staging, dir_fd=state_fd) as fd:
                self._write_key(fd, first)
                self._write_manifest(fd, [first])
            os.rename(staging, DIRECTORY, src_dir_fd=state_fd, dst_dir_fd=state_fd)
        except OSError as err:
            with contextlib.suppress(OSError):
                shutil.rmtree(staging, dir_fd=state_fd)
            raise StateError(f"{self.path}: cannot create the JWT key set: {err.strerror or err}") from None
        return [first]

    def _clean_staging(self, state_fd: int) -> None:
        for name in os.listdir(state_fd):
            if name.startswith(f".{DIRECTORY}.") and _lstat(name, state_fd) is not None:
                with contextlib.suppress(OSError):
                    shutil.rmtree(name, dir_fd=state_fd)

    def _write_key(self, fd: int, key: SigningKey) -> None:
        write_private_at(fd, key.key_id + KEY_SUFFIX, private_key_pem(key.private_key), shown=str(self.path))

    def _write_manifest(self, fd: int, keys: Sequence[SigningKey]) -> None:
        manifest = {
            "version": 1,
            "trust_domain": self.trust_domain.name,
            "keys": [
                {
                    "kid": k.key_id,
                    "published": k.published.isoformat(),
                    "signs_from": k.signs_from.isoformat(),
                    "signs_until": k.signs_until.isoformat(),
                }
                for k in keys
            ],
        }
        write_private_at(fd, MANIFEST, json.dumps(manifest, indent=2).encode() + b"\n", shown=str(self.path))

    # -- loading ---------------------------------------------------------------------------------------------

    def _load(self, fd: int) -> list[SigningKey]:
        where = self.path / MANIFEST
        try:
            manifest = json.loads(self._read(fd, MANIFEST))
        except ValueError:
            raise StateError(f"{where} is corrupt: not JSON") from None
        entries = self._check_manifest(manifest, where)
        keys = [self._load_key(fd, entry, where) for entry in entries]
        self._remove_leftovers(fd, {k.key_id for k in keys})
        return keys

    def _check_manifest(self, manifest: Any, where: Path) -> list[dict[str, Any]]:
        if not isinstance(manifest, dict) or manifest.get("version") != 1:
            raise StateError(f"{where} is corrupt: not a version 1 manifest")
        if manifest.get("trust_domain") != self.trust_domain.name:
            raise StateError(
                f"{where} belongs to trust domain {manifest.get('trust_domain')!r}, not {self.trust_domain}"
            )
        entries = manifest.get("keys")
        if not isinstance(entries, list) or not 0 < len(entries) <= MAX_KEYS:
            raise StateError(f"{where} is corrupt: 'keys' must list 1 to {MAX_KEYS} keys")
        checked: list[dict[str, Any]] = []
        for index, entry in enumerate(entries):
            at = f"{where} is corrupt: keys[{index}]"
            if not isinstance(entry, dict) or set(entry) != {"kid", "published", "signs_from", "signs_until"}:
                raise StateError(f"{at} must have exactly kid, published, signs_from, signs_until")
            kid = entry["kid"]
            if not isinstance(kid, str) or not _KID.fullmatch(kid):
                raise StateError(f"{at}: 'kid' is not a key thumbprint")
            times = {name: _time(entry[name], f"{at}: '{name}'") for name in ("published", "signs_from", "signs_until")}
            if not times["published"] <= times["signs_from"] < times["signs_until"]:
                raise StateError(f"{at}: times must satisfy published <= signs_from < signs_until")
            if checked and checked[-1]["signs_until"] != times["signs_from"]:
                raise StateError(f"{at}: its window must start where keys[{index - 1}]'s ends")
            if any(c["kid"] == kid for c in checked):
                raise StateError(f"{at}: key id {kid} appears twice")
            checked.append({"kid": kid, **times})
        return checked

    def _load_key(self, fd: int, entry: dict[str, Any], where: Path) -> SigningKey:
        name = entry["kid"] + KEY_SUFFIX
        path = self.path / name
        try:
            key = load_private_key(self._read(fd, name))
        except ValueError as err:
            raise StateError(f"{path} is corrupt: {err}") from None
        if not isinstance(key, ec.EllipticCurvePrivateKey) or key.curve.name != "secp256r1":
            raise StateError(f"{path} is not an ECDSA P-256 key")
        actual = thumbprint(key.public_key())
        if actual != entry["kid"]:
            raise StateError(
                f"{path} does not hold the key {entry['kid']} that {where.name} names (its key is {actual}): "
                "the file was replaced or damaged; refusing to use it"
            )
        return SigningKey(entry["kid"], key, entry["published"], entry["signs_from"], entry["signs_until"])

    def _read(self, fd: int, name: str) -> bytes:
        """A file of this directory: a regular file of our uid, 0600 or tighter, not through a link."""
        path = self.path / name
        try:
            handle = os.open(name, _READ_FLAGS, dir_fd=fd)
        except FileNotFoundError:
            raise StateError(f"{path} is missing") from None
        except OSError as err:
            raise StateError(f"{path}: {err.strerror or err} (a symbolic link is refused)") from None
        with os.fdopen(handle, "rb") as file:
            st = os.fstat(file.fileno())
            if not stat.S_ISREG(st.st_mode):
                raise StateError(f"{path} is not a regular file")
            if st.st_uid != os.geteuid():
                raise StateError(f"{path} is owned by uid {st.st_uid}, not this server's uid {os.geteuid()}")
            if st.st_mode & 0o077:
                raise StateError(
                    f"{path} is open to group or others (mode {stat.S_IMODE(st.st_mode):04o}): it must be 0600"
                )
            data = file.read(_MAX_FILE_BYTES + 1)
        if len(data) > _MAX_FILE_BYTES:
            raise StateError(f"{path} is larger than {_MAX_FILE_BYTES} bytes")
        return data

    def _remove_leftovers(self, fd: int, kept: set[str]) -> None:
        """Key files the manifest does not name (an interrupted publish or drop), and temporary files."""
        for name in os.listdir(fd):
            leftover_key = name.endswith(KEY_SUFFIX) and _KID.fullmatch(name[: -len(KEY_SUFFIX)]) is not None
            if (leftover_key and name[: -len(KEY_SUFFIX)] not in kept) or (
                name.startswith(".") and name.endswith(".tmp")
            ):
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(name, dir_fd=fd)
                log.info("deleted %s, which %s does not name", self.path / name, MANIFEST)


def _lstat(name: str, dir_fd: int) -> os.stat_result | None:
    try:
        return os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
    except FileNotFoundError:
        return None


def _has(name: str, state_fd: int, directory: str) -> bool:
    try:
        with owned_dir(directory, dir_fd=state_fd) as fd:
            return _lstat(name, fd) is not None
    except OSError:
        return True  # not ours to judge here: opening it again reports what is wrong


def _time(value: Any, at: str) -> datetime:
    try:
        moment = datetime.fromisoformat(value) if isinstance(value, str) else None
    except ValueError:
        moment = None
    if moment is None or moment.tzinfo is None:
        raise StateError(f"{at} is not an ISO 8601 time with a timezone")
    return moment
