"""The Kubernetes fake as a server: :class:`KubeServer` serves the API over real HTTPS (or HTTP) on a loopback
port (``:0``), authenticates bearer tokens, writes client configuration (``kubernetes.client.Configuration``,
kubeconfig, in-cluster files), serves more kinds on request (:meth:`KubeServer.register`, as installing CRDs
does), and offers the test controls: deny rules (403), injected errors, outages, watch history compaction,
bookmarks, waiting for watches, and direct reads and writes of the store. The ``kube_server`` and
``kube_api_client`` fixtures give a running server and a real client for it.

As the real server: ``?dryRun=All`` on a create runs admission (the webhooks see ``request.dryRun: true``) and
answers 201 with the object as it would be stored (its name generated, uid, creationTimestamp, defaults,
validated; no resourceVersion), stores nothing and sends no watch event (:meth:`KubeServer.dry_run`); and the
warnings of a request (:meth:`KubeServer.warn`, which the admission webhooks call with their responses'
``warnings``) are answered as ``Warning: 299 - "<text>"`` headers (:class:`Warnings`), which kubectl prints as
``Warning: <text>`` on its stderr."""

from __future__ import annotations

import base64
import contextlib
import http.server
import socket
import ssl
import tempfile
import threading
import unicodedata
from collections import deque
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

import kubernetes
import pytest
import yaml
from cryptography.hazmat.primitives import serialization
from cryptography.x509.oid import ExtendedKeyUsageOID

from tests.fakes.kube.errors import ApiError, JsonObj, details
from tests.fakes.kube.kinds import DEFAULT_KINDS, Kind
from tests.fakes.kube.routing import Handler, Route
from tests.fakes.kube.selectors import labels_of, parse_label_selector
from tests.fakes.kube.store import Store, meta
from tests.fakes.kube.tokenreview import TokenReviews
from tests.fakes.kube.watch import Watcher
from tests.pki import TestCa, key_pem

DEFAULT_TOKEN = "mesh-identity-test-token"
DEFAULT_USER = "system:serviceaccount:mesh-identity:mesh-identity"

AdmissionStep = Callable[[str, Route, JsonObj, Mapping[str, str]], JsonObj]
"""``step(user, route, obj, params)``, run on a create before the object is stored (:meth:`KubeServer.add_admission`)."""


class Warnings:
    """The warnings of one request, as the real server's warning recorder keeps them: in order, each text once,
    none with a control character (dropped); when their text would pass :attr:`TOTAL` characters, each is cut
    to :attr:`ITEM` characters and, once the total is reached, later ones are dropped. :meth:`headers` are the
    ``Warning`` header values: ``299 - "<text>"``, ``"`` and ``\\`` escaped with ``\\``, the text as UTF-8
    bytes (http.server writes headers as latin-1, so the value carries them one per character)."""

    TOTAL = 4 * 1024
    ITEM = 256

    def __init__(self) -> None:
        self.texts: list[str] = []

    def add(self, text: str) -> None:
        if text and text not in self.texts and not any(unicodedata.category(c) == "Cc" for c in text):
            self.texts.append(text)

    def kept(self) -> list[str]:
        """The texts sent, after the limits."""
        kept: list[str] = []
        cutting = False
        for text in self.texts:
            written = sum(len(t) for t in kept)
            if cutting:
                if written >= self.TOTAL:
                    break
                kept.append(text[: self.ITEM])
            elif written + len(text) <= self.TOTAL:
                kept.append(text)
            else:
                cutting = True
                kept = [t[: self.ITEM] for t in (*kept, text)]
        return kept

    def headers(self) -> list[str]:
        quoted = (t.replace("\\", "\\\\").replace('"', '\\"') for t in self.kept())
        return [f'299 - "{q}"'.encode().decode("latin-1") for q in quoted]


@dataclass(frozen=True)
class Rule:
    """A deny rule: each field is a value or ``*``. ``resource`` is ``plural`` or ``plural/status``."""

    verb: str = "*"
    resource: str = "*"
    group: str = "*"
    namespace: str = "*"
    user: str = "*"

    def matches(self, user: str, verb: str, group: str, resource: str, namespace: str) -> bool:
        return all(
            mine in ("*", theirs)
            for mine, theirs in (
                (self.verb, verb),
                (self.resource, resource),
                (self.group, group),
                (self.namespace, namespace),
                (self.user, user),
            )
        )


@dataclass
class InjectedError:
    rule: Rule
    error: ApiError
    times: int | None  # None: until removed


@dataclass(frozen=True)
class RequestRecord:
    """One request as the server saw it (for tests and benchmarks)."""

    user: str
    verb: str
    resource: str
    namespace: str
    name: str
    code: int


class HttpServer(http.server.ThreadingHTTPServer):
    """The listening socket: TLS per connection, and every open connection tracked so an outage can cut them."""

    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, owner: KubeServer, tls: ssl.SSLContext | None) -> None:
        self.owner = owner
        self.tls = tls
        self.connections: set[socket.socket] = set()
        self.connections_lock = threading.Lock()
        super().__init__(("127.0.0.1", 0), Handler)

    def finish_request(self, request: Any, client_address: Any) -> None:
        sock: socket.socket = request
        with self.connections_lock:
            self.connections.add(sock)
        try:
            if self.tls is not None:
                try:
                    sock = self.tls.wrap_socket(sock, server_side=True)
                except (ssl.SSLError, OSError):
                    return
                with self.connections_lock:
                    self.connections.add(sock)
            super().finish_request(sock, client_address)
        finally:
            with self.connections_lock:
                self.connections.discard(request)
                self.connections.discard(sock)
            if sock is not request:
                with contextlib.suppress(OSError):
                    sock.close()

    def drop_connections(self) -> None:
        with self.connections_lock:
            live = list(self.connections)
        for sock in live:
            with contextlib.suppress(OSError):
                # the plain socket's shutdown: SSLSocket.shutdown would drop its TLS state first, and a
                # handler thread still writing would then send plaintext into the TLS stream
                socket.socket.shutdown(sock, socket.SHUT_RDWR)


class KubeServer:
    """The test API server. ``tokens`` maps bearer tokens to user names (default: one token, one user).

    It serves ``kinds`` (default: Secret, ConfigMap, Namespace); to serve another, add a
    :class:`~tests.fakes.kube.kinds.Kind`, here or later with :meth:`register`::

        POD = Kind("Pod", "pods", status_subresource=True, short_names=("po",))
        with KubeServer(kinds=(*DEFAULT_KINDS, POD)) as server: ...
    """

    def __init__(
        self,
        kinds: Sequence[Kind] = DEFAULT_KINDS,
        *,
        tokens: Mapping[str, str] | None = None,
        tls: bool = True,
        history_limit: int = 10_000,
        request_log_limit: int = 100_000,
    ) -> None:
        self.tokens = dict(tokens) if tokens is not None else {DEFAULT_TOKEN: DEFAULT_USER}
        self.store = Store(kinds, history_limit)
        self.rules: list[Rule] = []
        self.injected: list[InjectedError] = []
        self.requests: deque[RequestRecord] = deque(maxlen=request_log_limit)
        self.token_reviews = TokenReviews()  # POST /apis/authentication.k8s.io/v1/tokenreviews
        self.admission_steps: list[AdmissionStep] = []  # none by default: see add_admission
        self.down = False
        self._lock = threading.Lock()
        self._watching: list[Watcher] = []  # the open streams, in the order they opened
        self._watch_changed = threading.Condition(self._lock)
        self._request = threading.local()  # the Warnings of the request each handler thread is answering
        self._tmp = tempfile.TemporaryDirectory(prefix="kube-server-")
        self.ca_path = Path(self._tmp.name) / "ca.crt"
        self._tls_context = self._make_tls() if tls else None
        self._http = HttpServer(self, self._tls_context)
        self._thread: threading.Thread | None = None
        scheme = "https" if tls else "http"
        self.port: int = self._http.server_address[1]
        self.url = f"{scheme}://127.0.0.1:{self.port}"

    @property
    def kinds(self) -> tuple[Kind, ...]:
        return self.store.kinds

    def register(self, *kinds: Kind) -> None:
        """Serve ``kinds`` too, from now on (as installing CRDs does); kinds already served stay as they are.
        ValueError for a kind whose group, version and plural another served kind has."""
        for kind in kinds:
            if kind in self.kinds:
                continue
            clash = next(
                (k for k in self.kinds if (k.group, k.version, k.plural) == (kind.group, kind.version, kind.plural)),
                None,
            )
            if clash is not None:
                raise ValueError(f"{kind.qualified} is already served as another kind: {clash}")
            self.store.add_kind(kind)

    def add_admission(self, step: AdmissionStep) -> None:
        """Run ``step(user, route, obj, params)`` on every create (POST) from now on, after authorization and
        before the object is stored, in the order added (as admission plugins run): it returns the object to
        store (``obj`` or a changed one) or raises :class:`ApiError` to refuse the request. The step runs in the
        request's thread without the store's lock (it may call out, as webhooks do). None by default; see
        :mod:`tests.fakes.kube.admission` for mutating webhooks."""
        with self._lock:
            self.admission_steps.append(step)

    def admit(self, user: str, route: Route, obj: JsonObj, params: Mapping[str, str]) -> JsonObj:
        """``obj`` after every admission step (used by the handler on a create)."""
        with self._lock:
            steps = list(self.admission_steps)
        for step in steps:
            obj = step(user, route, obj, params)
        return obj

    @staticmethod
    def dry_run(verb: str, params: Mapping[str, str]) -> bool:
        """Whether a request is a dry run (``?dryRun=All``): a create only, here; another value, or a dry run of
        another verb (which this server does not do), is refused with 400."""
        if "dryRun" not in params or verb in ("get", "list", "watch"):  # reads have no dryRun option
            return False
        value = params["dryRun"]
        if value != "All":
            raise ApiError(400, "BadRequest", f'dryRun: Unsupported value: "{value}": supported values: "All"')
        if verb != "create":
            raise ApiError(400, "BadRequest", f"dryRun=All on {verb}: the Kubernetes test server dry-runs creates only")
        return True

    def open_warnings(self) -> Warnings:
        """A new :class:`Warnings` for the request this thread begins to serve (used by the handler)."""
        recorder = Warnings()
        self._request.warnings = recorder
        return recorder

    def warn(self, text: str) -> None:
        """Answer the request this thread is serving with a ``Warning`` header of ``text`` (an admission step
        runs in the request's thread); outside a request, nothing."""
        found: Warnings | None = getattr(self._request, "warnings", None)
        if found is not None:
            found.add(text)

    # -- lifecycle
    def start(self) -> KubeServer:
        self._thread = threading.Thread(
            target=self._http.serve_forever, kwargs={"poll_interval": 0.05}, name="kube-server", daemon=True
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop serving: the port closes, open connections and watches are cut."""
        self.token_reviews.release()
        if self._thread is not None:
            self._http.shutdown()
            self._thread.join()
            self._thread = None
        self.store.end_watches()
        with self._watch_changed:  # let the streams end cleanly before the connections are cut
            self._watch_changed.wait_for(lambda: not self._watching, 2.0)
        self._http.drop_connections()
        self._http.server_close()
        self._tmp.cleanup()

    def __enter__(self) -> KubeServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def go_down(self) -> None:
        """Behave as an unreachable server: every connection is dropped without an answer."""
        self.down = True
        self.store.end_watches()
        self._http.drop_connections()

    def come_up(self) -> None:
        self.down = False

    # -- client side helpers
    @property
    def ca_pem(self) -> bytes:
        return self.ca_path.read_bytes() if self._tls_context is not None else b""

    def client_configuration(self, token: str | None = None) -> kubernetes.client.Configuration:
        """A ``kubernetes.client.Configuration`` for this server, with ``token`` (default: the first)."""
        token = token if token is not None else next(iter(self.tokens))
        config = kubernetes.client.Configuration(
            host=self.url,
            api_key={"authorization": token},
            api_key_prefix={"authorization": "Bearer"},
        )
        if self._tls_context is not None:
            config.ssl_ca_cert = str(self.ca_path)
        return config

    def kubeconfig(self, context: str = "kube-server", namespace: str = "default", token: str | None = None) -> JsonObj:
        """A kubeconfig document with one cluster, user and context pointing here."""
        token = token if token is not None else next(iter(self.tokens))
        cluster: JsonObj = {"server": self.url}
        if self._tls_context is not None:
            cluster["certificate-authority-data"] = base64.b64encode(self.ca_pem).decode()
        return {
            "apiVersion": "v1",
            "kind": "Config",
            "clusters": [{"name": f"{context}-cluster", "cluster": cluster}],
            "users": [{"name": f"{context}-user", "user": {"token": token}}],
            "contexts": [
                {
                    "name": context,
                    "context": {"cluster": f"{context}-cluster", "user": f"{context}-user", "namespace": namespace},
                }
            ],
            "current-context": context,
        }

    def write_kubeconfig(
        self, path: Path, context: str = "kube-server", namespace: str = "default", token: str | None = None
    ) -> Path:
        path.write_text(yaml.safe_dump(self.kubeconfig(context, namespace, token)))
        return path

    def write_in_cluster_files(self, directory: Path, token: str | None = None) -> dict[str, str]:
        """Write ``token`` and ``ca.crt`` as a pod's service-account mount has them; return the environment
        variables (``KUBERNETES_SERVICE_HOST``/``_PORT``) an in-cluster client reads."""
        directory.mkdir(parents=True, exist_ok=True)
        (directory / "token").write_text(token if token is not None else next(iter(self.tokens)))
        (directory / "ca.crt").write_bytes(self.ca_pem)
        (directory / "namespace").write_text("mesh-identity")
        return {"KUBERNETES_SERVICE_HOST": "127.0.0.1", "KUBERNETES_SERVICE_PORT": str(self.port)}

    # -- test controls
    def deny(
        self, verb: str = "*", resource: str = "*", *, group: str = "*", namespace: str = "*", user: str = "*"
    ) -> Rule:
        """Answer 403 Forbidden to matching requests until :meth:`allow` removes the rule."""
        rule = Rule(verb, resource, group, namespace, user)
        with self._lock:
            self.rules.append(rule)
        return rule

    def allow(self, rule: Rule) -> None:
        with self._lock:
            self.rules.remove(rule)

    def inject_error(
        self,
        verb: str = "*",
        resource: str = "*",
        *,
        code: int = 500,
        reason: str = "InternalError",
        message: str = "an error on the server has prevented the request from succeeding",
        times: int | None = 1,
        namespace: str = "*",
        user: str = "*",
    ) -> InjectedError:
        """Answer the next ``times`` matching requests (None: all, until removed) with this Status."""
        injected = InjectedError(Rule(verb, resource, "*", namespace, user), ApiError(code, reason, message), times)
        with self._lock:
            self.injected.append(injected)
        return injected

    def remove_error(self, injected: InjectedError) -> None:
        with self._lock:
            if injected in self.injected:
                self.injected.remove(injected)

    def end_watches(self) -> None:
        """End every open watch stream cleanly, as the real server does when a watch times out."""
        self.store.end_watches()

    def compact(self) -> int:
        """Drop the watch history: a watch from any resourceVersion older than the current one gets 410 Expired.
        Returns the current one, from which a watch still resumes (it missed nothing): to expire what a client
        has seen, write something after its last event first."""
        return self.store.compact()

    def send_bookmarks(self) -> int:
        """Send a BOOKMARK to every open watch that asked for them; returns how many were sent."""
        return self.store.send_bookmarks()

    def wait_for_watches(self, count: int, timeout: float = 10.0) -> bool:
        """Wait until at least ``count`` watch streams are open (so a test can act after a client watches).
        A stream ended by :meth:`end_watches` counts until its handler has closed it; to wait for one client's
        stream, or for a stream re-opened after some point, use :meth:`wait_for_watch`."""
        with self._watch_changed:
            return self._watch_changed.wait_for(lambda: len(self._watching) >= count, timeout)

    def wait_for_watch(
        self, *, user: str | None = None, kind: Kind | None = None, since: int = 0, timeout: float = 10.0
    ) -> bool:
        """Wait until a watch stream of ``user`` (any user if None) on ``kind`` (any) is open that started at
        resourceVersion ``since`` or later (see :attr:`Watcher.resource_version`): a client's first watch, or
        the one it re-opened from a fresh read after :meth:`compact`."""

        def found() -> bool:
            return any(
                (user is None or w.user == user) and (kind is None or w.kind is kind) and w.resource_version >= since
                for w in self._watching
            )

        with self._watch_changed:
            return self._watch_changed.wait_for(found, timeout)

    @property
    def open_watches(self) -> int:
        with self._lock:
            return len(self._watching)

    def objects(self, kind: Kind, namespace: str | None = None, label_selector: str = "") -> list[JsonObj]:
        """The stored objects of a kind, read directly (for assertions)."""
        matcher = parse_label_selector(label_selector) if label_selector else (lambda _labels: True)
        return self.store.select(kind, namespace, lambda obj: matcher(labels_of(obj)))

    def put_object(self, kind: Kind, obj: JsonObj) -> JsonObj:
        """Create an object directly (test setup), as if a client had POSTed it."""
        return self.store.create(kind, meta(obj).get("namespace", ""), obj)

    # -- used by the handler
    def watch_opened(self, watcher: Watcher) -> None:
        with self._watch_changed:
            self._watching.append(watcher)
            self._watch_changed.notify_all()

    def watch_closed(self, watcher: Watcher) -> None:
        with self._watch_changed:
            self._watching.remove(watcher)
            self._watch_changed.notify_all()

    def record(self, fields: Mapping[str, Any]) -> None:
        self.requests.append(RequestRecord(**fields))

    def authenticate(self, header: str) -> str:
        scheme, _, token = header.partition(" ")
        user = self.tokens.get(token.strip()) if scheme.lower() == "bearer" else None
        if user is None:
            raise ApiError(401, "Unauthorized", "Unauthorized")
        return user

    def authorize(self, user: str, verb: str, route: Route) -> None:
        namespace = route.namespace or ""
        with self._lock:
            for injected in self.injected:
                if injected.rule.matches(user, verb, route.kind.group, route.resource, namespace):
                    if injected.times is not None:
                        injected.times -= 1
                        if injected.times <= 0:
                            self.injected.remove(injected)
                    raise injected.error
            denied = any(r.matches(user, verb, route.kind.group, route.resource, namespace) for r in self.rules)
        if denied:
            kind = route.kind
            subject = f'{kind.qualified} "{route.name}"' if route.name else kind.qualified
            scope = f'in the namespace "{namespace}"' if namespace else "at the cluster scope"
            raise ApiError(
                403,
                "Forbidden",
                f'{subject} is forbidden: User "{user}" cannot {verb} resource "{route.resource}" in API group '
                f'"{kind.group}" {scope}',
                details(kind, route.name),
            )

    # -- TLS
    def _make_tls(self) -> ssl.SSLContext:
        ca = TestCa.create("kube-server test CA", lifetime=timedelta(days=2))
        cert, key = ca.leaf(
            dns=["localhost"],
            ips=["127.0.0.1"],
            ttl=timedelta(days=1),
            usages=(ExtendedKeyUsageOID.SERVER_AUTH,),
            common_name="kube-apiserver",
        )
        directory = Path(self._tmp.name)
        self.ca_path.write_bytes(ca.pem())
        (directory / "tls.crt").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        (directory / "tls.key").write_bytes(key_pem(key))
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(directory / "tls.crt", directory / "tls.key")
        return context


# ---------------------------------------------------------------------------------------------- fixtures


@pytest.fixture
def kube_server() -> Iterator[KubeServer]:
    """A running :class:`KubeServer` with the default kinds, stopped after the test."""
    with KubeServer() as server:
        yield server


@pytest.fixture
def kube_api_client(kube_server: KubeServer) -> Iterator[kubernetes.client.ApiClient]:
    """A real ``kubernetes.client.ApiClient`` authenticated to :func:`kube_server`."""
    with kubernetes.client.ApiClient(kube_server.client_configuration()) as api:
        yield api
