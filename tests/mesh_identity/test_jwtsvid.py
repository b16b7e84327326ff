"""JWT-SVIDs and JWT bundles (mesh_identity.jwtsvid): round trips, independent implementations (PyJWT, py-spiffe)
reading what we make and making what we read, and every refusal with its exact message."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any

import jwt
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature
from cryptography.x509.oid import NameOID
from spiffe.bundle.jwt_bundle.errors import ParseJWTBundleError
from spiffe.bundle.jwt_bundle.jwt_bundle import JwtBundle as SpiffeJwtBundle
from spiffe.spiffe_id.spiffe_id import TrustDomain as SpiffeTrustDomain
from spiffe.svid.jwt_svid import JwtSvid as SpiffeJwtSvid

from mesh_identity.jwtsvid import (
    MAX_TOKEN_BYTES,
    JwtBundle,
    JwtSvid,
    JwtSvidError,
    sign_jwt_svid,
    thumbprint,
    validate_jwt_svid,
)
from mesh_identity.spiffe import SpiffeId, TrustDomain
from tests.pki import TestCa

TD = TrustDomain("example.org")
OTHER = TrustDomain("other.org")
WEB = SpiffeId.parse("spiffe://example.org/ns/shop/sa/web")
KEY = ec.generate_private_key(ec.SECP256R1())
KID = thumbprint(KEY.public_key())
BUNDLES = {TD: JwtBundle(TD, {KID: KEY.public_key()})}
T0 = datetime(2030, 1, 1, tzinfo=UTC)
IAT, EXP = int(T0.timestamp()), int((T0 + timedelta(minutes=5)).timestamp())
NOW = T0 + timedelta(minutes=1)
HEADER: dict[str, Any] = {"alg": "ES256", "kid": KID, "typ": "JWT"}
CLAIMS: dict[str, Any] = {"sub": str(WEB), "aud": ["db"], "exp": EXP, "iat": IAT}


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def es256(key: ec.EllipticCurvePrivateKey) -> Callable[[bytes], bytes]:
    def sign(data: bytes) -> bytes:
        r, s = decode_dss_signature(key.sign(data, ec.ECDSA(hashes.SHA256())))
        return r.to_bytes(32, "big") + s.to_bytes(32, "big")

    return sign


def forge(
    header: dict[str, Any] | bytes = HEADER,
    claims: dict[str, Any] | bytes = CLAIMS,
    sign: Callable[[bytes], bytes] | None = None,
) -> str:
    """A compact JWS of exactly these header and claims (raw JSON bytes allowed), signed by ``sign`` (default:
    ES256 with the bundle's key)."""
    sign = sign or es256(KEY)
    parts = [raw if isinstance(raw, bytes) else json.dumps(raw).encode() for raw in (header, claims)]
    signing_input = f"{b64(parts[0])}.{b64(parts[1])}"
    return f"{signing_input}.{b64(sign(signing_input.encode()))}"


def refusal(token: str, audience: str = "db", now: datetime = NOW, bundles: Any = BUNDLES) -> str:
    with pytest.raises(JwtSvidError) as err:
        validate_jwt_svid(token, audience, bundles, now)
    return str(err.value)


# -- signing and validating ----------------------------------------------------------------------------------


def test_round_trip() -> None:
    svid = sign_jwt_svid(KEY, KID, WEB, ["db"], issued_at=T0, expiry=T0 + timedelta(minutes=5))
    header = json.loads(base64.urlsafe_b64decode(svid.token.split(".")[0] + "=="))
    assert header == {"alg": "ES256", "kid": KID, "typ": "JWT"}
    assert dict(svid.claims) == {"sub": str(WEB), "aud": ["db"], "exp": EXP, "iat": IAT}
    got = validate_jwt_svid(svid.token, "db", BUNDLES, NOW)
    assert got == svid
    assert (got.spiffe_id, got.audience, got.key_id) == (WEB, ("db",), KID)
    assert (got.issued_at, got.expiry) == (T0, T0 + timedelta(minutes=5))
    assert svid.token not in repr(svid)  # a bearer credential stays out of logs


def test_times_are_whole_seconds_rounded_down() -> None:
    svid = sign_jwt_svid(
        KEY, KID, WEB, ["db"], issued_at=T0 + timedelta(seconds=0.9), expiry=T0 + timedelta(seconds=60.9)
    )
    assert (svid.claims["iat"], svid.claims["exp"]) == (IAT, IAT + 60)
    assert svid.expiry == T0 + timedelta(seconds=60)  # never later than asked


def test_a_token_for_two_audiences_validates_for_each() -> None:
    svid = sign_jwt_svid(KEY, KID, WEB, ["db", "cache"], issued_at=T0, expiry=T0 + timedelta(minutes=5))
    assert validate_jwt_svid(svid.token, "cache", BUNDLES, NOW).audience == ("db", "cache")
    assert validate_jwt_svid(forge(claims={**CLAIMS, "aud": "db"}), "db", BUNDLES, NOW).audience == ("db",)


def test_typ_jose_and_no_typ_are_accepted() -> None:
    for header in ({"alg": "ES256", "kid": KID, "typ": "JOSE"}, {"alg": "ES256", "kid": KID}):
        assert validate_jwt_svid(forge(header=header), "db", BUNDLES, NOW).spiffe_id == WEB


def test_pyjwt_verifies_our_token_with_the_jwks_we_publish() -> None:
    now = datetime.now(UTC)  # PyJWT checks exp and iat against the wall clock
    svid = sign_jwt_svid(KEY, KID, WEB, ["db"], issued_at=now, expiry=now + timedelta(minutes=5))
    keys = jwt.PyJWKSet.from_json(BUNDLES[TD].to_jwks(sequence=1).decode())
    assert [(k.key_id, k.public_key_use) for k in keys.keys] == [(KID, "jwt-svid")]
    header = jwt.get_unverified_header(svid.token)
    assert header == {"alg": "ES256", "kid": KID, "typ": "JWT"}
    claims = jwt.decode(
        svid.token, keys[header["kid"]].key, algorithms=["ES256"], audience="db", options={"require": ["exp", "aud"]}
    )
    assert claims == dict(svid.claims)
    assert claims["sub"] == str(WEB) and claims["exp"] == int(svid.expiry.timestamp())
    with pytest.raises(jwt.InvalidSignatureError):
        jwt.decode(forge(sign=es256(OTHER_KEY)), keys[KID].key, algorithms=["ES256"], audience="db")


def test_we_verify_a_token_pyjwt_signed() -> None:
    key = ec.generate_private_key(ec.SECP256R1())
    token = jwt.encode(CLAIMS, key, algorithm="ES256", headers={"kid": "pyjwt-key"})
    bundles = {TD: JwtBundle(TD, {"pyjwt-key": key.public_key()})}
    got = validate_jwt_svid(token, "db", bundles, NOW)
    assert (got.spiffe_id, got.key_id, got.expiry) == (WEB, "pyjwt-key", T0 + timedelta(minutes=5))


def test_py_spiffe_parses_our_jwt_bundle_and_validates_our_token() -> None:
    now = datetime.now(UTC)  # py-spiffe checks exp against the wall clock
    svid = sign_jwt_svid(KEY, KID, WEB, ["db"], issued_at=now, expiry=now + timedelta(minutes=5))
    theirs = SpiffeJwtBundle.parse(SpiffeTrustDomain("example.org"), BUNDLES[TD].to_jwks(sequence=7))
    assert theirs.jwt_authorities == {KID: KEY.public_key()}
    parsed = SpiffeJwtSvid.parse_and_validate(svid.token, theirs, {"db"})
    assert (str(parsed.spiffe_id), parsed.audience, parsed.expiry) == (str(WEB), {"db"}, int(svid.expiry.timestamp()))


def test_py_spiffe_jwt_bundle_parser_wants_a_jwt_only_document() -> None:
    # py-spiffe 0.3 reads every JWK of the document as a JWT authority and wants a kid on each: an x509-svid
    # entry (no kid, as the bundle spec has it) makes it refuse the whole document. So the Workload API's
    # FetchJWTBundles must carry to_jwks() without roots; the full document is for federation.
    document = BUNDLES[TD].to_jwks([TestCa.for_trust_domain().certificate])
    with pytest.raises(ParseJWTBundleError, match="keyID"):
        SpiffeJwtBundle.parse(SpiffeTrustDomain("example.org"), document)


# -- the bundle document -------------------------------------------------------------------------------------


def rsa_root() -> x509.Certificate:
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "rsa root")])
    return (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(1)
        .not_valid_before(T0)
        .not_valid_after(T0 + timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )


def test_bundle_document_has_jwt_and_x509_entries_sequence_and_refresh_hint() -> None:
    ec_root, rsa_cert = TestCa.for_trust_domain().certificate, rsa_root()
    document = json.loads(BUNDLES[TD].to_jwks([ec_root, rsa_cert], sequence=42, refresh_hint=timedelta(minutes=4.5)))
    assert document["spiffe_sequence"] == 42
    assert document["spiffe_refresh_hint"] == 270
    jwt_entry, ec_entry, rsa_entry = document["keys"]
    numbers = KEY.public_key().public_numbers()
    assert jwt_entry == {
        "kty": "EC",
        "kid": KID,
        "use": "jwt-svid",
        "crv": "P-256",
        "x": b64(numbers.x.to_bytes(32, "big")),
        "y": b64(numbers.y.to_bytes(32, "big")),
    }
    assert "kid" not in ec_entry and "kid" not in rsa_entry
    for entry, cert in ((ec_entry, ec_root), (rsa_entry, rsa_cert)):
        assert entry["use"] == "x509-svid"
        assert base64.b64decode(entry["x5c"][0]) == cert.public_bytes(serialization.Encoding.DER)
    assert ec_entry["kty"] == "EC" and ec_entry["crv"] == "P-256"
    assert rsa_entry["kty"] == "RSA" and rsa_entry["e"] == "AQAB"
    # an independent JWK parser reads every entry as the key of its certificate
    parsed = jwt.PyJWKSet.from_dict(document)
    assert [k.key for k in parsed.keys][1:] == [ec_root.public_key(), rsa_cert.public_key()]
    assert "spiffe_refresh_hint" not in json.loads(BUNDLES[TD].to_jwks())


def test_thumbprint_is_rfc7638() -> None:
    # RFC 7638 section 3.1 computes a thumbprint over exactly these members, in this order
    numbers = KEY.public_key().public_numbers()
    x, y = b64(numbers.x.to_bytes(32, "big")), b64(numbers.y.to_bytes(32, "big"))
    canonical = '{"crv":"P-256","kty":"EC","x":"' + x + '","y":"' + y + '"}'
    assert b64(hashlib.sha256(canonical.encode()).digest()) == KID
    assert jwt.PyJWK.from_json(json.dumps(json.loads(BUNDLES[TD].to_jwks())["keys"][0])).key_id == KID


def test_from_jwks_round_trip_ignores_other_uses_and_key_types() -> None:
    other = ec.generate_private_key(ec.SECP384R1()).public_key()
    document = json.loads(BUNDLES[TD].to_jwks([TestCa.for_trust_domain().certificate, rsa_root()], sequence=3))
    document["keys"] += [
        {"kty": "EC", "kid": "p384", "use": "jwt-svid", "crv": "P-384", **_xy(other, 48)},
        {"kty": "RSA", "kid": "rsa", "use": "jwt-svid", "n": "AQAB", "e": "AQAB"},
        {"kty": "EC", "kid": "no-use", "crv": "P-256", "x": "", "y": ""},
        {"kty": "EC", "kid": "other-use", "use": "wit-svid", "crv": "P-256"},
        {"kty": "OKP", "kid": "ed", "use": "jwt-svid", "crv": "Ed25519", "x": "AA"},
    ]
    bundle = JwtBundle.from_jwks(TD, json.dumps(document).encode())
    assert bundle == BUNDLES[TD]
    assert JwtBundle.from_jwks(TD, b'{"keys": []}').keys == {}  # a trust domain that revoked every key


def _xy(key: ec.EllipticCurvePublicKey, size: int) -> dict[str, str]:
    numbers = key.public_numbers()
    return {"x": b64(numbers.x.to_bytes(size, "big")), "y": b64(numbers.y.to_bytes(size, "big"))}


WHERE = "JWT bundle of example.org"
ENTRY = json.loads(BUNDLES[TD].to_jwks())["keys"][0]


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (b"", f"{WHERE} is not a JSON object"),
        (b"[1]", f"{WHERE} is not a JSON object"),
        (b'{"keys": NaN}', f"{WHERE} is not a JSON object"),
        (b"\xff", f"{WHERE} is not a JSON object"),
        (b'{"keys": [], "keys": []}', f"{WHERE} has the member 'keys' twice"),
        (b"{}", f"{WHERE} has no 'keys' list"),
        (b'{"keys": {}}', f"{WHERE} has no 'keys' list"),
        (b'{"keys": [1]}', f"{WHERE}: keys[0] is not a JSON object"),
        (json.dumps({"keys": [{**ENTRY, "kid": ""}]}).encode(), f"{WHERE}: keys[0] (use jwt-svid) has no 'kid'"),
        (json.dumps({"keys": [ENTRY, ENTRY]}).encode(), f"{WHERE}: keys[1]: key id '{KID}' appears twice"),
        (
            json.dumps({"keys": [{**ENTRY, "x": ENTRY["x"][:-2]}]}).encode(),
            f"{WHERE}: keys[0] ('{KID}'): 'x' is not a base64url P-256 coordinate",
        ),
        (
            json.dumps({"keys": [{**ENTRY, "y": ENTRY["x"]}]}).encode(),
            f"{WHERE}: keys[0] ('{KID}'): (x, y) is not a point of P-256",
        ),
        (b" " * (1024 * 1024 + 1), f"{WHERE} is larger than 1048576 bytes"),
    ],
)
def test_from_jwks_refuses_malformed(data: bytes, message: str) -> None:
    with pytest.raises(JwtSvidError) as err:
        JwtBundle.from_jwks(TD, data)
    assert str(err.value) == message


def test_bundle_holds_only_p256_keys() -> None:
    with pytest.raises(JwtSvidError, match="key 'p384' is not a P-256 public key"):
        JwtBundle(TD, {"p384": ec.generate_private_key(ec.SECP384R1()).public_key()})  # type: ignore[dict-item]


# -- refusals ------------------------------------------------------------------------------------------------

PEM = KEY.public_key().public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
OTHER_KEY = ec.generate_private_key(ec.SECP256R1())
GOOD = forge()
H, P, S = GOOD.split(".")


def hs256(secret: bytes) -> Callable[[bytes], bytes]:
    return lambda data: hmac.new(secret, data, hashlib.sha256).digest()


@pytest.mark.parametrize(
    ("token", "message"),
    [
        # the JOSE header: only ES256, never none, never a MAC keyed with our public key, only alg/kid/typ
        (
            forge(header={**HEADER, "alg": "none"}, sign=lambda _: b""),
            "JWT-SVID algorithm 'none' is refused: a JWT-SVID must be signed",
        ),
        (
            forge(header={**HEADER, "alg": "None"}, sign=lambda _: b""),
            "JWT-SVID algorithm 'None' is refused: a JWT-SVID must be signed",
        ),
        (
            forge(header={**HEADER, "alg": "HS256"}, sign=hs256(PEM)),
            "JWT-SVID algorithm 'HS256' is not accepted (only ES256)",
        ),
        (forge(header={**HEADER, "alg": "RS256"}), "JWT-SVID algorithm 'RS256' is not accepted (only ES256)"),
        (forge(header={**HEADER, "alg": "ES384"}), "JWT-SVID algorithm 'ES384' is not accepted (only ES256)"),
        (forge(header={**HEADER, "alg": ["ES256"]}), "JWT-SVID algorithm ['ES256'] is not accepted (only ES256)"),
        (forge(header={"kid": KID, "typ": "JWT"}), "JWT-SVID header has no 'alg'"),
        (forge(header={"alg": "ES256", "typ": "JWT"}), "JWT-SVID header has no 'kid'"),
        (forge(header={**HEADER, "kid": ""}), "JWT-SVID header 'kid' is '', not a non-empty string"),
        (forge(header={**HEADER, "kid": 7}), "JWT-SVID header 'kid' is 7, not a non-empty string"),
        (forge(header={**HEADER, "typ": "at+jwt"}), "JWT-SVID header 'typ' is 'at+jwt', not 'JWT' or 'JOSE'"),
        (
            forge(header={**HEADER, "jku": "https://evil.example/jwks"}),
            "JWT-SVID header member 'jku' is not allowed (only alg, kid, typ)",
        ),
        (
            forge(header={**HEADER, "crit": ["exp"]}),
            "JWT-SVID header member 'crit' is not allowed (only alg, kid, typ)",
        ),
        (
            forge(header=b'{"alg":"ES256","kid":"%s","alg":"none"}' % KID.encode()),
            "JWT-SVID is malformed: its header has the member 'alg' twice",
        ),
        # keys and signature
        (forge(header={**HEADER, "kid": "nope"}), "JWT-SVID key id 'nope' is not in the JWT bundle of 'example.org'"),
        (forge(sign=es256(OTHER_KEY)), f"JWT-SVID signature does not verify with key '{KID}' of 'example.org'"),
        (f"{H}.{P}.{b64(bytes(64))}", f"JWT-SVID signature does not verify with key '{KID}' of 'example.org'"),
        (
            f"{H}.{P}.{b64(KEY.sign(f'{H}.{P}'.encode(), ec.ECDSA(hashes.SHA256())))}",
            "JWT-SVID signature is {n} bytes, not the 64 of ES256",
        ),  # DER, not JWS's r || s
        (f"{H}.{P}.{S[:-2]}", "JWT-SVID signature is 63 bytes, not the 64 of ES256"),
        # the subject
        (
            forge(claims={**CLAIMS, "sub": "https://example.org/web"}),
            "JWT-SVID 'sub' is not a SPIFFE ID: Invalid SPIFFE ID 'https://example.org/web': scheme must be 'spiffe://'",
        ),
        (
            forge(claims={**CLAIMS, "sub": "spiffe://example.org/a/../b"}),
            "JWT-SVID 'sub' is not a SPIFFE ID: Invalid SPIFFE ID 'spiffe://example.org/a/../b': path segment '..' is not allowed",
        ),
        (
            forge(claims={**CLAIMS, "sub": ["spiffe://example.org/web"]}),
            "JWT-SVID 'sub' is ['spiffe://example.org/web'], not a SPIFFE ID",
        ),
        (forge(claims={k: v for k, v in CLAIMS.items() if k != "sub"}), "JWT-SVID has no 'sub' claim"),
        (
            forge(claims={**CLAIMS, "sub": "spiffe://other.org/web"}),
            "JWT-SVID subject spiffe://other.org/web is in trust domain 'other.org', which has no JWT bundle here",
        ),
        # audience and times
        (forge(claims={k: v for k, v in CLAIMS.items() if k != "aud"}), "JWT-SVID has no 'aud' claim"),
        (forge(claims={**CLAIMS, "aud": []}), "JWT-SVID 'aud' is empty"),
        (forge(claims={**CLAIMS, "aud": ""}), "JWT-SVID 'aud' is empty"),
        (forge(claims={**CLAIMS, "aud": [1]}), "JWT-SVID 'aud' is [1], not a string or a list of strings"),
        (forge(claims={**CLAIMS, "aud": ["admin"]}), "JWT-SVID audience ['admin'] does not include 'db'"),
        (forge(claims={k: v for k, v in CLAIMS.items() if k != "exp"}), "JWT-SVID has no 'exp' claim"),
        (forge(claims={**CLAIMS, "exp": str(EXP)}), f"JWT-SVID 'exp' is '{EXP}', not a number"),
        (forge(claims={**CLAIMS, "exp": True}), "JWT-SVID 'exp' is True, not a number"),
        (forge(claims={**CLAIMS, "exp": 10**30}), f"JWT-SVID 'exp' {10**30} is out of range"),
        (forge(claims={**CLAIMS, "exp": IAT + 60}), "JWT-SVID expired at 2030-01-01T00:01:00Z"),
        (forge(claims={k: v for k, v in CLAIMS.items() if k != "iat"}), "JWT-SVID has no 'iat' claim"),
        (forge(claims={**CLAIMS, "iat": EXP + 1}), "JWT-SVID 'iat' is after its 'exp'"),
        (forge(claims={**CLAIMS, "nbf": IAT + 120}), "JWT-SVID is not valid before 2030-01-01T00:02:00Z"),
        (
            forge(claims=b'{"sub":"%s","aud":["db"],"exp":%d,"iat":%d,"exp":1}' % (str(WEB).encode(), EXP, IAT)),
            "JWT-SVID is malformed: its payload has the member 'exp' twice",
        ),
        (
            forge(claims=b'{"sub":"%s","aud":["db"],"exp":NaN,"iat":%d}' % (str(WEB).encode(), IAT)),
            "JWT-SVID is malformed: its payload is not a JSON object",
        ),
        # the serialization
        ("", "JWT-SVID is empty"),
        ("a" * (MAX_TOKEN_BYTES + 1), f"JWT-SVID is larger than {MAX_TOKEN_BYTES} bytes ({MAX_TOKEN_BYTES + 1})"),
        (f"{H}.{P}", "JWT-SVID is malformed: not three base64url parts separated by '.' (JWS compact serialization)"),
        (
            f"{H}.{P}.{S}.{S}",
            "JWT-SVID is malformed: not three base64url parts separated by '.' (JWS compact serialization)",
        ),
        (
            json.dumps({"protected": H, "payload": P, "signature": S}),
            "JWT-SVID is malformed: not three base64url parts separated by '.' (JWS compact serialization)",
        ),
        (
            f"{H}.{P}.{S}\u00e9",
            "JWT-SVID is malformed: not three base64url parts separated by '.' (JWS compact serialization)",
        ),
        (f"!{H[1:]}.{P}.{S}", "JWT-SVID is malformed: its header is not unpadded base64url"),
        (f"{H}=.{P}.{S}", "JWT-SVID is malformed: its header is not unpadded base64url"),
        (f"{H}.{P[:-1]}.{S}", "JWT-SVID is malformed: its payload is not unpadded base64url"),
        (f"{H}.{P}.{S[:-1]}+", "JWT-SVID is malformed: its signature is not unpadded base64url"),
        (f"{H}.{P}.{S[:-1]}{chr(ord(S[-1]) + 1)}", "JWT-SVID is malformed: its signature is not unpadded base64url"),
        (f"{b64(b'{not json')}.{P}.{S}", "JWT-SVID is malformed: its header is not a JSON object"),
        (f"{b64(b'[]')}.{P}.{S}", "JWT-SVID is malformed: its header is not a JSON object"),
        (f"{b64(bytes([0xFF]))}.{P}.{S}", "JWT-SVID is malformed: its header is not a JSON object"),
        (f"{H}.{b64(b'[' * 5000)}.{S}", "JWT-SVID is malformed: its payload is not a JSON object"),
    ],
)
def test_refusals_name_what_is_wrong(token: str, message: str) -> None:
    got = refusal(token)
    if "{n}" in message:  # a DER signature's length varies with its integers
        message = message.format(n=len(base64.urlsafe_b64decode(token.rsplit(".", 1)[1] + "==")))
    assert got == message
    if len(token) > 60:
        assert token not in got


def test_signature_refusal_is_not_bypassed_by_a_forged_audience() -> None:
    # a token for audience admin carrying the signature of the token for db: the signature is checked first
    token = forge(claims={**CLAIMS, "aud": ["admin"]}, sign=lambda _: es256(KEY)(f"{H}.{P}".encode()))
    assert refusal(token, audience="admin") == f"JWT-SVID signature does not verify with key '{KID}' of 'example.org'"


def test_expiry_is_exclusive() -> None:
    expiry = T0 + timedelta(minutes=5)
    assert validate_jwt_svid(GOOD, "db", BUNDLES, expiry - timedelta(microseconds=1)).expiry == expiry
    assert refusal(GOOD, now=expiry) == "JWT-SVID expired at 2030-01-01T00:05:00Z"


def test_key_of_another_trust_domain_does_not_validate() -> None:
    # a bundle of other.org holding our key: a token naming example.org is still checked against example.org
    bundles = {OTHER: JwtBundle(OTHER, {KID: KEY.public_key()})}
    assert refusal(GOOD, bundles=bundles) == (
        f"JWT-SVID subject {WEB} is in trust domain 'example.org', which has no JWT bundle here"
    )


def test_validator_needs_an_audience() -> None:
    assert refusal(GOOD, audience="") == "no audience to validate the JWT-SVID against"


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (
            lambda: sign_jwt_svid(KEY, KID, WEB, [], issued_at=T0, expiry=T0 + timedelta(minutes=5)),
            "a JWT-SVID needs at least one audience",
        ),
        (
            lambda: sign_jwt_svid(KEY, KID, WEB, "db", issued_at=T0, expiry=T0 + timedelta(minutes=5)),
            "audience must be a list of strings, not one string",
        ),
        (
            lambda: sign_jwt_svid(KEY, KID, WEB, [""], issued_at=T0, expiry=T0 + timedelta(minutes=5)),
            "audience '' is not a non-empty string",
        ),
        (
            lambda: sign_jwt_svid(KEY, KID, WEB, ["db"], issued_at=T0, expiry=T0),
            f"a JWT-SVID must expire after it is issued (exp {IAT} <= iat {IAT})",
        ),
        (
            lambda: sign_jwt_svid(KEY, KID, WEB, ["db"], issued_at=T0.replace(tzinfo=None), expiry=T0),
            "issued_at must be a timezone-aware datetime",
        ),
        (
            lambda: sign_jwt_svid(
                ec.generate_private_key(ec.SECP384R1()),
                KID,
                WEB,
                ["db"],
                issued_at=T0,
                expiry=T0 + timedelta(minutes=5),
            ),
            "a JWT-SVID is signed with an ECDSA P-256 key (ES256)",
        ),
        (
            lambda: sign_jwt_svid(KEY, "", WEB, ["db"], issued_at=T0, expiry=T0 + timedelta(minutes=5)),
            "key id '' is not a non-empty string",
        ),
        (
            lambda: sign_jwt_svid(KEY, KID, WEB, ["x" * 100] * 80, issued_at=T0, expiry=T0 + timedelta(minutes=5)),
            f"the JWT-SVID would be larger than {MAX_TOKEN_BYTES} bytes (too many audiences)",
        ),
    ],
)
def test_signing_refuses(call: Callable[[], JwtSvid], message: str) -> None:
    with pytest.raises(JwtSvidError) as err:
        call()
    assert str(err.value) == message


def test_bundle_document_refuses_bad_parameters() -> None:
    with pytest.raises(JwtSvidError, match=r"spiffe_sequence -1 is not an integer in \[0, 2\*\*63\)"):
        BUNDLES[TD].to_jwks(sequence=-1)
    with pytest.raises(JwtSvidError, match="spiffe_refresh_hint must be positive"):
        BUNDLES[TD].to_jwks(refresh_hint=timedelta(0))
