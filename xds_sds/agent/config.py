"""The agent's config file (YAML), validated with errors that name the key path and the bad value::

    trust_domain: example.org
    host: demo                          # this host: the mesh file's instances[].host
    state_dir: ./agent-state            # the agent's own SVID and key (0700/0600), to renew after a restart
    control_plane:
      signing: 127.0.0.1:8443           # the server's signing.listen (mTLS)
      attest: 127.0.0.1:8444            # the server's signing.attest_listen (token)
      bundle: ./bundle.pem              # roots that verify the control plane on first contact
    credential:                         # how the agent proves itself the first time: one of
      join_token_file: ./join-token     #   from `mesh-identity token create --node demo`
      # kubernetes_token_file: /var/run/secrets/tokens/mesh-identity
    sockets:
      sds: ./run/sds.sock               # SDS for local Envoys (a bootstrap's pipe address)
      workload_api: ./run/workload.sock # SPIFFE_ENDPOINT_SOCKET=unix://<this>
    metrics:
      listen: 127.0.0.1:9103            # /metrics and /healthz (loopback only; port 0: a free one, written to
                                        #   <state_dir>/metrics.addr)
    rotate_after: 0.5
    jitter: 0.1
    entries:                            # who gets which SVID (all selectors of an entry must match the caller)
      - spiffe_id: spiffe://example.org/ns/shop/sa/frontend
        selectors: [unix:uid:1001]

Relative paths are resolved against the config file's directory. ``credential`` may be left out once the
agent holds a valid SVID of its own in ``state_dir``; ``metrics`` may be left out (no endpoint); at least one
socket is needed.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mesh_identity.document import mapping, read_yaml, sequence, shown, string
from mesh_identity.errors import ConfigError, InvalidSpiffeIdError
from mesh_identity.ports import is_loopback
from mesh_identity.registry.base import RESERVED_PREFIX, agent_identity
from mesh_identity.spiffe import SpiffeId, TrustDomain
from xds_sds.agent.selectors import Entry, Selector, SelectorError

MAX_CONFIG_BYTES = 1024 * 1024
MAX_ENTRIES = 10_000
MAX_SELECTORS = 32
MAX_SOCKET_PATH = 107  # bytes of a Unix socket path (sun_path holds 108 with the final NUL)
HOST = re.compile(r"^[A-Za-z0-9]([A-Za-z0-9._-]{0,126}[A-Za-z0-9])?$")  # as the mesh file's instances[].host

_TOP = (
    "trust_domain", "host", "state_dir", "control_plane", "credential", "sockets", "metrics", "rotate_after",
    "jitter", "entries",
)  # fmt: skip
_CONTROL_PLANE = ("signing", "attest", "bundle")
_CREDENTIAL = ("join_token_file", "kubernetes_token_file")
_SOCKETS = ("sds", "workload_api")
_METRICS = ("listen",)
_ENTRY = ("spiffe_id", "selectors")


@dataclass(frozen=True, slots=True)
class Address:
    """``host:port`` of a TCP listener."""

    host: str
    port: int

    def __str__(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


@dataclass(frozen=True, slots=True)
class ControlPlane:
    signing: Address  # mutual TLS: renewals and workload SVIDs
    attest: Address  # server-authenticated TLS: the first contact, with a credential
    bundle: Path  # PEM roots that verify the control plane before it has sent a bundle


@dataclass(frozen=True, slots=True)
class Credential:
    """Exactly one of the two is set."""

    join_token_file: Path | None = None
    kubernetes_token_file: Path | None = None

    @property
    def path(self) -> Path:
        found = self.join_token_file or self.kubernetes_token_file
        assert found is not None  # the parser sets one
        return found


@dataclass(frozen=True, slots=True)
class AgentConfig:
    trust_domain: TrustDomain
    host: str
    state_dir: Path
    control_plane: ControlPlane
    credential: Credential | None
    sds_socket: Path | None
    workload_socket: Path | None
    metrics_listen: Address | None
    rotate_after: float
    jitter: float
    entries: tuple[Entry, ...]
    source: Path | None = None

    @property
    def agent_id(self) -> SpiffeId:
        """The identity a join token for this host buys."""
        return agent_identity(self.trust_domain, self.host)

    @property
    def identities(self) -> tuple[SpiffeId, ...]:
        """Every SPIFFE ID the entries name, in order, each once: the SVIDs the agent keeps."""
        return tuple(dict.fromkeys(entry.spiffe_id for entry in self.entries))


# -- field parsers -------------------------------------------------------------------------------------------


def _keys(section: Mapping[str, Any], known: tuple[str, ...], path: str) -> None:
    for key in section:
        if key not in known:
            raise ConfigError(f"{path}{key}: unknown key (known: {', '.join(known)})")


def _address(value: Any, path: str, *, any_port: bool = False) -> Address:
    """``HOST:PORT``; with ``any_port`` (a listener) port 0 picks a free one."""
    text = string(value, path)
    host, sep, port = text.rpartition(":")
    host = host[1:-1] if host.startswith("[") and host.endswith("]") else host
    lowest = 0 if any_port else 1
    if not sep or not host or not port.isascii() or not port.isdigit() or not lowest <= int(port) <= 65535:
        example = "127.0.0.1:9103; port 0 picks a free one" if any_port else "127.0.0.1:8443"
        raise ConfigError(f"{path}: {shown(value)} is not HOST:PORT (e.g. {example})")
    return Address(host, int(port))


def _path(value: Any, path: str, base_dir: Path) -> Path:
    text = string(value, path)
    if "\0" in text:
        raise ConfigError(f"{path}: {shown(value)} contains a NUL byte")
    return Path(os.path.normpath(base_dir / text))


def _socket(value: Any, path: str, base_dir: Path) -> Path:
    found = _path(value, path, base_dir)
    size = len(os.fsencode(found))
    if size > MAX_SOCKET_PATH:
        raise ConfigError(
            f"{path}: {shown(str(found))} is {size} bytes long; a Unix socket's path is at most {MAX_SOCKET_PATH}"
        )
    return found


def _fraction(value: Any, path: str, low: float, high: float, *, closed_low: bool) -> float:
    inside = isinstance(value, int | float) and not isinstance(value, bool) and value < high
    inside = inside and (value >= low if closed_low else value > low)
    if not inside:
        bounds = f"[{low:g}, {high:g})" if closed_low else f"({low:g}, {high:g})"
        raise ConfigError(f"{path}: {shown(value)} is not a fraction in {bounds}")
    return float(value)


def _spiffe_id(value: Any, path: str, trust_domain: TrustDomain) -> SpiffeId:
    try:
        spiffe_id = SpiffeId.parse(string(value, path))
    except InvalidSpiffeIdError as err:
        raise ConfigError(f"{path}: {err}") from None
    if spiffe_id.trust_domain != trust_domain:
        raise ConfigError(f"{path}: {spiffe_id} is not in trust domain {trust_domain}")
    if not spiffe_id.path:
        raise ConfigError(f"{path}: {spiffe_id} has no path; a workload identity needs one")
    if spiffe_id.path.startswith(RESERVED_PREFIX):
        raise ConfigError(
            f"{path}: {spiffe_id} is under {RESERVED_PREFIX}, reserved for the control plane's own identities"
        )
    return spiffe_id


def _entries(value: Any, trust_domain: TrustDomain) -> tuple[Entry, ...]:
    if value is None:
        return ()
    items = sequence(value, "entries")
    if len(items) > MAX_ENTRIES:
        raise ConfigError(f"entries: {len(items)} entries, more than the {MAX_ENTRIES} allowed")
    found: dict[tuple[SpiffeId, frozenset[Selector]], int] = {}
    for index, item in enumerate(items):
        path = f"entries[{index}]"
        raw = mapping(item, path)
        _keys(raw, _ENTRY, f"{path}.")
        for key in _ENTRY:
            if key not in raw:
                raise ConfigError(f"{path}.{key}: required")
        spiffe_id = _spiffe_id(raw["spiffe_id"], f"{path}.spiffe_id", trust_domain)
        texts = sequence(raw["selectors"], f"{path}.selectors")
        if not texts:
            raise ConfigError(f"{path}.selectors: empty; an entry needs at least one selector (e.g. unix:uid:1001)")
        if len(texts) > MAX_SELECTORS:
            raise ConfigError(f"{path}.selectors: {len(texts)} selectors, more than the {MAX_SELECTORS} allowed")
        selectors: list[Selector] = []
        for number, text in enumerate(texts):
            where = f"{path}.selectors[{number}]"
            try:
                selector = Selector.parse(string(text, where))
            except SelectorError as err:
                raise ConfigError(f"{where}: {err}") from None
            if selector in selectors:
                raise ConfigError(f"{where}: {selector} is listed twice")
            selectors.append(selector)
        entry = (spiffe_id, frozenset(selectors))
        if entry in found:
            raise ConfigError(f"{path}: the same entry as entries[{found[entry]}] ({spiffe_id} with these selectors)")
        found[entry] = index
    return tuple(Entry(spiffe_id, selectors) for spiffe_id, selectors in found)


def _credential(value: Any, base_dir: Path) -> Credential | None:
    if value is None:
        return None
    raw = mapping(value, "credential")
    _keys(raw, _CREDENTIAL, "credential.")
    if len(raw) != 1:
        raise ConfigError("credential: give exactly one of join_token_file, kubernetes_token_file")
    key = next(iter(raw))
    found = _path(raw[key], f"credential.{key}", base_dir)
    return Credential(**{key: found})


def parse_agent_config(data: Any, base_dir: Path, source: Path | None = None) -> AgentConfig:
    """Validate a parsed YAML document (see the module docstring); ConfigError naming the key path."""
    if not isinstance(data, dict):
        raise ConfigError(f"agent config: the document must be a mapping, not {type(data).__name__}")
    _keys(data, _TOP, "")
    for key in ("trust_domain", "host", "control_plane", "sockets"):
        if key not in data:
            raise ConfigError(f"{key}: required")
    try:
        trust_domain = TrustDomain.parse(string(data["trust_domain"], "trust_domain"))
    except InvalidSpiffeIdError as err:
        raise ConfigError(f"trust_domain: {err}") from None
    host = string(data["host"], "host")
    if not HOST.match(host):
        raise ConfigError(f"host: {shown(host)} is not a host name (letters, digits, '.', '-', '_'; at most 128)")
    state_dir = _path(data.get("state_dir", "mesh-identity-agent"), "state_dir", base_dir)

    raw_cp = mapping(data["control_plane"], "control_plane")
    _keys(raw_cp, _CONTROL_PLANE, "control_plane.")
    for key in _CONTROL_PLANE:
        if key not in raw_cp:
            raise ConfigError(f"control_plane.{key}: required")
    control_plane = ControlPlane(
        _address(raw_cp["signing"], "control_plane.signing"),
        _address(raw_cp["attest"], "control_plane.attest"),
        _path(raw_cp["bundle"], "control_plane.bundle", base_dir),
    )

    raw_sockets = mapping(data["sockets"], "sockets")
    _keys(raw_sockets, _SOCKETS, "sockets.")
    sds = _socket(raw_sockets["sds"], "sockets.sds", base_dir) if "sds" in raw_sockets else None
    workload = (
        _socket(raw_sockets["workload_api"], "sockets.workload_api", base_dir)
        if "workload_api" in raw_sockets
        else None
    )
    if sds is None and workload is None:
        raise ConfigError("sockets: give sds, workload_api or both (Unix socket paths)")
    if sds is not None and sds == workload:
        raise ConfigError(f"sockets.workload_api: {str(workload)!r} is also sockets.sds; they are two sockets")

    metrics_listen = None
    if data.get("metrics") is not None:
        raw_metrics = mapping(data["metrics"], "metrics")
        _keys(raw_metrics, _METRICS, "metrics.")
        if "listen" in raw_metrics:
            metrics_listen = _address(raw_metrics["listen"], "metrics.listen", any_port=True)
            if not is_loopback(metrics_listen.host):
                raise ConfigError(
                    f"metrics.listen: {metrics_listen} is not a loopback address; the agent's endpoint serves on "
                    "this host only (e.g. 127.0.0.1:9103)"
                )

    rotate_after = _fraction(data.get("rotate_after", 0.5), "rotate_after", 0.0, 1.0, closed_low=False)
    jitter = _fraction(data.get("jitter", 0.1), "jitter", 0.0, 0.5, closed_low=True)
    return AgentConfig(
        trust_domain=trust_domain,
        host=host,
        state_dir=state_dir,
        control_plane=control_plane,
        credential=_credential(data.get("credential"), base_dir),
        sds_socket=sds,
        workload_socket=workload,
        metrics_listen=metrics_listen,
        rotate_after=rotate_after,
        jitter=jitter,
        entries=_entries(data.get("entries"), trust_domain),
        source=source,
    )


def load_agent_config(path: Path) -> AgentConfig:
    """Read and validate the agent config file at ``path``."""
    return parse_agent_config(read_yaml(path, "agent config", MAX_CONFIG_BYTES), path.resolve().parent, path)
