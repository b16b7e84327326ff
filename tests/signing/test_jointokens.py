"""Join tokens: made for a host, stored as a hash only, redeemed once before they expire; the CLI around them."""

from __future__ import annotations

import json
import stat
import threading
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from mesh_identity.cli.main import main
from mesh_identity.errors import StateError
from mesh_identity.jointokens import LOCK, MAX_TTL, STORE, JoinTokenError, JoinTokens, token_digest

NOW = datetime(2026, 12, 1, 12, 0, tzinfo=UTC)


class Clock:
    def __init__(self, now: datetime = NOW) -> None:
        self.now = now

    def __call__(self) -> datetime:
        return self.now


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def tokens(tmp_path: Path, clock: Clock) -> JoinTokens:
    return JoinTokens(tmp_path / "state", clock=clock)


def test_a_token_is_redeemed_once_for_its_host(tokens: JoinTokens) -> None:
    token = tokens.create("host-a", timedelta(minutes=15))
    assert tokens.peek(token, NOW) == "host-a"
    assert tokens.redeem(token, NOW + timedelta(minutes=1)) == "host-a"
    with pytest.raises(
        JoinTokenError,
        match=r"^the join token [0-9a-f]{12} for node 'host-a' was already used at "
        r"2026-12-01T12:01:00Z$",
    ) as err:
        tokens.redeem(token, NOW + timedelta(minutes=2))
    assert err.value.reason == "already used"
    with pytest.raises(JoinTokenError, match="already used"):
        tokens.peek(token, NOW + timedelta(minutes=2))


def test_an_expired_token_is_refused(tokens: JoinTokens) -> None:
    token = tokens.create("host-a", timedelta(minutes=15))
    with pytest.raises(JoinTokenError, match=r"for node 'host-a' expired at 2026-12-01T12:15:00Z$") as err:
        tokens.redeem(token, NOW + timedelta(minutes=15))
    assert err.value.reason == "expired"
    assert tokens.list()[0].used is None  # a refused token is not used up


def test_an_unknown_token_is_refused(tokens: JoinTokens) -> None:
    tokens.create("host-a", timedelta(minutes=15))
    other = JoinTokens(tokens.state_dir.parent / "other").create("host-a", timedelta(minutes=15))
    with pytest.raises(JoinTokenError, match=r"^the join token is unknown to this control plane$") as err:
        tokens.redeem(other, NOW)
    assert err.value.reason == "unknown"


@pytest.mark.parametrize("bad", ["", "mijt-short", "x" * 48, "mijt-" + "a" * 42 + "\n", "mijt-" + "é" * 43])
def test_a_malformed_token_is_refused_before_any_lookup(tokens: JoinTokens, bad: str) -> None:
    with pytest.raises(JoinTokenError, match="malformed") as err:
        tokens.redeem(bad, NOW)
    assert err.value.reason == "malformed"


def test_the_store_holds_only_hashes_and_is_private(tokens: JoinTokens) -> None:
    token = tokens.create("host-a", timedelta(minutes=15))
    path = tokens.state_dir / STORE
    text = path.read_text()
    assert token not in text
    assert token[len("mijt-") :] not in text
    document = json.loads(text)
    assert [t["sha256"] for t in document["tokens"]] == [token_digest(token)]
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert stat.S_IMODE((tokens.state_dir / LOCK).stat().st_mode) == 0o600
    assert stat.S_IMODE(tokens.state_dir.stat().st_mode) == 0o700


@pytest.mark.parametrize(
    ("host", "ttl", "message"),
    [
        ("host a", timedelta(minutes=1), "node 'host a' is not a host name"),
        ("-host", timedelta(minutes=1), "node '-host' is not a host name"),
        ("h" * 200, timedelta(minutes=1), "is not a host name"),
        ("host-a", timedelta(0), "TTL 0:00:00 is not positive"),
        ("host-a", MAX_TTL + timedelta(seconds=1), "is longer than the 1 day, 0:00:00 a join token may live"),
    ],
)
def test_bad_hosts_and_ttls_are_refused(tokens: JoinTokens, host: str, ttl: timedelta, message: str) -> None:
    with pytest.raises(JoinTokenError, match=message):
        tokens.create(host, ttl)
    assert tokens.list() == []


def test_two_concurrent_redemptions_of_one_token_give_it_once(tokens: JoinTokens) -> None:
    token = tokens.create("host-a", timedelta(minutes=15))
    results: list[str] = []
    barrier = threading.Barrier(8)

    def redeem() -> None:
        barrier.wait()
        try:
            results.append(tokens.redeem(token, NOW))
        except JoinTokenError as err:
            results.append(err.reason)

    threads = [threading.Thread(target=redeem) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sorted(results) == ["already used"] * 7 + ["host-a"]


def test_writers_keep_each_others_tokens(tokens: JoinTokens) -> None:
    made: list[str] = []
    lock = threading.Lock()

    def create(index: int) -> None:
        token = JoinTokens(tokens.state_dir, clock=tokens.clock).create(f"host-{index}", timedelta(minutes=5))
        with lock:
            made.append(token)

    threads = [threading.Thread(target=create, args=(i,)) for i in range(10)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sorted(t.digest for t in tokens.list()) == sorted(token_digest(t) for t in made)


def test_old_tokens_are_dropped_at_the_next_write(tokens: JoinTokens, clock: Clock) -> None:
    used = tokens.create("host-a", timedelta(minutes=15))
    tokens.redeem(used, NOW)
    tokens.create("host-b", timedelta(minutes=15))
    clock.now = NOW + timedelta(days=2)
    tokens.create("host-c", timedelta(minutes=15))
    assert [t.host for t in tokens.list()] == ["host-c"]


def test_a_corrupt_store_is_a_state_error_naming_the_file(tokens: JoinTokens) -> None:
    tokens.create("host-a", timedelta(minutes=15))
    (tokens.state_dir / STORE).write_text('{"version": 1, "tokens": [{"sha256": "zz"}]}')
    with pytest.raises(StateError, match=r"join-tokens.json: not a valid join token store"):
        tokens.list()


# -- the CLI ---------------------------------------------------------------------------------------------------


def _config(tmp_path: Path, signing: bool = True) -> Path:
    path = tmp_path / "config.yaml"
    text = "trust_domain: example.org\nstate_dir: ./state\n"
    if signing:
        text += "signing:\n  listen: 127.0.0.1:0\n  attest_listen: 127.0.0.1:1\n"
    path.write_text(text)
    return path


def test_token_create_prints_only_the_token_and_list_never_shows_it(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = str(_config(tmp_path))
    assert main(["token", "create", "--node", "host-a", "--ttl", "10m", "--config", config]) == 0
    out = capsys.readouterr().out
    token = out.strip()
    assert out == token + "\n"
    assert JoinTokens(tmp_path / "state").peek(token, datetime.now(UTC)) == "host-a"
    assert main(["token", "list", "--config", config]) == 0
    listing = capsys.readouterr().out
    assert token not in listing
    assert token[len("mijt-") :][:12] not in listing
    header, row = listing.splitlines()
    assert header.split() == ["HOST", "EXPIRES", "STATE", "USED", "SHA256"]
    assert row.split()[0] == "host-a"
    assert row.split()[2:] == ["valid", "-", token_digest(token)[:12]]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--ttl", "soon"], "--ttl: 'soon' is not a duration"),
        (["--ttl", "2d"], "is longer than the 1 day, 0:00:00 a join token may live"),
        (["--node", "no such host"], "is not a host name"),
    ],
)
def test_token_create_refuses_bad_arguments(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], args: list[str], message: str
) -> None:
    argv = ["token", "create", "--node", "host-a", *args, "--config", str(_config(tmp_path))]
    assert main(argv) != 0
    captured = capsys.readouterr()
    assert captured.out == ""
    assert message in captured.err


def test_token_create_needs_the_signing_section(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["token", "create", "--node", "h", "--config", str(_config(tmp_path, signing=False))]) == 2
    assert "signing: not configured" in capsys.readouterr().err
