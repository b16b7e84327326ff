"""The PKI secrets engine of the Vault fake, on any number of mounts, with real crypto.

Endpoints: ``root/generate/internal`` (and ``exported``), ``intermediate/generate/internal``,
``intermediate/set-signed``, ``root/sign-intermediate``, ``sign/:role``, ``issue/:role``, ``roles/:name`` (read,
write, delete), and the unauthenticated CA reads ``ca_chain``, ``cert/ca``, ``cert/ca_chain``, ``ca``,
``ca/pem``. Role rules follow Vault: ``allowed_uri_sans`` globs, ``allow_any_name``, ``allowed_domains`` and
friends, ``enforce_hostnames``, ``require_cn``, ``use_csr_common_name``, ``use_csr_sans``, ``key_type``; a TTL
above the role's (or the mount's) max is capped with Vault's warning; a leaf past its issuer's NotAfter is
refused, an intermediate is truncated to it. CA certificates are made the way Vault makes them
(:func:`build_ca`); :func:`new_root` and :func:`new_intermediate` give a mount its CA in test setup.
"""

from __future__ import annotations

import base64
import ipaddress
import secrets
import uuid
from collections.abc import Iterable, Mapping, Sequence
from datetime import UTC, datetime, timedelta
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from tests.fakes.vault.api import ApiError, Request, Response, envelope, no_content, no_route
from tests.fakes.vault.params import (
    go_duration,
    parse_bool,
    parse_int,
    parse_list,
    parse_seconds,
    parse_string,
    unknown_params_warning,
)
from tests.fakes.vault.state import (
    HOSTNAME,
    Issuer,
    Namespace,
    PkiMount,
    PkiRole,
    PrivateKey,
    PublicKey,
    VaultState,
)

PUBLIC_READS = ("ca_chain", "ca", "ca/pem", "cert/ca", "cert/ca_chain")

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


# --- the engine's endpoints ---------------------------------------------------------------------------------


def handle(state: VaultState, req: Request, ns: Namespace) -> Response:
    """Answer a request to a path under one of ``ns``'s PKI mounts."""
    with state.lock:
        mount_path = max((p for p in ns.pki if req.rel == p or req.rel.startswith(p + "/")), key=len, default=None)
        if mount_path is None:
            raise no_route(req.rel)
        mount = ns.pki[mount_path]
        op = req.rel[len(mount_path) :].strip("/")
        if req.method == "GET" and op in PUBLIC_READS:
            return _read_ca(mount, op)
        state.authorize(req, ns)
        parts = op.split("/")
        if parts[0] == "roles" and len(parts) == 2:
            return _role(req, mount, parts[1])
        if req.method not in ("POST", "PUT"):
            raise ApiError(405, "unsupported operation")
        if op in ("root/generate/internal", "root/generate/exported"):
            return _generate_root(req, mount, exported=op.endswith("exported"))
        if op == "intermediate/generate/internal":
            return _generate_csr(req, mount)
        if op == "intermediate/set-signed":
            return _set_signed(req, mount)
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
        return _sign_intermediate(req, issuer, default_ttl, max_ttl)
    return _sign_leaf(req, issuer, role, default_ttl, max_ttl, generate_key=parts[0] == "issue")


def _read_ca(mount: PkiMount, op: str) -> Response:
    issuer = mount.require_issuer()
    chain = "".join(issuer.chain_pems())
    if op == "ca":
        return Response(200, issuer.certificate.public_bytes(serialization.Encoding.DER), "application/pkix-cert")
    if op == "ca/pem":
        return Response(200, pem(issuer.certificate).encode(), "application/pem-certificate-chain")
    if op == "ca_chain":
        return Response(200, chain.encode(), "application/pem-certificate-chain")
    if op == "cert/ca":
        return envelope({"certificate": pem(issuer.certificate), "revocation_time": 0, "ca_chain": None})
    return envelope({"certificate": chain, "ca_chain": chain, "revocation_time": 0})


def _role(req: Request, mount: PkiMount, name: str) -> Response:
    if req.method == "GET":
        role = mount.roles.get(name)
        if role is None:
            raise ApiError(404)
        return envelope(role.to_data())
    if req.method == "DELETE":
        mount.roles.pop(name, None)
        return no_content()
    if req.method in ("POST", "PUT"):
        role, warnings = PkiRole.from_params(name, req.body)
        mount.roles[name] = role
        return envelope(role.to_data(), warnings=warnings)
    raise ApiError(405, "unsupported operation")


def _ttl(
    params: Mapping[str, Any], role_ttl: int, role_max_ttl: int, default_ttl: int, max_ttl: int
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


def _sign_leaf(
    req: Request, issuer: Issuer, role: PkiRole, default_ttl: int, max_ttl: int, *, generate_key: bool
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
    warnings = unknown_params_warning(params, known)
    key: PrivateKey | None = None
    csr: x509.CertificateSigningRequest | None = None
    if generate_key:
        if role.key_type == "any":
            raise ApiError(400, 'role key type "any" not allowed for issuing certificates, only signing')
        key = new_key(role.key_type, role.key_bits)
        public_key = _public_key(key)
    else:
        csr = _load_csr(params.get("csr"))
        public_key = csr.public_key()  # type: ignore[assignment]
        _check_role_key(role, public_key)
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
    csr_sans = _csr_sans(csr) if csr is not None and role.use_csr_sans else None
    dns_names: list[str] = list(csr_sans["dns"]) if csr_sans else []
    emails: list[str] = list(csr_sans["email"]) if csr_sans else []
    if common_name and not parse_bool(params.get("exclude_cn_from_sans"), "exclude_cn_from_sans", False):
        if "@" in common_name:
            emails.append(common_name)
        elif HOSTNAME.match(common_name):
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
    ips = _leaf_ips(role, params, csr_sans)
    uris = _leaf_uris(role, params, csr_sans)
    not_after, ttl_warnings = _ttl(params, role.ttl, role.max_ttl, default_ttl, max_ttl)
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
    cert = _build_leaf(issuer, role, public_key, common_name, sans, not_after)
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
    return envelope(data, warnings=warnings, mount_type="pki")


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
        raise ApiError(400, f"URI Subject Alternative Names are not allowed in this role, but were provided via {via}")
    for uri in uris:
        if not role.uri_allowed(uri):
            suffix = "CSR which are" if via == "CSR" else "the API which are"
            raise ApiError(400, f"URI Subject Alternative Names were provided via {suffix} not valid for this role")
    return uris


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


def _sign_intermediate(req: Request, issuer: Issuer, default_ttl: int, max_ttl: int) -> Response:
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
    warnings = unknown_params_warning(params, known)
    csr = _load_csr(params.get("csr"))
    public_key = csr.public_key()
    if _key_type_of(public_key)[0] == "unknown":
        raise ApiError(400, "unsupported key type in CSR")
    if issuer.max_path_length == 0:
        raise ApiError(
            400, "signing certificate has a max path length of zero, and cannot issue further CA certificates"
        )
    if parse_bool(params.get("use_csr_values"), "use_csr_values", False):
        subject = csr.subject
        sans: list[x509.GeneralName] = list(_csr_san_list(csr))
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
            and HOSTNAME.match(common_name)
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
    not_after, ttl_warnings = _ttl(params, 0, 0, default_ttl, max_ttl)
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
    return envelope(data, warnings=warnings, mount_type="pki")


def _csr_san_list(csr: x509.CertificateSigningRequest) -> list[x509.GeneralName]:
    try:
        return list(csr.extensions.get_extension_for_class(x509.SubjectAlternativeName).value)
    except x509.ExtensionNotFound:
        return []


def _generate_root(req: Request, mount: PkiMount, *, exported: bool) -> Response:
    params = req.body
    common_name = parse_string(params.get("common_name"), "common_name")
    if not common_name:
        raise ApiError(400, "the common_name field is required")
    not_after, warnings = _ttl(params, 0, 0, mount.default_lease_ttl, mount.max_lease_ttl)
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
    return envelope(data, warnings=warnings, mount_type="pki")


def _generate_csr(req: Request, mount: PkiMount) -> Response:
    params = req.body
    key_type = parse_string(params.get("key_type"), "key_type") or "rsa"
    key = new_key(key_type, parse_int(params.get("key_bits"), "key_bits", 0))
    csr = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(_subject(parse_string(params.get("common_name"), "common_name")))
        .sign(key, _hash_for(key))  # type: ignore[arg-type]
    )
    mount.pending_keys.append(key)
    return envelope(
        {"csr": csr.public_bytes(serialization.Encoding.PEM).decode(), "key_id": str(uuid.uuid4())},
        mount_type="pki",
    )


def _set_signed(req: Request, mount: PkiMount) -> Response:
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
                return envelope(
                    {"imported_issuers": [mount.issuer.issuer_id], "imported_keys": None, "existing_issuers": None},
                    mount_type="pki",
                )
    raise ApiError(400, "unable to find a key matching the certificate")
