"""Selectors: what the agent knows about a caller of its sockets, and what a registration entry asks for.

A selector is ``<kind>:<value>``:

===================  ======================================================================================
``unix:uid:N``       the caller's user id (from the kernel: ``SO_PEERCRED``)
``unix:gid:N``       the caller's group id (likewise; the primary group of the process when it connected)
``unix:path:/abs``   the caller's executable (``/proc/<pid>/exe``), an absolute, normalised path
``k8s:pod-uid:UID``  the UID of the Kubernetes pod the caller runs in (read from ``/proc/<pid>/cgroup``)
===================  ======================================================================================

An entry grants its SPIFFE ID to a caller that has *every* selector of the entry (:func:`granted`).
"""

from __future__ import annotations

import enum
import os
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from mesh_identity.spiffe import SpiffeId

MAX_ID = 2**32 - 2  # (uid_t)-1 is "no id"
MAX_PATH = 4096
POD_UID = re.compile(r"^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$")


class SelectorError(ValueError):
    """A selector that is not one of the forms above; the message says what is wrong (not where: the caller
    adds the key path)."""


class Kind(enum.StrEnum):
    UID = "unix:uid"
    GID = "unix:gid"
    PATH = "unix:path"
    POD_UID = "k8s:pod-uid"


@dataclass(frozen=True, slots=True, order=True)
class Selector:
    """One fact about a caller, such as ``unix:uid:1001``."""

    kind: Kind
    value: str

    def __post_init__(self) -> None:
        problem = _value_problem(self.kind, self.value)
        if problem is not None:
            raise SelectorError(f"{str(self)!r}: {problem}")

    @classmethod
    def parse(cls, text: str) -> Selector:
        """``unix:uid:1001`` and the like; :class:`SelectorError` naming the problem otherwise."""
        if not isinstance(text, str) or not text:
            raise SelectorError(f"{text!r} is not a selector (use {', '.join(k.value + ':...' for k in Kind)})")
        for kind in Kind:
            prefix = kind.value + ":"
            if text.startswith(prefix):
                return cls(kind, text[len(prefix) :])
        raise SelectorError(f"{text[:80]!r} is not a selector (use {', '.join(k.value + ':...' for k in Kind)})")

    @classmethod
    def uid(cls, uid: int) -> Selector:
        return cls(Kind.UID, str(uid))

    @classmethod
    def gid(cls, gid: int) -> Selector:
        return cls(Kind.GID, str(gid))

    @classmethod
    def path(cls, path: str) -> Selector:
        return cls(Kind.PATH, path)

    @classmethod
    def pod_uid(cls, uid: str) -> Selector:
        return cls(Kind.POD_UID, uid)

    def __str__(self) -> str:
        return f"{self.kind.value}:{self.value}"


def _value_problem(kind: Kind, value: str) -> str | None:
    if kind in (Kind.UID, Kind.GID):
        if not value.isascii() or not value.isdigit() or (len(value) > 1 and value.startswith("0")):
            return f"{kind.value.split(':')[1]} must be a decimal number"
        if int(value) > MAX_ID:
            return f"{kind.value.split(':')[1]} is larger than {MAX_ID}"
        return None
    if kind is Kind.PATH:
        if not value.startswith("/"):
            return "the executable path must be absolute"
        if "\0" in value:
            return "the executable path contains a NUL byte"
        if len(value.encode()) > MAX_PATH:
            return f"the executable path is longer than {MAX_PATH} bytes"
        if os.path.normpath(value) != value or value.startswith("//"):
            return f"the executable path is not normalised (write {os.path.normpath(value)!r})"
        return None
    if not POD_UID.match(value):
        return "a pod UID is a lowercase UUID such as 3f2b8c1e-0c5d-4a8e-9f7a-2b1c3d4e5f60"
    return None


@dataclass(frozen=True, slots=True)
class Entry:
    """A registration entry: callers with all of ``selectors`` get ``spiffe_id``."""

    spiffe_id: SpiffeId
    selectors: frozenset[Selector]

    def __post_init__(self) -> None:
        if not self.selectors:
            raise SelectorError(f"the entry of {self.spiffe_id} has no selectors: it would match every caller")

    def matches(self, facts: frozenset[Selector]) -> bool:
        return self.selectors <= facts


def granted(entries: Sequence[Entry], facts: Iterable[Selector]) -> tuple[SpiffeId, ...]:
    """The SPIFFE IDs the entries grant a caller with ``facts``, in entry order, each once. The first is the
    caller's default identity (the first X.509-SVID of the Workload API)."""
    known = frozenset(facts)
    found: dict[SpiffeId, None] = {}
    for entry in entries:
        if entry.matches(known):
            found.setdefault(entry.spiffe_id, None)
    return tuple(found)
