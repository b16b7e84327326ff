"""The Vault fake as a server: :class:`VaultServer` listens on a loopback port over HTTP or HTTPS
(:class:`ListenerTLS`, optionally asking for client certificates), stops and starts again on the same port (an
outage: connections are refused and open ones are cut; the state survives, like a restart with persistent
storage and auto-unseal), and offers the test controls: seal and unseal, fail or drop the next requests,
request counters, token TTLs, and setup shortcuts that change the same state the HTTP API does (namespaces,
PKI mounts and roles, policies, tokens, AppRole credentials, Kubernetes roles and service-account JWTs)."""

from __future__ import annotations

import contextlib
import socket
import ssl
import threading
import time
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.x509.oid import ExtendedKeyUsageOID

from tests.fakes.vault import auth
from tests.fakes.vault.pki import new_intermediate, new_root
from tests.fakes.vault.routing import Handler
from tests.fakes.vault.state import (
    SYSTEM_DEFAULT_TTL,
    SYSTEM_MAX_TTL,
    TEN_YEARS,
    AuthRole,
    Fault,
    Issuer,
    Namespace,
    PkiMount,
    PkiRole,
    RequestRecord,
    VaultState,
    normalize_namespace,
)
from tests.pki import TestCa, key_pem

PEM = serialization.Encoding.PEM


@dataclass(frozen=True)
class ListenerTLS:
    """Files for the server's TLS listener: a CA, a server certificate for the given names, and a client
    certificate (for mutual TLS) signed by the same CA."""

    ca_file: Path
    cert_file: Path
    key_file: Path
    client_cert_file: Path
    client_key_file: Path

    @classmethod
    def create(
        cls, directory: Path, hostnames: Sequence[str] = ("localhost",), ips: Sequence[str] = ("127.0.0.1",)
    ) -> ListenerTLS:
        directory.mkdir(parents=True, exist_ok=True)
        ca = TestCa.create("Vault listener test CA", lifetime=timedelta(days=1))
        day = timedelta(days=1)
        server_cert, server_key = ca.leaf(
            dns=hostnames, ips=ips, ttl=day, usages=(ExtendedKeyUsageOID.SERVER_AUTH,), common_name="vault server"
        )
        client_cert, client_key = ca.leaf(
            dns=["client"], ttl=day, usages=(ExtendedKeyUsageOID.CLIENT_AUTH,), common_name="vault client"
        )
        files = cls(
            ca_file=directory / "vault-ca.pem",
            cert_file=directory / "vault-server.pem",
            key_file=directory / "vault-server-key.pem",
            client_cert_file=directory / "vault-client.pem",
            client_key_file=directory / "vault-client-key.pem",
        )
        files.ca_file.write_bytes(ca.pem())
        files.cert_file.write_bytes(server_cert.public_bytes(PEM))
        files.key_file.write_bytes(key_pem(server_key))
        files.client_cert_file.write_bytes(client_cert.public_bytes(PEM))
        files.client_key_file.write_bytes(key_pem(client_key))
        for secret in (files.key_file, files.client_key_file):
            secret.chmod(0o600)
        return files


class VaultServer:
    """A Vault for tests. Use as a context manager, or :meth:`start` and :meth:`stop` it.

    ``tls`` turns on HTTPS with the given listener files; ``require_client_cert`` asks clients for a
    certificate signed by the listener CA. State (tokens, mounts, CAs) survives :meth:`stop`/:meth:`start`,
    like a Vault restart with persistent storage and auto-unseal.
    """

    def __init__(
        self,
        *,
        tls: ListenerTLS | None = None,
        require_client_cert: bool = False,
        host: str = "127.0.0.1",
        default_lease_ttl: int = SYSTEM_DEFAULT_TTL,
        max_lease_ttl: int = SYSTEM_MAX_TTL,
    ) -> None:
        self.tls = tls
        self.require_client_cert = require_client_cert
        self.host = host
        self.state = VaultState(default_lease_ttl, max_lease_ttl)
        self._port = 0
        self._httpd: Httpd | None = None
        self._thread: threading.Thread | None = None
        self.root_token = self.state.new_token("", ("root",), ttl=0, renewable=False, path="auth/token/root").id

    # lifecycle

    def __enter__(self) -> VaultServer:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def port(self) -> int:
        return self._port

    @property
    def url(self) -> str:
        scheme = "https" if self.tls else "http"
        return f"{scheme}://{self.host}:{self._port}"

    @property
    def running(self) -> bool:
        return self._httpd is not None

    def start(self) -> None:
        """Listen (again) on the same port as before, or on an ephemeral one the first time."""
        if self._httpd is not None:
            return
        context = None
        if self.tls is not None:
            context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            context.minimum_version = ssl.TLSVersion.TLSv1_2
            context.load_cert_chain(self.tls.cert_file, self.tls.key_file)
            if self.require_client_cert:
                context.verify_mode = ssl.CERT_REQUIRED
                context.load_verify_locations(self.tls.ca_file)
        httpd = Httpd((self.host, self._port), Handler, self.state, context)
        self._port = httpd.server_address[1]
        self._httpd = httpd
        self._thread = threading.Thread(
            target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, name=f"vault-{self._port}", daemon=True
        )
        self._thread.start()

    def stop(self) -> None:
        """Stop listening and cut every open connection: clients see connection refused (an outage)."""
        httpd, thread = self._httpd, self._thread
        if httpd is None:
            return
        self._httpd = self._thread = None
        httpd.shutdown()
        httpd.server_close()
        httpd.close_connections()
        if thread is not None:
            thread.join(timeout=5)

    # seal state

    def seal(self) -> None:
        with self.state.lock:
            self.state.sealed_flag = True

    def unseal(self) -> None:
        with self.state.lock:
            self.state.sealed_flag = False

    def set_initialized(self, initialized: bool) -> None:
        with self.state.lock:
            self.state.initialized = initialized

    def set_standby(self, standby: bool) -> None:
        with self.state.lock:
            self.state.standby = standby

    @property
    def sealed(self) -> bool:
        return self.state.sealed

    # faults and counters

    def fail_next(
        self, count: int, status: int = 500, errors: Sequence[str] = ("internal error",), path: str | None = None
    ) -> None:
        """Answer the next ``count`` requests (to ``path``, exact or a ``prefix*``; any path when None) with
        ``status`` and ``{"errors": errors}``."""
        with self.state.lock:
            self.state.faults.append(Fault(count, status, tuple(errors), path))

    def drop_next(self, count: int, path: str | None = None) -> None:
        """Close the connection of the next ``count`` requests without answering."""
        with self.state.lock:
            self.state.faults.append(Fault(count, None, (), path))

    def clear_faults(self) -> None:
        with self.state.lock:
            self.state.faults.clear()

    def request_count(self, path: str, method: str | None = None, namespace: str | None = None) -> int:
        """How many requests reached ``path`` (``/v1/...``), optionally only with this method or namespace."""
        with self.state.lock:
            return sum(
                1
                for r in self.state.records
                if r.path == path
                and (method is None or r.method == method.upper())
                and (namespace is None or r.namespace == namespace)
            )

    @property
    def requests(self) -> list[RequestRecord]:
        with self.state.lock:
            return list(self.state.records)

    def reset_requests(self) -> None:
        with self.state.lock:
            self.state.records.clear()

    # setup shortcuts (the same state the HTTP API changes)

    def add_namespace(self, name: str) -> None:
        name = normalize_namespace(name)
        with self.state.lock:
            parts = name.split("/")
            for i in range(1, len(parts) + 1):
                path = "/".join(parts[:i])
                self.state.namespaces.setdefault(path, Namespace(path))

    def add_pki_mount(
        self,
        path: str = "pki",
        *,
        namespace: str = "",
        key_type: str = "ec",
        ca_ttl: int = TEN_YEARS,
        intermediate: bool = False,
        with_issuer: bool = True,
        default_lease_ttl: int | None = None,
        max_lease_ttl: int = TEN_YEARS,
    ) -> list[x509.Certificate]:
        """Mount a PKI engine with a CA: a root, or (``intermediate=True``) an intermediate under a root that
        Vault knows, so ``ca_chain`` holds two certificates. Returns the chain, issuing CA first."""
        mount = PkiMount(path, default_lease_ttl or self.state.default_lease_ttl, max_lease_ttl)
        if with_issuer:
            root = new_root(f"Vault test root CA ({path})", ca_ttl, key_type)
            mount.issuer = (
                new_intermediate(root, f"Vault test intermediate CA ({path})", ca_ttl, key_type)
                if (intermediate)
                else root
            )
        with self.state.lock:
            ns = self.state.namespace(namespace)
            ns.pki[path] = mount
        return mount.issuer.chain if mount.issuer else []

    def pki_issuer(self, path: str = "pki", namespace: str = "") -> Issuer:
        with self.state.lock:
            return self.state.namespace(namespace).pki[path].require_issuer()

    def add_pki_role(self, mount: str, name: str, *, namespace: str = "", **params: Any) -> PkiRole:
        role, _ = PkiRole.from_params(name, params)
        with self.state.lock:
            self.state.namespace(namespace).pki[mount].roles[name] = role
        return role

    def add_policy(self, name: str, rules: Mapping[str, Sequence[str]], namespace: str = "") -> None:
        with self.state.lock:
            self.state.namespace(namespace).policies[name] = [(p, frozenset(c)) for p, c in rules.items()]

    def create_token(
        self,
        *,
        policies: Sequence[str] = ("default",),
        ttl: int = 3600,
        renewable: bool = True,
        explicit_max_ttl: int = 0,
        namespace: str = "",
        no_default_policy: bool = False,
    ) -> str:
        """A service token with ``policies`` (and ``default``, as Vault adds it unless ``no_default_policy``);
        ``ttl=0`` makes one that never expires (only sensible for root-like tokens)."""
        if not no_default_policy and "root" not in policies:
            policies = ("default", *policies)
        with self.state.lock:
            self.state.namespace(namespace)
            return self.state.new_token(
                normalize_namespace(namespace),
                tuple(policies),
                ttl=ttl,
                renewable=renewable,
                explicit_max_ttl=explicit_max_ttl,
                path="auth/token/create",
            ).id

    def set_token_ttl(self, token: str, ttl: float) -> None:
        """Make ``token`` expire ``ttl`` seconds from now (0 or less: it has expired)."""
        with self.state.lock:
            self.state.tokens[token].expire_at = time.time() + ttl

    def revoke_token(self, token: str) -> None:
        with self.state.lock:
            self.state.tokens.pop(token, None)

    def token_ttl(self, token: str) -> float | None:
        """Seconds ``token`` has left (None when it never expires); KeyError once revoked or expired."""
        with self.state.lock:
            entry = self.state.tokens[token]
            if entry.expired(time.time()):
                raise KeyError(token)
            return None if entry.expire_at is None else entry.expire_at - time.time()

    def add_approle(
        self,
        name: str,
        *,
        policies: Sequence[str] = ("default",),
        token_ttl: int = 3600,
        token_max_ttl: int = 0,
        secret_id_ttl: int = 0,
        mount: str = "approle",
        namespace: str = "",
    ) -> tuple[str, str]:
        """An AppRole (its auth mount enabled if needed); returns ``(role_id, secret_id)``."""
        with self.state.lock:
            auth_mount = self.state.auth_mount(namespace, mount, "approle")
            role = AuthRole(name, list(policies), token_ttl, token_max_ttl, role_id=str(uuid.uuid4()))
            role.secret_id_ttl = secret_id_ttl
            auth_mount.roles[name] = role
            return role.role_id, self.state.new_secret_id(role)

    def new_secret_id(self, name: str, *, mount: str = "approle", namespace: str = "") -> str:
        with self.state.lock:
            return self.state.new_secret_id(self.state.namespace(namespace).auth[mount].roles[name])

    def add_kubernetes_role(
        self,
        name: str,
        *,
        service_account_names: Sequence[str],
        service_account_namespaces: Sequence[str],
        policies: Sequence[str] = ("default",),
        token_ttl: int = 3600,
        token_max_ttl: int = 0,
        audience: str = "",
        mount: str = "kubernetes",
        namespace: str = "",
    ) -> None:
        with self.state.lock:
            auth_mount = self.state.auth_mount(namespace, mount, "kubernetes")
            auth_mount.configured = True
            auth_mount.roles[name] = AuthRole(
                name,
                list(policies),
                token_ttl,
                token_max_ttl,
                service_account_names=list(service_account_names),
                service_account_namespaces=list(service_account_namespaces),
                audience=audience,
            )

    def service_account_jwt(
        self,
        namespace: str,
        name: str,
        *,
        ttl: int = 3600,
        audience: Sequence[str] = ("https://kubernetes.default.svc",),
    ) -> str:
        """A projected service-account token as the kubelet writes it; only this server can verify it."""
        return auth.service_account_jwt(self.state.jwt_key, namespace, name, ttl=ttl, audience=audience)


class Httpd(ThreadingHTTPServer):
    """The listening socket: TLS handshakes happen in the handler's thread, and every open connection is
    tracked so :meth:`VaultServer.stop` can cut them."""

    daemon_threads = True
    allow_reuse_address = True

    def __init__(
        self,
        address: tuple[str, int],
        handler: type[BaseHTTPRequestHandler],
        state: VaultState,
        context: ssl.SSLContext | None,
    ) -> None:
        self.state = state
        self.context = context
        self._open: set[socket.socket] = set()
        self._open_lock = threading.Lock()
        super().__init__(address, handler)

    def get_request(self) -> tuple[socket.socket, Any]:
        sock, address = self.socket.accept()
        if self.context is not None:
            sock = self.context.wrap_socket(sock, server_side=True, do_handshake_on_connect=False)
        with self._open_lock:
            self._open.add(sock)
        return sock, address

    def shutdown_request(self, request: Any) -> None:
        with self._open_lock:
            self._open.discard(request)
        super().shutdown_request(request)

    def close_connections(self) -> None:
        with self._open_lock:
            open_sockets = list(self._open)
            self._open.clear()
        for sock in open_sockets:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)

    def handle_error(self, request: Any, client_address: Any) -> None:
        """Broken connections (a client giving up, a cut during :meth:`VaultServer.stop`) are not errors."""
