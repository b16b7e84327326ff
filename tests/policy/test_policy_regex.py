"""Regexes for Envoy: Python's syntax check, then what RE2 does not support."""

from __future__ import annotations

import pytest

from mesh_identity.mesh.regex import regex_problem

UNSUPPORTED = "which Envoy's RE2 does not support"

ACCEPTED = [
    "/",
    "/items(/.*)?",
    "(?i)/Admin/.*",
    "(?P<id>[0-9]+)",
    "(?:a|b)+?",
    "[(?=]x",  # inside a class these are literals
    "[]+]+",
    "[^]x]*",
    "\\(?=",  # an escaped parenthesis
    "a{2,3}",
    "\\d\\w\\s\\b\\A",
]
"""Patterns both Python and RE2 accept."""

UNSUPPORTED_FEATURES = [
    ("a(?=b)", "a lookahead"),
    ("a(?!b)", "a negative lookahead"),
    ("(?<=a)b", "a lookbehind"),
    ("(?<!a)b", "a negative lookbehind"),
    ("(?>a+)b", "an atomic group"),
    ("(a)?(?(1)b|c)", "a conditional group"),
    ("a(?#comment)", "a comment group"),
    ("(?P<x>a)(?P=x)", "a named backreference"),
    ("(a)\\1", "a backreference"),
    ("a++", "a possessive quantifier"),
    ("a*+", "a possessive quantifier"),
    ("a{2}+", "a possessive quantifier"),
    ("(?x) a", "the inline flag 'x'"),
    ("(?a:\\w)", "the inline flag 'a'"),
    ("a\\Z", "the escape \\Z"),
    ("\\N{DIGIT ONE}", "the escape \\N"),
    ("\\u0041", "the escape \\u"),
]
"""Patterns Python compiles and RE2 refuses (tests/e2e/test_policy.py has Envoy confirm both lists)."""


@pytest.mark.parametrize("pattern", ACCEPTED)
def test_patterns_envoy_accepts(pattern: str) -> None:
    assert regex_problem(pattern) is None


@pytest.mark.parametrize(("pattern", "feature"), UNSUPPORTED_FEATURES)
def test_patterns_only_python_accepts(pattern: str, feature: str) -> None:
    assert regex_problem(pattern) == f"it uses {feature}, {UNSUPPORTED}"


def test_a_pattern_python_cannot_compile() -> None:
    assert regex_problem("[a-") == "it does not compile: unterminated character set at position 0"
