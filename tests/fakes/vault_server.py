"""A HashiCorp Vault HTTP API server for tests, with real crypto.

No Vault can be installed on the machines this project is tested on, so the Vault provider's tests drive this
server through the real ``hvac`` client, over real HTTP or HTTPS on an ephemeral loopback port. It speaks the
parts of Vault's documented HTTP API that a PKI client uses, with Vault's response envelope (``request_id``,
``lease_id``, ``lease_duration``, ``renewable``, ``data``, ``auth``, ``warnings``) and error shape
(``{"errors": [...]}``):

* ``sys/health`` (200 active, 429 standby, 501 not initialised, 503 sealed, and the ``*code`` query
  parameters), ``sys/seal-status``, ``sys/capabilities-self``, ``sys/mounts/:path`` (enable, tune, disable a ``pki`` engine),
  ``sys/auth/:path`` (enable ``approle`` or ``kubernetes``), ``sys/policy/:name`` (HCL or JSON policies).
* Token auth: ``auth/token/lookup-self``, ``renew-self`` (Vault's max-TTL capping and warning),
  ``revoke-self``, ``revoke``, ``create``. Tokens expire on the wall clock, renewable or not, with a max TTL.
* AppRole (``auth/:mount/role/:name``, ``role-id``, ``secret-id``, ``login``) and Kubernetes auth
  (``auth/:mount/config``, ``role/:name``, ``login`` with a service-account JWT made by
  :meth:`VaultServer.service_account_jwt`; this server plays the Kubernetes TokenReview itself).
* PKI on any number of mounts: ``root/generate/internal``, ``intermediate/generate/internal``,
  ``intermediate/set-signed``, ``root/sign-intermediate``, ``sign/:role``, ``issue/:role``, ``roles/:name``
  (read, write, delete), ``ca_chain``, ``cert/ca``, ``cert/ca_chain``, ``ca``, ``ca/pem``. Role rules follow
  Vault: ``allowed_uri_sans`` globs, ``allow_any_name``, ``allowed_domains`` and friends, ``enforce_hostnames``,
  ``require_cn``, ``use_csr_common_name``, ``use_csr_sans``, ``key_type``; a TTL above the role's (or the
  mount's) max is capped with Vault's warning; a leaf past its issuer's NotAfter is refused, an intermediate
  is truncated to it.
* ``X-Vault-Token`` and ACL policies (``path "pki/sign/*" { capabilities = ["update"] }``); ``X-Vault-Namespace``
  (a token works only in its own namespace and those below it; mounts, auth methods and policies belong to a
  namespace). Only the header selects a namespace, not a path prefix.

Test controls in Python: :meth:`~VaultServer.seal`, :meth:`~VaultServer.unseal`, :meth:`~VaultServer.stop` and
:meth:`~VaultServer.start` (an outage: connections are refused and open ones are cut), fail or drop the next N
requests, token TTLs, request counters per path, and shortcuts to create namespaces, mounts, roles, policies,
tokens, AppRole credentials and Kubernetes roles.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import hashlib
import hmac
import ipaddress
import json
import re
import secrets
import socket
import ssl
import sys
import threading
import time
import uuid
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

VAULT_VERSION = "1.17.2"
SYSTEM_DEFAULT_TTL = 768 * 3600  # Vault's default_lease_ttl and max_lease_ttl out of the box: 32 days
SYSTEM_MAX_TTL = 768 * 3600
TEN_YEARS = 87600 * 3600

PrivateKey = ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey | ed25519.Ed25519PrivateKey
PublicKey = ec.EllipticCurvePublicKey | rsa.RSAPublicKey | ed25519.Ed25519PublicKey

# Vault's hostnameRegex (builtin/logical/pki).
_HOSTNAME = re.compile(
    r"^(\*\.)?(([a-zA-Z0-9]|[a-zA-Z0-9][a-zA-Z0-9\-]*[a-zA-Z0-9])\.)*"
    r"([A-Za-z0-9]|[A-Za-z0-9][A-Za-z0-9\-]*[A-Za-z0-9])\.?$"
)
_GO_DURATION_PART = re.compile(r"(\d+(?:\.\d*)?|\.\d+)(ns|us|µs|ms|s|m|h|d)")
_GO_UNITS = {"ns": 1e-9, "us": 1e-6, "µs": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}


class ApiError(Exception):
    """An error answer: HTTP ``status`` with ``{"errors": errors}``."""

    def __init__(self, status: int, *errors: str) -> None:
        super().__init__(f"{status}: {'; '.join(errors)}")
        self.status = status
        self.errors = list(errors)


def _denied() -> ApiError:
    return ApiError(403, "permission denied")


def _no_route(rel: str) -> ApiError:
    return ApiError(404, f'no handler for route "{rel}". route entry not found.')


# --- Vault's parameter types -------------------------------------------------------------------------------


def go_duration(seconds: float) -> str:
    """Format whole seconds the way Go's ``time.Duration.String`` does: ``768h0m0s``, ``10m0s``, ``30s``."""
    if seconds == 0:
        return "0s"
    sign = "-" if seconds < 0 else ""
    hours, rest = divmod(abs(round(seconds)), 3600)
    minutes, secs = divmod(rest, 60)
    if hours:
        return f"{sign}{hours}h{minutes}m{secs}s"
    if minutes:
        return f"{sign}{minutes}m{secs}s"
    return f"{sign}{secs}s"


def parse_seconds(value: object, name: str) -> int:
    """A Vault duration field: seconds as a number or digits, or a Go duration string (``1h30m``, ``7d``)."""
    if value is None or value == "":
        return 0
    if isinstance(value, int | float) and not isinstance(value, bool) and value >= 0:
        return int(value)
    if isinstance(value, str):
        text = value.strip()
        if text.isdigit():
            return int(text)
        position, total = 0, 0.0
        for match in _GO_DURATION_PART.finditer(text):
            if match.start() != position:
                break
            total += float(match.group(1)) * _GO_UNITS[match.group(2)]
            position = match.end()
        if position == len(text) and position > 0:
            return int(total)
    raise ApiError(400, f'error converting input {value} for field "{name}": time: invalid duration "{value}"')


def parse_bool(value: object, name: str, default: bool) -> bool:
    if value is None:
        return default
    if isinstance(value, bool):
        return value
    if isinstance(value, int):
        return value != 0
    if isinstance(value, str) and value.lower() in ("true", "t", "1"):
        return True
    if isinstance(value, str) and value.lower() in ("false", "f", "0", ""):
        return False
    raise ApiError(400, f'error converting input {value} for field "{name}": invalid boolean')


def parse_int(value: object, name: str, default: int) -> int:
    if value is None or value == "":
        return default
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    if isinstance(value, str) and re.fullmatch(r"-?\d+", value.strip()):
        return int(value)
    raise ApiError(400, f'error converting input {value} for field "{name}": invalid integer')


def parse_list(value: object, name: str) -> list[str]:
    """A Vault comma-separated-string-or-list field."""
    if value is None or value == "":
        return []
    if isinstance(value, str):
        return [part.strip() for part in value.split(",") if part.strip()]
    if isinstance(value, list) and all(isinstance(v, str) for v in value):
        return [v.strip() for v in value if v.strip()]
    raise ApiError(400, f'error converting input {value} for field "{name}": not a list of strings')


def parse_string(value: object, name: str) -> str:
    if value is None:
        return ""
    if isinstance(value, str):
        return value
    raise ApiError(400, f'error converting input {value} for field "{name}": not a string')


def glob_match(pattern: str, value: str) -> bool:
    """Vault's glob (ryanuber/go-glob): ``*`` matches any run of characters, ``/`` included."""
    if pattern == "*":
        return True
    regex = ".*".join(re.escape(part) for part in pattern.split("*"))
    return re.fullmatch(regex, value, flags=re.DOTALL) is not None


def _unknown_params_warning(params: Mapping[str, Any], known: frozenset[str]) -> list[str]:
    unknown = sorted(set(params) - known)
    return [f"Endpoint ignored these unrecognized parameters: [{' '.join(unknown)}]"] if unknown else []


# --- crypto -------------------------------------------------------------------------------------------------


def new_key(key_type: str, bits: int = 0) -> PrivateKey:
    if key_type == "ec":
        curves: dict[int, ec.EllipticCurve] = {
            224: ec.SECP224R1(),
            256: ec.SECP256R1(),
            384: ec.SECP384R1(),
            521: ec.SECP521R1(),
        }
        if (bits or 256) not in curves:
            raise ApiError(400, f"unsupported bit length for EC key: {bits}")
        return ec.generate_private_key(curves[bits or 256])
    if key_type == "rsa":
        if (bits or 2048) not in (2048, 3072, 4096, 8192):
            raise ApiError(400, f"unsupported bit length for RSA key: {bits}")
        return rsa.generate_private_key(public_exponent=65537, key_size=bits or 2048)
    if key_type == "ed25519":
        return ed25519.Ed25519PrivateKey.generate()
    raise ApiError(400, f"unknown key type: {key_type}")


def _key_type_of(key: object) -> tuple[str, int]:
    if isinstance(key, ec.EllipticCurvePublicKey | ec.EllipticCurvePrivateKey):
        return "ec", key.curve.key_size
    if isinstance(key, rsa.RSAPublicKey | rsa.RSAPrivateKey):
        return "rsa", key.key_size
    if isinstance(key, ed25519.Ed25519PublicKey | ed25519.Ed25519PrivateKey):
        return "ed25519", 0
    return "unknown", 0


def _hash_for(key: PrivateKey) -> hashes.HashAlgorithm | None:
    if isinstance(key, ed25519.Ed25519PrivateKey):
        return None
    if isinstance(key, ec.EllipticCurvePrivateKey) and key.curve.key_size > 384:
        return hashes.SHA512()
    if isinstance(key, ec.EllipticCurvePrivateKey) and key.curve.key_size > 256:
        return hashes.SHA384()
    return hashes.SHA256()


def pem(cert: x509.Certificate) -> str:
    return cert.public_bytes(serialization.Encoding.PEM).decode()


def serial_text(serial: int) -> str:
    """Vault's serial format: colon-separated lowercase hex octets."""
    raw = serial.to_bytes(max(1, (serial.bit_length() + 7) // 8), "big")
    return ":".join(f"{b:02x}" for b in raw)


def _public_key(key: PrivateKey) -> PublicKey:
    return key.public_key()


def _aki(issuer: x509.Certificate) -> x509.AuthorityKeyIdentifier:
    ski = issuer.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    return x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski)


def _key_usage(names: Iterable[str]) -> x509.KeyUsage:
    wanted = {n.lower().removeprefix("keyusage") for n in names}
    return x509.KeyUsage(
        digital_signature="digitalsignature" in wanted,
        content_commitment="contentcommitment" in wanted,
        key_encipherment="keyencipherment" in wanted,
        data_encipherment="dataencipherment" in wanted,
        key_agreement="keyagreement" in wanted,
        key_cert_sign="certsign" in wanted,
        crl_sign="crlsign" in wanted,
        encipher_only=False,
        decipher_only=False,
    )


def _subject(common_name: str, organization: Sequence[str] = (), ou: Sequence[str] = ()) -> x509.Name:
    attributes = [x509.NameAttribute(NameOID.ORGANIZATION_NAME, o) for o in organization]
    attributes += [x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, u) for u in ou]
    if common_name:
        attributes.append(x509.NameAttribute(NameOID.COMMON_NAME, common_name))
    return x509.Name(attributes)


def _random_serial() -> int:
    return secrets.randbits(159) | 1


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
        return [pem(c) for c in self.chain if not (remove_roots and c.issuer == c.subject)]

    @property
    def max_path_length(self) -> int | None:
        return self.certificate.extensions.get_extension_for_class(x509.BasicConstraints).value.path_length


def build_ca(
    *,
    subject: x509.Name,
    public_key: PublicKey,
    signer: Issuer | None,
    signer_key: PrivateKey,
    not_after: datetime,
    now: datetime,
    path_length: int | None,
    sans: Sequence[x509.GeneralName] = (),
) -> x509.Certificate:
    """A CA certificate the way Vault makes them: CA:true (critical), CertSign+CRLSign, SKID/AKID."""
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(signer.certificate.subject if signer else subject)
        .public_key(public_key)
        .serial_number(_random_serial())
        .not_valid_before(now - timedelta(seconds=30))
        .not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=True, path_length=path_length), critical=True)
        .add_extension(_key_usage(["CertSign", "CRLSign"]), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public_key), critical=False)
    )
    if signer is not None:
        builder = builder.add_extension(_aki(signer.certificate), critical=False)
    if sans:
        builder = builder.add_extension(x509.SubjectAlternativeName(list(sans)), critical=False)
    return builder.sign(signer_key, _hash_for(signer_key))  # type: ignore[arg-type]


def new_root(common_name: str, ttl: int, key_type: str = "ec", key_bits: int = 0) -> Issuer:
    key = new_key(key_type, key_bits)
    now = datetime.now(UTC)
    cert = build_ca(
        subject=_subject(common_name),
        public_key=_public_key(key),
        signer=None,
        signer_key=key,
        not_after=now + timedelta(seconds=ttl),
        now=now,
        path_length=None,
    )
    return Issuer(cert, key)


def new_intermediate(parent: Issuer, common_name: str, ttl: int, key_type: str = "ec") -> Issuer:
    key = new_key(key_type)
    now = datetime.now(UTC)
    cert = build_ca(
        subject=_subject(common_name),
        public_key=_public_key(key),
        signer=parent,
        signer_key=parent.key,
        not_after=min(now + timedelta(seconds=ttl), parent.certificate.not_valid_after_utc),
        now=now,
        path_length=None,
    )
    return Issuer(cert, key, parents=parent.chain)


# --- listener TLS -------------------------------------------------------------------------------------------


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
        ca = new_root("Vault listener test CA", 86400)
        now = datetime.now(UTC)

        def leaf(name: str, sans: list[x509.GeneralName], eku: x509.ObjectIdentifier) -> tuple[bytes, bytes]:
            key = ec.generate_private_key(ec.SECP256R1())
            cert = (
                x509.CertificateBuilder()
                .subject_name(_subject(name))
                .issuer_name(ca.certificate.subject)
                .public_key(key.public_key())
                .serial_number(_random_serial())
                .not_valid_before(now - timedelta(minutes=1))
                .not_valid_after(now + timedelta(days=1))
                .add_extension(x509.SubjectAlternativeName(sans), critical=False)
                .add_extension(x509.ExtendedKeyUsage([eku]), critical=False)
                .add_extension(_aki(ca.certificate), critical=False)
                .sign(ca.key, hashes.SHA256())
            )
            key_pem = key.private_bytes(
                serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
            )
            return cert.public_bytes(serialization.Encoding.PEM), key_pem

        server_sans: list[x509.GeneralName] = [x509.DNSName(h) for h in hostnames]
        server_sans += [x509.IPAddress(ipaddress.ip_address(i)) for i in ips]
        server_cert, server_key = leaf("vault server", server_sans, ExtendedKeyUsageOID.SERVER_AUTH)
        client_cert, client_key = leaf("vault client", [x509.DNSName("client")], ExtendedKeyUsageOID.CLIENT_AUTH)
        files = cls(
            ca_file=directory / "vault-ca.pem",
            cert_file=directory / "vault-server.pem",
            key_file=directory / "vault-server-key.pem",
            client_cert_file=directory / "vault-client.pem",
            client_key_file=directory / "vault-client-key.pem",
        )
        files.ca_file.write_text(pem(ca.certificate))
        files.cert_file.write_bytes(server_cert)
        files.key_file.write_bytes(server_key)
        files.client_cert_file.write_bytes(client_cert)
        files.client_key_file.write_bytes(client_key)
        for secret in (files.key_file, files.client_key_file):
            secret.chmod(0o600)
        return files


# --- state --------------------------------------------------------------------------------------------------

_CAPABILITIES = frozenset({"create", "read", "update", "delete", "list", "patch", "sudo", "deny"})
_DEFAULT_POLICY = (
    ("auth/token/lookup-self", frozenset({"read"})),
    ("auth/token/renew-self", frozenset({"update"})),
    ("auth/token/revoke-self", frozenset({"update"})),
    ("sys/capabilities-self", frozenset({"update"})),
)


def _acl_match(pattern: str, path: str) -> bool:
    prefix = pattern.endswith("*")
    body = pattern[:-1] if prefix else pattern
    regex = "[^/]+".join(re.escape(part) for part in body.split("+"))
    return re.fullmatch(regex + (".*" if prefix else ""), path, flags=re.DOTALL) is not None


def parse_policy(text: str) -> list[tuple[str, frozenset[str]]]:
    """Parse an ACL policy in HCL (``path "x" { capabilities = ["read"] }``) or its JSON form."""
    rules: list[tuple[str, frozenset[str]]] = []
    stripped = text.strip()
    if stripped.startswith("{"):
        try:
            paths = json.loads(stripped).get("path", {})
            for path, body in paths.items():
                rules.append((path, frozenset(body.get("capabilities", []))))
        except (ValueError, AttributeError) as err:
            raise ApiError(400, f"failed to parse policy: {err}") from None
    else:
        for match in re.finditer(r'path\s+"([^"]+)"\s*\{([^}]*)\}', text):
            caps = re.search(r"capabilities\s*=\s*\[([^\]]*)\]", match.group(2))
            names = re.findall(r'"([^"]+)"', caps.group(1)) if caps else []
            rules.append((match.group(1), frozenset(names)))
        if not rules and stripped:
            raise ApiError(400, "failed to parse policy: no path stanzas found")
    for path, granted in rules:
        bad = granted - _CAPABILITIES
        if bad:
            raise ApiError(400, f'failed to parse policy: path "{path}": invalid capabilities {sorted(bad)}')
    return rules


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
        return role, _unknown_params_warning(params, frozenset(known))

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
        if self.enforce_hostnames and reduced and not _HOSTNAME.match(reduced):
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
    policies: dict[str, list[tuple[str, frozenset[str]]]] = field(
        default_factory=lambda: {"default": list(_DEFAULT_POLICY)}
    )


@dataclass(frozen=True)
class RequestRecord:
    method: str
    path: str
    namespace: str
    status: int


@dataclass
class _Fault:
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


@dataclass
class Request:
    method: str
    rel: str  # the path after /v1/, without slashes at either end
    query: dict[str, list[str]]
    body: dict[str, Any]
    namespace: str
    token: str


@dataclass
class Response:
    status: int
    body: bytes = b""
    content_type: str = "application/json"


def _envelope(
    data: Mapping[str, Any] | None = None,
    *,
    auth: Mapping[str, Any] | None = None,
    warnings: Sequence[str] = (),
    mount_type: str = "",
) -> Response:
    body = {
        "request_id": str(uuid.uuid4()),
        "lease_id": "",
        "renewable": False,
        "lease_duration": 0,
        "data": dict(data) if data is not None else None,
        "wrap_info": None,
        "warnings": list(warnings) or None,
        "auth": dict(auth) if auth is not None else None,
        "mount_type": mount_type,
    }
    return Response(200, json.dumps(body).encode())


def _no_content() -> Response:
    return Response(204)


def _error(status: int, errors: Sequence[str]) -> Response:
    return Response(status, json.dumps({"errors": list(errors)}).encode())


def _normalize_namespace(raw: str) -> str:
    name = raw.strip().strip("/")
    return "" if name == "root" else name


def _within(parent: str, child: str) -> bool:
    return parent == "" or child == parent or child.startswith(parent + "/")


# --- the server ---------------------------------------------------------------------------------------------


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
        self.default_lease_ttl = default_lease_ttl
        self.max_lease_ttl = max_lease_ttl
        self._lock = threading.RLock()
        self._namespaces: dict[str, Namespace] = {"": Namespace("")}
        self._tokens: dict[str, Token] = {}
        self._sealed = False
        self._initialized = True
        self._standby = False
        self._faults: list[_Fault] = []
        self._records: list[RequestRecord] = []
        self._jwt_key = secrets.token_bytes(32)
        self._cluster_id = str(uuid.uuid4())
        self._port = 0
        self._httpd: _Httpd | None = None
        self._thread: threading.Thread | None = None
        self.root_token = self._new_token("", ("root",), ttl=0, renewable=False, path="auth/token/root").id

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
        httpd = _Httpd((self.host, self._port), _Handler, self, context)
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
        with self._lock:
            self._sealed = True

    def unseal(self) -> None:
        with self._lock:
            self._sealed = False

    def set_initialized(self, initialized: bool) -> None:
        with self._lock:
            self._initialized = initialized

    def set_standby(self, standby: bool) -> None:
        with self._lock:
            self._standby = standby

    @property
    def sealed(self) -> bool:
        return self._sealed or not self._initialized

    # faults and counters

    def fail_next(
        self, count: int, status: int = 500, errors: Sequence[str] = ("internal error",), path: str | None = None
    ) -> None:
        """Answer the next ``count`` requests (to ``path``, exact or a ``prefix*``; any path when None) with
        ``status`` and ``{"errors": errors}``."""
        with self._lock:
            self._faults.append(_Fault(count, status, tuple(errors), path))

    def drop_next(self, count: int, path: str | None = None) -> None:
        """Close the connection of the next ``count`` requests without answering."""
        with self._lock:
            self._faults.append(_Fault(count, None, (), path))

    def clear_faults(self) -> None:
        with self._lock:
            self._faults.clear()

    def request_count(self, path: str, method: str | None = None, namespace: str | None = None) -> int:
        """How many requests reached ``path`` (``/v1/...``), optionally only with this method or namespace."""
        with self._lock:
            return sum(
                1
                for r in self._records
                if r.path == path
                and (method is None or r.method == method.upper())
                and (namespace is None or r.namespace == namespace)
            )

    @property
    def requests(self) -> list[RequestRecord]:
        with self._lock:
            return list(self._records)

    def reset_requests(self) -> None:
        with self._lock:
            self._records.clear()

    # setup shortcuts (the same state the HTTP API changes)

    def add_namespace(self, name: str) -> None:
        name = _normalize_namespace(name)
        with self._lock:
            parts = name.split("/")
            for i in range(1, len(parts) + 1):
                self._namespaces.setdefault("/".join(parts[:i]), Namespace("/".join(parts[:i])))

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
        mount = PkiMount(path, default_lease_ttl or self.default_lease_ttl, max_lease_ttl)
        if with_issuer:
            root = new_root(f"Vault test root CA ({path})", ca_ttl, key_type)
            mount.issuer = (
                new_intermediate(root, f"Vault test intermediate CA ({path})", ca_ttl, key_type)
                if (intermediate)
                else root
            )
        with self._lock:
            ns = self._namespace(namespace)
            ns.pki[path] = mount
        return mount.issuer.chain if mount.issuer else []

    def pki_issuer(self, path: str = "pki", namespace: str = "") -> Issuer:
        with self._lock:
            return self._namespace(namespace).pki[path].require_issuer()

    def add_pki_role(self, mount: str, name: str, *, namespace: str = "", **params: Any) -> PkiRole:
        role, _ = PkiRole.from_params(name, params)
        with self._lock:
            self._namespace(namespace).pki[mount].roles[name] = role
        return role

    def add_policy(self, name: str, rules: Mapping[str, Sequence[str]], namespace: str = "") -> None:
        with self._lock:
            self._namespace(namespace).policies[name] = [(p, frozenset(c)) for p, c in rules.items()]

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
        with self._lock:
            self._namespace(namespace)
            return self._new_token(
                _normalize_namespace(namespace),
                tuple(policies),
                ttl=ttl,
                renewable=renewable,
                explicit_max_ttl=explicit_max_ttl,
                path="auth/token/create",
            ).id

    def set_token_ttl(self, token: str, ttl: float) -> None:
        """Make ``token`` expire ``ttl`` seconds from now (0 or less: it has expired)."""
        with self._lock:
            self._tokens[token].expire_at = time.time() + ttl

    def revoke_token(self, token: str) -> None:
        with self._lock:
            self._tokens.pop(token, None)

    def token_ttl(self, token: str) -> float | None:
        """Seconds ``token`` has left (None when it never expires); KeyError once revoked or expired."""
        with self._lock:
            entry = self._tokens[token]
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
        with self._lock:
            auth = self._auth_mount(namespace, mount, "approle")
            role = AuthRole(name, list(policies), token_ttl, token_max_ttl, role_id=str(uuid.uuid4()))
            role.secret_id_ttl = secret_id_ttl
            auth.roles[name] = role
            return role.role_id, self._new_secret_id(role)

    def new_secret_id(self, name: str, *, mount: str = "approle", namespace: str = "") -> str:
        with self._lock:
            return self._new_secret_id(self._namespace(namespace).auth[mount].roles[name])

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
        with self._lock:
            auth = self._auth_mount(namespace, mount, "kubernetes")
            auth.configured = True
            auth.roles[name] = AuthRole(
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
        signature = hmac.new(self._jwt_key, f"{header}.{payload}".encode(), hashlib.sha256).digest()
        return f"{header}.{payload}.{b64(signature)}"

    # internals: state helpers (call with the lock held)

    def _namespace(self, name: str) -> Namespace:
        ns = self._namespaces.get(_normalize_namespace(name))
        if ns is None:
            raise KeyError(f"no namespace {name!r}")
        return ns

    def _auth_mount(self, namespace: str, path: str, kind: str) -> AuthMount:
        ns = self._namespace(namespace)
        auth = ns.auth.setdefault(path, AuthMount(path, kind))
        if auth.type != kind:
            raise ValueError(f"auth mount {path!r} is a {auth.type} mount, not {kind}")
        return auth

    def _new_token(
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
        self._tokens[token.id] = token
        return token

    def _new_secret_id(self, role: AuthRole) -> str:
        secret_id = str(uuid.uuid4())
        role.secret_ids[secret_id] = time.time() + role.secret_id_ttl if role.secret_id_ttl else None
        return secret_id

    def _valid_token(self, raw: str) -> Token:
        token = self._tokens.get(raw)
        if token is None:
            raise _denied()
        if token.expired(time.time()):
            del self._tokens[raw]
            raise _denied()
        return token

    def _authorize(self, req: Request, ns: Namespace) -> Token:
        """The request's token, if it may do ``req.method`` on ``req.rel`` in namespace ``ns``."""
        token = self._valid_token(req.token)
        if not _within(token.namespace, ns.name):
            raise _denied()
        needed = {
            "GET": {"read"},
            "HEAD": {"read"},
            "LIST": {"list"},
            "POST": {"create", "update"},
            "PUT": {"create", "update"},
            "DELETE": {"delete"},
            "PATCH": {"patch"},
        }.get(req.method, set())
        if "list" in req.query and req.method == "GET":
            needed = {"list"}
        granted = self._capabilities(token, ns, req.rel)
        if "root" not in granted and ("deny" in granted or not granted & needed):
            raise _denied()
        return token

    def _capabilities(self, token: Token, ns: Namespace, rel: str) -> set[str]:
        """What ``token``'s policies grant on ``rel`` in namespace ``ns`` (``{"root"}`` for a root token)."""
        if "root" in token.policies:
            return {"root"}
        relative = ns.name[len(token.namespace) :].strip("/") if token.namespace else ns.name
        path = f"{relative}/{rel}" if relative else rel
        home = self._namespaces[token.namespace]
        granted: set[str] = set()
        for name in token.policies:
            for pattern, caps in home.policies.get(name, []):
                if _acl_match(pattern, path):
                    granted |= caps
        return {"deny"} if "deny" in granted else granted

    # internals: request handling

    def _before(self, method: str, path: str, namespace: str) -> _Fault | None:
        with self._lock:
            for fault in self._faults:
                if fault.remaining > 0 and fault.matches(path):
                    fault.remaining -= 1
                    return fault
            self._faults = [f for f in self._faults if f.remaining > 0]
        return None

    def _record(self, method: str, path: str, namespace: str, status: int) -> None:
        with self._lock:
            self._records.append(RequestRecord(method, path, namespace, status))

    def handle(self, method: str, raw_path: str, headers: Mapping[str, str], raw_body: bytes) -> Response:
        """Answer one HTTP request (the transport-independent part of the server)."""
        parts = urlsplit(raw_path)
        path = parts.path
        lowered = {k.lower(): v for k, v in headers.items()}
        if not path.startswith("/v1/"):
            return _error(404, ["404 page not found"])
        body: dict[str, Any] = {}
        if raw_body.strip():
            try:
                loaded = json.loads(raw_body)
            except ValueError as err:
                return _error(400, [f"failed to parse JSON input: {err}"])
            if not isinstance(loaded, dict):
                return _error(400, ["failed to parse JSON input: not an object"])
            body = loaded
        req = Request(
            method=method,
            rel=re.sub(r"/+", "/", path[len("/v1/") :]).strip("/"),
            query=parse_qs(parts.query),
            body=body,
            namespace=_normalize_namespace(lowered.get("x-vault-namespace", "")),
            token=lowered.get("x-vault-token", ""),
        )
        try:
            return self._route(req)
        except ApiError as err:
            return _error(err.status, err.errors)

    def _route(self, req: Request) -> Response:
        if req.rel == "sys/health":
            return self._health(req)
        if req.rel == "sys/seal-status":
            return self._seal_status()
        with self._lock:
            if self.sealed:
                raise ApiError(503, "Vault is sealed")
            ns = self._namespaces.get(req.namespace)
        if ns is None:
            raise _no_route(req.rel)
        if req.rel.startswith("sys/"):
            return self._sys(req, ns)
        if req.rel.startswith("auth/token/"):
            return self._token_api(req, ns)
        if req.rel.startswith("auth/"):
            return self._auth_api(req, ns)
        return self._pki_api(req, ns)

    # sys

    def _health(self, req: Request) -> Response:
        def code(name: str, default: int) -> int:
            return parse_int(req.query.get(name, [None])[0], name, default)

        with self._lock:
            initialized, sealed, standby = self._initialized, self._sealed or not self._initialized, self._standby
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
            body |= {"cluster_name": "vault-cluster-test", "cluster_id": self._cluster_id}
        if req.method == "HEAD":
            return Response(status)
        return Response(status, json.dumps(body).encode())

    def _seal_status(self) -> Response:
        with self._lock:
            sealed = self.sealed
        body: dict[str, Any] = {
            "type": "shamir",
            "initialized": self._initialized,
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
            body |= {"cluster_name": "vault-cluster-test", "cluster_id": self._cluster_id}
        return Response(200, json.dumps(body).encode())

    def _sys(self, req: Request, ns: Namespace) -> Response:
        with self._lock:
            token = self._authorize(req, ns)
            parts = req.rel.split("/")
            if req.rel == "sys/capabilities-self" and req.method in ("POST", "PUT"):
                paths = parse_list(req.body.get("paths") or req.body.get("path"), "paths")
                data: dict[str, Any] = {
                    p: sorted(self._capabilities(token, ns, p.strip("/")) or {"deny"}) for p in paths
                }
                if len(paths) == 1:
                    data["capabilities"] = data[paths[0]]
                return _envelope(data)
            if parts[1] == "mounts" and len(parts) >= 3:
                return self._sys_mounts(req, ns, parts)
            if parts[1] == "auth" and len(parts) >= 3:
                path = "/".join(parts[2:])
                if req.method == "DELETE":
                    ns.auth.pop(path, None)
                    return _no_content()
                kind = parse_string(req.body.get("type"), "type")
                if kind not in ("approle", "kubernetes"):
                    raise ApiError(400, f"plugin not found in the catalog: {kind}")
                if path in ns.auth:
                    raise ApiError(400, f"path is already in use at {path}/")
                ns.auth[path] = AuthMount(path, kind)
                return _no_content()
            if parts[1] in ("policy", "policies") and len(parts) >= 3:
                name = parts[-1]
                if req.method == "DELETE":
                    ns.policies.pop(name, None)
                    return _no_content()
                if req.method == "GET":
                    if name not in ns.policies:
                        raise ApiError(404)
                    return _envelope({"name": name, "rules": ""})
                ns.policies[name] = parse_policy(parse_string(req.body.get("policy"), "policy"))
                return _no_content()
        raise _no_route(req.rel)

    def _sys_mounts(self, req: Request, ns: Namespace, parts: list[str]) -> Response:
        tune = parts[-1] == "tune"
        path = "/".join(parts[2:-1] if tune else parts[2:])
        config = req.body if tune else req.body.get("config") or {}
        if req.method == "DELETE":
            ns.pki.pop(path, None)
            return _no_content()
        if req.method == "GET":
            mount = ns.pki.get(path)
            if mount is None:
                raise ApiError(400, f"cannot fetch sysview for path {path!r}")
            return _envelope({"default_lease_ttl": mount.default_lease_ttl, "max_lease_ttl": mount.max_lease_ttl})
        default_ttl = parse_seconds(config.get("default_lease_ttl"), "default_lease_ttl")
        max_ttl = parse_seconds(config.get("max_lease_ttl"), "max_lease_ttl")
        if tune:
            mount = ns.pki.get(path)
            if mount is None:
                raise ApiError(400, f"cannot tune '{path}/': no mount found")
            mount.default_lease_ttl = default_ttl or mount.default_lease_ttl
            mount.max_lease_ttl = max_ttl or mount.max_lease_ttl
            return _no_content()
        kind = parse_string(req.body.get("type"), "type")
        if kind != "pki":
            raise ApiError(400, f"plugin not found in the catalog: {kind}")
        if path in ns.pki:
            raise ApiError(400, f"path is already in use at {path}/")
        ns.pki[path] = PkiMount(path, default_ttl or self.default_lease_ttl, max_ttl or self.max_lease_ttl)
        return _no_content()

    # token auth

    def _token_api(self, req: Request, ns: Namespace) -> Response:
        op = req.rel.removeprefix("auth/token/")
        now = time.time()
        with self._lock:
            token = self._authorize(req, ns)
            if op == "lookup-self" and req.method in ("GET", "POST"):
                return _envelope(self._lookup_data(token, now))
            if op == "renew-self" and req.method in ("POST", "PUT"):
                return self._renew(token, req.body.get("increment"), now)
            if op == "revoke-self" and req.method in ("POST", "PUT"):
                self._tokens.pop(token.id, None)
                return _no_content()
            if op == "revoke" and req.method in ("POST", "PUT"):
                self._tokens.pop(parse_string(req.body.get("token"), "token"), None)
                return _no_content()
            if op in ("create", "create-orphan") and req.method in ("POST", "PUT"):
                return self._create_token(req, ns, token, orphan=op == "create-orphan")
        raise ApiError(405, "unsupported operation") if op in ("lookup-self", "renew-self") else _no_route(req.rel)

    def _lookup_data(self, token: Token, now: float) -> dict[str, Any]:
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

    def _renew(self, token: Token, increment_raw: object, now: float) -> Response:
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
        return _envelope(None, auth=token.auth_block(now), warnings=warnings)

    def _create_token(self, req: Request, ns: Namespace, parent: Token, orphan: bool) -> Response:
        body = req.body
        policies = parse_list(body.get("policies"), "policies") or [p for p in parent.policies if p != "root"]
        if "root" not in parent.policies and not set(policies) <= set(parent.policies) | {"default"}:
            raise ApiError(400, "child policies must be subset of parent")
        if not parse_bool(body.get("no_default_policy"), "no_default_policy", False) and "root" not in policies:
            policies = ["default", *policies]
        ttl = parse_seconds(body.get("ttl"), "ttl") or (0 if "root" in policies else self.default_lease_ttl)
        token = self._new_token(
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
        return _envelope(None, auth=token.auth_block(time.time()))

    # approle and kubernetes auth

    def _auth_api(self, req: Request, ns: Namespace) -> Response:
        rest = req.rel.removeprefix("auth/")
        with self._lock:
            for path, mount in ns.auth.items():
                if rest.startswith(path + "/"):
                    op = rest[len(path) + 1 :]
                    if op == "login" and req.method in ("POST", "PUT"):
                        return self._login(req, ns, mount)
                    self._authorize(req, ns)
                    return self._auth_admin(req, mount, op)
        raise _no_route(req.rel)

    def _login(self, req: Request, ns: Namespace, mount: AuthMount) -> Response:
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
            claims = self._review_jwt(jwt)
            sa = claims["kubernetes.io"]
            sa_namespace, sa_name = sa["namespace"], sa["serviceaccount"]["name"]
            if role.audience and role.audience not in claims.get("aud", []):
                raise _denied()
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
        token = self._new_token(
            ns.name,
            ["default", *role.policies],
            ttl=role.token_ttl or self.default_lease_ttl,
            renewable=True,
            max_ttl=role.token_max_ttl,
            path=f"auth/{mount.path}/login",
            meta=meta,
            orphan=True,
            display_name=f"{mount.path}-{role.name}",
        )
        return _envelope(None, auth=token.auth_block(time.time()))

    def _review_jwt(self, jwt: str) -> dict[str, Any]:
        """What a Kubernetes TokenReview would say: the claims of a valid token, else permission denied."""
        try:
            header, payload, signature = jwt.split(".")
            expected = hmac.new(self._jwt_key, f"{header}.{payload}".encode(), hashlib.sha256).digest()
            given = base64.urlsafe_b64decode(signature + "=" * (-len(signature) % 4))
            claims: dict[str, Any] = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
        except (ValueError, TypeError):
            raise _denied() from None
        if not hmac.compare_digest(expected, given) or claims.get("exp", 0) <= time.time():
            raise _denied()
        return claims

    def _auth_admin(self, req: Request, mount: AuthMount, op: str) -> Response:
        body = req.body
        if op == "config" and mount.type == "kubernetes" and req.method in ("POST", "PUT"):
            mount.configured = True
            return _no_content()
        parts = op.split("/")
        if parts[0] != "role" or len(parts) < 2:
            raise ApiError(404, "unsupported path")
        name = parts[1]
        if len(parts) == 2:
            if req.method == "DELETE":
                mount.roles.pop(name, None)
                return _no_content()
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
                service_account_names=parse_list(
                    body.get("bound_service_account_names"), "bound_service_account_names"
                ),
                service_account_namespaces=parse_list(
                    body.get("bound_service_account_namespaces"), "bound_service_account_namespaces"
                ),
                audience=parse_string(body.get("audience"), "audience"),
            )
            if mount.type == "kubernetes" and not (role.service_account_names and role.service_account_namespaces):
                raise ApiError(400, '"bound_service_account_names" and "bound_service_account_namespaces" are required')
            mount.roles[name] = role
            return _no_content()
        existing = mount.roles.get(name)
        if existing is None or mount.type != "approle":
            raise ApiError(400, f'role "{name}" does not exist')
        if parts[2] == "role-id" and req.method == "GET":
            return _envelope({"role_id": existing.role_id})
        if parts[2] == "secret-id" and req.method in ("POST", "PUT"):
            secret_id = self._new_secret_id(existing)
            return _envelope(
                {
                    "secret_id": secret_id,
                    "secret_id_accessor": str(uuid.uuid4()),
                    "secret_id_ttl": existing.secret_id_ttl,
                }
            )
        raise ApiError(404, "unsupported path")

    # PKI

    def _pki_api(self, req: Request, ns: Namespace) -> Response:
        with self._lock:
            mount_path = max((p for p in ns.pki if req.rel == p or req.rel.startswith(p + "/")), key=len, default=None)
            if mount_path is None:
                raise _no_route(req.rel)
            mount = ns.pki[mount_path]
            op = req.rel[len(mount_path) :].strip("/")
            if req.method == "GET" and op in ("ca_chain", "ca", "ca/pem", "cert/ca", "cert/ca_chain"):
                return self._pki_read_ca(mount, op)
            self._authorize(req, ns)
            parts = op.split("/")
            if parts[0] == "roles" and len(parts) == 2:
                return self._pki_role(req, mount, parts[1])
            if req.method not in ("POST", "PUT"):
                raise ApiError(405, "unsupported operation")
            if op in ("root/generate/internal", "root/generate/exported"):
                return self._pki_generate_root(req, mount, exported=op.endswith("exported"))
            if op == "intermediate/generate/internal":
                return self._pki_generate_csr(req, mount)
            if op == "intermediate/set-signed":
                return self._pki_set_signed(req, mount)
            signing = op == "root/sign-intermediate" or (parts[0] in ("sign", "issue") and len(parts) == 2)
            if not signing:
                raise ApiError(404, "unsupported path")
            issuer = mount.require_issuer()
            role = mount.roles.get(parts[-1]) if parts[0] != "root" else None
            if parts[0] != "root" and role is None:
                raise ApiError(400, f"unknown role: {parts[1]}")
            default_ttl, max_ttl = mount.default_lease_ttl, mount.max_lease_ttl
        # signing happens outside the lock, so concurrent requests are signed in parallel
        if role is None:
            return self._pki_sign_intermediate(req, issuer, default_ttl, max_ttl)
        return self._pki_sign_leaf(req, issuer, role, default_ttl, max_ttl, generate_key=parts[0] == "issue")

    def _pki_read_ca(self, mount: PkiMount, op: str) -> Response:
        issuer = mount.require_issuer()
        chain = "".join(issuer.chain_pems())
        if op == "ca":
            return Response(200, issuer.certificate.public_bytes(serialization.Encoding.DER), "application/pkix-cert")
        if op == "ca/pem":
            return Response(200, pem(issuer.certificate).encode(), "application/pem-certificate-chain")
        if op == "ca_chain":
            return Response(200, chain.encode(), "application/pem-certificate-chain")
        if op == "cert/ca":
            return _envelope({"certificate": pem(issuer.certificate), "revocation_time": 0, "ca_chain": None})
        return _envelope({"certificate": chain, "ca_chain": chain, "revocation_time": 0})

    def _pki_role(self, req: Request, mount: PkiMount, name: str) -> Response:
        if req.method == "GET":
            role = mount.roles.get(name)
            if role is None:
                return _error(404, [])
            return _envelope(role.to_data())
        if req.method == "DELETE":
            mount.roles.pop(name, None)
            return _no_content()
        if req.method in ("POST", "PUT"):
            role, warnings = PkiRole.from_params(name, req.body)
            mount.roles[name] = role
            return _envelope(role.to_data(), warnings=warnings)
        raise ApiError(405, "unsupported operation")

    def _ttl(
        self, params: Mapping[str, Any], role_ttl: int, role_max_ttl: int, default_ttl: int, max_ttl: int
    ) -> tuple[datetime, list[str]]:
        """Vault's GetCertificateNotAfter: request TTL, else role TTL, else the mount default; capped at the
        role max (else the mount max) with a warning."""
        ttl = parse_seconds(params.get("ttl"), "ttl")
        not_after_text = parse_string(params.get("not_after"), "not_after")
        if ttl and not_after_text:
            raise ApiError(
                400, "Either ttl or not_after should be provided. Both should not be provided in the same request."
            )
        ttl = ttl or role_ttl or default_ttl
        limit = role_max_ttl or max_ttl
        warnings = []
        if ttl > limit:
            warnings.append(
                f'TTL "{go_duration(ttl)}" is longer than permitted maxTTL "{go_duration(limit)}", so maxTTL is being used'
            )
            ttl = limit
        if not_after_text:
            try:
                explicit = datetime.fromisoformat(not_after_text.replace("Z", "+00:00"))
            except ValueError as err:
                raise ApiError(400, str(err)) from None
            return (explicit if explicit.tzinfo else explicit.replace(tzinfo=UTC)), warnings
        return datetime.now(UTC) + timedelta(seconds=ttl), warnings

    def _pki_sign_leaf(
        self, req: Request, issuer: Issuer, role: PkiRole, default_ttl: int, max_ttl: int, *, generate_key: bool
    ) -> Response:
        params = req.body
        known = frozenset(
            {
                "csr",
                "common_name",
                "alt_names",
                "ip_sans",
                "uri_sans",
                "other_sans",
                "ttl",
                "format",
                "private_key_format",
                "exclude_cn_from_sans",
                "not_after",
                "remove_roots_from_chain",
                "user_ids",
                "serial_number",
            }
        )
        warnings = _unknown_params_warning(params, known)
        key: PrivateKey | None = None
        csr: x509.CertificateSigningRequest | None = None
        if generate_key:
            if role.key_type == "any":
                raise ApiError(400, 'role key type "any" not allowed for issuing certificates, only signing')
            key = new_key(role.key_type, role.key_bits)
            public_key = _public_key(key)
        else:
            csr = self._load_csr(params.get("csr"))
            public_key = csr.public_key()  # type: ignore[assignment]
            self._check_role_key(role, public_key)
        # names
        common_name = ""
        if csr is not None and role.use_csr_common_name:
            cns = csr.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
            common_name = str(cns[0].value) if cns else ""
        common_name = common_name or parse_string(params.get("common_name"), "common_name")
        if not common_name and role.require_cn:
            raise ApiError(
                400,
                'the common_name field is required, or must be provided in a CSR with "use_csr_common_name" set to '
                'true, unless "require_cn" is set to false',
            )
        csr_sans = self._csr_sans(csr) if csr is not None and role.use_csr_sans else None
        dns_names: list[str] = list(csr_sans["dns"]) if csr_sans else []
        emails: list[str] = list(csr_sans["email"]) if csr_sans else []
        if common_name and not parse_bool(params.get("exclude_cn_from_sans"), "exclude_cn_from_sans", False):
            if "@" in common_name:
                emails.append(common_name)
            elif _HOSTNAME.match(common_name):
                dns_names.append(common_name)
        if csr_sans is None:
            for name in parse_list(params.get("alt_names"), "alt_names"):
                (emails if "@" in name else dns_names).append(name)
        if common_name and not role.name_allowed(common_name):
            raise ApiError(400, f"common name {common_name} not allowed by this role")
        for name in dns_names:
            if not role.name_allowed(name):
                raise ApiError(400, f"subject alternate name {name} not allowed by this role")
        for name in emails:
            if not role.name_allowed(name):
                raise ApiError(400, f"email address {name} not allowed by this role")
        ips = self._leaf_ips(role, params, csr_sans)
        uris = self._leaf_uris(role, params, csr_sans)
        not_after, ttl_warnings = self._ttl(params, role.ttl, role.max_ttl, default_ttl, max_ttl)
        warnings += ttl_warnings
        if not_after > issuer.certificate.not_valid_after_utc:
            raise ApiError(
                400,
                "cannot satisfy request, as TTL would result in notAfter of "
                f"{not_after.isoformat().replace('+00:00', 'Z')} that is beyond the expiration of the CA certificate "
                f"at {issuer.certificate.not_valid_after_utc.isoformat().replace('+00:00', 'Z')}",
            )
        sans: list[x509.GeneralName] = [x509.DNSName(n) for n in dict.fromkeys(dns_names)]
        sans += [x509.RFC822Name(e) for e in dict.fromkeys(emails)]
        sans += [x509.IPAddress(ip) for ip in ips]
        sans += [x509.UniformResourceIdentifier(u) for u in uris]
        cert = self._build_leaf(issuer, role, public_key, common_name, sans, not_after)
        remove_roots = parse_bool(params.get("remove_roots_from_chain"), "remove_roots_from_chain", False)
        data: dict[str, Any] = {
            "certificate": pem(cert),
            "issuing_ca": pem(issuer.certificate),
            "ca_chain": issuer.chain_pems(remove_roots),
            "serial_number": serial_text(cert.serial_number),
            "expiration": int(cert.not_valid_after_utc.timestamp()),
        }
        fmt = parse_string(params.get("format"), "format") or "pem"
        if fmt == "der":
            data["certificate"] = base64.b64encode(cert.public_bytes(serialization.Encoding.DER)).decode()
        elif fmt == "pem_bundle":
            data["certificate"] = pem(cert) + ("" if issuer.parents == [] else pem(issuer.certificate))
        elif fmt != "pem":
            raise ApiError(400, f'unknown format "{fmt}"')
        if key is not None:
            pkcs8 = parse_string(params.get("private_key_format"), "private_key_format") == "pkcs8"
            private_format = (
                serialization.PrivateFormat.PKCS8
                if pkcs8 or isinstance(key, ed25519.Ed25519PrivateKey)
                else serialization.PrivateFormat.TraditionalOpenSSL
            )
            data["private_key"] = key.private_bytes(
                serialization.Encoding.PEM, private_format, serialization.NoEncryption()
            ).decode()
            data["private_key_type"] = role.key_type
        return _envelope(data, warnings=warnings, mount_type="pki")

    @staticmethod
    def _load_csr(raw: object) -> x509.CertificateSigningRequest:
        text = parse_string(raw, "csr")
        if "-----BEGIN" not in text:
            raise ApiError(400, "csr contains no data")
        try:
            csr = x509.load_pem_x509_csr(text.encode())
        except ValueError as err:
            raise ApiError(400, f"certificate request could not be parsed: {err}") from None
        if not csr.is_signature_valid:
            raise ApiError(400, "request signature invalid")
        return csr

    @staticmethod
    def _check_role_key(role: PkiRole, public_key: object) -> None:
        kind, bits = _key_type_of(public_key)
        if kind == "unknown":
            raise ApiError(400, "unsupported key type in CSR")
        if kind == "rsa" and bits < 2048:
            raise ApiError(400, "RSA keys < 2048 bits are unsafe and not supported")
        if role.key_type == "any":
            return
        if kind != role.key_type:
            raise ApiError(400, f"role requires keys of type {role.key_type}")
        wanted = role.key_bits or {"rsa": 2048, "ec": 256}.get(kind, 0)
        if kind == "rsa" and bits < wanted:
            raise ApiError(400, f"role requires a minimum of a {wanted}-bit key, but CSR's key is {bits} bits")
        if kind == "ec" and bits != wanted:
            raise ApiError(400, f"role requires a {wanted}-bit key, but CSR's key is {bits} bits")

    @staticmethod
    def _csr_sans(csr: x509.CertificateSigningRequest) -> dict[str, list[Any]]:
        try:
            san = csr.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        except x509.ExtensionNotFound:
            return {"dns": [], "email": [], "ip": [], "uri": []}
        return {
            "dns": san.get_values_for_type(x509.DNSName),
            "email": san.get_values_for_type(x509.RFC822Name),
            "ip": san.get_values_for_type(x509.IPAddress),
            "uri": san.get_values_for_type(x509.UniformResourceIdentifier),
        }

    @staticmethod
    def _leaf_ips(
        role: PkiRole, params: Mapping[str, Any], csr_sans: dict[str, list[Any]] | None
    ) -> list[ipaddress.IPv4Address | ipaddress.IPv6Address]:
        if csr_sans is not None:
            if csr_sans["ip"] and not role.allow_ip_sans:
                raise ApiError(
                    400, "IP Subject Alternative Names are not allowed in this role, but was provided some via CSR"
                )
            return list(csr_sans["ip"])
        given = parse_list(params.get("ip_sans"), "ip_sans")
        if given and not role.allow_ip_sans:
            raise ApiError(400, f"IP Subject Alternative Names are not allowed in this role, but was provided {given}")
        ips = []
        for value in given:
            try:
                ips.append(ipaddress.ip_address(value))
            except ValueError:
                raise ApiError(400, f'the value "{value}" is not a valid IP address') from None
        return ips

    @staticmethod
    def _leaf_uris(role: PkiRole, params: Mapping[str, Any], csr_sans: dict[str, list[Any]] | None) -> list[str]:
        via, uris = (
            ("CSR", list(csr_sans["uri"]))
            if csr_sans is not None
            else (
                "the API",
                parse_list(params.get("uri_sans"), "uri_sans"),
            )
        )
        if uris and not role.allowed_uri_sans:
            raise ApiError(
                400, f"URI Subject Alternative Names are not allowed in this role, but were provided via {via}"
            )
        for uri in uris:
            if not role.uri_allowed(uri):
                suffix = "CSR which are" if via == "CSR" else "the API which are"
                raise ApiError(400, f"URI Subject Alternative Names were provided via {suffix} not valid for this role")
        return uris

    @staticmethod
    def _build_leaf(
        issuer: Issuer,
        role: PkiRole,
        public_key: PublicKey,
        common_name: str,
        sans: list[x509.GeneralName],
        not_after: datetime,
    ) -> x509.Certificate:
        now = datetime.now(UTC)
        subject = _subject(common_name, role.organization, role.ou)
        builder = (
            x509.CertificateBuilder()
            .subject_name(subject)
            .issuer_name(issuer.certificate.subject)
            .public_key(public_key)
            .serial_number(_random_serial())
            .not_valid_before(now - timedelta(seconds=role.not_before_duration))
            .not_valid_after(not_after)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(public_key), critical=False)
            .add_extension(_aki(issuer.certificate), critical=False)
        )
        if role.key_usage:
            builder = builder.add_extension(_key_usage(role.key_usage), critical=True)
        ekus = [
            oid
            for flag, oid in (
                (role.server_flag, ExtendedKeyUsageOID.SERVER_AUTH),
                (role.client_flag, ExtendedKeyUsageOID.CLIENT_AUTH),
                (role.code_signing_flag, ExtendedKeyUsageOID.CODE_SIGNING),
                (role.email_protection_flag, ExtendedKeyUsageOID.EMAIL_PROTECTION),
            )
            if flag
        ]
        if ekus:
            builder = builder.add_extension(x509.ExtendedKeyUsage(ekus), critical=False)
        if role.basic_constraints_valid_for_non_ca:
            builder = builder.add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        if sans:
            # like Go's x509: the SAN extension is critical when the subject is empty (RFC 5280 4.2.1.6)
            builder = builder.add_extension(x509.SubjectAlternativeName(sans), critical=len(subject) == 0)
        return builder.sign(issuer.key, _hash_for(issuer.key))  # type: ignore[arg-type]

    def _pki_sign_intermediate(self, req: Request, issuer: Issuer, default_ttl: int, max_ttl: int) -> Response:
        params = req.body
        known = frozenset(
            {
                "csr",
                "common_name",
                "alt_names",
                "ip_sans",
                "uri_sans",
                "other_sans",
                "ttl",
                "format",
                "max_path_length",
                "key_usage",
                "exclude_cn_from_sans",
                "use_csr_values",
                "permitted_dns_domains",
                "ou",
                "organization",
                "country",
                "locality",
                "province",
                "street_address",
                "postal_code",
                "serial_number",
                "not_before_duration",
                "not_after",
                "signature_bits",
                "skid",
                "use_pss",
            }
        )
        warnings = _unknown_params_warning(params, known)
        csr = self._load_csr(params.get("csr"))
        public_key = csr.public_key()
        if _key_type_of(public_key)[0] == "unknown":
            raise ApiError(400, "unsupported key type in CSR")
        if issuer.max_path_length == 0:
            raise ApiError(
                400, "signing certificate has a max path length of zero, and cannot issue further CA certificates"
            )
        if parse_bool(params.get("use_csr_values"), "use_csr_values", False):
            subject = csr.subject
            sans: list[x509.GeneralName] = list(self._csr_san_list(csr))
        else:
            common_name = parse_string(params.get("common_name"), "common_name")
            if not common_name:
                cns = csr.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
                common_name = str(cns[0].value) if cns else ""
            subject = _subject(
                common_name,
                parse_list(params.get("organization"), "organization"),
                parse_list(params.get("ou"), "ou"),
            )
            sans = [x509.DNSName(n) for n in parse_list(params.get("alt_names"), "alt_names")]
            if (
                common_name
                and _HOSTNAME.match(common_name)
                and not parse_bool(params.get("exclude_cn_from_sans"), "exclude_cn_from_sans", False)
            ):
                sans.insert(0, x509.DNSName(common_name))
            for value in parse_list(params.get("ip_sans"), "ip_sans"):
                try:
                    sans.append(x509.IPAddress(ipaddress.ip_address(value)))
                except ValueError:
                    raise ApiError(400, f'the value "{value}" is not a valid IP address') from None
            sans += [x509.UniformResourceIdentifier(u) for u in parse_list(params.get("uri_sans"), "uri_sans")]
        requested_path = parse_int(params.get("max_path_length"), "max_path_length", -1)
        if requested_path >= 0:
            path_length: int | None = requested_path
        elif issuer.max_path_length is None:
            path_length = None
        else:
            path_length = issuer.max_path_length - 1
        not_after, ttl_warnings = self._ttl(params, 0, 0, default_ttl, max_ttl)
        warnings += ttl_warnings
        # sign-intermediate truncates to the issuer's NotAfter instead of failing (Vault's default)
        not_after = min(not_after, issuer.certificate.not_valid_after_utc)
        cert = build_ca(
            subject=subject,
            public_key=public_key,  # type: ignore[arg-type]
            signer=issuer,
            signer_key=issuer.key,
            not_after=not_after,
            now=datetime.now(UTC),
            path_length=path_length,
            sans=sans,
        )
        data = {
            "certificate": pem(cert),
            "issuing_ca": pem(issuer.certificate),
            "ca_chain": issuer.chain_pems(
                parse_bool(params.get("remove_roots_from_chain"), "remove_roots_from_chain", False)
            ),
            "serial_number": serial_text(cert.serial_number),
            "expiration": int(cert.not_valid_after_utc.timestamp()),
        }
        return _envelope(data, warnings=warnings, mount_type="pki")

    @staticmethod
    def _csr_san_list(csr: x509.CertificateSigningRequest) -> list[x509.GeneralName]:
        try:
            return list(csr.extensions.get_extension_for_class(x509.SubjectAlternativeName).value)
        except x509.ExtensionNotFound:
            return []

    def _pki_generate_root(self, req: Request, mount: PkiMount, *, exported: bool) -> Response:
        params = req.body
        common_name = parse_string(params.get("common_name"), "common_name")
        if not common_name:
            raise ApiError(400, "the common_name field is required")
        not_after, warnings = self._ttl(params, 0, 0, mount.default_lease_ttl, mount.max_lease_ttl)
        key_type = parse_string(params.get("key_type"), "key_type") or "rsa"
        key = new_key(key_type, parse_int(params.get("key_bits"), "key_bits", 0))
        max_path = parse_int(params.get("max_path_length"), "max_path_length", -1)
        uris = [x509.UniformResourceIdentifier(u) for u in parse_list(params.get("uri_sans"), "uri_sans")]
        now = datetime.now(UTC)
        cert = build_ca(
            subject=_subject(
                common_name,
                parse_list(params.get("organization"), "organization"),
                parse_list(params.get("ou"), "ou"),
            ),
            public_key=_public_key(key),
            signer=None,
            signer_key=key,
            not_after=not_after,
            now=now,
            path_length=None if max_path < 0 else max_path,
            sans=uris,
        )
        mount.issuer = Issuer(cert, key)
        data: dict[str, Any] = {
            "certificate": pem(cert),
            "issuing_ca": pem(cert),
            "serial_number": serial_text(cert.serial_number),
            "expiration": int(cert.not_valid_after_utc.timestamp()),
            "issuer_id": mount.issuer.issuer_id,
            "issuer_name": "",
            "key_id": mount.issuer.key_id,
            "key_name": "",
        }
        if exported:
            data["private_key"] = key.private_bytes(
                serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
            ).decode()
            data["private_key_type"] = key_type
        return _envelope(data, warnings=warnings, mount_type="pki")

    def _pki_generate_csr(self, req: Request, mount: PkiMount) -> Response:
        params = req.body
        key_type = parse_string(params.get("key_type"), "key_type") or "rsa"
        key = new_key(key_type, parse_int(params.get("key_bits"), "key_bits", 0))
        csr = (
            x509.CertificateSigningRequestBuilder()
            .subject_name(_subject(parse_string(params.get("common_name"), "common_name")))
            .sign(key, _hash_for(key))  # type: ignore[arg-type]
        )
        mount.pending_keys.append(key)
        return _envelope(
            {"csr": csr.public_bytes(serialization.Encoding.PEM).decode(), "key_id": str(uuid.uuid4())},
            mount_type="pki",
        )

    def _pki_set_signed(self, req: Request, mount: PkiMount) -> Response:
        text = parse_string(req.body.get("certificate"), "certificate")
        try:
            certs = x509.load_pem_x509_certificates(text.encode())
        except ValueError as err:
            raise ApiError(400, f"error parsing certificate: {err}") from None
        der = serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        for index, cert in enumerate(certs):
            for key in mount.pending_keys:
                if cert.public_key().public_bytes(*der) == _public_key(key).public_bytes(*der):
                    mount.issuer = Issuer(cert, key, parents=[c for i, c in enumerate(certs) if i != index])
                    mount.pending_keys.remove(key)
                    return _envelope(
                        {"imported_issuers": [mount.issuer.issuer_id], "imported_keys": None, "existing_issuers": None},
                        mount_type="pki",
                    )
        raise ApiError(400, "unable to find a key matching the certificate")


# --- transport ----------------------------------------------------------------------------------------------


class _Httpd(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True

    def __init__(
        self,
        address: tuple[str, int],
        handler: type[BaseHTTPRequestHandler],
        vault: VaultServer,
        context: ssl.SSLContext | None,
    ) -> None:
        self.vault = vault
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


class _Handler(BaseHTTPRequestHandler):
    server: _Httpd
    protocol_version = "HTTP/1.1"
    disable_nagle_algorithm = True  # headers and body go out in two writes: no 40 ms delayed-ACK stalls
    server_version = "Vault"
    sys_version = ""

    def setup(self) -> None:
        self.tls_failed = False
        if isinstance(self.request, ssl.SSLSocket):
            self.request.settimeout(10)
            try:
                self.request.do_handshake()
            except (ssl.SSLError, OSError):
                self.tls_failed = True
            self.request.settimeout(None)
        super().setup()

    def handle(self) -> None:
        if not self.tls_failed:
            with contextlib.suppress(ConnectionError, ssl.SSLError, TimeoutError):
                super().handle()

    def log_message(self, format: str, *args: Any) -> None:
        return

    def _serve(self) -> None:
        vault = self.server.vault
        length = int(self.headers.get("Content-Length") or 0)
        raw = self.rfile.read(length) if length else b""
        path = urlsplit(self.path).path
        namespace = _normalize_namespace(self.headers.get("X-Vault-Namespace", ""))
        fault = vault._before(self.command, path, namespace)
        if fault is not None and fault.status is None:
            vault._record(self.command, path, namespace, 0)
            self.close_connection = True
            with contextlib.suppress(OSError):
                self.connection.shutdown(socket.SHUT_RDWR)
            return
        if fault is not None and fault.status is not None:
            response = _error(fault.status, fault.errors)
        else:
            response = vault.handle(self.command, self.path, dict(self.headers.items()), raw)
        vault._record(self.command, path, namespace, response.status)
        self.send_response(response.status)
        if response.status != 204:
            self.send_header("Content-Type", response.content_type)
            self.send_header("Content-Length", str(len(response.body)))
        self.send_header("Cache-Control", "no-store")
        self.end_headers()
        if self.command != "HEAD" and response.status != 204:
            self.wfile.write(response.body)

    do_GET = do_POST = do_PUT = do_DELETE = do_HEAD = do_LIST = do_PATCH = _serve


def main() -> None:
    """Serve a Vault test server in this process (for benchmarks and manual tries): a PKI mount ``pki`` with a
    role ``spiffe`` (any SPIFFE ID, any key type, max TTL 24h). Prints ``{"url": ..., "token": ...}`` on one
    line, then serves until standard input closes."""
    parser = argparse.ArgumentParser(description=main.__doc__)
    parser.add_argument("--intermediate", action="store_true", help="a Vault-side intermediate under the root")
    args = parser.parse_args()
    with VaultServer() as server:
        server.add_pki_mount("pki", intermediate=args.intermediate)
        server.add_pki_role(
            "pki", "spiffe", allowed_uri_sans=["spiffe://*"], require_cn=False, key_type="any", max_ttl="24h"
        )
        print(json.dumps({"url": server.url, "token": server.root_token}), flush=True)
        sys.stdin.read()


if __name__ == "__main__":
    main()


__all__ = [
    "ApiError",
    "Issuer",
    "ListenerTLS",
    "PkiRole",
    "RequestRecord",
    "VaultServer",
    "glob_match",
    "go_duration",
    "parse_seconds",
]
