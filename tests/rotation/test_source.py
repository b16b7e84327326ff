"""The SVID and bundle sources: subscriptions, ordering, isolation of a failing subscriber, close."""

from __future__ import annotations

import logging

import pytest

from mesh_identity.errors import IssuanceError
from mesh_identity.rotation.source import BundleSource, SvidSource
from tests.rotation.helpers import ids

WEB, API = ids("web", "api")


@pytest.fixture
def issued(authority):
    return [authority.issue(WEB) for _ in range(3)]


def test_subscribers_get_every_new_svid_in_order(authority, issued):
    bundles = BundleSource()
    source = SvidSource(WEB, bundles)
    seen_a: list[str] = []
    seen_b: list[str] = []
    source.subscribe(lambda svid: seen_a.append(svid.serial))
    source.subscribe(lambda svid: seen_b.append(svid.serial))
    for svid in issued:
        source.update(svid)
    assert seen_a == seen_b == [svid.serial for svid in issued]
    assert source.svid() is issued[-1]


def test_unsubscribe_stops_the_calls(issued):
    source = SvidSource(WEB, BundleSource())
    seen: list[str] = []
    unsubscribe = source.subscribe(lambda svid: seen.append(svid.serial))
    source.update(issued[0])
    unsubscribe()
    unsubscribe()  # twice is harmless
    source.update(issued[1])
    assert seen == [issued[0].serial]


def test_a_failing_subscriber_does_not_stop_the_others(issued, caplog):
    source = SvidSource(WEB, BundleSource())
    seen: list[str] = []

    def broken(svid):
        raise RuntimeError("push failed")

    source.subscribe(broken)
    source.subscribe(lambda svid: seen.append(svid.serial))
    with caplog.at_level(logging.ERROR, logger="mesh_identity.rotation.source"):
        source.update(issued[0])
    assert seen == [issued[0].serial]
    assert "failed" in caplog.records[0].getMessage()
    assert caplog.records[0].exc_info is not None


def test_no_svid_yet_is_a_clear_error():
    source = SvidSource(WEB, BundleSource())
    assert source.current() is None
    with pytest.raises(IssuanceError) as raised:
        source.svid()
    assert str(raised.value) == (
        "no SVID for spiffe://example.org/ns/default/sa/web yet: its first issuance has not succeeded"
    )


def test_an_svid_of_another_identity_is_refused(authority):
    source = SvidSource(WEB, BundleSource())
    with pytest.raises(IssuanceError) as raised:
        source.update(authority.issue(API))
    assert str(raised.value) == (
        "SVID for spiffe://example.org/ns/default/sa/api offered to the source of spiffe://example.org/ns/default/sa/web"
    )


def test_a_closed_source_keeps_its_svid_but_tells_no_one(issued):
    bundles = BundleSource()
    seen: list[object] = []
    with SvidSource(WEB, bundles, issued[0]) as source:
        source.subscribe(seen.append)
        source.subscribe_bundle(seen.append)
    assert source.closed
    source.update(issued[1])
    bundles.publish(issued[1].bundle)
    assert seen == []
    assert source.svid() is issued[0]
    with pytest.raises(IssuanceError) as raised:
        source.subscribe(seen.append)
    assert str(raised.value) == "the source of spiffe://example.org/ns/default/sa/web is closed"
    with pytest.raises(IssuanceError) as raised:
        source.subscribe_bundle(seen.append)
    assert str(raised.value) == "the source of spiffe://example.org/ns/default/sa/web is closed"


def test_the_bundle_is_shared_and_published_only_when_its_roots_change(authority, make_authority, tmp_path):
    bundles = BundleSource()
    with pytest.raises(IssuanceError) as raised:
        bundles.bundle()
    assert str(raised.value) == "no trust bundle yet: the rotation engine has not started"
    web, api = SvidSource(WEB, bundles), SvidSource(API, bundles)
    seen_web: list[frozenset[str]] = []
    seen_api: list[frozenset[str]] = []
    web.subscribe_bundle(lambda b: seen_web.append(b.fingerprints))
    api.subscribe_bundle(lambda b: seen_api.append(b.fingerprints))
    first = authority.bundle()
    other = make_authority(state_dir=tmp_path / "other").bundle()
    assert bundles.publish(first) is True
    assert bundles.publish(first) is False  # same roots: nobody is bothered
    both = first.with_authorities(other.authorities)
    assert bundles.publish(both) is True
    assert seen_web == seen_api == [first.fingerprints, both.fingerprints]
    assert web.bundle() is both
    web.close()
    bundles.publish(first)
    assert seen_web == [first.fingerprints, both.fingerprints]
    assert seen_api[-1] == first.fingerprints
