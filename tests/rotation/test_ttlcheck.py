"""The TTL-chain check: table-driven refusals and warnings with their exact messages, the figures it explains,
and the refusal at start."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from mesh_identity.assembly import build_service
from mesh_identity.errors import ConfigError
from mesh_identity.provider import Limits, Mode
from mesh_identity.ttlcheck import TtlChain, check_ttl_chain
from tests.rotation.helpers import FlakyPlugin, ids, make_config, provider_for

NOW = datetime(2030, 1, 1, tzinfo=UTC)
H = timedelta(hours=1)
YEAR_ROOT = NOW + timedelta(days=365)


def chain(**changes) -> TtlChain:
    base = {
        "mode": Mode.INTERMEDIATE,
        "workload_ttl": H,
        "intermediate_ttl": 24 * H,
        "rotate_after": 0.5,
        "jitter": 0.1,
        "root_not_after": YEAR_ROOT,
        "limits": Limits(),
    }
    return TtlChain(**{**base, **changes})


@pytest.mark.parametrize(
    ("changes", "error"),
    [
        ({"rotate_after": 1.5}, "ca.rotate_after: 1.5 is not a fraction strictly between 0 and 1"),
        ({"rotate_after": 0}, "ca.rotate_after: 0 is not a fraction strictly between 0 and 1"),
        ({"rotate_after": 1.0}, "ca.rotate_after: 1.0 is not a fraction strictly between 0 and 1"),
        ({"jitter": 0.6}, "ca.jitter: 0.6 is not a fraction in [0, 0.5)"),
        (
            {"workload_ttl": 48 * H},
            "ca.workload_ttl: 2d is not shorter than ca.intermediate_ttl 1d; a workload certificate cannot outlive "
            "its issuer",
        ),
        (
            {"workload_ttl": 24 * H},
            "ca.workload_ttl: 1d is not shorter than ca.intermediate_ttl 1d; a workload certificate cannot outlive "
            "its issuer",
        ),
        (
            {"limits": Limits(max_intermediate_ttl=30 * timedelta(minutes=1))},
            "ca.workload_ttl: 1h is not shorter than the 30m an intermediate can live (the provider's limit)",
        ),
        (
            {"root_not_after": NOW + timedelta(minutes=45)},
            "ca.workload_ttl: 1h is not shorter than the 45m an intermediate can live (the root's remaining lifetime)",
        ),
        ({"root_not_after": NOW - H}, "the signing root expired at 2029-12-31T23:00:00Z: rotate or replace it"),
        (
            {"mode": Mode.PER_WORKLOAD, "root_not_after": NOW + timedelta(minutes=50)},
            "the signing root expires in 50m, sooner than a workload certificate's 1h: rotate the root first "
            "(mesh-identity ca rotate-root prepare)",
        ),
    ],
)
def test_unsound_chains_are_refused_with_a_clear_message(changes, error):
    report = check_ttl_chain(chain(**changes), NOW)
    assert report.errors == [error]
    assert not report.ok
    with pytest.raises(ConfigError) as raised:
        report.require_sound()
    assert str(raised.value) == f"the TTL chain is unsound: {error}"


@pytest.mark.parametrize(
    ("changes", "warning"),
    [
        (
            {"workload_ttl": 14 * H},
            "ca.workload_ttl 14h is longer than the intermediate's renewal window 12h: workload certificates issued "
            "late in an intermediate's life are cut to its NotAfter",
        ),
        (
            {"limits": Limits(max_intermediate_ttl=12 * H)},
            "the provider signs intermediates for at most 12h; ca.intermediate_ttl 1d is cut to that",
        ),
        (
            {"root_not_after": NOW + 10 * H},
            "the root expires in 10h, before a new intermediate would: intermediates are cut to its NotAfter; "
            "rotate the root (mesh-identity ca rotate-root prepare)",
        ),
        (
            {"mode": Mode.PER_WORKLOAD, "limits": Limits(max_workload_ttl=30 * timedelta(minutes=1))},
            "the provider signs workload certificates for at most 30m; ca.workload_ttl 1h is cut to that (rotation "
            "follows each certificate's real NotAfter)",
        ),
        (
            {"rotate_after": 0.95},
            "ca.rotate_after 0.95 leaves only 3m (5% of each lifetime) to retry a failed renewal before the "
            "certificate expires",
        ),
    ],
)
def test_doubtful_chains_are_warned_about(changes, warning):
    report = check_ttl_chain(chain(**changes), NOW)
    assert report.ok
    assert report.warnings == [warning]


def test_intermediate_mode_explains_lifetime_and_outage_budget():
    report = check_ttl_chain(chain(), NOW)
    assert (report.errors, report.warnings) == ([], [])
    assert report.workload_lifetime == H
    assert report.intermediate_lifetime == 24 * H
    assert report.renewal_window == H / 2
    assert report.outage_budget == 12 * H
    assert report.notes == [
        "workload certificates live 1h and are renewed 27m to 30m after issue (rotate_after 0.5, jitter 0.1); a "
        "failing renewal is retried for 30m before the certificate expires",
        "the intermediate lives 1d and is renewed 12h after issue; workloads move to a new intermediate at their "
        "own next renewal",
        "outage budget: the upstream CA may be unreachable for 12h before anything expires (workload certificates "
        "keep being signed locally by the intermediate)",
        "if mesh-identity itself stops, workload certificates stay valid for at least 30m",
        "the signing root expires 2031-01-01T00:00:00Z (in 365d)",
    ]


def test_per_workload_mode_budget_is_the_workload_window_after_the_provider_cap():
    report = check_ttl_chain(
        chain(mode=Mode.PER_WORKLOAD, limits=Limits(max_workload_ttl=40 * timedelta(minutes=1), notes=("role web",))),
        NOW,
    )
    assert report.workload_lifetime == timedelta(minutes=40)
    assert report.intermediate_lifetime is None
    assert report.outage_budget == timedelta(minutes=20)
    assert (
        "outage budget: the upstream CA may be unreachable for 20m before a workload certificate expires (every "
        "renewal goes upstream)"
    ) in report.notes
    assert report.notes[-1] == "provider: role web"


def test_the_service_refuses_to_start_on_an_unsound_chain(tmp_path):
    # the provider reports intermediates can live 30 minutes: a 1 h workload certificate cannot fit under one
    config = make_config(
        tmp_path,
        identities=ids("web"),
        provider="flaky",
        workload_ttl="1h",
        intermediate_ttl="24h",
        provider_options={"max_intermediate_ttl": "30m"},
    )
    service = build_service(config, provider_for(config, FlakyPlugin()))
    with pytest.raises(ConfigError) as raised:
        service.start()
    assert str(raised.value) == (
        "the TTL chain is unsound: ca.workload_ttl: 1h is not shorter than the 30m an intermediate can live "
        "(the provider's limit)"
    )
    assert not service.engine.running
    assert service.authority.signing_ca is None


@pytest.mark.parametrize(
    ("ca", "message"),
    [
        ({"rotate_after": 1.5}, "ca.rotate_after: 1.5 is not a fraction strictly between 0 and 1"),
        (
            {"workload_ttl": "2h", "intermediate_ttl": "1h"},
            "ca.workload_ttl: '2h' is not shorter than ca.intermediate_ttl '1h'; a workload certificate cannot "
            "outlive its issuer",
        ),
    ],
)
def test_the_config_file_refuses_the_same_mistakes(tmp_path, ca, message):
    with pytest.raises(ConfigError) as raised:
        make_config(tmp_path, **ca)
    assert str(raised.value) == message
