"""Regexes that Envoy will run: Python checks the syntax, this module refuses what RE2 cannot do.

Envoy matches paths and headers with Google RE2 (``safe_regex``), which has no backtracking features. A pattern
that Python compiles but RE2 refuses would be rejected by every sidecar it is sent to; we refuse it first, with
a message that says why. RE2's own syntax is the reference: no lookaround, backreferences, atomic groups,
possessive quantifiers, conditionals or comment groups; inline flags only ``i``, ``m``, ``s`` (and ``U``, which
Python lacks); no ``\\Z``, ``\\N{...}``, ``\\u`` or ``\\U`` escapes.
"""

from __future__ import annotations

import functools
import re

_GROUPS = (
    ("(?<=", "a lookbehind"),
    ("(?<!", "a negative lookbehind"),
    ("(?=", "a lookahead"),
    ("(?!", "a negative lookahead"),
    ("(?>", "an atomic group"),
    ("(?(", "a conditional group"),
    ("(?#", "a comment group"),
    ("(?P=", "a named backreference"),
)
_ESCAPES = {"Z": "the escape \\Z", "N": "the escape \\N", "u": "the escape \\u", "U": "the escape \\U"}
_RE2_FLAGS = frozenset("imsU-")
_FLAG_CHARS = frozenset("aiLmsux-")


@functools.lru_cache(maxsize=4096)
def regex_problem(pattern: str) -> str | None:
    """Why Envoy cannot use ``pattern`` (Python's syntax error, or an RE2 limit), or None when it can.

    Cached: a mesh's policies repeat the same few patterns, and every mesh update checks them all again.
    """
    try:
        re.compile(pattern)
    except re.error as err:
        return f"it does not compile: {err}"
    except (OverflowError, RecursionError):  # a repeat count beyond any limit, nesting beyond the parser's
        return "it does not compile: it is too large or nests too deeply"
    feature = _unsupported(pattern)
    return None if feature is None else f"it uses {feature}, which Envoy's RE2 does not support"


def _unsupported(pattern: str) -> str | None:
    in_class = False
    i, end = 0, len(pattern)
    while i < end:
        char = pattern[i]
        if char == "\\":
            escaped = pattern[i + 1 : i + 2]
            if not in_class and escaped.isdigit() and escaped != "0":
                return "a backreference"
            if escaped in _ESCAPES:
                return _ESCAPES[escaped]
            i += 2
            continue
        if in_class:
            in_class = char != "]"
        elif char == "[":
            in_class = True
            i += 1
            if pattern[i : i + 1] == "^":
                i += 1
            if pattern[i : i + 1] == "]":  # a ']' first in a class is a literal
                i += 1
            continue
        elif pattern.startswith("(?", i):
            found = _group_problem(pattern, i)
            if found is not None:
                return found
        elif char in "*+?}" and pattern[i + 1 : i + 2] == "+":
            return "a possessive quantifier"
        i += 1
    return None


def _group_problem(pattern: str, start: int) -> str | None:
    for opening, name in _GROUPS:
        if pattern.startswith(opening, start):
            return name
    flags = []
    for char in pattern[start + 2 :]:
        if char not in _FLAG_CHARS:
            break
        flags.append(char)
    bad = sorted(set(flags) - _RE2_FLAGS)
    return f"the inline flag {bad[0]!r}" if bad else None
