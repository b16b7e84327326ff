"""Typed readers for what the Kubernetes API server answers.

The provider takes the bytes of every answer from the ``kubernetes`` client (:mod:`providers.cert_manager.kube`
calls with ``_preload_content=False``) and reads them here: :func:`parse_json` reads the body, then one reader
for each value the provider uses (:func:`obj`, :func:`mapping`, :func:`string`, :func:`integer`, :func:`items`,
:func:`string_map`, :func:`conditions`). Each one checks that the value has the type the Kubernetes API gives it and
returns it typed. If it does not, the reader raises :class:`~providers.cert_manager.errors.MalformedAnswerError`,
which names the object and the key::

    cert-manager: CertificateRequest mesh/web-abc: status.conditions[0] is not an object (got 5)

``what`` names the object. That is its kind, namespace and name (``CertificateRequest mesh/web-abc``), or, before
the name is known, the call it answered (``the answer to create a CertificateRequest in namespace "mesh"``).
``path`` is the key path inside it. The API server leaves out empty fields, so an absent key and ``null`` both
read as empty ({}, [], "") unless the key is required.

Text from an answer is shown bounded and escaped (:func:`shown` for values, :func:`text` for names and messages),
so a newline in a name cannot forge a log line and a megabyte of JSON does not become a megabyte of message. With
``secret=True`` (the data of a Secret) a message gives only the type of a value, never the value.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any, cast

from mesh_identity.document import shown
from providers.cert_manager.errors import NAME, MalformedAnswerError

JsonObj = dict[str, Any]

TEXT_LIMIT = 512  # characters of an answer's text (a name, a condition's message) kept in one message
_KEY = re.compile(r"[A-Za-z_][A-Za-z0-9_-]*\Z")  # keys shown as .key; others as ['key']
_TYPES = {bool: "a boolean", int: "a number", float: "a number", str: "a string", list: "a list", dict: "an object"}


def text(value: str, limit: int = TEXT_LIMIT) -> str:
    """Text from an answer (a name, a condition's message) as it may go into a message or a log line:
    non-printable characters (newlines, escape sequences, bidi overrides) escaped as ``repr`` writes them, cut to
    ``limit`` characters. Printable text, non-ASCII letters too, stays as it is."""
    rest = len(value) - limit
    head = value[:limit] if rest > 0 else value
    out = head if head.isprintable() else "".join(c if c.isprintable() else repr(c)[1:-1] for c in head)
    return f"{out}...({rest} more characters)" if rest > 0 else out


def _got(value: Any, secret: bool) -> str:
    if not secret:
        return f"(got {shown(value)})"
    return f"(got {'null' if value is None else _TYPES.get(type(value), type(value).__name__)})"


def key_path(path: str, key: str) -> str:
    """``path`` one key further down: ``status.conditions``, ``data['ca.crt']``."""
    if not _KEY.match(key):
        return f"{path}[{shown(key)}]"
    return f"{path}.{key}" if path else key


def malformed(what: str, path: str, problem: str) -> MalformedAnswerError:
    """The error for ``path`` of ``what`` (the object itself when ``path`` is empty): ``problem`` says what is
    wrong with it (``is not an object (got 5)``)."""
    return MalformedAnswerError(NAME, f"{what}: {path} {problem}" if path else f"{what} {problem}")


def parse_json(body: bytes, what: str) -> Any:
    """The JSON document ``body`` holds (``what``: whose body it is, for messages)."""
    if not body.strip():
        raise MalformedAnswerError(NAME, f"{what} is empty")
    try:
        document = body.decode("utf-8")
    except UnicodeDecodeError as err:
        raise MalformedAnswerError(NAME, f"{what} is not UTF-8 text (byte {err.start} of {len(body)})") from None
    try:
        return json.loads(document)
    except json.JSONDecodeError as err:  # its message gives the position only, never the text
        raise MalformedAnswerError(
            NAME, f"{what} is not JSON ({err.msg}: line {err.lineno} column {err.colno})"
        ) from None
    except RecursionError:
        raise MalformedAnswerError(NAME, f"{what} nests its lists or objects too deeply") from None


def obj(value: Any, what: str, path: str = "", *, secret: bool = False) -> JsonObj:
    """``value``, which must be a JSON object."""
    if isinstance(value, dict):
        return cast(JsonObj, value)
    raise malformed(what, path, f"is not an object {_got(value, secret)}")


def mapping(parent: JsonObj, key: str, what: str, path: str = "", *, secret: bool = False) -> JsonObj:
    """``parent[key]``, an object ({} when absent or null)."""
    value = parent.get(key)
    return {} if value is None else obj(value, what, key_path(path, key), secret=secret)


def string(
    parent: JsonObj, key: str, what: str, path: str = "", *, required: bool = False, secret: bool = False
) -> str:
    """``parent[key]``, a string ("" when absent or null); ``required``: a non-empty one."""
    value = parent.get(key)
    if value is None or value == "":
        if required:
            raise malformed(what, key_path(path, key), "is missing" if value is None else "is empty")
        return ""
    if not isinstance(value, str):
        raise malformed(what, key_path(path, key), f"is not a string {_got(value, secret)}")
    return value


def integer(parent: JsonObj, key: str, what: str, path: str = "") -> int | None:
    """``parent[key]``, an integer (None when absent or null)."""
    value = parent.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise malformed(what, key_path(path, key), f"is not an integer {_got(value, False)}")
    return value


def items(parent: JsonObj, key: str, what: str, path: str = "") -> list[JsonObj]:
    """``parent[key]``, a list of objects ([] when absent or null)."""
    value = parent.get(key)
    if value is None:
        return []
    where = key_path(path, key)
    if not isinstance(value, list):
        raise malformed(what, where, f"is not a list {_got(value, False)}")
    return [obj(item, what, f"{where}[{i}]") for i, item in enumerate(value)]


def string_map(parent: JsonObj, key: str, what: str, path: str = "", *, secret: bool = False) -> dict[str, str]:
    """``parent[key]``, an object of strings (labels, a ConfigMap's or a Secret's data; {} when absent or null)."""
    found = mapping(parent, key, what, path, secret=secret)
    where = key_path(path, key)
    for name, value in found.items():
        if not isinstance(value, str):
            raise malformed(what, key_path(where, name), f"is not a string {_got(value, secret)}")
    return cast(dict[str, str], found)


@dataclass(frozen=True, slots=True)
class Condition:
    """One of an object's ``status.conditions`` (empty strings for what it does not say)."""

    type: str
    status: str
    reason: str
    message: str


def conditions(owner: JsonObj, what: str) -> list[Condition]:
    """The ``status.conditions`` of ``owner`` (a CertificateRequest, an Issuer), in order. Each one is an object,
    its ``type`` a non-empty string, and its ``status``, ``reason`` and ``message`` strings when present."""
    status = mapping(owner, "status", what)
    found: list[Condition] = []
    for i, condition in enumerate(items(status, "conditions", what, "status")):
        where = f"status.conditions[{i}]"
        found.append(
            Condition(
                string(condition, "type", what, where, required=True),
                string(condition, "status", what, where),
                string(condition, "reason", what, where),
                string(condition, "message", what, where),
            )
        )
    return found
