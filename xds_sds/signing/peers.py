"""Who is calling the signing listener, checked on every call, cheaply.

Every call's peer certificate is checked as the xDS server checks a new stream (the X.509-SVID leaf profile, its
chain to the *current* roots, every certificate valid now: :func:`~xds_sds.protocol.auth.peer_credential`,
:func:`~xds_sds.protocol.auth.trust_of`), because a resumed TLS session or an old connection skips or predates
the handshake's checks. A caller makes many calls on one connection, so :class:`PeerCheck` remembers the outcome
for the exact certificate bytes the auth context holds and the exact roots it was checked against: a call with the
same chain and roots then costs a dictionary lookup and the time checks (the chain's earliest NotAfter, its
latest NotBefore), not two signature checks. A change of roots forgets everything.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import datetime

from cryptography import x509

from mesh_identity.spiffe import SpiffeId
from xds_sds.protocol.auth import peer_credential, trust_of

DEFAULT_SIZE = 4096


@dataclass(frozen=True, slots=True)
class _Checked:
    identity: SpiffeId
    valid_from: datetime
    valid_until: datetime


class PeerCheck:
    """The SPIFFE ID of a caller whose chain is valid now against the current roots (see the module docstring).
    Not thread-safe: the server calls it on its event loop only. ``size`` bounds how many chains it remembers."""

    def __init__(self, size: int = DEFAULT_SIZE) -> None:
        self._size = size
        self._roots: tuple[x509.Certificate, ...] | None = None
        self._checked: OrderedDict[tuple[bytes, ...], _Checked] = OrderedDict()

    def identity(
        self, auth_context: Mapping[str, Iterable[bytes]], roots: tuple[x509.Certificate, ...], now: datetime
    ) -> SpiffeId:
        """The caller's SPIFFE ID; PeerError (why not) unless its chain is valid at ``now`` against ``roots``."""
        if roots is not self._roots:
            if roots != self._roots:
                self._checked.clear()
            self._roots = roots
        key = (*auth_context.get("x509_pem_cert", ()), b"", *auth_context.get("x509_pem_cert_chain", ()))
        known = self._checked.get(key)
        if known is not None and known.valid_from <= now <= known.valid_until:
            self._checked.move_to_end(key)
            return known.identity
        credential = peer_credential(auth_context)
        trust = trust_of(credential, roots, now)
        certs = (credential.leaf, *credential.intermediates)
        valid_from = max(c.not_valid_before_utc for c in certs)
        self._checked[key] = _Checked(credential.identity, valid_from, trust.not_after)
        if len(self._checked) > self._size:
            self._checked.popitem(last=False)
        return credential.identity
