"""SPIFFE identities: :class:`TrustDomain` and :class:`SpiffeId`, exactly per the SPIFFE ID specification.

The spec (SPIFFE-ID.md, section 2): ``spiffe://`` + trust domain + optional path. The trust domain is made of
lowercase letters, digits, ``.``, ``-`` and ``_``; no port, user info, percent-encoding. The path is a sequence
of ``/segment``; segments use letters, digits, ``.``, ``-`` and ``_``; no empty, ``.`` or ``..`` segment and no
trailing slash; no query or fragment. The whole URI is at most 2048 bytes, the trust domain at most 255.
"""

from __future__ import annotations

import string
from dataclasses import dataclass

from mesh_identity.errors import InvalidSpiffeIdError

SCHEME = "spiffe://"
MAX_ID_LENGTH = 2048
MAX_TRUST_DOMAIN_LENGTH = 255
_TD_CHARS = frozenset(string.ascii_lowercase + string.digits + ".-_")
_PATH_CHARS = frozenset(string.ascii_letters + string.digits + ".-_")


def _trust_domain_problem(name: str) -> str | None:
    if not name:
        return "trust domain is missing"
    if len(name) > MAX_TRUST_DOMAIN_LENGTH:
        return f"trust domain is longer than {MAX_TRUST_DOMAIN_LENGTH} characters"
    if "@" in name:
        return "user info is not allowed"
    if ":" in name:
        return "a port is not allowed"
    for char in name:
        if char not in _TD_CHARS:
            if char in string.ascii_uppercase:
                return f"trust domain character {char!r} is uppercase (only lowercase letters are allowed)"
            return f"trust domain character {char!r} is not allowed (use a-z, 0-9, '.', '-', '_')"
    return None


def _path_problem(path: str) -> str | None:
    if not path:
        return None
    if not path.startswith("/"):
        return "path must start with '/'"
    if path.endswith("/"):
        return "trailing slash is not allowed"
    for segment in path[1:].split("/"):
        if segment == "":
            return "empty path segment is not allowed"
        if segment in (".", ".."):
            return f"path segment {segment!r} is not allowed"
        for char in segment:
            if char not in _PATH_CHARS:
                return f"path character {char!r} is not allowed (use A-Z, a-z, 0-9, '.', '-', '_')"
    return None


def _k8s_segment_problem(label: str, value: str) -> str | None:
    if not value:
        return f"{label} is empty"
    if value in (".", ".."):
        return f"{label} {value!r} is not allowed"
    bad = next((c for c in value if c not in _PATH_CHARS), None)
    if bad is not None:
        return f"{label} character {bad!r} is not allowed"
    return None


@dataclass(frozen=True, slots=True, order=True)
class TrustDomain:
    """A SPIFFE trust domain such as ``example.org``."""

    name: str

    def __post_init__(self) -> None:
        problem = _trust_domain_problem(self.name)
        if problem is not None:
            raise InvalidSpiffeIdError(f"Invalid trust domain {self.name!r}: {problem}")

    @classmethod
    def parse(cls, text: str) -> TrustDomain:
        """Parse ``example.org`` or ``spiffe://example.org`` (the latter without a path)."""
        if text.startswith(SCHEME):
            spiffe_id = SpiffeId.parse(text)
            if spiffe_id.path:
                raise InvalidSpiffeIdError(f"Invalid trust domain {text!r}: a trust domain has no path")
            return spiffe_id.trust_domain
        return cls(text)

    @property
    def id(self) -> SpiffeId:
        """The trust domain's own SPIFFE ID, ``spiffe://<name>``."""
        return SpiffeId(self, "")

    def __str__(self) -> str:
        return self.name


@dataclass(frozen=True, slots=True, order=True)
class SpiffeId:
    """A SPIFFE ID: a trust domain and a path (``""`` or ``/seg/seg``)."""

    trust_domain: TrustDomain
    path: str = ""

    def __post_init__(self) -> None:
        problem = _path_problem(self.path)
        if problem is not None:
            raise InvalidSpiffeIdError(f"Invalid SPIFFE ID {self._raw()!r}: {problem}")
        if len(self._raw()) > MAX_ID_LENGTH:
            raise InvalidSpiffeIdError(f"Invalid SPIFFE ID {self._raw()[:64]!r}...: longer than {MAX_ID_LENGTH} bytes")

    def _raw(self) -> str:
        return f"{SCHEME}{self.trust_domain.name}{self.path}"

    @classmethod
    def parse(cls, text: str) -> SpiffeId:
        """Parse a SPIFFE ID URI; raise :class:`InvalidSpiffeIdError` naming what is wrong."""
        if not isinstance(text, str):
            raise InvalidSpiffeIdError(f"Invalid SPIFFE ID {text!r}: not a string")
        if text == "":
            raise InvalidSpiffeIdError("Invalid SPIFFE ID '': it is empty")
        if len(text) > MAX_ID_LENGTH:
            raise InvalidSpiffeIdError(f"Invalid SPIFFE ID {text[:64]!r}...: longer than {MAX_ID_LENGTH} bytes")
        if not text.startswith(SCHEME):
            if text.lower().startswith(SCHEME):
                return cls._fail(text, "scheme must be lowercase 'spiffe://'")
            return cls._fail(text, "scheme must be 'spiffe://'")
        rest = text[len(SCHEME) :]
        if "?" in rest:
            return cls._fail(text, "a query is not allowed")
        if "#" in rest:
            return cls._fail(text, "a fragment is not allowed")
        if "%" in rest:
            return cls._fail(text, "percent-encoding is not allowed")
        slash = rest.find("/")
        domain, path = (rest, "") if slash < 0 else (rest[:slash], rest[slash:])
        problem = _trust_domain_problem(domain)
        if problem is not None:
            return cls._fail(text, problem)
        problem = _path_problem(path)
        if problem is not None:
            return cls._fail(text, problem)
        return cls(TrustDomain(domain), path)

    @staticmethod
    def _fail(text: str, problem: str) -> SpiffeId:
        raise InvalidSpiffeIdError(f"Invalid SPIFFE ID {text!r}: {problem}")

    @classmethod
    def from_segments(cls, trust_domain: TrustDomain, *segments: str) -> SpiffeId:
        """Build ``spiffe://<td>/<seg>/<seg>...`` from already separate segments."""
        return cls(trust_domain, "".join(f"/{s}" for s in segments))

    @classmethod
    def for_kubernetes(cls, trust_domain: TrustDomain, namespace: str, service_account: str) -> SpiffeId:
        """The Kubernetes form ``spiffe://<td>/ns/<namespace>/sa/<service-account>``."""
        for label, value in (("namespace", namespace), ("service account", service_account)):
            problem = _k8s_segment_problem(label, value)
            if problem is not None:
                raise InvalidSpiffeIdError(f"Invalid SPIFFE ID for {namespace!r}/{service_account!r}: {problem}")
        return cls.from_segments(trust_domain, "ns", namespace, "sa", service_account)

    @property
    def segments(self) -> tuple[str, ...]:
        return tuple(self.path[1:].split("/")) if self.path else ()

    @property
    def kubernetes(self) -> tuple[str, str] | None:
        """``(namespace, service_account)`` when this ID has the Kubernetes form, else None."""
        segs = self.segments
        if len(segs) == 4 and segs[0] == "ns" and segs[2] == "sa":
            return segs[1], segs[3]
        return None

    def member_of(self, trust_domain: TrustDomain) -> bool:
        return self.trust_domain == trust_domain

    def __str__(self) -> str:
        return self._raw()
