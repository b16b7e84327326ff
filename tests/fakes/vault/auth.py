"""The auth methods of the Vault fake.

* Token auth: ``auth/token/lookup-self``, ``renew-self`` (Vault's max-TTL capping and warning), ``revoke-self``,
  ``revoke``, ``create``, ``create-orphan``. Tokens expire on the wall clock, renewable or not, with a max TTL.
* AppRole (``auth/:mount/role/:name``, ``role-id``, ``secret-id``, ``login``) and Kubernetes auth
  (``auth/:mount/config``, ``role/:name``, ``login`` with a service-account JWT made by
  :func:`service_account_jwt`; the fake plays the Kubernetes TokenReview itself, :func:`review_jwt`).
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import time
import uuid
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any

from tests.fakes.vault.api import ApiError, Request, Response, denied, envelope, no_content, no_route
from tests.fakes.vault.params import glob_match, go_duration, parse_bool, parse_list, parse_seconds, parse_string
from tests.fakes.vault.state import AuthMount, AuthRole, Namespace, Token, VaultState


def service_account_jwt(
    key: bytes,
    namespace: str,
    name: str,
    *,
    ttl: int = 3600,
    audience: Sequence[str] = ("https://kubernetes.default.svc",),
) -> str:
    """A projected service-account token as the kubelet writes it, signed with ``key`` (only
    :func:`review_jwt` with the same key accepts it)."""
    now = int(time.time())
    claims = {
        "aud": list(audience),
        "exp": now + ttl,
        "iat": now,
        "nbf": now,
        "iss": "https://kubernetes.default.svc.cluster.local",
        "kubernetes.io": {
            "namespace": namespace,
            "serviceaccount": {"name": name, "uid": str(uuid.uuid5(uuid.NAMESPACE_URL, f"{namespace}/{name}"))},
        },
        "sub": f"system:serviceaccount:{namespace}:{name}",
    }

    def b64(raw: bytes) -> str:
        return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()

    header = b64(json.dumps({"alg": "HS256", "typ": "JWT", "kid": "test"}).encode())
    payload = b64(json.dumps(claims).encode())
    signature = hmac.new(key, f"{header}.{payload}".encode(), hashlib.sha256).digest()
    return f"{header}.{payload}.{b64(signature)}"


# --- token auth ---------------------------------------------------------------------------------------------


def token_api(state: VaultState, req: Request, ns: Namespace) -> Response:
    """``auth/token/...``: lookup-self, renew-self, revoke-self, revoke, create, create-orphan."""
    op = req.rel.removeprefix("auth/token/")
    now = time.time()
    with state.lock:
        token = state.authorize(req, ns)
        if op == "lookup-self" and req.method in ("GET", "POST"):
            return envelope(_lookup_data(token, now))
        if op == "renew-self" and req.method in ("POST", "PUT"):
            return _renew(token, req.body.get("increment"), now)
        if op == "revoke-self" and req.method in ("POST", "PUT"):
            state.tokens.pop(token.id, None)
            return no_content()
        if op == "revoke" and req.method in ("POST", "PUT"):
            state.tokens.pop(parse_string(req.body.get("token"), "token"), None)
            return no_content()
        if op in ("create", "create-orphan") and req.method in ("POST", "PUT"):
            return _create_token(state, req, ns, token, orphan=op == "create-orphan")
    raise ApiError(405, "unsupported operation") if op in ("lookup-self", "renew-self") else no_route(req.rel)


def _lookup_data(token: Token, now: float) -> dict[str, Any]:
    def rfc3339(epoch: float) -> str:
        return datetime.fromtimestamp(epoch, UTC).isoformat().replace("+00:00", "Z")

    return {
        "accessor": token.accessor,
        "creation_time": int(token.issue_time),
        "creation_ttl": token.creation_ttl,
        "display_name": token.display_name,
        "entity_id": "",
        "expire_time": rfc3339(token.expire_at) if token.expire_at else None,
        "explicit_max_ttl": token.explicit_max_ttl,
        "id": token.id,
        "issue_time": rfc3339(token.issue_time),
        "meta": token.meta,
        "namespace_path": f"{token.namespace}/" if token.namespace else "",
        "num_uses": 0,
        "orphan": token.orphan,
        "path": token.path,
        "policies": sorted(token.policies),
        "renewable": token.renewable,
        "ttl": token.remaining(now),
        "type": "service",
    }


def _renew(token: Token, increment_raw: object, now: float) -> Response:
    if not token.renewable:
        raise ApiError(400, "lease is not renewable")
    max_valid = token.issue_time + token.max_ttl
    if now >= max_valid:
        raise ApiError(400, "past the max TTL, cannot renew")
    increment: float = parse_seconds(increment_raw, "increment") or token.creation_ttl
    warnings = []
    left = max_valid - now
    if increment > left:
        warnings.append(
            f'TTL of "{go_duration(increment)}" exceeded the effective max_ttl of "{go_duration(round(left))}"; '
            "TTL value is capped accordingly"
        )
        increment = left
    token.expire_at = now + increment
    return envelope(None, auth=token.auth_block(now), warnings=warnings)


def _create_token(state: VaultState, req: Request, ns: Namespace, parent: Token, orphan: bool) -> Response:
    body = req.body
    policies = parse_list(body.get("policies"), "policies") or [p for p in parent.policies if p != "root"]
    if "root" not in parent.policies and not set(policies) <= set(parent.policies) | {"default"}:
        raise ApiError(400, "child policies must be subset of parent")
    if not parse_bool(body.get("no_default_policy"), "no_default_policy", False) and "root" not in policies:
        policies = ["default", *policies]
    ttl = parse_seconds(body.get("ttl"), "ttl") or (0 if "root" in policies else state.default_lease_ttl)
    token = state.new_token(
        ns.name,
        policies,
        ttl=ttl,
        renewable=parse_bool(body.get("renewable"), "renewable", True),
        explicit_max_ttl=parse_seconds(body.get("explicit_max_ttl"), "explicit_max_ttl"),
        path="auth/token/create",
        meta=body.get("meta"),
        orphan=orphan or parse_bool(body.get("no_parent"), "no_parent", False),
        display_name="token-" + parse_string(body.get("display_name"), "display_name"),
    )
    return envelope(None, auth=token.auth_block(time.time()))


# --- AppRole and Kubernetes auth ------------------------------------------------------------------------


def auth_api(state: VaultState, req: Request, ns: Namespace) -> Response:
    """``auth/:mount/...`` of an AppRole or Kubernetes auth mount: ``login``, and role administration."""
    rest = req.rel.removeprefix("auth/")
    with state.lock:
        for path, mount in ns.auth.items():
            if rest.startswith(path + "/"):
                op = rest[len(path) + 1 :]
                if op == "login" and req.method in ("POST", "PUT"):
                    return _login(state, req, ns, mount)
                state.authorize(req, ns)
                return _auth_admin(req, mount, op)
    raise no_route(req.rel)


def _login(state: VaultState, req: Request, ns: Namespace, mount: AuthMount) -> Response:
    body = req.body
    if mount.type == "approle":
        role_id = parse_string(body.get("role_id"), "role_id")
        secret_id = parse_string(body.get("secret_id"), "secret_id")
        if not role_id:
            raise ApiError(400, "missing role_id")
        role = next((r for r in mount.roles.values() if r.role_id == role_id), None)
        if role is None or secret_id not in role.secret_ids:
            raise ApiError(400, "invalid role or secret ID")
        expiry = role.secret_ids[secret_id]
        if expiry is not None and time.time() >= expiry:
            del role.secret_ids[secret_id]
            raise ApiError(400, "invalid role or secret ID")
        meta = {"role_name": role.name}
    else:
        if not mount.configured:
            raise ApiError(400, "could not load backend configuration")
        role_name = parse_string(body.get("role"), "role")
        jwt = parse_string(body.get("jwt"), "jwt")
        if not role_name:
            raise ApiError(400, "missing role")
        if not jwt:
            raise ApiError(400, "missing jwt")
        role = mount.roles.get(role_name)
        if role is None:
            raise ApiError(400, f'invalid role name "{role_name}"')
        claims = review_jwt(state.jwt_key, jwt)
        sa = claims["kubernetes.io"]
        sa_namespace, sa_name = sa["namespace"], sa["serviceaccount"]["name"]
        if role.audience and role.audience not in claims.get("aud", []):
            raise denied()
        if not any(glob_match(p, sa_name) for p in role.service_account_names):
            raise ApiError(403, "service account name not authorized")
        if not any(glob_match(p, sa_namespace) for p in role.service_account_namespaces):
            raise ApiError(403, "namespace not authorized")
        meta = {
            "role": role.name,
            "service_account_name": sa_name,
            "service_account_namespace": sa_namespace,
            "service_account_uid": sa["serviceaccount"]["uid"],
            "service_account_secret_name": "",
        }
    token = state.new_token(
        ns.name,
        ["default", *role.policies],
        ttl=role.token_ttl or state.default_lease_ttl,
        renewable=True,
        max_ttl=role.token_max_ttl,
        path=f"auth/{mount.path}/login",
        meta=meta,
        orphan=True,
        display_name=f"{mount.path}-{role.name}",
    )
    return envelope(None, auth=token.auth_block(time.time()))


def review_jwt(key: bytes, jwt: str) -> dict[str, Any]:
    """What a Kubernetes TokenReview would say: the claims of a valid token, else permission denied."""
    try:
        header, payload, signature = jwt.split(".")
        expected = hmac.new(key, f"{header}.{payload}".encode(), hashlib.sha256).digest()
        given = base64.urlsafe_b64decode(signature + "=" * (-len(signature) % 4))
        claims: dict[str, Any] = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
    except (ValueError, TypeError):
        raise denied() from None
    if not hmac.compare_digest(expected, given) or claims.get("exp", 0) <= time.time():
        raise denied()
    return claims


def _auth_admin(req: Request, mount: AuthMount, op: str) -> Response:
    body = req.body
    if op == "config" and mount.type == "kubernetes" and req.method in ("POST", "PUT"):
        mount.configured = True
        return no_content()
    parts = op.split("/")
    if parts[0] != "role" or len(parts) < 2:
        raise ApiError(404, "unsupported path")
    name = parts[1]
    if len(parts) == 2:
        if req.method == "DELETE":
            mount.roles.pop(name, None)
            return no_content()
        if req.method not in ("POST", "PUT"):
            raise ApiError(405, "unsupported operation")
        policies = parse_list(body.get("token_policies") or body.get("policies"), "token_policies")
        role = AuthRole(
            name,
            policies,
            parse_seconds(body.get("token_ttl") or body.get("ttl"), "token_ttl"),
            parse_seconds(body.get("token_max_ttl") or body.get("max_ttl"), "token_max_ttl"),
            role_id=mount.roles[name].role_id if name in mount.roles else str(uuid.uuid4()),
            secret_id_ttl=parse_seconds(body.get("secret_id_ttl"), "secret_id_ttl"),
            service_account_names=parse_list(body.get("bound_service_account_names"), "bound_service_account_names"),
            service_account_namespaces=parse_list(
                body.get("bound_service_account_namespaces"), "bound_service_account_namespaces"
            ),
            audience=parse_string(body.get("audience"), "audience"),
        )
        if mount.type == "kubernetes" and not (role.service_account_names and role.service_account_namespaces):
            raise ApiError(400, '"bound_service_account_names" and "bound_service_account_namespaces" are required')
        mount.roles[name] = role
        return no_content()
    existing = mount.roles.get(name)
    if existing is None or mount.type != "approle":
        raise ApiError(400, f'role "{name}" does not exist')
    if parts[2] == "role-id" and req.method == "GET":
        return envelope({"role_id": existing.role_id})
    if parts[2] == "secret-id" and req.method in ("POST", "PUT"):
        secret_id = VaultState.new_secret_id(existing)
        return envelope(
            {
                "secret_id": secret_id,
                "secret_id_accessor": str(uuid.uuid4()),
                "secret_id_ttl": existing.secret_id_ttl,
            }
        )
    raise ApiError(404, "unsupported path")
