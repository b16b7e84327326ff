"""The ``sys/`` endpoints of the Vault fake: ``sys/health`` (with its ``*code`` query parameters) and
``sys/seal-status``, which answer even when sealed; ``sys/capabilities-self``; ``sys/mounts/:path`` (enable,
tune, read, disable a ``pki`` engine); ``sys/auth/:path`` (enable ``approle`` or ``kubernetes``);
``sys/policy/:name`` (HCL or JSON ACL policies)."""

from __future__ import annotations

import time
from typing import Any

from tests.fakes.vault.acl import parse_policy
from tests.fakes.vault.api import ApiError, Request, Response, envelope, json_response, no_content, no_route
from tests.fakes.vault.params import parse_bool, parse_int, parse_list, parse_seconds, parse_string
from tests.fakes.vault.state import AuthMount, Namespace, PkiMount, VaultState

VAULT_VERSION = "1.17.2"


def health(state: VaultState, req: Request) -> Response:
    """``sys/health``: 200 active, 429 standby, 501 not initialised, 503 sealed, or the ``*code`` parameters."""

    def code(name: str, default: int) -> int:
        return parse_int(req.query.get(name, [None])[0], name, default)

    with state.lock:
        initialized, sealed, standby = state.initialized, state.sealed, state.standby
    if not initialized:
        status = code("uninitcode", 501)
    elif sealed:
        status = code("sealedcode", 503)
    elif standby:
        standby_ok = parse_bool(req.query.get("standbyok", [None])[0], "standbyok", False)
        status = code("activecode", 200) if standby_ok else code("standbycode", 429)
    else:
        status = code("activecode", 200)
    body: dict[str, Any] = {
        "initialized": initialized,
        "sealed": sealed,
        "standby": standby or sealed,
        "performance_standby": False,
        "replication_performance_mode": "disabled",
        "replication_dr_mode": "disabled",
        "server_time_utc": int(time.time()),
        "version": VAULT_VERSION,
    }
    if not sealed:
        body |= {"cluster_name": "vault-cluster-test", "cluster_id": state.cluster_id}
    if req.method == "HEAD":
        return Response(status)
    return json_response(status, body)


def seal_status(state: VaultState) -> Response:
    with state.lock:
        sealed = state.sealed
    body: dict[str, Any] = {
        "type": "shamir",
        "initialized": state.initialized,
        "sealed": sealed,
        "t": 1,
        "n": 1,
        "progress": 0,
        "nonce": "",
        "version": VAULT_VERSION,
        "build_date": "2024-08-01T00:00:00Z",
        "migration": False,
        "recovery_seal": False,
        "storage_type": "inmem",
    }
    if not sealed:
        body |= {"cluster_name": "vault-cluster-test", "cluster_id": state.cluster_id}
    return json_response(200, body)


def handle(state: VaultState, req: Request, ns: Namespace) -> Response:
    """The other ``sys/`` endpoints, which need a token."""
    with state.lock:
        token = state.authorize(req, ns)
        parts = req.rel.split("/")
        if req.rel == "sys/capabilities-self" and req.method in ("POST", "PUT"):
            paths = parse_list(req.body.get("paths") or req.body.get("path"), "paths")
            data: dict[str, Any] = {p: sorted(state.capabilities(token, ns, p.strip("/")) or {"deny"}) for p in paths}
            if len(paths) == 1:
                data["capabilities"] = data[paths[0]]
            return envelope(data)
        if parts[1] == "mounts" and len(parts) >= 3:
            return _mounts(state, req, ns, parts)
        if parts[1] == "auth" and len(parts) >= 3:
            path = "/".join(parts[2:])
            if req.method == "DELETE":
                ns.auth.pop(path, None)
                return no_content()
            kind = parse_string(req.body.get("type"), "type")
            if kind not in ("approle", "kubernetes"):
                raise ApiError(400, f"plugin not found in the catalog: {kind}")
            if path in ns.auth:
                raise ApiError(400, f"path is already in use at {path}/")
            ns.auth[path] = AuthMount(path, kind)
            return no_content()
        if parts[1] in ("policy", "policies") and len(parts) >= 3:
            name = parts[-1]
            if req.method == "DELETE":
                ns.policies.pop(name, None)
                return no_content()
            if req.method == "GET":
                if name not in ns.policies:
                    raise ApiError(404)
                return envelope({"name": name, "rules": ""})
            ns.policies[name] = parse_policy(parse_string(req.body.get("policy"), "policy"))
            return no_content()
    raise no_route(req.rel)


def _mounts(state: VaultState, req: Request, ns: Namespace, parts: list[str]) -> Response:
    tune = parts[-1] == "tune"
    path = "/".join(parts[2:-1] if tune else parts[2:])
    config = req.body if tune else req.body.get("config") or {}
    if req.method == "DELETE":
        ns.pki.pop(path, None)
        return no_content()
    if req.method == "GET":
        mount = ns.pki.get(path)
        if mount is None:
            raise ApiError(400, f"cannot fetch sysview for path {path!r}")
        return envelope({"default_lease_ttl": mount.default_lease_ttl, "max_lease_ttl": mount.max_lease_ttl})
    default_ttl = parse_seconds(config.get("default_lease_ttl"), "default_lease_ttl")
    max_ttl = parse_seconds(config.get("max_lease_ttl"), "max_lease_ttl")
    if tune:
        mount = ns.pki.get(path)
        if mount is None:
            raise ApiError(400, f"cannot tune '{path}/': no mount found")
        mount.default_lease_ttl = default_ttl or mount.default_lease_ttl
        mount.max_lease_ttl = max_ttl or mount.max_lease_ttl
        return no_content()
    kind = parse_string(req.body.get("type"), "type")
    if kind != "pki":
        raise ApiError(400, f"plugin not found in the catalog: {kind}")
    if path in ns.pki:
        raise ApiError(400, f"path is already in use at {path}/")
    ns.pki[path] = PkiMount(path, default_ttl or state.default_lease_ttl, max_ttl or state.max_lease_ttl)
    return no_content()
