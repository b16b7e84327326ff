"""A small HTTP app for the demo mesh and the end-to-end tests (stdlib ``http.server``, in a thread).

It listens in plaintext on loopback, behind its sidecar, and answers JSON:

* ``GET /`` -> ``{"service": ..., "peer": <caller's SPIFFE ID>, "xfcc": <raw header>}``; the caller's SPIFFE ID
  comes from the ``x-forwarded-client-cert`` header that the sidecar sets from the verified client certificate.
* ``GET /call/<upstream>[/<path>]`` -> the same, plus ``"upstream"``: what ``<upstream>`` answered to
  ``GET /<path>`` when this app called it through its own sidecar's outbound listener (so one request shows
  both hops). Paths chain: ``/call/backend/call/ratings`` asks backend to call ratings. A failed call answers 502.
"""

from __future__ import annotations

import http.client
import json
from collections.abc import Mapping
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from mesh_identity.demo.threaded import ThreadedApp
from mesh_identity.mesh.model import Address

XFCC = "x-forwarded-client-cert"


def peer_from_xfcc(value: str | None) -> str | None:
    """The ``URI`` of the last element of an XFCC header (the hop closest to us), or None."""
    if not value:
        return None
    last = value.split(",")[-1]
    for pair in last.split(";"):
        key, _, item = pair.strip().partition("=")
        if key.lower() == "uri":
            return item.strip('"') or None
    return None


def get_json(address: Address, path: str, timeout: float = 5.0) -> tuple[int, Any]:
    """``GET http://address/path`` and parse the JSON answer."""
    connection = http.client.HTTPConnection(address.host, address.port, timeout=timeout)
    try:
        connection.request("GET", path)
        response = connection.getresponse()
        body = response.read()
    finally:
        connection.close()
    try:
        return response.status, json.loads(body) if body else None
    except ValueError:
        return response.status, body.decode(errors="replace")


class DemoApp(ThreadedApp):
    """The app of one service. ``upstreams`` maps an upstream service name to its outbound listener address."""

    def __init__(self, service: str, address: Address, upstreams: Mapping[str, Address] | None = None) -> None:
        self.service = service
        self.upstreams = dict(upstreams or {})
        httpd = ThreadingHTTPServer((address.host, address.port), _handler(self))
        httpd.daemon_threads = True
        super().__init__(httpd, f"app-{service}")


def _handler(app: DemoApp) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def do_GET(self) -> None:
            xfcc = self.headers.get(XFCC)
            answer: dict[str, Any] = {"service": app.service, "peer": peer_from_xfcc(xfcc), "xfcc": xfcc}
            status = 200
            if self.path.startswith("/call/"):
                upstream, _, rest = self.path.removeprefix("/call/").partition("/")
                target = app.upstreams.get(upstream)
                if target is None:
                    status, answer["error"] = 404, f"{app.service} has no upstream {upstream!r}"
                else:
                    try:
                        code, answer["upstream"] = get_json(target, "/" + rest)
                    except OSError as err:
                        code, answer["error"] = 502, f"calling {upstream}: {err}"
                    if code != 200:
                        status = 502
            elif self.path != "/":
                status, answer["error"] = 404, f"no such path {self.path!r}"
            body = json.dumps(answer).encode()
            self.send_response(status)
            self.send_header("content-type", "application/json")
            self.send_header("content-length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: Any) -> None:
            return None

    return Handler
