"""JWT-SVIDs and JWT bundles, per the SPIFFE JWT-SVID and the SPIFFE Trust Domain and Bundle specifications.

A JWT-SVID is a JWS in compact serialization (``header.payload.signature``, each unpadded base64url). We sign
and accept ES256 only (ECDSA P-256, SHA-256): the JOSE header is ``{"alg": "ES256", "kid": ..., "typ": "JWT"}``
and nothing else (the spec forbids other header members); the claims are ``sub`` (the SPIFFE ID), ``aud`` (one
or more audiences), ``exp`` and ``iat`` (NumericDates, whole seconds).

Validation (:func:`validate_jwt_svid`) refuses, each with a message naming what is wrong and never the token:
a token over 8 KiB; anything but three canonical base64url parts of JSON objects (no duplicate members, no
NaN); an ``alg`` other than ES256 (``none`` and ``HS256`` above all); a header member other than ``alg``,
``kid``, ``typ``; a ``typ`` other than ``JWT``/``JOSE``; a missing ``kid``; a ``sub`` that is not a SPIFFE ID,
or whose trust domain has no bundle, or a ``kid`` that bundle does not hold; a bad signature; a missing or
non-numeric ``exp``/``iat``, an ``exp`` not after ``now``, an ``nbf`` after it; an ``aud`` missing, empty, or
without the validator's audience. The signature is checked before any claim is trusted, with the key the
trust domain of ``sub`` publishes under ``kid``.

A bundle document (:meth:`JwtBundle.to_jwks`) is an RFC 7517 JWK Set: one ``"use": "jwt-svid"`` entry per
signing key (with its ``kid``), one ``"use": "x509-svid"`` entry per X.509 root (with ``x5c``), and the
``spiffe_sequence`` and ``spiffe_refresh_hint`` parameters. :meth:`JwtBundle.from_jwks` reads the jwt-svid
P-256 keys and, as the spec says, ignores entries of another use or key type.
"""

from __future__ import annotations

import base64
import hashlib
import json
import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from types import MappingProxyType
from typing import Any

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature, encode_dss_signature

from mesh_identity.document import shown
from mesh_identity.errors import InvalidSpiffeIdError, MeshIdentityError
from mesh_identity.spiffe import SpiffeId, TrustDomain

ALGORITHM = "ES256"
MAX_TOKEN_BYTES = 8 * 1024
MAX_BUNDLE_BYTES = 1024 * 1024
USE_JWT = "jwt-svid"
USE_X509 = "x509-svid"
HEADER_MEMBERS = ("alg", "kid", "typ")
TYPES = ("JWT", "JOSE")
_COORDINATE_BYTES = 32  # P-256
_SIGNATURE_BYTES = 2 * _COORDINATE_BYTES
_LAST_SECOND = 253_402_300_799  # 9999-12-31T23:59:59Z: the last NumericDate a datetime holds
_B64URL = re.compile(r"[A-Za-z0-9_-]*")
_CURVES = {"secp256r1": "P-256", "secp384r1": "P-384", "secp521r1": "P-521"}


class JwtSvidError(MeshIdentityError):
    """A JWT-SVID or JWT bundle that is malformed, refused by validation, or cannot be issued as asked.
    The message names what is wrong; it never holds a whole token or key material."""


@dataclass(frozen=True, slots=True)
class JwtSvid:
    """A signed JWT-SVID (what :func:`sign_jwt_svid` made or :func:`validate_jwt_svid` accepted).

    ``expiry`` and ``issued_at`` are the token's own ``exp`` and ``iat``; ``claims`` is every claim, read-only.
    ``token`` is a bearer credential: it is left out of ``repr``.
    """

    token: str = field(repr=False)
    spiffe_id: SpiffeId
    audience: tuple[str, ...]
    expiry: datetime
    issued_at: datetime
    key_id: str
    claims: Mapping[str, Any] = field(hash=False, compare=False, repr=False)


@dataclass(frozen=True, slots=True)
class JwtBundle:
    """The JWT-SVID signing keys of a trust domain, by key id (``kid``). Only P-256 keys (what ES256 needs)."""

    trust_domain: TrustDomain
    keys: Mapping[str, ec.EllipticCurvePublicKey] = field(hash=False)

    def __post_init__(self) -> None:
        if not isinstance(self.trust_domain, TrustDomain):
            raise JwtSvidError(f"a JWT bundle needs a TrustDomain, not {shown(self.trust_domain)}")
        keys: dict[str, ec.EllipticCurvePublicKey] = {}
        for key_id, key in dict(self.keys).items():
            if not isinstance(key_id, str) or not key_id:
                raise JwtSvidError(
                    f"JWT bundle of {self.trust_domain}: key id {shown(key_id)} is not a non-empty string"
                )
            if not _is_p256_public(key):
                raise JwtSvidError(f"JWT bundle of {self.trust_domain}: key {shown(key_id)} is not a P-256 public key")
            keys[key_id] = key
        object.__setattr__(self, "keys", MappingProxyType(keys))

    def to_jwks(
        self,
        x509_roots: Sequence[x509.Certificate] = (),
        *,
        sequence: int = 0,
        refresh_hint: timedelta | None = None,
    ) -> bytes:
        """The SPIFFE bundle document: a JWK Set with a ``jwt-svid`` entry per signing key, an ``x509-svid``
        entry (``x5c``) per root in ``x509_roots``, ``spiffe_sequence`` and, when given, ``spiffe_refresh_hint``
        (whole seconds, rounded up). ``sequence`` must grow whenever the document changes (the caller keeps it)."""
        if isinstance(sequence, bool) or not isinstance(sequence, int) or not 0 <= sequence < 2**63:
            raise JwtSvidError(f"spiffe_sequence {shown(sequence)} is not an integer in [0, 2**63)")
        entries: list[dict[str, Any]] = [
            {"kty": "EC", "kid": key_id, "use": USE_JWT, **_ec_members(key)} for key_id, key in self.keys.items()
        ]
        entries += [_x509_entry(cert) for cert in x509_roots]
        document: dict[str, Any] = {"keys": entries, "spiffe_sequence": sequence}
        if refresh_hint is not None:
            if refresh_hint <= timedelta(0):
                raise JwtSvidError(f"spiffe_refresh_hint must be positive, not {refresh_hint}")
            document["spiffe_refresh_hint"] = math.ceil(refresh_hint.total_seconds())
        return json.dumps(document, separators=(",", ":")).encode()

    @classmethod
    def from_jwks(cls, trust_domain: TrustDomain, data: bytes) -> JwtBundle:
        """Read the ``jwt-svid`` P-256 keys of a SPIFFE bundle document; entries without that ``use``, of
        another key type or curve are ignored, as the bundle spec says. JwtSvidError on malformed."""
        where = f"JWT bundle of {trust_domain}"
        if not isinstance(data, bytes | bytearray):
            raise JwtSvidError(f"{where} is not bytes")
        if len(data) > MAX_BUNDLE_BYTES:
            raise JwtSvidError(f"{where} is larger than {MAX_BUNDLE_BYTES} bytes")
        document = _json_object(bytes(data), where)
        entries = document.get("keys")
        if not isinstance(entries, list):
            raise JwtSvidError(f"{where} has no 'keys' list")
        keys: dict[str, ec.EllipticCurvePublicKey] = {}
        for index, entry in enumerate(entries):
            at = f"{where}: keys[{index}]"
            if not isinstance(entry, dict):
                raise JwtSvidError(f"{at} is not a JSON object")
            if entry.get("use") != USE_JWT or entry.get("kty") != "EC" or entry.get("crv") != "P-256":
                continue
            key_id = entry.get("kid")
            if not isinstance(key_id, str) or not key_id:
                raise JwtSvidError(f"{at} (use jwt-svid) has no 'kid'")
            if key_id in keys:
                raise JwtSvidError(f"{at}: key id {shown(key_id)} appears twice")
            keys[key_id] = _p256_from_members(entry, f"{at} ({shown(key_id)})")
        return cls(trust_domain, keys)


# -- signing -------------------------------------------------------------------------------------------------


def sign_jwt_svid(
    key: ec.EllipticCurvePrivateKey,
    key_id: str,
    spiffe_id: SpiffeId,
    audience: Sequence[str],
    *,
    issued_at: datetime,
    expiry: datetime,
) -> JwtSvid:
    """Sign a JWT-SVID for ``spiffe_id`` with ``key`` (P-256, ES256) under ``key_id``. ``iat`` and ``exp`` are
    whole seconds, rounded down (the token never outlives ``expiry``); the returned times are the token's."""
    if not isinstance(key, ec.EllipticCurvePrivateKey) or key.curve.name != "secp256r1":
        raise JwtSvidError("a JWT-SVID is signed with an ECDSA P-256 key (ES256)")
    if not isinstance(key_id, str) or not key_id:
        raise JwtSvidError(f"key id {shown(key_id)} is not a non-empty string")
    if not isinstance(spiffe_id, SpiffeId):
        raise JwtSvidError(f"{shown(spiffe_id)} is not a SpiffeId")
    audiences = _audience_list(audience)
    for moment, name in ((issued_at, "issued_at"), (expiry, "expiry")):
        if not isinstance(moment, datetime) or moment.tzinfo is None:
            raise JwtSvidError(f"{name} must be a timezone-aware datetime")
    iat, exp = math.floor(issued_at.timestamp()), math.floor(expiry.timestamp())
    if exp <= iat:
        raise JwtSvidError(f"a JWT-SVID must expire after it is issued (exp {exp} <= iat {iat})")
    if iat < 0 or exp > _LAST_SECOND:
        raise JwtSvidError("a JWT-SVID's times must lie between 1970 and 9999")
    header = {"alg": ALGORITHM, "kid": key_id, "typ": "JWT"}
    claims: dict[str, Any] = {"sub": str(spiffe_id), "aud": list(audiences), "exp": exp, "iat": iat}
    signing_input = f"{_b64url(_json_bytes(header))}.{_b64url(_json_bytes(claims))}"
    r, s = decode_dss_signature(key.sign(signing_input.encode("ascii"), ec.ECDSA(hashes.SHA256())))
    signature = r.to_bytes(_COORDINATE_BYTES, "big") + s.to_bytes(_COORDINATE_BYTES, "big")
    token = f"{signing_input}.{_b64url(signature)}"
    if len(token) > MAX_TOKEN_BYTES:
        raise JwtSvidError(f"the JWT-SVID would be larger than {MAX_TOKEN_BYTES} bytes (too many audiences)")
    return JwtSvid(
        token=token,
        spiffe_id=spiffe_id,
        audience=audiences,
        expiry=datetime.fromtimestamp(exp, UTC),
        issued_at=datetime.fromtimestamp(iat, UTC),
        key_id=key_id,
        claims=MappingProxyType(claims),
    )


def _audience_list(audience: Sequence[str]) -> tuple[str, ...]:
    if isinstance(audience, str):
        raise JwtSvidError("audience must be a list of strings, not one string")
    audiences = tuple(audience)
    if not audiences:
        raise JwtSvidError("a JWT-SVID needs at least one audience")
    for value in audiences:
        if not isinstance(value, str) or not value:
            raise JwtSvidError(f"audience {shown(value)} is not a non-empty string")
    return audiences


# -- validation ----------------------------------------------------------------------------------------------


def validate_jwt_svid(token: str, audience: str, bundles: Mapping[TrustDomain, JwtBundle], now: datetime) -> JwtSvid:
    """Validate ``token`` for ``audience`` against the JWT bundles of the trust domains we trust, at ``now``.
    Returns the JWT-SVID; raises :class:`JwtSvidError` naming the first thing wrong (see the module docstring)."""
    if not isinstance(audience, str) or not audience:
        raise JwtSvidError("no audience to validate the JWT-SVID against")
    if not isinstance(now, datetime) or now.tzinfo is None:
        raise JwtSvidError("now must be a timezone-aware datetime")
    header, claims, signing_input, signature = _parse(token)
    key_id = _check_header(header)
    spiffe_id = _subject(claims)
    bundle = bundles.get(spiffe_id.trust_domain)
    if bundle is None:
        raise JwtSvidError(
            f"JWT-SVID subject {spiffe_id} is in trust domain '{spiffe_id.trust_domain}', which has no JWT bundle here"
        )
    key = bundle.keys.get(key_id)
    if key is None:
        raise JwtSvidError(f"JWT-SVID key id {shown(key_id)} is not in the JWT bundle of '{bundle.trust_domain}'")
    _verify(
        key,
        signing_input,
        signature,
        f"JWT-SVID signature does not verify with key {shown(key_id)} of '{bundle.trust_domain}'",
    )
    expiry = _numeric_date(claims, "exp")
    issued_at = _numeric_date(claims, "iat")
    if now >= expiry:
        raise JwtSvidError(f"JWT-SVID expired at {_shown_time(expiry)}")
    if issued_at > expiry:
        raise JwtSvidError("JWT-SVID 'iat' is after its 'exp'")
    if "nbf" in claims:
        not_before = _numeric_date(claims, "nbf")
        if now < not_before:
            raise JwtSvidError(f"JWT-SVID is not valid before {_shown_time(not_before)}")
    audiences = _audiences(claims)
    if audience not in audiences:
        raise JwtSvidError(f"JWT-SVID audience {shown(list(audiences))} does not include {shown(audience)}")
    return JwtSvid(
        token=token,
        spiffe_id=spiffe_id,
        audience=audiences,
        expiry=expiry,
        issued_at=issued_at,
        key_id=key_id,
        claims=MappingProxyType(claims),
    )


def _parse(token: str) -> tuple[dict[str, Any], dict[str, Any], bytes, bytes]:
    if not isinstance(token, str):
        raise JwtSvidError("JWT-SVID is not a string")
    if not token:
        raise JwtSvidError("JWT-SVID is empty")
    if len(token) > MAX_TOKEN_BYTES:
        raise JwtSvidError(f"JWT-SVID is larger than {MAX_TOKEN_BYTES} bytes ({len(token)})")
    parts = token.split(".")
    if len(parts) != 3 or not token.isascii():
        raise JwtSvidError(
            "JWT-SVID is malformed: not three base64url parts separated by '.' (JWS compact serialization)"
        )
    header = _json_object(_unb64url(parts[0], "header"), "JWT-SVID is malformed: its header")
    claims = _json_object(_unb64url(parts[1], "payload"), "JWT-SVID is malformed: its payload")
    signature = _unb64url(parts[2], "signature")
    return header, claims, f"{parts[0]}.{parts[1]}".encode("ascii"), signature


def _check_header(header: dict[str, Any]) -> str:
    if "alg" not in header:
        raise JwtSvidError("JWT-SVID header has no 'alg'")
    alg = header["alg"]
    if isinstance(alg, str) and alg.lower() == "none":
        raise JwtSvidError(f"JWT-SVID algorithm {shown(alg)} is refused: a JWT-SVID must be signed")
    if alg != ALGORITHM:
        raise JwtSvidError(f"JWT-SVID algorithm {shown(alg)} is not accepted (only {ALGORITHM})")
    for name in header:
        if name not in HEADER_MEMBERS:
            raise JwtSvidError(f"JWT-SVID header member {shown(name)} is not allowed (only alg, kid, typ)")
    if "typ" in header and header["typ"] not in TYPES:
        raise JwtSvidError(f"JWT-SVID header 'typ' is {shown(header['typ'])}, not 'JWT' or 'JOSE'")
    if "kid" not in header:
        raise JwtSvidError("JWT-SVID header has no 'kid'")
    key_id = header["kid"]
    if not isinstance(key_id, str) or not key_id:
        raise JwtSvidError(f"JWT-SVID header 'kid' is {shown(key_id)}, not a non-empty string")
    return key_id


def _subject(claims: Mapping[str, Any]) -> SpiffeId:
    if "sub" not in claims:
        raise JwtSvidError("JWT-SVID has no 'sub' claim")
    sub = claims["sub"]
    if not isinstance(sub, str):
        raise JwtSvidError(f"JWT-SVID 'sub' is {shown(sub)}, not a SPIFFE ID")
    try:
        return SpiffeId.parse(sub)
    except InvalidSpiffeIdError as err:
        raise JwtSvidError(f"JWT-SVID 'sub' is not a SPIFFE ID: {err}") from None


def _numeric_date(claims: Mapping[str, Any], name: str) -> datetime:
    if name not in claims:
        raise JwtSvidError(f"JWT-SVID has no '{name}' claim")
    value = claims[name]
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise JwtSvidError(f"JWT-SVID '{name}' is {shown(value)}, not a number")
    if not 0 <= value <= _LAST_SECOND:
        raise JwtSvidError(f"JWT-SVID '{name}' {shown(value)} is out of range")
    return datetime.fromtimestamp(value, UTC)


def _audiences(claims: Mapping[str, Any]) -> tuple[str, ...]:
    if "aud" not in claims:
        raise JwtSvidError("JWT-SVID has no 'aud' claim")
    aud = claims["aud"]
    values = [aud] if isinstance(aud, str) else aud
    if not isinstance(values, list) or not all(isinstance(v, str) for v in values):
        raise JwtSvidError(f"JWT-SVID 'aud' is {shown(aud)}, not a string or a list of strings")
    if not any(values):
        raise JwtSvidError("JWT-SVID 'aud' is empty")
    return tuple(values)


def _verify(key: ec.EllipticCurvePublicKey, signing_input: bytes, signature: bytes, refusal: str) -> None:
    if len(signature) != _SIGNATURE_BYTES:
        raise JwtSvidError(f"JWT-SVID signature is {len(signature)} bytes, not the {_SIGNATURE_BYTES} of ES256")
    r = int.from_bytes(signature[:_COORDINATE_BYTES], "big")
    s = int.from_bytes(signature[_COORDINATE_BYTES:], "big")
    try:
        key.verify(encode_dss_signature(r, s), signing_input, ec.ECDSA(hashes.SHA256()))
    except InvalidSignature:
        raise JwtSvidError(refusal) from None


def _shown_time(moment: datetime) -> str:
    return moment.isoformat(timespec="seconds").replace("+00:00", "Z")


# -- encodings -----------------------------------------------------------------------------------------------


class _DuplicateMember(Exception):
    def __init__(self, name: str) -> None:
        super().__init__(name)
        self.name = name


def _unique_members(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    members: dict[str, Any] = {}
    for name, value in pairs:
        if name in members:
            raise _DuplicateMember(name)
        members[name] = value
    return members


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def _json_object(data: bytes, what: str) -> dict[str, Any]:
    """``data`` as a JSON object: strict UTF-8, no duplicate member, no NaN/Infinity; JwtSvidError naming ``what``."""
    try:
        value = json.loads(data.decode("utf-8"), object_pairs_hook=_unique_members, parse_constant=_no_constant)
    except _DuplicateMember as dup:
        raise JwtSvidError(f"{what} has the member {shown(dup.name)} twice") from None
    except (ValueError, RecursionError):  # UnicodeDecodeError and JSONDecodeError are ValueErrors
        raise JwtSvidError(f"{what} is not a JSON object") from None
    if not isinstance(value, dict):
        raise JwtSvidError(f"{what} is not a JSON object")
    return value


def _json_bytes(value: Mapping[str, Any]) -> bytes:
    return json.dumps(value, separators=(",", ":")).encode()


def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def _unb64url(text: str, part: str) -> bytes:
    """Decode canonical unpadded base64url (RFC 7515 section 2); one encoding per value."""
    refusal = f"JWT-SVID is malformed: its {part} is not unpadded base64url"
    if not _B64URL.fullmatch(text) or len(text) % 4 == 1:
        raise JwtSvidError(refusal)
    data = base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
    if _b64url(data) != text:
        raise JwtSvidError(refusal)
    return data


def _is_p256_public(key: object) -> bool:
    return isinstance(key, ec.EllipticCurvePublicKey) and key.curve.name == "secp256r1"


def _ec_members(key: ec.EllipticCurvePublicKey) -> dict[str, str]:
    crv = _CURVES.get(key.curve.name)
    if crv is None:
        raise JwtSvidError(f"curve {key.curve.name} has no JWK name")
    size = (key.curve.key_size + 7) // 8
    numbers = key.public_numbers()
    return {"crv": crv, "x": _b64url(numbers.x.to_bytes(size, "big")), "y": _b64url(numbers.y.to_bytes(size, "big"))}


def _uint(value: int) -> str:
    return _b64url(value.to_bytes(max(1, (value.bit_length() + 7) // 8), "big"))


def _x509_entry(cert: x509.Certificate) -> dict[str, Any]:
    if not isinstance(cert, x509.Certificate):
        raise JwtSvidError(f"X.509 root {shown(cert)} is not a certificate")
    key = cert.public_key()
    members: dict[str, Any]
    if isinstance(key, ec.EllipticCurvePublicKey):
        members = {"kty": "EC", "use": USE_X509, **_ec_members(key)}
    elif isinstance(key, rsa.RSAPublicKey):
        numbers = key.public_numbers()
        members = {"kty": "RSA", "use": USE_X509, "n": _uint(numbers.n), "e": _uint(numbers.e)}
    else:
        raise JwtSvidError(f"X.509 root {cert.serial_number:x}: a {type(key).__name__} cannot go in a SPIFFE bundle")
    der = cert.public_bytes(serialization.Encoding.DER)
    members["x5c"] = [base64.b64encode(der).decode("ascii")]
    return members


def _p256_from_members(entry: Mapping[str, Any], at: str) -> ec.EllipticCurvePublicKey:
    coordinates = []
    for name in ("x", "y"):
        value = entry.get(name)
        try:
            raw = _unb64url(value, name) if isinstance(value, str) else b""
        except JwtSvidError:
            raw = b""
        if len(raw) != _COORDINATE_BYTES:
            raise JwtSvidError(f"{at}: '{name}' is not a base64url P-256 coordinate")
        coordinates.append(int.from_bytes(raw, "big"))
    try:
        return ec.EllipticCurvePublicNumbers(coordinates[0], coordinates[1], ec.SECP256R1()).public_key()
    except ValueError:
        raise JwtSvidError(f"{at}: (x, y) is not a point of P-256") from None


def thumbprint(key: ec.EllipticCurvePublicKey) -> str:
    """The RFC 7638 JWK thumbprint of a P-256 key (SHA-256, base64url): our key ids. A key file whose key does
    not hash to its key id was replaced or damaged."""
    members = {"kty": "EC", **_ec_members(key)}
    canonical = json.dumps(dict(sorted(members.items())), separators=(",", ":")).encode()
    return _b64url(hashlib.sha256(canonical).digest())
