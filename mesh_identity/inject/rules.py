"""The iptables rules that send a pod's TCP traffic through its Envoy sidecar (transparent capture).

The injected init container runs them, in the pod's network namespace, before any other container starts
(:func:`shell_command`); the pod runner of the tests runs exactly the same argv lists. Only the ``nat`` table is
touched, in chains of our own, so the rules are easy to read back (``iptables -t nat -S``)::

    PREROUTING  -p tcp -> MESH_INBOUND
      MESH_INBOUND   --dport <the sidecar's inbound port>  RETURN     (mesh traffic: already mTLS)
                     --dport <each excluded inbound port>  RETURN     (Envoy's stats port, annotations)
                     -> MESH_IN_REDIRECT: REDIRECT --to-ports <inbound port>
    OUTPUT      -p tcp -> MESH_OUTBOUND
      MESH_OUTBOUND  -m owner --uid-owner <Envoy's UID>  RETURN      (Envoy's own traffic: never looped back)
                     -m owner --uid-owner <each spared UID>  RETURN  (the node agent: it reaches the signing API
                                                                      itself, over its own mTLS)
                     -o lo  RETURN                                     (loopback: the app and Envoy talk there)
                     --dport <each excluded outbound port>  RETURN
                     -d <each excluded outbound CIDR>  RETURN
                     -> MESH_OUT_REDIRECT: REDIRECT --to-ports <outbound port>

So a plaintext connection from outside the pod to the app's port lands on the sidecar's mTLS listener and fails
its handshake: nothing reaches the app but through Envoy. Envoy finds where a redirected outbound connection
was going with ``SO_ORIGINAL_DST`` (its ``original_dst`` listener filter).
"""

from __future__ import annotations

import ipaddress
import shlex
from collections.abc import Sequence
from dataclasses import dataclass

from mesh_identity.mesh.ports import INBOUND_PORT, OUTBOUND_CAPTURE_PORT, STATS_PORT

PROXY_UID = 1337  # Envoy's user (OSM's and Istio's choice)
AGENT_UID = 1338  # the node agent's user in an injected pod
OUTBOUND_PORT = OUTBOUND_CAPTURE_PORT  # the port the outbound rules redirect to (mesh_identity.mesh.ports)
DEFAULT_EXCLUDED_INBOUND = (STATS_PORT,)

CHAINS = ("MESH_INBOUND", "MESH_IN_REDIRECT", "MESH_OUTBOUND", "MESH_OUT_REDIRECT")


def _port(value: object, what: str) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or not 1 <= value <= 65535:
        raise ValueError(f"{what}: {value!r} is not a port (1-65535)")
    return value


@dataclass(frozen=True, slots=True)
class CaptureSettings:
    """What the rules capture and what they leave alone; ValueError (naming the field) for a bad value."""

    proxy_uid: int = PROXY_UID
    inbound_port: int = INBOUND_PORT
    outbound_port: int = OUTBOUND_PORT
    exclude_inbound_ports: tuple[int, ...] = DEFAULT_EXCLUDED_INBOUND
    exclude_outbound_ports: tuple[int, ...] = ()
    exclude_outbound_cidrs: tuple[str, ...] = ()
    spared_uids: tuple[int, ...] = (AGENT_UID,)  # users whose outbound traffic is not captured

    def __post_init__(self) -> None:
        if not isinstance(self.proxy_uid, int) or isinstance(self.proxy_uid, bool) or not 1 <= self.proxy_uid < 2**31:
            raise ValueError(f"proxy_uid: {self.proxy_uid!r} is not a non-root user id")
        for uid in self.spared_uids:
            if not isinstance(uid, int) or isinstance(uid, bool) or not 1 <= uid < 2**31 or uid == self.proxy_uid:
                raise ValueError(f"spared_uids: {uid!r} is not a non-root user id other than the proxy's")
        _port(self.inbound_port, "inbound_port")
        _port(self.outbound_port, "outbound_port")
        if self.inbound_port == self.outbound_port:
            raise ValueError(f"inbound_port and outbound_port are both {self.inbound_port}")
        for port in self.exclude_inbound_ports:
            _port(port, "exclude_inbound_ports")
        for port in self.exclude_outbound_ports:
            _port(port, "exclude_outbound_ports")
        if self.inbound_port in self.exclude_inbound_ports:
            raise ValueError(f"exclude_inbound_ports: {self.inbound_port} is the sidecar's inbound port itself")
        for cidr in self.exclude_outbound_cidrs:
            try:
                network = ipaddress.ip_network(cidr, strict=True)
            except (TypeError, ValueError) as err:
                raise ValueError(f"exclude_outbound_cidrs: {cidr!r} is not a CIDR ({err})") from None
            if network.version != 4:
                raise ValueError(f"exclude_outbound_cidrs: {cidr!r} is IPv6; these rules are for iptables (IPv4)")


def capture_rules(settings: CaptureSettings) -> list[list[str]]:
    """The argv of each ``iptables`` command, in order (see the module docstring)."""
    nat = ["iptables", "-t", "nat"]
    rules = [[*nat, "-N", chain] for chain in CHAINS]
    rules.append(
        [*nat, "-A", "MESH_IN_REDIRECT", "-p", "tcp", "-j", "REDIRECT", "--to-ports", str(settings.inbound_port)]
    )
    rules.append([*nat, "-A", "PREROUTING", "-p", "tcp", "-j", "MESH_INBOUND"])
    for port in (settings.inbound_port, *sorted(set(settings.exclude_inbound_ports))):
        rules.append([*nat, "-A", "MESH_INBOUND", "-p", "tcp", "--dport", str(port), "-j", "RETURN"])
    rules.append([*nat, "-A", "MESH_INBOUND", "-p", "tcp", "-j", "MESH_IN_REDIRECT"])
    rules.append(
        [*nat, "-A", "MESH_OUT_REDIRECT", "-p", "tcp", "-j", "REDIRECT", "--to-ports", str(settings.outbound_port)]
    )
    rules.append([*nat, "-A", "OUTPUT", "-p", "tcp", "-j", "MESH_OUTBOUND"])
    owner = ["-m", "owner", "--uid-owner", str(settings.proxy_uid)]
    rules.append([*nat, "-A", "MESH_OUTBOUND", "-p", "tcp", *owner, "-j", "RETURN"])
    for uid in sorted(set(settings.spared_uids)):
        rules.append([*nat, "-A", "MESH_OUTBOUND", "-p", "tcp", "-m", "owner", "--uid-owner", str(uid), "-j", "RETURN"])
    rules.append([*nat, "-A", "MESH_OUTBOUND", "-o", "lo", "-j", "RETURN"])
    for port in sorted(set(settings.exclude_outbound_ports)):
        rules.append([*nat, "-A", "MESH_OUTBOUND", "-p", "tcp", "--dport", str(port), "-j", "RETURN"])
    for cidr in sorted(set(settings.exclude_outbound_cidrs)):
        rules.append([*nat, "-A", "MESH_OUTBOUND", "-d", cidr, "-j", "RETURN"])
    rules.append([*nat, "-A", "MESH_OUTBOUND", "-p", "tcp", "-j", "MESH_OUT_REDIRECT"])
    return rules


def shell_command(rules: Sequence[Sequence[str]]) -> str:
    """One ``sh -c`` command running ``rules`` in order, stopping at the first that fails (``set -e``)."""
    return "set -e; " + "; ".join(shlex.join(rule) for rule in rules)
