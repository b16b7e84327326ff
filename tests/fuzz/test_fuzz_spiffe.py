"""Fuzz target: SPIFFE IDs and trust domains (``SpiffeId.parse``, ``TrustDomain``, ``SpiffeId.for_kubernetes``).

Besides the rule (InvalidSpiffeIdError or a valid result, bounded), every answer is checked against the SPIFFE
ID specification written as a regular expression here: what it accepts the parser must accept and print back
unchanged, what it refuses the parser must refuse.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from mesh_identity.errors import InvalidSpiffeIdError
from mesh_identity.spiffe import SpiffeId, TrustDomain
from tests.fuzz.harness import Rule, corpus_cases, count, fuzz_settings, mutated

TARGET = "spiffe"
RULE = Rule(TARGET, allowed=(InvalidSpiffeIdError,), timeout=5.0)
TD = TrustDomain("example.org")

# the spec (SPIFFE-ID.md section 2), independently of the parser
_TD = r"[a-z0-9._-]{1,255}"
_SEGMENT = r"[A-Za-z0-9._-]+"
_ID = re.compile(rf"spiffe://(?P<td>{_TD})(?P<path>(?:/{_SEGMENT})*)")


def spec_accepts_id(text: Any) -> bool:
    if not isinstance(text, str) or len(text.encode()) > 2048:
        return False
    match = _ID.fullmatch(text)
    return match is not None and all(s not in (".", "..") for s in match["path"].split("/")[1:])


def spec_accepts_td(text: str) -> bool:
    return re.fullmatch(_TD, text) is not None


def check(text: Any) -> None:
    """One input through every parser that takes text."""
    ok, result = RULE.call(lambda: SpiffeId.parse(text), "SpiffeId.parse")
    if ok:
        assert spec_accepts_id(text), f"SpiffeId.parse accepted {text!r}, which the spec refuses"
        assert isinstance(result, SpiffeId) and str(result) == text
        assert SpiffeId.parse(str(result)) == result
        assert result.trust_domain == TrustDomain(result.trust_domain.name)
    else:
        assert not spec_accepts_id(text), f"SpiffeId.parse refused {text!r}, which the spec accepts: {result}"
        assert "Invalid SPIFFE ID" in str(result) or "Invalid trust domain" in str(result), str(result)
    if not isinstance(text, str):
        return
    ok, result = RULE.call(lambda: TrustDomain(text), "TrustDomain")
    assert ok == spec_accepts_td(text), f"TrustDomain({text!r}): {result!r}"
    if ok:
        assert str(result) == text and result.id == SpiffeId.parse(f"spiffe://{text}")
    ok, result = RULE.call(lambda: TrustDomain.parse(text), "TrustDomain.parse")
    if text.startswith("spiffe://"):
        expected = spec_accepts_id(text) and "/" not in text[len("spiffe://") :]
    else:
        expected = spec_accepts_td(text)
    assert ok == expected, f"TrustDomain.parse({text!r}): {result!r}"


def check_kubernetes(namespace: str, service_account: str) -> None:
    ok, result = RULE.call(lambda: SpiffeId.for_kubernetes(TD, namespace, service_account), "for_kubernetes")
    expected = spec_accepts_id(f"spiffe://{TD}/ns/{namespace}/sa/{service_account}") and "/" not in (
        namespace + service_account
    )
    assert ok == expected, f"for_kubernetes({namespace!r}, {service_account!r}): {result!r}"
    if ok:
        assert result.kubernetes == (namespace, service_account)
        assert SpiffeId.parse(str(result)) == result


# -- the seed corpus -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("path", corpus_cases(TARGET))
def test_corpus(path: Path) -> None:
    count(TARGET, corpus=True)
    check(path.read_bytes().decode("utf-8"))


# -- generated inputs ----------------------------------------------------------------------------------------

VALID = sorted(p.read_bytes().decode() for p in Path(__file__).parent.joinpath("corpus", TARGET).glob("valid-*"))
NEAR = "spiffe:/.-_%?#@:aAzZ09 é\x00\n"

texts = st.one_of(
    st.text(max_size=80),
    st.text(alphabet=st.sampled_from(NEAR), max_size=60),
    st.builds(
        lambda a, b: a + b,
        st.sampled_from(["spiffe://", "spiffe://example.org", "SPIFFE://", ""]),
        st.text(alphabet=st.sampled_from("abcXYZ019.-_/%?#@: é"), max_size=40),
    ),
)
mutations = st.one_of(*[mutated(valid, max_mutations=4, vocabulary=[*VALID, "/", ".."]) for valid in VALID])
lengths = st.builds(
    lambda td, path: f"spiffe://{'a' * td}/{'b' * path}", st.integers(250, 258), st.integers(1760, 1800)
)


@fuzz_settings(1000)
@given(texts)
def test_arbitrary_text(text: str) -> None:
    count(TARGET)
    check(text)


@fuzz_settings(800)
@given(st.one_of(mutations, lengths))
def test_mutations_of_valid_ids(text: Any) -> None:
    count(TARGET)
    check(text)


@fuzz_settings(50)
@given(st.one_of(st.none(), st.integers(), st.binary(max_size=20), st.lists(st.text(max_size=5), max_size=2)))
def test_not_text(value: Any) -> None:
    count(TARGET)
    check(value)


@fuzz_settings(300)
@given(st.text(alphabet=st.sampled_from(NEAR), max_size=12) | st.text(max_size=12), st.text(max_size=12))
def test_kubernetes_ids(namespace: str, service_account: str) -> None:
    count(TARGET)
    check_kubernetes(namespace, service_account)
