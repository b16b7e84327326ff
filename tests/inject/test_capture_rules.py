"""The iptables rules of transparent capture: their order and what each leaves alone; bad settings refused."""

from __future__ import annotations

import shlex

import pytest

from mesh_identity.inject.rules import CaptureSettings, capture_rules, shell_command


def _lines(settings: CaptureSettings) -> list[str]:
    return [shlex.join(rule[3:]) for rule in capture_rules(settings)]  # without "iptables -t nat"


def test_the_default_rules_capture_tcp_both_ways_and_spare_envoy_loopback_and_its_ports() -> None:
    assert _lines(CaptureSettings()) == [
        "-N MESH_INBOUND",
        "-N MESH_IN_REDIRECT",
        "-N MESH_OUTBOUND",
        "-N MESH_OUT_REDIRECT",
        "-A MESH_IN_REDIRECT -p tcp -j REDIRECT --to-ports 15003",
        "-A PREROUTING -p tcp -j MESH_INBOUND",
        "-A MESH_INBOUND -p tcp --dport 15003 -j RETURN",
        "-A MESH_INBOUND -p tcp --dport 15090 -j RETURN",
        "-A MESH_INBOUND -p tcp -j MESH_IN_REDIRECT",
        "-A MESH_OUT_REDIRECT -p tcp -j REDIRECT --to-ports 15001",
        "-A OUTPUT -p tcp -j MESH_OUTBOUND",
        "-A MESH_OUTBOUND -p tcp -m owner --uid-owner 1337 -j RETURN",
        "-A MESH_OUTBOUND -p tcp -m owner --uid-owner 1338 -j RETURN",
        "-A MESH_OUTBOUND -o lo -j RETURN",
        "-A MESH_OUTBOUND -p tcp -j MESH_OUT_REDIRECT",
    ]
    assert all(rule[:3] == ["iptables", "-t", "nat"] for rule in capture_rules(CaptureSettings()))


def test_exclusions_return_before_the_redirect() -> None:
    settings = CaptureSettings(
        exclude_inbound_ports=(9000, 15090), exclude_outbound_ports=(5432, 443), exclude_outbound_cidrs=("10.0.0.0/8",)
    )
    lines = _lines(settings)
    redirect = lines.index("-A MESH_OUTBOUND -p tcp -j MESH_OUT_REDIRECT")
    for line in (
        "-A MESH_OUTBOUND -p tcp --dport 443 -j RETURN",
        "-A MESH_OUTBOUND -p tcp --dport 5432 -j RETURN",
        "-A MESH_OUTBOUND -d 10.0.0.0/8 -j RETURN",
    ):
        assert lines.index(line) < redirect
    assert lines.index("-A MESH_INBOUND -p tcp --dport 9000 -j RETURN") < lines.index(
        "-A MESH_INBOUND -p tcp -j MESH_IN_REDIRECT"
    )


def test_the_shell_command_stops_at_the_first_failure_and_quotes_nothing_unsafe() -> None:
    command = shell_command(capture_rules(CaptureSettings(exclude_outbound_cidrs=("192.168.0.0/16",))))
    assert command.startswith("set -e; iptables -t nat -N MESH_INBOUND; ")
    assert "-d 192.168.0.0/16 -j RETURN" in command


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"proxy_uid": 0}, "proxy_uid: 0 is not a non-root user id"),
        ({"inbound_port": 0}, "inbound_port: 0 is not a port (1-65535)"),
        ({"spared_uids": (1337,)}, "spared_uids: 1337 is not a non-root user id other than the proxy's"),
        ({"spared_uids": (0,)}, "spared_uids: 0 is not a non-root user id other than the proxy's"),
        ({"outbound_port": 15003}, "inbound_port and outbound_port are both 15003"),
        ({"exclude_inbound_ports": (15003,)}, "exclude_inbound_ports: 15003 is the sidecar's inbound port itself"),
        ({"exclude_outbound_ports": (70000,)}, "exclude_outbound_ports: 70000 is not a port (1-65535)"),
        ({"exclude_outbound_ports": (True,)}, "exclude_outbound_ports: True is not a port (1-65535)"),
        (
            {"exclude_outbound_cidrs": ("10.0.0.1/8",)},
            "exclude_outbound_cidrs: '10.0.0.1/8' is not a CIDR (10.0.0.1/8 has host bits set)",
        ),
        (
            {"exclude_outbound_cidrs": ("fd00::/8",)},
            "exclude_outbound_cidrs: 'fd00::/8' is IPv6; these rules are for iptables (IPv4)",
        ),
        (
            {"exclude_outbound_cidrs": ("1.2.3.4/8; rm -rf /",)},
            "exclude_outbound_cidrs: '1.2.3.4/8; rm -rf /' is not a CIDR",
        ),
    ],
)
def test_bad_settings_are_refused_naming_the_field(settings: dict[str, object], message: str) -> None:
    with pytest.raises(ValueError) as info:
        CaptureSettings(**settings)  # type: ignore[arg-type]
    assert str(info.value).startswith(message)
