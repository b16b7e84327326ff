"""Peer-controlled text (node ids, resource names, nonces, NACK messages, type URLs) made safe for one log line.

Every log call in :mod:`xds_sds` that takes text a peer chose passes it through :func:`escaped`: a newline in a
node id must not start a forged log line, an escape sequence must not drive the terminal of whoever reads the
log, and a 100,000-character name must not become a 100,000-character line.
"""

from __future__ import annotations

LIMIT = 512  # characters of peer text kept in one log field
_SHORT = {"\n": "\\n", "\r": "\\r", "\t": "\\t"}


def escaped(text: object, limit: int = LIMIT) -> str:
    """``text`` with every non-printable character (C0/C1 controls, DEL, line and paragraph separators, format
    characters such as bidi overrides, non-ASCII spaces) written as a Python-style escape (``\\n``, ``\\x1b``,
    ``\\u2028``), cut to ``limit`` characters of the original. Printable text, including non-ASCII letters,
    is kept as it is."""
    value = str(text)
    rest = len(value) - limit
    head = value[:limit] if rest > 0 else value
    out = head if head.isprintable() else "".join(_escape(c) for c in head)
    return f"{out}...({rest} more characters)" if rest > 0 else out


def _escape(char: str) -> str:
    if char.isprintable():
        return char
    if char in _SHORT:
        return _SHORT[char]
    code = ord(char)
    if code <= 0xFF:
        return f"\\x{code:02x}"
    if code <= 0xFFFF:
        return f"\\u{code:04x}"
    return f"\\U{code:08x}"
