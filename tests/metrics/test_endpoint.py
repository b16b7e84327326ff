"""The monitoring and admin listener over real HTTP on a loopback port: health, readiness, status, the token."""

from __future__ import annotations

import json
import stat
import urllib.error
import urllib.request
from datetime import timedelta

import pytest

from mesh_identity.assembly import build_service
from mesh_identity.server.service import ADMIN_ADDR, ADMIN_TOKEN, DEFAULT_LISTEN
from tests.rotation.helpers import FakeClock, Recorder, ids, make_config, provider_for

TEAM = ids("web", "api")


def call(url: str, *, method: str = "GET", headers: dict[str, str] | None = None) -> tuple[int, dict[str, str], str]:
    request = urllib.request.Request(url, method=method, data=b"" if method == "POST" else None, headers=headers or {})
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status, dict(response.headers), response.read().decode()
    except urllib.error.HTTPError as err:
        return err.code, dict(err.headers), err.read().decode()


@pytest.fixture
def clock():
    return FakeClock()


@pytest.fixture
def service(tmp_path, clock):
    config = make_config(tmp_path, identities=TEAM)
    service = build_service(config, provider_for(config, clock=clock), events=Recorder(), clock=clock)
    service.start(paused=True)
    yield service
    service.stop()


def test_health_and_readiness(service):
    assert call(service.url + "/healthz")[::2] == (200, "ok\n")
    assert call(service.url + "/readyz")[::2] == (200, "ready\n")


def test_not_ready_once_the_intermediate_has_expired(service, clock):
    serial = service.authority.signing_ca.serial
    clock.advance(timedelta(days=2))
    assert call(service.url + "/readyz")[::2] == (503, f"not ready: the signing intermediate {serial} has expired\n")
    assert call(service.url + "/healthz")[0] == 200


def test_unhealthy_once_the_engine_stopped(service):
    service.engine.stop()
    assert call(service.url + "/healthz")[::2] == (503, "the rotation engine is not running\n")
    assert call(service.url + "/readyz")[::2] == (503, "not ready: the rotation engine is not running\n")


def test_status_lists_identities_chain_and_phase(service, clock):
    code, headers, body = call(service.url + "/status")
    assert (code, headers["Content-Type"]) == (200, "application/json")
    data = json.loads(body)
    assert data["trust_domain"] == "example.org"
    assert data["provider"]["name"] == "builtin" and data["provider"]["healthy"] is True
    assert data["ready"] is True and data["ca"]["phase"] == "steady"
    assert [i["subject"] for i in data["identities"]] == sorted(map(str, TEAM))
    web = service.engine.source(TEAM[1]).svid()
    (entry,) = [i for i in data["identities"] if i["subject"] == str(TEAM[1])]
    assert entry["serial"] == web.serial
    assert entry["not_after"] == web.not_after.isoformat().replace("+00:00", "Z")
    assert entry["seconds_left"] == (web.not_after - clock.now).total_seconds()
    assert (entry["failures"], entry["last_error"], entry["provider"]) == (0, None, "builtin")
    assert data["ca"]["intermediate"]["serial"] == service.authority.signing_ca.serial
    assert data["outage_budget_seconds"] == min(i["seconds_left"] for i in data["identities"])


@pytest.mark.parametrize(
    ("method", "path", "code", "body"),
    [
        ("GET", "/nope", 404, "no such endpoint: /nope\n"),
        ("POST", "/metrics", 405, "/metrics takes GET\n"),
        ("GET", "/admin/root/prepare", 405, "/admin/root/prepare takes POST\n"),
        ("POST", "/nope", 404, "no such endpoint: /nope\n"),
    ],
)
def test_wrong_paths_and_methods(service, method, path, code, body):
    assert call(service.url + path, method=method)[::2] == (code, body)


REFUSED = "admin requests need 'Authorization: Bearer <token>' with the token from <state_dir>/admin.token\n"


@pytest.mark.parametrize(
    "headers",
    [
        {},
        {"Authorization": "Bearer "},
        {"Authorization": "Basic dXNlcjpwYXNz"},
        {"Authorization": "Bearer not-the-token"},
    ],
)
def test_admin_refuses_without_the_token(service, headers):
    code, reply_headers, body = call(service.url + "/admin/root/prepare", method="POST", headers=headers)
    assert (code, body) == (401, REFUSED)
    assert reply_headers["WWW-Authenticate"] == 'Bearer realm="mesh-identity admin"'
    assert service.roots.phase() == "steady"


def test_admin_with_the_token(service):
    token = (service.config.state_dir / ADMIN_TOKEN).read_text().strip()
    auth = {"Authorization": f"Bearer {token}"}
    code, _, body = call(service.url + "/admin/root/activate", method="POST", headers=auth)
    assert code == 409
    assert json.loads(body) == {
        "error": "cannot activate: the root rotation is in phase 'steady', not 'prepared'; next step: "
        "mesh-identity ca rotate-root prepare"
    }
    code, _, body = call(service.url + "/admin/root/rewind", method="POST", headers=auth)
    assert (code, body) == (404, "no root rotation step 'rewind' (use prepare, activate, retire)\n")
    code, _, body = call(service.url + "/admin/root/prepare", method="POST", headers=auth)
    assert code == 200 and json.loads(body)["message"].startswith("prepared root ")
    assert service.roots.phase() == "prepared"


def test_token_and_address_files(service, tmp_path):
    state = service.config.state_dir
    token = state / ADMIN_TOKEN
    assert stat.S_IMODE(token.stat().st_mode) == 0o600
    assert len(token.read_text().strip()) >= 40
    assert (state / ADMIN_ADDR).read_text().strip() == service.url
    assert service.url.startswith("http://127.0.0.1:")
    service.stop()
    assert not token.exists() and not (state / ADMIN_ADDR).exists()


def test_a_new_token_on_every_start(tmp_path):
    config = make_config(tmp_path, identities=TEAM)
    tokens = []
    for _ in range(2):
        service = build_service(config, provider_for(config))
        service.start(paused=True)
        tokens.append((config.state_dir / ADMIN_TOKEN).read_text())
        service.stop()
    assert tokens[0] != tokens[1]


def test_the_default_listener_is_loopback(tmp_path):
    from mesh_identity.config import parse_config

    config = parse_config({"trust_domain": "example.org", "state_dir": "state"}, tmp_path)
    assert build_service(config, provider_for(config)).listen == DEFAULT_LISTEN
    assert DEFAULT_LISTEN.host == "127.0.0.1"
