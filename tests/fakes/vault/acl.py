"""Vault's ACL policies: parsing HCL (``path "pki/sign/*" { capabilities = ["update"] }``) or its JSON form,
path patterns (``*`` suffix, ``+`` segments), the ``default`` policy every token gets, and the capabilities a
request method needs."""

from __future__ import annotations

import json
import re

from tests.fakes.vault.api import ApiError

Rules = list[tuple[str, frozenset[str]]]

CAPABILITIES = frozenset({"create", "read", "update", "delete", "list", "patch", "sudo", "deny"})
DEFAULT_POLICY: tuple[tuple[str, frozenset[str]], ...] = (
    ("auth/token/lookup-self", frozenset({"read"})),
    ("auth/token/renew-self", frozenset({"update"})),
    ("auth/token/revoke-self", frozenset({"update"})),
    ("sys/capabilities-self", frozenset({"update"})),
)
NEEDED = {
    "GET": {"read"},
    "HEAD": {"read"},
    "LIST": {"list"},
    "POST": {"create", "update"},
    "PUT": {"create", "update"},
    "DELETE": {"delete"},
    "PATCH": {"patch"},
}


def acl_match(pattern: str, path: str) -> bool:
    prefix = pattern.endswith("*")
    body = pattern[:-1] if prefix else pattern
    regex = "[^/]+".join(re.escape(part) for part in body.split("+"))
    return re.fullmatch(regex + (".*" if prefix else ""), path, flags=re.DOTALL) is not None


def granted(rules: Rules, path: str) -> set[str]:
    """The union of what ``rules`` grant on ``path``."""
    caps: set[str] = set()
    for pattern, rule_caps in rules:
        if acl_match(pattern, path):
            caps |= rule_caps
    return caps


def parse_policy(text: str) -> Rules:
    """Parse an ACL policy in HCL (``path "x" { capabilities = ["read"] }``) or its JSON form."""
    rules: Rules = []
    stripped = text.strip()
    if stripped.startswith("{"):
        try:
            paths = json.loads(stripped).get("path", {})
            for path, body in paths.items():
                rules.append((path, frozenset(body.get("capabilities", []))))
        except (ValueError, AttributeError) as err:
            raise ApiError(400, f"failed to parse policy: {err}") from None
    else:
        for match in re.finditer(r'path\s+"([^"]+)"\s*\{([^}]*)\}', text):
            caps = re.search(r"capabilities\s*=\s*\[([^\]]*)\]", match.group(2))
            names = re.findall(r'"([^"]+)"', caps.group(1)) if caps else []
            rules.append((match.group(1), frozenset(names)))
        if not rules and stripped:
            raise ApiError(400, "failed to parse policy: no path stanzas found")
    for path, caps in rules:
        bad = caps - CAPABILITIES
        if bad:
            raise ApiError(400, f'failed to parse policy: path "{path}": invalid capabilities {sorted(bad)}')
    return rules
