"""The ``/status`` document as typed values: what the server writes with ``to_json`` is what the CLI reads back
with ``from_json``, and a document that is wrong is refused with the key path of the first wrong value."""

from __future__ import annotations

import copy
import dataclasses
import json
import threading
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest

from mesh_identity.assembly import build_service
from mesh_identity.errors import MeshIdentityError
from mesh_identity.provider import Mode
from mesh_identity.rotation.roots import RootStep
from mesh_identity.server.client import ServerError, fetch_status
from mesh_identity.server.document import (
    CaStatus,
    CertStatus,
    ProviderStatus,
    RootStatus,
    StatusDocument,
    StatusDocumentError,
)
from mesh_identity.server.service import ADMIN_ADDR
from mesh_identity.svid import Fingerprint
from tests.rotation.helpers import FakeClock, Recorder, ids, make_config, provider_for

TEAM = ids("web", "api")


@pytest.fixture
def service(tmp_path):
    clock = FakeClock()
    config = make_config(tmp_path, identities=TEAM)
    service = build_service(config, provider_for(config, clock=clock), events=Recorder(), clock=clock)
    service.start(paused=True)
    yield service
    service.stop()


def round_trip(document: StatusDocument) -> StatusDocument:
    """Through the wire: to JSON text and back."""
    return StatusDocument.from_json(json.loads(json.dumps(document.to_json())))


# -- round trips --------------------------------------------------------------------------------------------


def test_a_running_service_round_trips(service):
    snapshot = service.snapshot()
    document = snapshot.document()
    assert round_trip(document) == document
    assert document.to_json() == snapshot.to_json() == service.status_json()
    assert StatusDocument.from_json(document.to_json()).to_json() == document.to_json()
    assert [identity.subject for identity in document.identities] == sorted(map(str, TEAM))
    assert document.ca.intermediate is not None
    assert document.ca.intermediate.serial == service.authority.signing_ca.serial
    assert document.provider.mode is Mode.INTERMEDIATE


def test_a_root_rotation_in_progress_round_trips(service):
    service.roots.step(RootStep.PREPARE)
    document = service.snapshot().document()
    assert (document.ca.phase, [root.new for root in document.ca.roots]) == ("prepared", [False, True])
    assert round_trip(document) == document


def test_every_optional_value_round_trips(service):
    """None where the document allows it, non-empty proxy lists, failures: the other branch of every value."""
    document = service.snapshot().document()
    (first, *rest) = document.identities
    variants = [
        dataclasses.replace(
            document,
            provider=dataclasses.replace(document.provider, healthy=None, checked_at=None, mode=Mode.PER_WORKLOAD),
            outage_budget_seconds=None,
            ready=False,
            ca=dataclasses.replace(
                document.ca, intermediate=None, proxies_missing_bundle=(), proxies_on_old_roots=("a", "b")
            ),
            identities=(
                dataclasses.replace(
                    first,
                    serial=None,
                    not_after=None,
                    seconds_left=None,
                    next_rotation=None,
                    failures=3,
                    last_error="upstream CA unreachable",
                ),
                *rest,
            ),
        ),
        dataclasses.replace(document, identities=(), ca=dataclasses.replace(document.ca, roots=())),
    ]
    for variant in variants:
        assert round_trip(variant) == variant


def test_fetch_status_reads_the_document_of_a_running_server(service):
    assert fetch_status(service.config) == service.snapshot().document()


# -- bad documents ------------------------------------------------------------------------------------------

GOOD: dict[str, Any] = {
    "generated_at": "2026-05-01T12:00:00Z",
    "trust_domain": "example.org",
    "provider": {
        "name": "builtin",
        "mode": "intermediate",
        "healthy": True,
        "detail": "signing CA valid until 2027-05-01T12:00:00Z",
        "checked_at": "2026-05-01T11:59:30.250000Z",
    },
    "ready": True,
    "ready_detail": "the authority can sign",
    "outage_budget_seconds": 3600.0,
    "ca": {
        "phase": "prepared",
        "next_step": "ready: mesh-identity ca rotate-root activate",
        "roots": [
            {
                "serial": "0a",
                "fingerprint": "aa" * 32,
                "not_before": "2026-05-01T11:59:00Z",
                "not_after": "2027-05-01T12:00:00Z",
                "seconds_left": 31536000.0,
                "signing": True,
                "new": False,
                "leaves": 2,
            },
            {
                "serial": "0b",
                "fingerprint": "bb" * 32,
                "not_before": "2026-05-01T11:59:00Z",
                "not_after": "2027-05-01T12:00:00Z",
                "seconds_left": 31536000.0,
                "signing": False,
                "new": True,
                "leaves": 0,
            },
        ],
        "intermediate": {
            "subject": "spiffe://example.org",
            "serial": "0c",
            "not_after": "2026-05-02T12:00:00Z",
            "seconds_left": 86400.0,
            "next_rotation": "2026-05-02T00:00:00Z",
            "provider": "builtin",
            "failures": 0,
            "last_error": None,
        },
        "leaves_outside_bundle": 0,
        "proxies_missing_bundle": None,
        "proxies_on_old_roots": ["web-1"],
        "proxies_lagging": ["web-1: rejected its Secret config: bad"],
    },
    "identities": [
        {
            "subject": "spiffe://example.org/ns/default/sa/web",
            "serial": None,
            "not_after": None,
            "seconds_left": None,
            "next_rotation": None,
            "provider": "builtin",
            "failures": 2,
            "last_error": "upstream CA unreachable",
        },
    ],
}


def at(*, year: int = 2026, day: int = 1, hour: int = 12) -> datetime:
    """A whole hour in May, UTC."""
    return datetime(year, 5, day, hour, tzinfo=UTC)


def test_the_good_document_reads_as_typed_values():
    root = {"not_before": datetime(2026, 5, 1, 11, 59, tzinfo=UTC), "not_after": at(year=2027)}
    assert StatusDocument.from_json(copy.deepcopy(GOOD)) == StatusDocument(
        generated_at=at(),
        trust_domain="example.org",
        provider=ProviderStatus(
            "builtin",
            Mode.INTERMEDIATE,
            True,
            "signing CA valid until 2027-05-01T12:00:00Z",
            datetime(2026, 5, 1, 11, 59, 30, 250000, tzinfo=UTC),
        ),
        ready=True,
        ready_detail="the authority can sign",
        outage_budget_seconds=3600.0,
        ca=CaStatus(
            phase="prepared",
            next_step="ready: mesh-identity ca rotate-root activate",
            roots=(
                RootStatus(
                    "0a", Fingerprint("aa" * 32), **root, seconds_left=31536000.0, signing=True, new=False, leaves=2
                ),
                RootStatus(
                    "0b", Fingerprint("bb" * 32), **root, seconds_left=31536000.0, signing=False, new=True, leaves=0
                ),
            ),
            intermediate=CertStatus(
                "spiffe://example.org", "0c", at(day=2), 86400.0, at(day=2, hour=0), "builtin", 0, None
            ),
            leaves_outside_bundle=0,
            proxies_missing_bundle=None,
            proxies_on_old_roots=("web-1",),
            proxies_lagging=("web-1: rejected its Secret config: bad",),
        ),
        identities=(
            CertStatus(
                "spiffe://example.org/ns/default/sa/web",
                None,
                None,
                None,
                None,
                "builtin",
                2,
                "upstream CA unreachable",
            ),
        ),
    )
    assert StatusDocument.from_json(copy.deepcopy(GOOD)).to_json() == GOOD


def test_unknown_keys_are_ignored():
    document = copy.deepcopy(GOOD)
    document["ca"]["roots"][0]["added_by_a_newer_server"] = 1
    assert StatusDocument.from_json(document) == StatusDocument.from_json(GOOD)


def _walk(document: Any, path: str) -> tuple[Any, str | int]:
    """The container holding ``path`` (``ca.roots[1].serial``) in ``document``, and its last key or index."""
    steps: list[str | int] = []
    for part in path.split("."):
        name, *indexes = part.replace("]", "").split("[")
        steps += [name, *map(int, indexes)]
    *parents, last = steps
    for step in parents:
        document = document[step]
    return document, last


def setting(path: str, value: Any) -> Callable[[dict[str, Any]], Any]:
    def change(document: dict[str, Any]) -> Any:
        parent, key = _walk(document, path)
        parent[key] = value
        return document

    return change


def deleting(path: str) -> Callable[[dict[str, Any]], Any]:
    def change(document: dict[str, Any]) -> Any:
        parent, key = _walk(document, path)
        del parent[key]
        return document

    return change


BAD = [
    # missing keys
    (deleting("trust_domain"), "trust_domain: missing"),
    (deleting("ca.roots[1].serial"), "ca.roots[1].serial: missing"),
    (deleting("ca.intermediate.failures"), "ca.intermediate.failures: missing"),
    (deleting("provider.checked_at"), "provider.checked_at: missing"),
    (deleting("ca.proxies_missing_bundle"), "ca.proxies_missing_bundle: missing"),
    # wrong types
    (setting("ca.roots[1].serial", 3), "ca.roots[1].serial: expected a string, got 3"),
    (setting("trust_domain", None), "trust_domain: expected a string, got null"),
    (setting("ready", 1), "ready: expected true or false, got 1"),
    (setting("provider.healthy", "yes"), 'provider.healthy: expected true or false, got "yes"'),
    (setting("identities[0].failures", True), "identities[0].failures: expected an integer, got true"),
    (setting("identities[0].failures", 2.0), "identities[0].failures: expected an integer, got 2.0"),
    (setting("ca.roots[0].leaves", "2"), 'ca.roots[0].leaves: expected an integer, got "2"'),
    (setting("outage_budget_seconds", "3600"), 'outage_budget_seconds: expected a number, got "3600"'),
    (setting("ca.roots[0].seconds_left", None), "ca.roots[0].seconds_left: expected a number, got null"),
    (setting("identities[0].last_error", ["boom"]), "identities[0].last_error: expected a string, got a list"),
    (setting("ca.proxies_on_old_roots", ["web-1", 2]), "ca.proxies_on_old_roots[1]: expected a string, got 2"),
    (setting("ca.proxies_on_old_roots", "web-1"), 'ca.proxies_on_old_roots: expected a list, got "web-1"'),
    (
        setting("provider.mode", "sideways"),
        'provider.mode: expected one of "intermediate", "per-workload", got "sideways"',
    ),
    # bad timestamps
    (
        setting("generated_at", "yesterday"),
        'generated_at: expected an ISO 8601 timestamp with a time zone, got "yesterday"',
    ),
    (
        setting("provider.checked_at", "2026-05-01T11:59:30"),
        'provider.checked_at: expected an ISO 8601 timestamp with a time zone, got "2026-05-01T11:59:30"',
    ),
    (
        setting("ca.roots[1].not_after", 1777636800),
        "ca.roots[1].not_after: expected an ISO 8601 timestamp with a time zone, got 1777636800",
    ),
    (
        setting("identities[0].next_rotation", "2026-13-01T00:00:00Z"),
        'identities[0].next_rotation: expected an ISO 8601 timestamp with a time zone, got "2026-13-01T00:00:00Z"',
    ),
    # a list where an object is expected, and the other way round
    (setting("provider", []), "provider: expected an object, got a list"),
    (setting("ca.intermediate", ["0c"]), "ca.intermediate: expected an object, got a list"),
    (setting("ca.roots[0]", "0a"), 'ca.roots[0]: expected an object, got "0a"'),
    (setting("identities", {}), "identities: expected a list, got an object"),
    (lambda document: [document], "expected an object, got a list"),
    (lambda document: None, "expected an object, got null"),
]


@pytest.mark.parametrize(("change", "message"), BAD, ids=[message for _, message in BAD])
def test_a_bad_document_is_refused_naming_the_key_path(change, message):
    with pytest.raises(StatusDocumentError) as raised:
        StatusDocument.from_json(change(copy.deepcopy(GOOD)))
    assert str(raised.value) == f"status document: {message}"
    assert raised.value.detail == message
    assert isinstance(raised.value, MeshIdentityError)


def test_a_long_value_is_cut_short_in_the_message():
    document = setting("ca.roots[0].leaves", 7 * "ten chars ")(copy.deepcopy(GOOD))
    with pytest.raises(StatusDocumentError) as raised:
        StatusDocument.from_json(document)
    assert raised.value.detail == 'ca.roots[0].leaves: expected an integer, got "' + 5 * "ten chars " + "ten ch..."


def test_each_part_reads_on_its_own():
    assert RootStatus.from_json(GOOD["ca"]["roots"][0]).serial == "0a"
    assert CertStatus.from_json(GOOD["identities"][0]).failures == 2
    assert ProviderStatus.from_json(GOOD["provider"]).mode is Mode.INTERMEDIATE
    assert CaStatus.from_json(GOOD["ca"]).proxies_on_old_roots == ("web-1",)
    with pytest.raises(StatusDocumentError, match=r"^status document: serial: expected a string, got 3$"):
        RootStatus.from_json({**GOOD["ca"]["roots"][0], "serial": 3})


# -- fetch_status: the server URL in the error --------------------------------------------------------------


@pytest.fixture
def answering(tmp_path) -> Iterator[Callable[[bytes], Any]]:
    """A config whose server (found through ``admin.addr``) answers /status with the body given."""
    body = [b""]

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.end_headers()
            self.wfile.write(body[0])

        def log_message(self, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    config = make_config(tmp_path)
    config.state_dir.mkdir(parents=True, exist_ok=True)
    url = f"http://127.0.0.1:{server.server_address[1]}"
    (config.state_dir / ADMIN_ADDR).write_text(url + "\n")

    def answer(reply: bytes) -> Any:
        body[0] = reply
        return config, url + "/status"

    yield answer
    server.shutdown()
    server.server_close()
    thread.join()


@pytest.mark.parametrize(
    ("body", "message"),
    [
        (json.dumps([GOOD]).encode(), "answered a bad status document: expected an object, got a list"),
        (
            json.dumps(setting("ca.roots[1].serial", 3)(copy.deepcopy(GOOD))).encode(),
            "answered a bad status document: ca.roots[1].serial: expected a string, got 3",
        ),
        (b"<html>", "answered with something that is not JSON: Expecting value: line 1 column 1 (char 0)"),
    ],
)
def test_fetch_status_names_the_server_url_of_a_bad_document(answering, body, message):
    config, url = answering(body)
    with pytest.raises(ServerError) as raised:
        fetch_status(config)
    assert str(raised.value) == f"{url} {message}"


def test_fetch_status_reads_a_good_document(answering):
    config, _ = answering(json.dumps(GOOD).encode())
    assert fetch_status(config) == StatusDocument.from_json(GOOD)
