"""The agent's config file: the documented example loads; every bad key or value is refused naming its path."""

from __future__ import annotations

import copy
import textwrap
from pathlib import Path
from typing import Any

import pytest
import yaml

from mesh_identity.errors import ConfigError
from mesh_identity.spiffe import SpiffeId
from xds_sds.agent import config as agent_config
from xds_sds.agent.config import Address, load_agent_config, parse_agent_config
from xds_sds.agent.selectors import Kind, Selector

GOOD: dict[str, Any] = {
    "trust_domain": "example.org",
    "host": "demo",
    "control_plane": {"signing": "127.0.0.1:8443", "attest": "127.0.0.1:8444", "bundle": "bundle.pem"},
    "credential": {"join_token_file": "join-token"},
    "sockets": {"sds": "run/sds.sock", "workload_api": "run/workload.sock"},
    "entries": [{"spiffe_id": "spiffe://example.org/ns/shop/sa/frontend", "selectors": ["unix:uid:1001"]}],
}


def documented_example() -> str:
    """The YAML in the module docstring of ``xds_sds.agent.config`` (what the README shows)."""
    doc = agent_config.__doc__ or ""
    block = doc.split("::", 1)[1].split("\n\n", 2)[1]
    return textwrap.dedent(block)


def test_the_documented_example_loads(tmp_path: Path) -> None:
    path = tmp_path / "agent.yaml"
    path.write_text(documented_example())
    config = load_agent_config(path)
    assert config.host == "demo"
    assert config.agent_id == SpiffeId.parse("spiffe://example.org/mesh-identity/agent/demo")
    assert config.control_plane.signing == Address("127.0.0.1", 8443)
    assert config.control_plane.bundle == tmp_path / "bundle.pem"
    assert config.credential is not None and config.credential.join_token_file == tmp_path / "join-token"
    assert config.sds_socket == tmp_path / "run/sds.sock"
    assert config.workload_socket == tmp_path / "run/workload.sock"
    assert config.metrics_listen == Address("127.0.0.1", 9103)
    assert (config.rotate_after, config.jitter) == (0.5, 0.1)
    assert config.identities == (SpiffeId.parse("spiffe://example.org/ns/shop/sa/frontend"),)
    assert config.entries[0].selectors == frozenset({Selector(Kind.UID, "1001")})
    assert config.state_dir == tmp_path / "agent-state"


def test_defaults_and_every_selector_kind(tmp_path: Path) -> None:
    doc = copy.deepcopy(GOOD)
    del doc["credential"], doc["sockets"]["sds"]
    doc["entries"] = [
        {
            "spiffe_id": "spiffe://example.org/ns/shop/sa/frontend",
            "selectors": [
                "unix:uid:0",
                "unix:gid:4294967294",
                "unix:path:/usr/bin/envoy",
                "k8s:pod-uid:3f2b8c1e-0c5d-4a8e-9f7a-2b1c3d4e5f60",
            ],
        },
        {"spiffe_id": "spiffe://example.org/ns/shop/sa/frontend", "selectors": ["unix:uid:1002"]},
    ]
    config = parse_agent_config(doc, tmp_path)
    assert config.credential is None and config.sds_socket is None and config.metrics_listen is None
    assert len(config.entries) == 2 and len(config.identities) == 1
    assert {s.kind for s in config.entries[0].selectors} == set(Kind)


def _with(path: str, value: Any) -> dict[str, Any]:
    doc = copy.deepcopy(GOOD)
    *parents, last = path.split(".")
    target: Any = doc
    for key in parents:
        target = target[int(key)] if isinstance(target, list) else target[key]
    if value is _DELETE:
        del target[last]
    elif isinstance(target, list):
        target[int(last)] = value
    else:
        target[last] = value
    return doc


_DELETE = object()
LONG = "x" * 120


@pytest.mark.parametrize(
    ("path", "value", "message"),
    [
        ("trust_domain", _DELETE, "trust_domain: required"),
        ("trust_domain", "Example.org", "trust_domain: Invalid trust domain 'Example.org'"),
        ("host", "no/slash", "host: 'no/slash' is not a host name"),
        ("host", _DELETE, "host: required"),
        ("colour", "blue", "colour: unknown key"),
        ("control_plane.signing", "localhost", "control_plane.signing: 'localhost' is not HOST:PORT"),
        ("control_plane.attest", "127.0.0.1:0", "control_plane.attest: '127.0.0.1:0' is not HOST:PORT"),
        ("control_plane.bundle", _DELETE, "control_plane.bundle: required"),
        ("control_plane.tls", True, "control_plane.tls: unknown key"),
        ("credential", {}, "credential: give exactly one of join_token_file, kubernetes_token_file"),
        (
            "credential",
            {"join_token_file": "a", "kubernetes_token_file": "b"},
            "credential: give exactly one of join_token_file, kubernetes_token_file",
        ),
        ("credential", {"token": "a"}, "credential.token: unknown key"),
        ("sockets", {}, "sockets: give sds, workload_api or both"),
        ("sockets", {"sds": "a.sock", "workload_api": "a.sock"}, "sockets.workload_api: "),
        ("sockets", {"sds": "/" + LONG}, "sockets.sds: "),
        ("metrics", {"listen": "0.0.0.0:9103"}, "metrics.listen: 0.0.0.0:9103 is not a loopback address"),
        ("metrics", {"port": 1}, "metrics.port: unknown key"),
        ("rotate_after", 1, "rotate_after: 1 is not a fraction in (0, 1)"),
        ("rotate_after", True, "rotate_after: True is not a fraction in (0, 1)"),
        ("jitter", 0.5, "jitter: 0.5 is not a fraction in [0, 0.5)"),
        ("entries", "all", "entries: 'all' is not a list"),
        (
            "entries.0.spiffe_id",
            "spiffe://other.org/x",
            "entries[0].spiffe_id: spiffe://other.org/x is not in trust domain",
        ),
        ("entries.0.spiffe_id", "spiffe://example.org", "entries[0].spiffe_id: spiffe://example.org has no path"),
        (
            "entries.0.spiffe_id",
            "spiffe://example.org/mesh-identity/xds",
            "entries[0].spiffe_id: spiffe://example.org/mesh-identity/xds is under /mesh-identity/, reserved",
        ),
        ("entries.0.spiffe_id", "spiffe://example.org/a/../b", "entries[0].spiffe_id: Invalid SPIFFE ID"),
        ("entries.0.selectors", [], "entries[0].selectors: empty; an entry needs at least one selector"),
        ("entries.0.selectors", ["uid:1001"], "entries[0].selectors[0]: 'uid:1001' is not a selector"),
        ("entries.0.selectors", ["unix:uid:-1"], "entries[0].selectors[0]: 'unix:uid:-1': uid must be a decimal"),
        ("entries.0.selectors", ["unix:uid:01"], "entries[0].selectors[0]: 'unix:uid:01': uid must be a decimal"),
        ("entries.0.selectors", ["unix:gid:4294967295"], "gid is larger than 4294967294"),
        ("entries.0.selectors", ["unix:path:bin/envoy"], "the executable path must be absolute"),
        ("entries.0.selectors", ["unix:path:/usr/../bin/envoy"], "is not normalised (write '/bin/envoy')"),
        ("entries.0.selectors", ["k8s:pod-uid:ABC"], "a pod UID is a lowercase UUID"),
        ("entries.0.selectors", ["unix:uid:1", "unix:uid:1"], "entries[0].selectors[1]: unix:uid:1 is listed twice"),
        ("entries.0.selectors", 5, "entries[0].selectors: 5 is not a list"),
        ("entries.0.hint", "x", "entries[0].hint: unknown key"),
        ("entries.0", {"spiffe_id": "spiffe://example.org/a"}, "entries[0].selectors: required"),
    ],
)
def test_bad_values_name_the_key(path: str, value: Any, message: str, tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as caught:
        parse_agent_config(_with(path, value), tmp_path)
    assert message in str(caught.value)


def test_the_same_entry_twice_is_refused(tmp_path: Path) -> None:
    doc = copy.deepcopy(GOOD)
    doc["entries"] = [doc["entries"][0], copy.deepcopy(doc["entries"][0])]
    with pytest.raises(ConfigError, match=r"entries\[1\]: the same entry as entries\[0\]"):
        parse_agent_config(doc, tmp_path)


def test_a_file_that_is_not_a_mapping_or_not_yaml(tmp_path: Path) -> None:
    path = tmp_path / "agent.yaml"
    path.write_text("- a\n- b\n")
    with pytest.raises(ConfigError, match="agent config: the document must be a mapping, not list"):
        load_agent_config(path)
    path.write_text("a: [\n")
    with pytest.raises(ConfigError, match="is not valid YAML"):
        load_agent_config(path)
    with pytest.raises(ConfigError, match="cannot read"):
        load_agent_config(tmp_path / "missing.yaml")
    path.write_text(yaml.safe_dump(GOOD))
    assert load_agent_config(path).source == path
