"""Label selectors (``=``, ``==``, ``!=``, ``in``, ``notin``, ``key``, ``!key``, as ``kubectl -l`` takes them) and
field selectors (``metadata.name``, ``metadata.namespace`` and a kind's own field labels) of the Kubernetes
fake; a selector that does not parse is a 400 BadRequest."""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from tests.fakes.kube.errors import JsonObj, bad_request
from tests.fakes.kube.kinds import Kind

_KEY = r"(?:[A-Za-z0-9][-A-Za-z0-9.]*/)?[A-Za-z0-9](?:[-A-Za-z0-9_.]*[A-Za-z0-9])?"
_VALUE = r"(?:[A-Za-z0-9](?:[-A-Za-z0-9_.]*[A-Za-z0-9])?)?"
_REQUIREMENT = re.compile(
    rf"""^\s*(?:
        !\s*(?P<absent>{_KEY})
      | (?P<key>{_KEY})\s*(?:
            (?P<op>==|=|!=)\s*(?P<value>{_VALUE})
          | \s(?P<setop>in|notin)\s*\((?P<values>[^()]*)\)
        )?
    )\s*$""",
    re.VERBOSE,
)

Matcher = Callable[[Mapping[str, str]], bool]


def _split_selector(text: str) -> list[str]:
    parts, depth, current = [], 0, ""
    for char in text:
        if char == "(":
            depth += 1
        elif char == ")":
            depth -= 1
        if char == "," and depth == 0:
            parts.append(current)
            current = ""
        else:
            current += char
    parts.append(current)
    return [p for p in parts if p.strip()]


@dataclass(frozen=True)
class Requirement:
    """One term of a label selector: ``op`` is ``=``, ``!=``, ``in``, ``notin``, ``exists`` or ``!exists``."""

    key: str
    op: str
    values: frozenset[str] = frozenset()

    def matches(self, labels: Mapping[str, str]) -> bool:
        value = labels.get(self.key)
        match self.op:
            case "exists":
                return self.key in labels
            case "!exists":
                return self.key not in labels
            case "=" | "in":
                return value in self.values
            case _:  # "!=" and "notin" also select objects without the label
                return value not in self.values


def parse_label_selector(text: str) -> Matcher:
    """A label selector as ``kubectl -l`` takes it; 400 BadRequest when it does not parse."""
    requirements: list[Requirement] = []
    for part in _split_selector(text):
        match = _REQUIREMENT.match(part)
        if not match:
            raise bad_request(f"unable to parse requirement: {part.strip()!r}")
        if match["absent"]:
            requirements.append(Requirement(match["absent"], "!exists"))
        elif match["op"]:
            requirements.append(
                Requirement(match["key"], "!=" if match["op"] == "!=" else "=", frozenset({match["value"]}))
            )
        elif match["setop"]:
            values = frozenset(v.strip() for v in match["values"].split(",") if v.strip())
            requirements.append(Requirement(match["key"], match["setop"], values))
        else:
            requirements.append(Requirement(match["key"], "exists"))

    def matches(labels: Mapping[str, str]) -> bool:
        return all(r.matches(labels) for r in requirements)

    return matches


def _field(obj: JsonObj, path: str) -> str | None:
    value: Any = obj
    for part in path.split("."):
        if not isinstance(value, dict):
            return None
        value = value.get(part)
    return None if value is None else str(value)


def parse_field_selector(kind: Kind, text: str) -> Callable[[JsonObj], bool]:
    allowed = ("metadata.name", "metadata.namespace", *kind.field_labels)
    terms: list[tuple[str, str, bool]] = []
    for part in _split_selector(text):
        match = re.fullmatch(r"\s*([\w.]+)\s*(==|=|!=)\s*([^,]*?)\s*", part)
        if not match:
            raise bad_request(f"invalid selector: {part.strip()!r}; can't understand it")
        path, op, value = match.groups()
        if path not in allowed:
            raise bad_request(f"field label not supported: {path}")
        terms.append((path, value, op == "!="))

    def matches(obj: JsonObj) -> bool:
        return all((_field(obj, path) == value) != negate for path, value, negate in terms)

    return matches


def labels_of(obj: JsonObj) -> Mapping[str, str]:
    meta = obj.get("metadata")
    return (meta.get("labels") if isinstance(meta, dict) else None) or {}


def matcher(kind: Kind, params: Mapping[str, str]) -> Callable[[JsonObj], bool]:
    """The objects a request's ``labelSelector`` and ``fieldSelector`` select."""
    labels = parse_label_selector(params.get("labelSelector", ""))
    fields = parse_field_selector(kind, params.get("fieldSelector", ""))
    return lambda obj: labels(labels_of(obj)) and fields(obj)
