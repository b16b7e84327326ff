from __future__ import annotations

from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
import yaml

from mesh_identity.config import load_config, parse_config
from mesh_identity.errors import ConfigError
from mesh_identity.keys import KeyType
from mesh_identity.provider import Mode

EXAMPLE = Path(__file__).parents[2] / "examples" / "config.yaml"


def test_example_config_loads() -> None:
    config = load_config(EXAMPLE)
    assert config.trust_domain.name == "example.org"
    assert config.state_dir == EXAMPLE.parent.resolve() / "mesh-identity-state"
    assert config.ca.provider == "builtin"
    assert config.ca.mode is Mode.INTERMEDIATE
    assert config.ca.key_type is KeyType.ECDSA_P256
    assert config.ca.workload_ttl == timedelta(hours=1)
    assert config.ca.rotate_after == 0.5
    assert str(config.metrics_listen) == "127.0.0.1:9102"
    assert str(config.xds_listen) == "127.0.0.1:15010"
    assert config.mesh_file == EXAMPLE.parent.resolve() / "demo-mesh.yaml"
    assert config.mesh_file.exists()


BASE: dict[str, Any] = {"trust_domain": "example.org"}


@pytest.mark.parametrize(
    ("doc", "message"),
    [
        (
            {"trust_domain": "example.org", "ca": {"workload_ttl": "5x"}},
            "ca.workload_ttl: '5x' is not a duration (use 30m, 24h, 7d)",
        ),
        (
            {"trust_domain": "example.org", "ca": {"workload_tll": "1h"}},
            "ca.workload_tll: unknown key (did you mean 'workload_ttl'?)",
        ),
        ({"trust_domain": "example.org", "stat_dir": "x"}, "stat_dir: unknown key (did you mean 'state_dir'?)"),
        ({}, "trust_domain: required (e.g. trust_domain: example.org)"),
        (
            {"trust_domain": "Example.org"},
            "trust_domain: Invalid trust domain 'Example.org': trust domain character 'E' is uppercase "
            "(only lowercase letters are allowed)",
        ),
        (
            {"trust_domain": "example.org", "ca": {"rotate_after": 1.5}},
            "ca.rotate_after: 1.5 is not a fraction strictly between 0 and 1",
        ),
        (
            {"trust_domain": "example.org", "ca": {"rotate_after": 0}},
            "ca.rotate_after: 0 is not a fraction strictly between 0 and 1",
        ),
        (
            {"trust_domain": "example.org", "ca": {"key_type": "dsa"}},
            "ca.key_type: 'dsa' is not one of ecdsa-p256, ecdsa-p384, rsa-2048, rsa-3072",
        ),
        (
            {"trust_domain": "example.org", "ca": {"mode": "direct"}},
            "ca.mode: 'direct' is not one of intermediate, per-workload",
        ),
        (
            {"trust_domain": "example.org", "ca": {"workload_ttl": "48h", "intermediate_ttl": "24h"}},
            "ca.workload_ttl: '48h' is not shorter than ca.intermediate_ttl '24h'; a workload certificate cannot "
            "outlive its issuer",
        ),
        (
            {"trust_domain": "example.org", "metrics": {"listen": "9102"}},
            "metrics.listen: '9102' is not HOST:PORT (e.g. 127.0.0.1:9102; port 0 picks a free one)",
        ),
        (
            {"trust_domain": "example.org", "ca": {"provider_options": ["a"]}},
            "ca.provider_options: ['a'] is not a mapping",
        ),
        (["trust_domain"], "config: the document must be a mapping, not list"),
    ],
)
def test_bad_config_names_key_and_value(doc: Any, message: str, tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as err:
        parse_config(doc, tmp_path)
    assert str(err.value) == message


def test_bad_yaml_and_missing_file(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("trust_domain: [unclosed\n")
    with pytest.raises(ConfigError, match=r"config: .*bad.yaml is not valid YAML"):
        load_config(bad)
    with pytest.raises(ConfigError, match=r"config: cannot read .*missing.yaml: No such file or directory"):
        load_config(tmp_path / "missing.yaml")


def test_config_from_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(BASE))
    monkeypatch.setenv("MESH_IDENTITY_CONFIG", str(path))
    assert load_config().trust_domain.name == "example.org"
    monkeypatch.delenv("MESH_IDENTITY_CONFIG")
    with pytest.raises(ConfigError, match="no config: pass --config FILE or set MESH_IDENTITY_CONFIG"):
        load_config()


SIGNING = {"listen": "127.0.0.1:15011", "attest_listen": "127.0.0.1:15012"}


def test_agent_mode_signing_and_jwt_sections(tmp_path: Path) -> None:
    from mesh_identity.config import SecretSource

    config = parse_config(
        {**BASE, "xds": {"secrets": "agent"}, "jwt": {"ttl": "2m"},
         "signing": {**SIGNING, "kubernetes": {"kubeconfig": "kube.yaml", "audience": "mesh"}}},
        tmp_path,
    )  # fmt: skip
    assert config.xds_secrets is SecretSource.AGENT
    assert config.signing is not None and str(config.signing.listen) == "127.0.0.1:15011"
    assert config.signing.kubernetes is not None
    assert config.signing.kubernetes.kubeconfig == tmp_path / "kube.yaml"
    assert config.signing.kubernetes.audience == "mesh"
    assert config.jwt.ttl == timedelta(minutes=2) and config.jwt.max_ttl == timedelta(hours=1)
    default = parse_config(BASE, tmp_path)
    assert default.xds_secrets is SecretSource.CONTROL_PLANE and default.signing is None
    in_cluster = parse_config({**BASE, "signing": {**SIGNING, "kubernetes": {}}}, tmp_path)
    assert in_cluster.signing is not None and in_cluster.signing.kubernetes is not None
    assert in_cluster.signing.kubernetes.kubeconfig is None


@pytest.mark.parametrize(
    ("doc", "message"),
    [
        ({"xds": {"secrets": "agnet"}}, "xds.secrets: 'agnet' is not one of control-plane, agent"),
        ({"xds": {"secrets": "agent"}},
         "xds.secrets: agent needs the signing section (signing.listen, signing.attest_listen)"),
        ({"signing": {"listen": "127.0.0.1:1"}}, "signing.attest_listen: required (HOST:PORT; port 0 picks a free one)"),
        ({"signing": {**SIGNING, "attest_listen": "127.0.0.1:15011"}},
         "signing.attest_listen: 127.0.0.1:15011 is signing.listen's address; they are two listeners"),
        ({"signing": {**SIGNING, "listn": 1}}, "signing.listn: unknown key (did you mean 'listen'?)"),
        ({"signing": {**SIGNING, "max_csr_bytes": 10**9}},
         "signing.max_csr_bytes: 1000000000 is not a whole number of bytes in [512, 65536]"),
        ({"signing": {**SIGNING, "kubernetes": {"kubeconfig": "k", "in_cluster": True}}},
         "signing.kubernetes: give either kubeconfig: FILE or in_cluster: true (the pod's service account)"),
        ({"signing": {**SIGNING, "kubernetes": {"timeout": "0s"}}},
         "signing.kubernetes.timeout: '0s' is not a positive duration (use 30m, 24h, 7d)"),
        ({"jwt": {"ttl": "2h"}}, "jwt.ttl: '2h' is longer than jwt.max_ttl"),
        ({"jwt": {"key_ttl": "1h"}},
         "jwt.key_ttl: '1h' is shorter than twice jwt.max_ttl; a key must outlive every token it signed by a margin"),
        ({"jwt": {"tll": "5m"}}, "jwt.tll: unknown key (did you mean 'ttl'?)"),
    ],
)  # fmt: skip
def test_bad_agent_sections_name_the_key(doc: dict[str, Any], message: str, tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as err:
        parse_config({**BASE, **doc}, tmp_path)
    assert str(err.value) == message
