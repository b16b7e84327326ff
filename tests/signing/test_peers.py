"""The per-call check of a signing listener's caller: remembered for the same chain and roots, never past the
chain's validity, forgotten when the roots change."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from tests.pki import TestCa
from xds_sds.protocol.auth import PeerError
from xds_sds.signing.peers import PeerCheck

CA = TestCa.for_trust_domain("example.org")
OTHER = TestCa.for_trust_domain("example.org", name="other root")


def _context(ca: TestCa, ttl: timedelta = timedelta(hours=1)) -> dict[str, list[bytes]]:
    svid = ca.svid("/mesh-identity/agent/host-a", ttl=ttl)
    leaf = svid.cert_chain_pem()
    return {"x509_pem_cert": [leaf], "x509_pem_cert_chain": [leaf]}


def test_a_chain_is_checked_once_then_remembered_within_its_validity() -> None:
    check = PeerCheck()
    roots = (CA.certificate,)
    auth = _context(CA)
    now = datetime.now(UTC)
    assert str(check.identity(auth, roots, now)) == "spiffe://example.org/mesh-identity/agent/host-a"
    assert (
        str(check.identity(auth, roots, now + timedelta(minutes=30)))
        == "spiffe://example.org/mesh-identity/agent/host-a"
    )
    with pytest.raises(PeerError, match="the peer certificate expired at"):
        check.identity(auth, roots, now + timedelta(hours=2))


def test_new_roots_are_checked_again() -> None:
    check = PeerCheck()
    auth = _context(CA)
    now = datetime.now(UTC)
    check.identity(auth, (CA.certificate,), now)
    with pytest.raises(PeerError, match="does not chain to any root of the current trust bundle"):
        check.identity(auth, (OTHER.certificate,), now)


def test_a_chain_of_another_root_is_refused() -> None:
    with pytest.raises(PeerError, match="does not chain"):
        PeerCheck().identity(_context(OTHER), (CA.certificate,), datetime.now(UTC))


def test_it_remembers_a_bounded_number_of_chains() -> None:
    check = PeerCheck(size=2)
    now = datetime.now(UTC)
    for _ in range(5):
        check.identity(_context(CA), (CA.certificate,), now)
    assert len(check._checked) == 2
