"""The Vault client never takes the token (or a login's credentials) to another origin on a redirect.

Two real HTTP servers on loopback: "vault" answers with a redirect, "elsewhere" records every request it gets.
Refused: a redirect to another origin (scheme, host or port) and any redirect from https to http; "elsewhere"
must never see a request, let alone the ``X-Vault-Token`` header. Same-origin redirects (a standby forwarding
to a path on the same address) still work, token included.
"""

from __future__ import annotations

import json
import ssl
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest

from mesh_identity.errors import ProviderError
from providers.vault.connection import Connection
from providers.vault.options import VaultSettings
from tests.fakes.vault import ListenerTLS

TOKEN = "hvs.the-token-that-must-stay-home"
LOOKUP = {"data": {"ttl": 3600, "creation_ttl": 7200, "renewable": True, "policies": ["default"]}}
LOGIN = {"auth": {"client_token": "hvs.new", "lease_duration": 60, "renewable": True, "policies": []}}


@dataclass
class Seen:
    method: str
    path: str
    headers: dict[str, str]
    body: bytes


@dataclass
class Server:
    """A loopback HTTP(S) server; ``answer(path)`` gives (status, headers, JSON body) for each request."""

    answer: Callable[[Server, str], tuple[int, dict[str, str], Any]]
    tls: ListenerTLS | None = None
    seen: list[Seen] = field(default_factory=list)

    def __post_init__(self) -> None:
        server = self

        class Handler(BaseHTTPRequestHandler):
            def _any(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else b""
                server.seen.append(Seen(self.command, self.path, dict(self.headers.items()), body))
                status, headers, document = server.answer(server, self.path)
                data = json.dumps(document).encode() if document is not None else b""
                self.send_response(status)
                for key, value in headers.items():
                    self.send_header(key, value)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            do_GET = do_POST = do_PUT = _any

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        if self.tls is not None:
            context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
            context.load_cert_chain(self.tls.cert_file, self.tls.key_file)
            self.httpd.socket = context.wrap_socket(self.httpd.socket, server_side=True)
        self.thread = threading.Thread(target=self.httpd.serve_forever, args=(0.05,), daemon=True)
        self.thread.start()

    @property
    def url(self) -> str:
        return f"{'https' if self.tls else 'http'}://127.0.0.1:{self.httpd.server_address[1]}"

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def elsewhere() -> Iterator[Server]:
    """The other origin: answers like Vault would, and remembers who came."""
    server = Server(lambda _s, path: (200, {}, LOGIN if "login" in path else LOOKUP))
    yield server
    server.close()


def _redirecting(to: Callable[[str], str], status: int = 307, tls: ListenerTLS | None = None) -> Server:
    return Server(lambda _s, path: (status, {"Location": to(path)}, None), tls=tls)


def _connection(url: str, tls: ListenerTLS | None = None) -> Connection:
    connection = Connection(VaultSettings(address=url, ca_cert=tls.ca_file if tls else None))
    connection.use_token(TOKEN)
    return connection


@pytest.mark.parametrize("status", [301, 302, 303, 307, 308])
def test_a_redirect_to_another_origin_is_refused(elsewhere: Server, status: int) -> None:
    vault = _redirecting(lambda path: elsewhere.url + path, status)
    try:
        with pytest.raises(ProviderError) as info:
            _connection(vault.url).lookup_token()
    finally:
        vault.close()
    target = f"{elsewhere.url}/v1/auth/token/lookup-self"
    assert str(info.value) == (
        f"vault: look up the Vault token: Vault at {vault.url} redirected to {target}, another origin; refusing to "
        "follow (the token goes only to the configured address: set address to the node that answers)"
    )
    assert info.value.retryable is False
    assert elsewhere.seen == []
    assert [s.headers.get("X-Vault-Token") for s in vault.seen] == [TOKEN]


def test_a_login_is_not_replayed_to_another_origin(elsewhere: Server) -> None:
    """A 307 keeps the method and the body: the AppRole secret_id would go along with it."""
    vault = _redirecting(lambda path: elsewhere.url + path)
    try:
        with pytest.raises(ProviderError, match=rf"redirected to {elsewhere.url}/v1/auth/approle/login, another"):
            _connection(vault.url).login_approle("log in with AppRole", "role", "the-secret-id", "approle")
    finally:
        vault.close()
    assert elsewhere.seen == []


def test_a_scheme_relative_redirect_to_another_host_is_refused(elsewhere: Server) -> None:
    vault = _redirecting(lambda path: "//" + elsewhere.url.split("://", 1)[1] + path)
    try:
        with pytest.raises(ProviderError, match="another origin; refusing to follow"):
            _connection(vault.url).lookup_token()
    finally:
        vault.close()
    assert elsewhere.seen == []


def test_a_redirect_from_https_to_http_is_refused(elsewhere: Server, listener_tls: ListenerTLS) -> None:
    vault = _redirecting(lambda path: elsewhere.url + path, tls=listener_tls)
    try:
        with pytest.raises(ProviderError) as info:
            _connection(vault.url, listener_tls).lookup_token()
    finally:
        vault.close()
    assert str(info.value).startswith(
        f"vault: look up the Vault token: Vault at {vault.url} redirected to {elsewhere.url}/v1/auth/token/"
        "lookup-self, from https to plain http; refusing to follow"
    )
    assert elsewhere.seen == []


def test_a_same_origin_redirect_is_followed_with_the_token() -> None:
    """Like a standby forwarding a request to another path of the same address."""

    def answer(server: Server, path: str) -> tuple[int, dict[str, str], Any]:
        if "forwarded" not in path:
            return 307, {"Location": f"{server.url}{path}?forwarded=1"}, None
        return 200, {}, LOOKUP

    vault = Server(answer)
    try:
        info = _connection(vault.url).lookup_token()
    finally:
        vault.close()
    assert info.ttl == 3600
    assert [(s.path, s.headers.get("X-Vault-Token")) for s in vault.seen] == [
        ("/v1/auth/token/lookup-self", TOKEN),
        ("/v1/auth/token/lookup-self?forwarded=1", TOKEN),
    ]


def test_a_relative_redirect_is_followed() -> None:
    def answer(server: Server, path: str) -> tuple[int, dict[str, str], Any]:
        if path.startswith("/v1/auth/token/lookup-self"):
            return 307, {"Location": "/v1/standby/lookup-self"}, None
        return 200, {}, LOOKUP

    vault = Server(answer)
    try:
        assert _connection(vault.url).lookup_token().renewable is True
    finally:
        vault.close()
    assert [s.headers.get("X-Vault-Token") for s in vault.seen] == [TOKEN, TOKEN]
