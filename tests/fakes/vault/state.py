"""The Vault fake's in-memory state: namespaces with their PKI mounts (CA, roles) and auth mounts (AppRole,
Kubernetes roles), ACL policies, tokens with their leases, the seal flags, and what the test controls add (the
faults to inject, the request log). :class:`VaultState` holds it all behind one lock and answers the questions
every endpoint asks: which namespace, which token, may it do this."""

from __future__ import annotations

import re
import secrets
import threading
import time
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa

from tests.fakes.vault.acl import DEFAULT_POLICY, NEEDED, Rules, granted
from tests.fakes.vault.api import ApiError, Request, denied
from tests.fakes.vault.params import (
    glob_match,
    parse_bool,
    parse_int,
    parse_list,
    parse_seconds,
    parse_string,
    unknown_params_warning,
)

SYSTEM_DEFAULT_TTL = 768 * 3600  # Vault's default_lease_ttl and max_lease_ttl out of the box: 32 days
SYSTEM_MAX_TTL = 768 * 3600
TEN_YEARS = 87600 * 3600

PrivateKey = ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey | ed25519.Ed25519PrivateKey
PublicKey = ec.EllipticCurvePublicKey | rsa.RSAPublicKey | ed25519.Ed25519PublicKey

# Vault's hostnameRegex (builtin/logical/pki).
HOSTNAME = re.compile(
    r"^(\*\.)?(([a-zA-Z0-9]|[a-zA-Z0-9][a-zA-Z0-9\-]*[a-zA-Z0-9])\.)*"
    r"([A-Za-z0-9]|[A-Za-z0-9][A-Za-z0-9\-]*[A-Za-z0-9])\.?$"
)


def normalize_namespace(raw: str) -> str:
    name = raw.strip().strip("/")
    return "" if name == "root" else name


def within(parent: str, child: str) -> bool:
    return parent == "" or child == parent or child.startswith(parent + "/")


# --- tokens -------------------------------------------------------------------------------------------------


@dataclass
class Token:
    id: str
    accessor: str
    namespace: str
    policies: tuple[str, ...]
    path: str
    creation_ttl: int  # 0: never expires
    renewable: bool
    explicit_max_ttl: int
    issue_time: float
    expire_at: float | None
    meta: dict[str, str] | None = None
    display_name: str = "token"
    orphan: bool = False
    max_ttl: int = SYSTEM_MAX_TTL  # the login path's (role's) max TTL, or the system max

    def expired(self, now: float) -> bool:
        return self.expire_at is not None and now >= self.expire_at

    def auth_block(self, now: float) -> dict[str, Any]:
        return {
            "client_token": self.id,
            "accessor": self.accessor,
            "policies": sorted(self.policies),
            "token_policies": sorted(self.policies),
            "identity_policies": None,
            "metadata": self.meta,
            "lease_duration": self.remaining(now),
            "renewable": self.renewable,
            "entity_id": "",
            "token_type": "service",
            "orphan": self.orphan,
            "mfa_requirement": None,
            "num_uses": 0,
        }

    def remaining(self, now: float) -> int:
        return 0 if self.expire_at is None else max(0, round(self.expire_at - now))


# --- PKI mounts ---------------------------------------------------------------------------------------------


@dataclass
class Issuer:
    """A CA of a PKI mount: its certificate and key, and the certificates above it (its parents, up to the root
    when Vault knows them)."""

    certificate: x509.Certificate
    key: PrivateKey
    parents: list[x509.Certificate] = field(default_factory=list)
    issuer_id: str = field(default_factory=lambda: str(uuid.uuid4()))
    key_id: str = field(default_factory=lambda: str(uuid.uuid4()))

    @property
    def chain(self) -> list[x509.Certificate]:
        return [self.certificate, *self.parents]

    def chain_pems(self, remove_roots: bool = False) -> list[str]:
        return [
            c.public_bytes(serialization.Encoding.PEM).decode()
            for c in self.chain
            if not (remove_roots and c.issuer == c.subject)
        ]

    @property
    def max_path_length(self) -> int | None:
        return self.certificate.extensions.get_extension_for_class(x509.BasicConstraints).value.path_length


@dataclass
class PkiRole:
    """A PKI role with Vault's defaults; :meth:`from_params` reads the API's parameters."""

    name: str
    ttl: int = 0
    max_ttl: int = 0
    allow_localhost: bool = True
    allowed_domains: list[str] = field(default_factory=list)
    allow_bare_domains: bool = False
    allow_subdomains: bool = False
    allow_glob_domains: bool = False
    allow_wildcard_certificates: bool = True
    allow_any_name: bool = False
    enforce_hostnames: bool = True
    allow_ip_sans: bool = True
    allowed_uri_sans: list[str] = field(default_factory=list)
    server_flag: bool = True
    client_flag: bool = True
    code_signing_flag: bool = False
    email_protection_flag: bool = False
    key_type: str = "rsa"
    key_bits: int = 0
    key_usage: list[str] = field(default_factory=lambda: ["DigitalSignature", "KeyAgreement", "KeyEncipherment"])
    use_csr_common_name: bool = True
    use_csr_sans: bool = True
    require_cn: bool = True
    ou: list[str] = field(default_factory=list)
    organization: list[str] = field(default_factory=list)
    basic_constraints_valid_for_non_ca: bool = False
    not_before_duration: int = 30
    generate_lease: bool = False
    no_store: bool = False
    issuer_ref: str = "default"

    _DURATIONS = ("ttl", "max_ttl", "not_before_duration")
    # accepted as Vault does, without effect here
    _IGNORED = frozenset(
        {
            "allowed_uri_sans_template",
            "allowed_domains_template",
            "allowed_other_sans",
            "allowed_serial_numbers",
            "ext_key_usage",
            "ext_key_usage_oids",
            "policy_identifiers",
            "cn_validations",
            "allowed_user_ids",
            "signature_bits",
            "use_pss",
            "country",
            "locality",
            "province",
            "street_address",
            "postal_code",
            "not_after",
            "serial_number_source",
            "no_store_metadata",
            "allow_token_displayname",
            "backend",
        }
    )
    _LISTS = ("allowed_domains", "allowed_uri_sans", "key_usage", "ou", "organization")
    _STRINGS = ("key_type", "issuer_ref")

    @classmethod
    def from_params(cls, name: str, params: Mapping[str, Any]) -> tuple[PkiRole, list[str]]:
        role = cls(name)
        known = set(cls._IGNORED)
        for key, value in params.items():
            if key not in cls.__dataclass_fields__ or key == "name" or key.startswith("_"):
                continue
            known.add(key)
            current = getattr(role, key)
            if key in cls._DURATIONS:
                setattr(role, key, parse_seconds(value, key))
            elif key in cls._LISTS:
                setattr(role, key, parse_list(value, key))
            elif key in cls._STRINGS:
                setattr(role, key, parse_string(value, key))
            elif isinstance(current, bool):
                setattr(role, key, parse_bool(value, key, current))
            elif isinstance(current, int):
                setattr(role, key, parse_int(value, key, current))
        if role.key_type not in ("rsa", "ec", "ed25519", "any"):
            raise ApiError(400, f"unknown key type {role.key_type}")
        if role.key_type == "ec" and role.key_bits not in (0, 224, 256, 384, 521):
            raise ApiError(400, f"unsupported bit length for EC key: {role.key_bits}")
        if role.key_type == "rsa" and role.key_bits not in (0, 2048, 3072, 4096, 8192):
            raise ApiError(400, f"unsupported bit length for RSA key: {role.key_bits}")
        if role.max_ttl and role.ttl > role.max_ttl:
            raise ApiError(400, '"ttl" value must be less than "max_ttl" value')
        return role, unknown_params_warning(params, frozenset(known))

    def to_data(self) -> dict[str, Any]:
        data = {k: getattr(self, k) for k in self.__dataclass_fields__ if k != "name" and not k.startswith("_")}
        data["key_bits"] = self.key_bits or {"rsa": 2048, "ec": 256}.get(self.key_type, 0)
        return data

    def name_allowed(self, name: str) -> bool:
        """Vault's ValidateNames for one CN, DNS or email name (wildcards, hostnames, domains, any-name)."""
        reduced, is_email = name, False
        if "@" in reduced:
            parts = reduced.split("@")
            if len(parts) != 2:
                return False
            reduced, is_email = parts[1], True
        is_wildcard = "*" in reduced.split(".", 1)[0]
        if is_wildcard:
            if not self.allow_wildcard_certificates or is_email:
                return False
            reduced = reduced.split(".", 1)[1] if "." in reduced else ""
        if self.enforce_hostnames and reduced and not HOSTNAME.match(reduced):
            return False
        if self.allow_any_name:
            return True
        if self.allow_localhost and reduced in ("localhost", "localdomain", "localhost.localdomain"):
            return True
        for domain in self.allowed_domains:
            if self.allow_bare_domains and name.lower() == domain.lower():
                return True
            if self.allow_subdomains and (
                reduced.lower().endswith("." + domain.lower()) or (is_wildcard and reduced == domain)
            ):
                return True
            if self.allow_glob_domains and "*" in domain and glob_match(domain.lower(), name.lower()):
                return True
        return False

    def uri_allowed(self, uri: str) -> bool:
        return any(glob_match(pattern, uri) for pattern in self.allowed_uri_sans)


@dataclass
class PkiMount:
    path: str
    default_lease_ttl: int
    max_lease_ttl: int
    issuer: Issuer | None = None
    roles: dict[str, PkiRole] = field(default_factory=dict)
    pending_keys: list[PrivateKey] = field(default_factory=list)

    def require_issuer(self) -> Issuer:
        if self.issuer is None:
            raise ApiError(400, "no default issuer currently configured")
        return self.issuer


# --- auth mounts and namespaces -----------------------------------------------------------------------------


@dataclass
class AuthRole:
    """An AppRole or Kubernetes auth role."""

    name: str
    policies: list[str]
    token_ttl: int
    token_max_ttl: int
    role_id: str = ""
    secret_ids: dict[str, float | None] = field(default_factory=dict)  # secret id -> expiry (None: never)
    secret_id_ttl: int = 0
    service_account_names: list[str] = field(default_factory=list)
    service_account_namespaces: list[str] = field(default_factory=list)
    audience: str = ""


@dataclass
class AuthMount:
    path: str
    type: str  # "approle" or "kubernetes"
    roles: dict[str, AuthRole] = field(default_factory=dict)
    configured: bool = False


@dataclass
class Namespace:
    name: str  # "" is the root namespace
    pki: dict[str, PkiMount] = field(default_factory=dict)
    auth: dict[str, AuthMount] = field(default_factory=dict)
    policies: dict[str, Rules] = field(default_factory=lambda: {"default": list(DEFAULT_POLICY)})


# --- test controls: faults and the request log --------------------------------------------------------------


@dataclass(frozen=True)
class RequestRecord:
    method: str
    path: str
    namespace: str
    status: int


@dataclass
class Fault:
    remaining: int
    status: int | None  # None: drop the connection without an answer
    errors: tuple[str, ...]
    path: str | None  # exact path, or a prefix ending in "*"

    def matches(self, path: str) -> bool:
        if self.path is None:
            return True
        if self.path.endswith("*"):
            return path.startswith(self.path[:-1])
        return path == self.path


# --- the state ----------------------------------------------------------------------------------------------


class VaultState:
    """Everything the server knows. Take :attr:`lock` around reads and writes (it is re-entrant); the helpers
    below expect it held."""

    def __init__(self, default_lease_ttl: int = SYSTEM_DEFAULT_TTL, max_lease_ttl: int = SYSTEM_MAX_TTL) -> None:
        self.default_lease_ttl = default_lease_ttl
        self.max_lease_ttl = max_lease_ttl
        self.lock = threading.RLock()
        self.namespaces: dict[str, Namespace] = {"": Namespace("")}
        self.tokens: dict[str, Token] = {}
        self.sealed_flag = False
        self.initialized = True
        self.standby = False
        self.faults: list[Fault] = []
        self.records: list[RequestRecord] = []
        self.jwt_key = secrets.token_bytes(32)  # signs the service-account JWTs the Kubernetes auth reviews
        self.cluster_id = str(uuid.uuid4())

    @property
    def sealed(self) -> bool:
        return self.sealed_flag or not self.initialized

    def namespace(self, name: str) -> Namespace:
        ns = self.namespaces.get(normalize_namespace(name))
        if ns is None:
            raise KeyError(f"no namespace {name!r}")
        return ns

    def auth_mount(self, namespace: str, path: str, kind: str) -> AuthMount:
        ns = self.namespace(namespace)
        auth = ns.auth.setdefault(path, AuthMount(path, kind))
        if auth.type != kind:
            raise ValueError(f"auth mount {path!r} is a {auth.type} mount, not {kind}")
        return auth

    # tokens

    def new_token(
        self,
        namespace: str,
        policies: Sequence[str],
        *,
        ttl: int,
        renewable: bool,
        path: str,
        explicit_max_ttl: int = 0,
        max_ttl: int = 0,
        meta: dict[str, str] | None = None,
        orphan: bool = False,
        display_name: str = "token",
    ) -> Token:
        now = time.time()
        effective_max = min(t for t in (explicit_max_ttl, max_ttl or self.max_lease_ttl) if t > 0)
        if ttl > effective_max:
            ttl = effective_max
        token = Token(
            id="hvs." + secrets.token_urlsafe(18),
            accessor=secrets.token_urlsafe(18),
            namespace=namespace,
            policies=tuple(dict.fromkeys(policies)),
            path=path,
            creation_ttl=ttl,
            renewable=renewable and ttl > 0,
            explicit_max_ttl=explicit_max_ttl,
            issue_time=now,
            expire_at=now + ttl if ttl > 0 else None,
            meta=meta,
            orphan=orphan,
            display_name=display_name,
            max_ttl=effective_max,
        )
        self.tokens[token.id] = token
        return token

    @staticmethod
    def new_secret_id(role: AuthRole) -> str:
        secret_id = str(uuid.uuid4())
        role.secret_ids[secret_id] = time.time() + role.secret_id_ttl if role.secret_id_ttl else None
        return secret_id

    def valid_token(self, raw: str) -> Token:
        token = self.tokens.get(raw)
        if token is None:
            raise denied()
        if token.expired(time.time()):
            del self.tokens[raw]
            raise denied()
        return token

    # authorization

    def authorize(self, req: Request, ns: Namespace) -> Token:
        """The request's token, if it may do ``req.method`` on ``req.rel`` in namespace ``ns``."""
        token = self.valid_token(req.token)
        if not within(token.namespace, ns.name):
            raise denied()
        needed = NEEDED.get(req.method, set())
        if "list" in req.query and req.method == "GET":
            needed = {"list"}
        caps = self.capabilities(token, ns, req.rel)
        if "root" not in caps and ("deny" in caps or not caps & needed):
            raise denied()
        return token

    def capabilities(self, token: Token, ns: Namespace, rel: str) -> set[str]:
        """What ``token``'s policies grant on ``rel`` in namespace ``ns`` (``{"root"}`` for a root token)."""
        if "root" in token.policies:
            return {"root"}
        relative = ns.name[len(token.namespace) :].strip("/") if token.namespace else ns.name
        path = f"{relative}/{rel}" if relative else rel
        home = self.namespaces[token.namespace]
        caps: set[str] = set()
        for name in token.policies:
            caps |= granted(home.policies.get(name, []), path)
        return {"deny"} if "deny" in caps else caps

    # faults and the request log

    def take_fault(self, path: str) -> Fault | None:
        """The fault the next request to ``path`` meets, counted down; None when it is answered normally."""
        with self.lock:
            for fault in self.faults:
                if fault.remaining > 0 and fault.matches(path):
                    fault.remaining -= 1
                    return fault
            self.faults = [f for f in self.faults if f.remaining > 0]
        return None

    def record(self, method: str, path: str, namespace: str, status: int) -> None:
        with self.lock:
            self.records.append(RequestRecord(method, path, namespace, status))
