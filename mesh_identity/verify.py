"""Chain verification against a trust bundle (used on everything an upstream CA returns)."""

from __future__ import annotations

import itertools
from datetime import datetime

from cryptography import x509
from cryptography.exceptions import InvalidSignature

from mesh_identity.profile import is_ca
from mesh_identity.svid import TrustBundle


def _issued_by(cert: x509.Certificate, issuer: x509.Certificate) -> bool:
    try:
        cert.verify_directly_issued_by(issuer)
    except (ValueError, TypeError, InvalidSignature):
        return False
    return True


def chain_problem(
    leaf: x509.Certificate, chain: tuple[x509.Certificate, ...], bundle: TrustBundle, now: datetime | None = None
) -> str | None:
    """Why ``leaf`` + ``chain`` does not verify against ``bundle`` (None when it does).

    Each certificate must be signed by the next one, the last by a bundle authority; every certificate above
    the leaf must be a CA; when ``now`` is given, every certificate must be valid at ``now``.
    """
    path = (leaf, *chain)
    for cert in path[1:]:
        if not is_ca(cert):
            return f"chain certificate {cert.subject.rfc4514_string()!r} is not a CA"
    for child, parent in itertools.pairwise(path):
        if not _issued_by(child, parent):
            return f"{child.subject.rfc4514_string()!r} is not signed by {parent.subject.rfc4514_string()!r}"
    top = path[-1]
    if not any(_issued_by(top, root) for root in bundle.authorities):
        return f"{top.subject.rfc4514_string()!r} does not chain to any authority of the {bundle.trust_domain} bundle"
    if now is not None:
        for cert in path:
            if not cert.not_valid_before_utc <= now <= cert.not_valid_after_utc:
                return (
                    f"{cert.subject.rfc4514_string()!r} is not valid at {now:%Y-%m-%dT%H:%M:%SZ} "
                    f"({cert.not_valid_before_utc:%Y-%m-%dT%H:%M:%SZ} .. {cert.not_valid_after_utc:%Y-%m-%dT%H:%M:%SZ})"
                )
    return None
