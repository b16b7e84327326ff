from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from mesh_identity.errors import InvalidSpiffeIdError
from mesh_identity.spiffe import SpiffeId, TrustDomain

TD = TrustDomain("example.org")


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("", "Invalid SPIFFE ID '': it is empty"),
        ("http://example.org/a", "Invalid SPIFFE ID 'http://example.org/a': scheme must be 'spiffe://'"),
        ("SPIFFE://example.org/a", "Invalid SPIFFE ID 'SPIFFE://example.org/a': scheme must be lowercase 'spiffe://'"),
        ("spiffe:///a", "Invalid SPIFFE ID 'spiffe:///a': trust domain is missing"),
        (
            "spiffe://Example.org/a",
            "Invalid SPIFFE ID 'spiffe://Example.org/a': trust domain character 'E' is uppercase "
            "(only lowercase letters are allowed)",
        ),
        ("spiffe://example.org:443/a", "Invalid SPIFFE ID 'spiffe://example.org:443/a': a port is not allowed"),
        ("spiffe://user@example.org/a", "Invalid SPIFFE ID 'spiffe://user@example.org/a': user info is not allowed"),
        ("spiffe://example.org/a?x=1", "Invalid SPIFFE ID 'spiffe://example.org/a?x=1': a query is not allowed"),
        ("spiffe://example.org/a#f", "Invalid SPIFFE ID 'spiffe://example.org/a#f': a fragment is not allowed"),
        (
            "spiffe://example.org/a/./b",
            "Invalid SPIFFE ID 'spiffe://example.org/a/./b': path segment '.' is not allowed",
        ),
        (
            "spiffe://example.org/../b",
            "Invalid SPIFFE ID 'spiffe://example.org/../b': path segment '..' is not allowed",
        ),
        (
            "spiffe://example.org/a//b",
            "Invalid SPIFFE ID 'spiffe://example.org/a//b': empty path segment is not allowed",
        ),
        ("spiffe://example.org/a/", "Invalid SPIFFE ID 'spiffe://example.org/a/': trailing slash is not allowed"),
        ("spiffe://example.org/", "Invalid SPIFFE ID 'spiffe://example.org/': trailing slash is not allowed"),
        (
            "spiffe://example.org/a b",
            "Invalid SPIFFE ID 'spiffe://example.org/a b': path character ' ' is not allowed "
            "(use A-Z, a-z, 0-9, '.', '-', '_')",
        ),
        ("spiffe://example.org/%41", "Invalid SPIFFE ID 'spiffe://example.org/%41': percent-encoding is not allowed"),
        (
            "spiffe://exa$mple.org/a",
            "Invalid SPIFFE ID 'spiffe://exa$mple.org/a': trust domain character '$' is not allowed "
            "(use a-z, 0-9, '.', '-', '_')",
        ),
    ],
)
def test_invalid_ids_name_the_problem(text: str, message: str) -> None:
    with pytest.raises(InvalidSpiffeIdError) as err:
        SpiffeId.parse(text)
    assert str(err.value) == message


def test_over_long_id_is_refused() -> None:
    text = "spiffe://example.org/" + "a" * 2040
    with pytest.raises(InvalidSpiffeIdError, match="longer than 2048 bytes"):
        SpiffeId.parse(text)


def test_over_long_trust_domain_is_refused() -> None:
    with pytest.raises(InvalidSpiffeIdError, match="trust domain is longer than 255 characters"):
        TrustDomain("a" * 256)


def test_kubernetes_form() -> None:
    sid = SpiffeId.for_kubernetes(TD, "prod", "web")
    assert str(sid) == "spiffe://example.org/ns/prod/sa/web"
    assert sid.kubernetes == ("prod", "web")
    assert SpiffeId.parse("spiffe://example.org/region/eu/web").kubernetes is None


@pytest.mark.parametrize(
    ("ns", "sa", "problem"),
    [
        ("", "web", "namespace is empty"),
        ("a/b", "web", "namespace character '/' is not allowed"),
        ("prod", "..", "service account '..' is not allowed"),
    ],
)
def test_kubernetes_form_validates_its_parts(ns: str, sa: str, problem: str) -> None:
    with pytest.raises(InvalidSpiffeIdError) as err:
        SpiffeId.for_kubernetes(TD, ns, sa)
    assert str(err.value).endswith(problem)


def test_value_semantics() -> None:
    a = SpiffeId.parse("spiffe://example.org/ns/a/sa/b")
    b = SpiffeId.for_kubernetes(TrustDomain("example.org"), "a", "b")
    assert a == b
    assert hash(a) == hash(b)
    assert {a, b} == {a}
    with pytest.raises(AttributeError):
        a.path = "/x"  # type: ignore[misc]
    assert TrustDomain.parse("spiffe://example.org") == TD
    assert TD.id == SpiffeId(TD)
    assert a.member_of(TD)


def test_trust_domain_id_with_path_is_not_a_trust_domain() -> None:
    with pytest.raises(InvalidSpiffeIdError, match="a trust domain has no path"):
        TrustDomain.parse("spiffe://example.org/a")


td_names = st.from_regex(r"[a-z0-9._-]{1,40}", fullmatch=True)
segments = st.from_regex(r"[A-Za-z0-9_-][A-Za-z0-9._-]{0,15}", fullmatch=True).filter(lambda s: s not in (".", ".."))


@given(td_names, st.lists(segments, max_size=6))
def test_parse_format_round_trip(domain: str, segs: list[str]) -> None:
    sid = SpiffeId.from_segments(TrustDomain(domain), *segs)
    text = str(sid)
    assert SpiffeId.parse(text) == sid
    assert str(SpiffeId.parse(text)) == text
    assert sid.segments == tuple(segs)


@given(st.text(max_size=60))
def test_parse_never_fails_with_anything_but_invalid_id(text: str) -> None:
    try:
        sid = SpiffeId.parse("spiffe://" + text)
    except InvalidSpiffeIdError:
        return
    assert str(sid) == "spiffe://" + text
