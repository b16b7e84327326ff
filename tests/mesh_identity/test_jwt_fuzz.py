"""Fuzzing JWT-SVID validation and JWT bundle parsing: whatever the input, ``JwtSvidError`` or a valid result,
never another exception, never a hang, and never the token or the signing key in a message.

Inputs: any text; a valid token mutated byte by byte; tokens built from mutated headers and claims (JSON trees
changed node by node), signed with the bundle's key so that validation reaches the claim checks; mutated
bundle documents.
"""

from __future__ import annotations

import base64
import json
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature
from hypothesis import given
from hypothesis import strategies as st

from mesh_identity.jwtsvid import JwtBundle, JwtSvidError, sign_jwt_svid, thumbprint, validate_jwt_svid
from mesh_identity.keys import private_key_pem
from mesh_identity.spiffe import SpiffeId, TrustDomain
from tests.fuzz.harness import Rule, Watch, fuzz_settings, mutated, mutated_bytes, secret_markers

TD = TrustDomain("example.org")
WEB = SpiffeId.parse("spiffe://example.org/ns/shop/sa/web")
KEY = ec.generate_private_key(ec.SECP256R1())
KID = thumbprint(KEY.public_key())
BUNDLES = {TD: JwtBundle(TD, {KID: KEY.public_key()})}
T0 = datetime(2030, 1, 1, tzinfo=UTC)
NOW = T0 + timedelta(minutes=1)
GOOD = sign_jwt_svid(KEY, KID, WEB, ["db"], issued_at=T0, expiry=T0 + timedelta(minutes=5))
HEADER = {"alg": "ES256", "kid": KID, "typ": "JWT"}
VOCABULARY = (
    "ES256", "none", "HS256", "RS256", "JWT", "JOSE", KID, "db", str(WEB), "spiffe://other.org/web",
    "spiffe://example.org", int(T0.timestamp()), int(NOW.timestamp()), 2**63, [], {},
)  # fmt: skip


@pytest.fixture(scope="module")
def rule() -> Iterator[Rule]:
    with Watch() as watch:
        yield Rule("jwt", allowed=(JwtSvidError,), secrets=secret_markers(private_key_pem(KEY)), watch=watch)


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def signed(header: Any, claims: Any) -> str:
    parts = [json.dumps(part).encode() for part in (header, claims)]
    signing_input = f"{b64(parts[0])}.{b64(parts[1])}"
    r, s = decode_dss_signature(KEY.sign(signing_input.encode(), ec.ECDSA(hashes.SHA256())))
    return f"{signing_input}.{b64(r.to_bytes(32, 'big') + s.to_bytes(32, 'big'))}"


def check(rule: Rule, token: Any) -> None:
    ok, result = rule.call(lambda: validate_jwt_svid(token, "db", BUNDLES, NOW), "validate_jwt_svid")
    if ok:  # accepted: it must really be a token for db, of a trusted domain, live, with our key
        assert result.spiffe_id.trust_domain == TD and "db" in result.audience
        assert result.key_id == KID and result.expiry > NOW
    elif isinstance(token, str) and len(token) >= 40:
        assert token not in str(result), "an error message echoes the whole token"
    rule.settle()


def test_the_good_token_is_accepted(rule: Rule) -> None:
    ok, _ = rule.call(lambda: validate_jwt_svid(GOOD.token, "db", BUNDLES, NOW))
    assert ok


@fuzz_settings(300)
@given(token=st.text(max_size=300) | st.text(alphabet="abcXYZ019-_.=+/", max_size=300))
def test_any_text(rule: Rule, token: str) -> None:
    check(rule, token)


@fuzz_settings(300)
@given(data=mutated_bytes(GOOD.token.encode(), max_mutations=3))
def test_mutated_token(rule: Rule, data: bytes) -> None:
    check(rule, data.decode("latin-1"))


@fuzz_settings(400)
@given(
    header=mutated(HEADER, vocabulary=VOCABULARY),
    claims=mutated(dict(GOOD.claims), vocabulary=VOCABULARY),
)
def test_mutated_header_and_claims_signed_with_the_bundle_key(rule: Rule, header: Any, claims: Any) -> None:
    check(rule, signed(header, claims))


@fuzz_settings(300)
@given(document=mutated(json.loads(BUNDLES[TD].to_jwks(sequence=1)), max_mutations=4, vocabulary=VOCABULARY))
def test_mutated_bundle_document(rule: Rule, document: Any) -> None:
    data = json.dumps(document).encode()
    ok, result = rule.call(lambda: JwtBundle.from_jwks(TD, data), "JwtBundle.from_jwks")
    if ok:
        assert result.trust_domain == TD
        assert all(k.curve.name == "secp256r1" for k in result.keys.values())
    rule.settle()


@fuzz_settings(100)
@given(value=st.none() | st.integers() | st.binary(max_size=40) | st.lists(st.text(max_size=5), max_size=3))
def test_not_a_string(rule: Rule, value: Any) -> None:
    check(rule, value)
