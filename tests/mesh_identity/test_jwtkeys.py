"""The JWT-SVID signing keys (mesh_identity.jwtkeys): issuing, rotation with overlap over a fake clock, keys
kept across restarts, and the key directory on disk (modes, links, damage)."""

from __future__ import annotations

import json
import stat
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from mesh_identity.config import JwtConfig
from mesh_identity.errors import ConfigError, StateError
from mesh_identity.jwtkeys import MANIFEST, JwtAuthority
from mesh_identity.jwtsvid import JwtBundle, JwtSvid, JwtSvidError, validate_jwt_svid
from mesh_identity.keys import private_key_pem
from mesh_identity.spiffe import SpiffeId, TrustDomain

TD = TrustDomain("example.org")
WEB = SpiffeId.parse("spiffe://example.org/ns/shop/sa/web")
T0 = datetime(2030, 1, 1, tzinfo=UTC)
SETTINGS = JwtConfig()  # ttl 5m, max_ttl 1h, key_ttl 24h
HOUR = timedelta(hours=1)


class FakeClock:
    def __init__(self, now: datetime = T0) -> None:
        self.now = now

    def __call__(self) -> datetime:
        return self.now

    def advance(self, delta: timedelta) -> None:
        self.now += delta


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def state(tmp_path: Path) -> Path:
    return tmp_path / "state"


def started(state: Path, clock: FakeClock, settings: JwtConfig = SETTINGS) -> JwtAuthority:
    authority = JwtAuthority(TD, state, settings=settings, clock=clock)
    authority.start()
    return authority


def valid(svid: JwtSvid, bundle: JwtBundle, now: datetime, audience: str = "db") -> bool:
    try:
        validate_jwt_svid(svid.token, audience, {TD: bundle}, now)
    except JwtSvidError:
        return False
    return True


def key_files(state: Path) -> set[str]:
    return {p.stem for p in (state / "jwt").glob("*.key")}


# -- issuing -------------------------------------------------------------------------------------------------


def test_issue_defaults_to_five_minutes_and_validates(state: Path, clock: FakeClock) -> None:
    authority = started(state, clock)
    svid = authority.issue(WEB, ["db"])
    assert (svid.issued_at, svid.expiry) == (T0, T0 + timedelta(minutes=5))
    assert svid.key_id == authority.keys[0].key_id
    assert validate_jwt_svid(svid.token, "db", {TD: authority.bundle()}, T0).spiffe_id == WEB
    assert authority.issue(WEB, ["db"], ttl=HOUR).expiry == T0 + HOUR  # max_ttl itself is allowed


@pytest.mark.parametrize(
    ("spiffe_id", "audience", "ttl", "message"),
    [
        (WEB, ["db"], timedelta(hours=2), "a JWT-SVID lifetime of 2h is longer than jwt.max_ttl (1h)"),
        (WEB, ["db"], HOUR + timedelta(seconds=1), "a JWT-SVID lifetime of 1h1s is longer than jwt.max_ttl (1h)"),
        (WEB, ["db"], timedelta(0), "a JWT-SVID lifetime must be positive, not 0:00:00"),
        (WEB, [], None, "a JWT-SVID needs at least one audience (a list of strings)"),
        (WEB, "db", None, "a JWT-SVID needs at least one audience (a list of strings)"),
        (WEB, ["db", ""], None, "audience '' is not a non-empty string"),
        (
            SpiffeId.parse("spiffe://other.org/web"),
            ["db"],
            None,
            "spiffe://other.org/web is not an identity of trust domain example.org",
        ),
    ],
)
def test_issue_refuses(
    state: Path, clock: FakeClock, spiffe_id: SpiffeId, audience: list[str], ttl: timedelta | None, message: str
) -> None:
    authority = started(state, clock)
    with pytest.raises(JwtSvidError) as err:
        authority.issue(spiffe_id, audience, ttl)
    assert str(err.value) == message


def test_nothing_before_start(state: Path, clock: FakeClock) -> None:
    authority = JwtAuthority(TD, state, settings=SETTINGS, clock=clock)
    for call in (lambda: authority.issue(WEB, ["db"]), authority.bundle, authority.rotate_if_due):
        with pytest.raises(JwtSvidError, match=r"the JWT authority of example\.org is not started"):
            call()
    assert not state.exists()


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        (JwtConfig(ttl=timedelta(hours=2)), "jwt.ttl must be positive and at most jwt.max_ttl"),
        (JwtConfig(key_ttl=timedelta(hours=1)), "jwt.key_ttl must be at least twice jwt.max_ttl"),
    ],
)
def test_settings_are_checked(state: Path, settings: JwtConfig, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        JwtAuthority(TD, state, settings=settings)


# -- rotation ------------------------------------------------------------------------------------------------


def test_next_key_is_published_half_a_key_ttl_before_it_signs(state: Path, clock: FakeClock) -> None:
    authority = started(state, clock)
    first = authority.keys[0].key_id
    assert authority.next_rotation() == T0 + timedelta(hours=12)
    clock.now = T0 + timedelta(hours=12) - timedelta(seconds=1)
    assert authority.rotate_if_due() is False
    assert set(authority.bundle().keys) == {first}
    clock.now = T0 + timedelta(hours=12)
    assert authority.rotate_if_due() is True
    second = authority.keys[1].key_id
    assert set(authority.bundle().keys) == {first, second}
    assert authority.keys[1].signs_from == T0 + timedelta(hours=24)
    assert key_files(state) == {first, second}
    # published, but the current key still signs until its key_ttl is over
    clock.now = T0 + timedelta(hours=24) - timedelta(seconds=1)
    late = authority.issue(WEB, ["db"], ttl=HOUR)
    assert late.key_id == first
    clock.now = T0 + timedelta(hours=24)
    assert authority.issue(WEB, ["db"]).key_id == second
    assert authority.rotate_if_due() is False  # the hand-over changes nothing in the bundle
    # the retired key stays until the last token it could have signed has expired, then it is deleted
    assert authority.next_rotation() == T0 + timedelta(hours=25)
    clock.now = late.expiry - timedelta(seconds=1)
    assert authority.rotate_if_due() is False
    assert valid(late, authority.bundle(), clock.now)
    clock.now = T0 + timedelta(hours=25) - timedelta(seconds=1)
    assert authority.rotate_if_due() is False
    clock.now = T0 + timedelta(hours=25)
    assert authority.rotate_if_due() is True
    assert set(authority.bundle().keys) == {second}
    assert key_files(state) == {second}
    assert authority.next_rotation() == T0 + timedelta(hours=36)


def test_every_token_validates_with_every_bundle_of_its_lifetime(state: Path, clock: FakeClock) -> None:
    """Three days in ten-minute steps, a max_ttl token issued at each: whatever bundle a validator holds from
    a token's issue to its expiry verifies it, and every key was published half a key_ttl before it signed."""
    settings = JwtConfig(ttl=timedelta(minutes=5), max_ttl=HOUR, key_ttl=timedelta(hours=4))
    authority = started(state, clock, settings)
    live: list[JwtSvid] = []
    published: dict[str, datetime] = {}
    first_signed: dict[str, datetime] = {}
    rotations = 0
    for _ in range(3 * 24 * 6):
        if clock.now >= authority.next_rotation():
            rotations += authority.rotate_if_due()
        bundle = authority.bundle()
        for kid in bundle.keys:
            published.setdefault(kid, clock.now)
        svid = authority.issue(WEB, ["db"], ttl=HOUR)
        first_signed.setdefault(svid.key_id, clock.now)
        live = [s for s in [*live, svid] if s.expiry > clock.now]
        assert all(valid(s, bundle, clock.now) for s in live)
        assert len(bundle.keys) <= 3
        assert key_files(state) == set(bundle.keys)
        clock.advance(timedelta(minutes=10))
    assert rotations >= 30 and len(first_signed) >= 18  # a new key every 4h, each one dropped again
    for kid, since in first_signed.items():
        if since != T0:  # the very first key signs from the start: there was no bundle before it
            assert since - published[kid] >= timedelta(hours=2), kid


def test_after_a_long_downtime_the_old_key_signs_on_until_the_next_has_been_published(
    state: Path, clock: FakeClock
) -> None:
    first = started(state, clock).keys[0].key_id
    clock.now = T0 + timedelta(days=3)  # the process was down through the hand-over
    authority = started(state, clock)
    assert authority.keys[0].key_id == first
    assert authority.issue(WEB, ["db"]).key_id == first
    nxt = authority.keys[1]
    assert nxt.published == clock.now and nxt.signs_from == clock.now + timedelta(hours=12)
    clock.now = nxt.signs_from
    assert authority.issue(WEB, ["db"]).key_id == nxt.key_id


def test_issue_fails_closed_when_rotation_is_overdue(state: Path, clock: FakeClock) -> None:
    authority = started(state, clock)
    clock.now = T0 + timedelta(hours=24)  # nobody called rotate_if_due: no key may sign now
    with pytest.raises(JwtSvidError) as err:
        authority.issue(WEB, ["db"])
    assert str(err.value) == (
        "no JWT signing key of example.org signs at 2030-01-02T00:00:00+00:00: rotation was due at "
        "2030-01-01T12:00:00+00:00"
    )
    assert authority.rotate_if_due() is True
    assert authority.issue(WEB, ["db"]).key_id == authority.keys[0].key_id


# -- restarts and the directory ------------------------------------------------------------------------------


def test_restart_keeps_keys_schedule_and_tokens(state: Path, clock: FakeClock) -> None:
    authority = started(state, clock)
    clock.now = T0 + timedelta(hours=12)
    authority.rotate_if_due()
    svid = authority.issue(WEB, ["db"])
    again = started(state, clock)
    assert again.keys == authority.keys
    assert again.bundle() == authority.bundle()
    assert valid(svid, again.bundle(), clock.now)
    assert again.issue(WEB, ["db"]).key_id == svid.key_id
    assert again.next_rotation() == authority.next_rotation()


def test_modes_are_0700_and_0600(state: Path, clock: FakeClock) -> None:
    authority = started(state, clock)
    clock.now = T0 + timedelta(hours=12)
    authority.rotate_if_due()
    directory = state / "jwt"
    assert stat.S_IMODE(directory.stat().st_mode) == 0o700
    files = sorted(directory.iterdir())
    assert [p.name for p in files if p.suffix == ".json"] == [MANIFEST] and len(files) == 3
    assert {stat.S_IMODE(p.stat().st_mode) for p in files} == {0o600}
    assert not [p for p in state.iterdir() if p.name != "jwt"]  # no staging directory left


def test_a_loose_directory_is_tightened(state: Path, clock: FakeClock) -> None:
    started(state, clock)
    (state / "jwt").chmod(0o755)
    started(state, clock)
    assert stat.S_IMODE((state / "jwt").stat().st_mode) == 0o700


def _key_path(state: Path) -> Path:
    return next((state / "jwt").glob("*.key"))


def _replace_with_other_key(path: Path) -> None:
    path.write_bytes(private_key_pem(ec.generate_private_key(ec.SECP256R1())))


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        (lambda p: p.write_bytes(b"garbage"), r"\.key is corrupt: not a valid PEM private key$"),
        (lambda p: p.write_bytes(p.read_bytes()[:100]), r"\.key is corrupt: not a valid PEM private key$"),
        (
            _replace_with_other_key,
            r"\.key does not hold the key [\w-]{43} that keys\.json names \(its key is [\w-]{43}\): the file was "
            r"replaced or damaged; refusing to use it$",
        ),
        (
            lambda p: p.write_bytes(private_key_pem(rsa.generate_private_key(public_exponent=65537, key_size=2048))),
            r"\.key is not an ECDSA P-256 key$",
        ),
        (lambda p: p.unlink(), r"\.key is missing$"),
        (lambda p: p.chmod(0o644), r"\.key is open to group or others \(mode 0644\): it must be 0600$"),
        (
            lambda p: (p.rename(p.with_suffix(".real")), p.symlink_to(p.with_suffix(".real"))),
            r"\.key: Too many levels of symbolic links \(a symbolic link is refused\)$",
        ),
        (lambda p: (p.parent / MANIFEST).write_text("{"), r"keys\.json is corrupt: not JSON$"),
        (
            lambda p: (p.parent / MANIFEST).write_text(json.dumps({"version": 2})),
            r"keys\.json is corrupt: not a version 1 manifest$",
        ),
        (
            lambda p: _edit_manifest(p, trust_domain="other.org"),
            r"keys\.json belongs to trust domain 'other\.org', not example\.org$",
        ),
        (lambda p: _edit_manifest(p, keys=[]), r"keys\.json is corrupt: 'keys' must list 1 to 64 keys$"),
        (
            lambda p: _edit_key(p, kid="../../etc/x"),
            r"keys\.json is corrupt: keys\[0\]: 'kid' is not a key thumbprint$",
        ),
        (
            lambda p: _edit_key(p, signs_until="yesterday"),
            r"keys\.json is corrupt: keys\[0\]: 'signs_until' is not an ISO 8601 time with a timezone$",
        ),
        (
            lambda p: _edit_key(p, signs_until="2030-01-02T00:00:00"),
            r"keys\.json is corrupt: keys\[0\]: 'signs_until' is not an ISO 8601 time with a timezone$",
        ),
        (
            lambda p: _edit_key(p, signs_until="2029-01-01T00:00:00+00:00"),
            r"keys\.json is corrupt: keys\[0\]: times must satisfy published <= signs_from < signs_until$",
        ),
        (
            lambda p: _edit_key(p, extra=1),
            r"keys\.json is corrupt: keys\[0\] must have exactly kid, published, signs_from, signs_until$",
        ),
        (
            lambda p: (p.parent / MANIFEST).unlink(),
            r"jwt holds files but no keys\.json: refusing to guess which keys are in use \(move the directory away "
            r"to start a new key set\)$",
        ),
    ],
)
def test_damage_is_a_clear_error_and_nothing_is_replaced(state: Path, clock: FakeClock, damage, message: str) -> None:
    started(state, clock)
    path = _key_path(state)
    damage(path)
    before = {p.name: p.read_bytes() if not p.is_symlink() else b"link" for p in (state / "jwt").iterdir()}
    with pytest.raises(StateError, match=message):
        started(state, clock)
    after = {p.name: p.read_bytes() if not p.is_symlink() else b"link" for p in (state / "jwt").iterdir()}
    assert after == before


def _edit_manifest(key: Path, **changes: object) -> None:
    path = key.parent / MANIFEST
    path.write_text(json.dumps({**json.loads(path.read_text()), **changes}))


def _edit_key(key: Path, **changes: object) -> None:
    path = key.parent / MANIFEST
    manifest = json.loads(path.read_text())
    manifest["keys"][0].update(changes)
    path.write_text(json.dumps(manifest))


def test_windows_that_overlap_are_refused(state: Path, clock: FakeClock) -> None:
    authority = started(state, clock)
    clock.now = T0 + timedelta(hours=12)
    authority.rotate_if_due()
    path = state / "jwt" / MANIFEST
    manifest = json.loads(path.read_text())
    manifest["keys"][1]["signs_from"] = (T0 + timedelta(hours=20)).isoformat()
    path.write_text(json.dumps(manifest))
    with pytest.raises(StateError, match=r"keys\[1\]: its window must start where keys\[0\]'s ends$"):
        started(state, clock)


def test_a_linked_key_directory_is_refused(state: Path, clock: FakeClock, tmp_path: Path) -> None:
    started(state, clock)
    (state / "jwt").rename(tmp_path / "elsewhere")
    (state / "jwt").symlink_to(tmp_path / "elsewhere")
    with pytest.raises(StateError, match=r"jwt is a symbolic link: refusing to follow it$"):
        started(state, clock)


def test_leftovers_of_an_interrupted_step_are_deleted(state: Path, clock: FakeClock) -> None:
    authority = started(state, clock)
    directory = state / "jwt"
    unpublished = directory / ("A" * 43 + ".key")  # written before a manifest that never came
    unpublished.write_bytes(private_key_pem(ec.generate_private_key(ec.SECP256R1())))
    temporary = directory / ".keys.json.0123456789abcdef.tmp"
    temporary.write_bytes(b"{")
    (state / ".jwt.0123456789abcdef").mkdir()  # a first key set that was never renamed into place
    unrelated = directory / "notes.txt"
    unrelated.write_text("kept")
    again = started(state, clock)
    assert again.keys == authority.keys
    assert not unpublished.exists() and not temporary.exists() and unrelated.exists()
    assert not (state / ".jwt.0123456789abcdef").exists()


def test_an_empty_key_directory_is_taken_over(state: Path, clock: FakeClock) -> None:
    (state / "jwt").mkdir(parents=True, mode=0o755)
    authority = started(state, clock)
    assert len(authority.keys) == 1 and key_files(state) == {authority.keys[0].key_id}


def test_a_linked_state_dir_is_followed_but_nothing_inside_it(state: Path, clock: FakeClock, tmp_path: Path) -> None:
    real = tmp_path / "real-state"
    real.mkdir(mode=0o700)
    state.symlink_to(real)  # the operator's configured path: followed
    authority = started(state, clock)
    assert key_files(real) == {authority.keys[0].key_id}
