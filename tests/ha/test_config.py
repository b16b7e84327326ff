"""The HA keys of the ``registry`` section: the control plane's namespace and the leader election."""

from __future__ import annotations

from pathlib import Path

import pytest

from mesh_identity.config import DEFAULT_LEASE, default_identity, default_namespace, parse_config
from mesh_identity.errors import ConfigError


def registry(tmp_path: Path, **keys: object):  # type: ignore[no-untyped-def]
    (tmp_path / "kubeconfig").write_text("{}")
    section = {"kind": "kubernetes", "mesh_name": "demo", "kubeconfig": "kubeconfig", **keys}
    return parse_config({"trust_domain": "example.org", "registry": section}, tmp_path).registry


def test_defaults_come_from_the_pod(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("POD_NAME", "mesh-identity-7d9f-abcde")
    settings = registry(tmp_path)
    assert settings.leader_election.lease_name == DEFAULT_LEASE
    assert settings.leader_election.identity == "mesh-identity-7d9f-abcde"
    assert settings.namespace == default_namespace()
    (tmp_path / "namespace").write_text("mesh-control\n")
    assert default_namespace(tmp_path / "namespace") == "mesh-control"
    assert default_namespace(tmp_path / "missing") == "mesh-identity-system"
    assert default_identity({"POD_NAME": ""}) == default_identity({}) != ""


def test_explicit_values(tmp_path: Path) -> None:
    settings = registry(tmp_path, namespace="mesh-control", leader_election={"lease_name": "ha", "identity": "r-1"})
    assert (settings.namespace, settings.leader_election.lease_name, settings.leader_election.identity) == (
        "mesh-control",
        "ha",
        "r-1",
    )


@pytest.mark.parametrize(
    ("keys", "message"),
    [
        ({"namespace": "Mesh"}, r"registry.namespace: 'Mesh' is not a namespace name"),
        ({"namespace": "a.b"}, r"registry.namespace: 'a.b' is not a namespace name"),
        ({"leader_election": {"lease_name": "-x"}}, r"registry.leader_election.lease_name: '-x' is not an object name"),
        ({"leader_election": {"identity": "Pod_1"}}, r"registry.leader_election.identity: 'Pod_1' is not an object"),
        ({"leader_election": {"lease": "x"}}, r"registry.leader_election.lease: unknown key \(did you mean"),
        ({"leader_election": "x"}, r"registry.leader_election: 'x' is not a mapping"),
    ],
)
def test_bad_values_are_named(tmp_path: Path, keys: dict[str, object], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        registry(tmp_path, **keys)
