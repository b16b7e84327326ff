"""Fuzz target: the config file, ``parse_config(data, base_dir)`` and the file reader ``load_config(path)``.

Inputs: YAML-like structures (hypothesis ``recursive`` of dicts, lists and the scalars YAML produces) built
from the config's own keys and values; mutations of ``examples/config.yaml``; random and mutated bytes as the
file. The rule: a ``ConfigError`` (of our tree) or a valid ``Config``, whose invariants are checked; an error
message is not vastly larger than the file it is about.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import given
from hypothesis import strategies as st

from mesh_identity.config import Config, load_config, parse_config
from mesh_identity.errors import MeshIdentityError
from mesh_identity.provider import Mode
from tests.fuzz.harness import (
    CORPUS,
    Rule,
    Watch,
    corpus_cases,
    count,
    fuzz_settings,
    mutated,
    mutated_bytes,
    outcome,
)

TARGET = "config"
EXAMPLE = (Path(__file__).resolve().parents[2] / "examples" / "config.yaml").read_bytes()
MAX_MESSAGE = 64 * 1024  # an error message may quote the bad value, not grow far beyond the file


@pytest.fixture(scope="module")
def rule() -> Iterator[Rule]:
    with Watch() as watch:
        yield Rule(TARGET, allowed=(MeshIdentityError,), timeout=10.0, watch=watch)


def check_config(config: Config) -> None:
    """What a valid Config promises."""
    ca = config.ca
    assert ca.workload_ttl > dt.timedelta(0) and ca.intermediate_ttl > dt.timedelta(0)
    if ca.mode is Mode.INTERMEDIATE:
        assert ca.workload_ttl < ca.intermediate_ttl
    assert 0 < ca.rotate_after < 1 and 0 <= ca.jitter < 0.5
    for listen in (config.metrics_listen, config.xds_listen):
        assert listen is None or (listen.host and 0 <= listen.port <= 65535)
    assert len(set(config.identities)) == len(config.identities)
    assert all(i.trust_domain == config.trust_domain and i.path for i in config.identities)


def check_data(rule: Rule, data: Any, base_dir: Path) -> None:
    ok, result = rule.call(lambda: parse_config(data, base_dir), "parse_config")
    if ok:
        check_config(result)
        outcome("valid config")
    else:
        outcome(f"ConfigError {str(result).split(':')[0][:30]}")
    rule.settle("a config")


def check_file(rule: Rule, data: bytes, path: Path) -> None:
    path.write_bytes(data)
    ok, result = rule.call(lambda: load_config(path), "load_config")
    if ok:
        check_config(result)
        outcome("valid config file")
    else:
        size = len(str(result))
        assert size <= max(MAX_MESSAGE, 16 * len(data)), f"a {len(data)}-byte file made a {size}-character message"
        outcome("ConfigError")
    rule.settle("a config file")


# -- the seed corpus -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("path", corpus_cases(TARGET))
def test_corpus(rule: Rule, path: Path, tmp_path: Path) -> None:
    count(TARGET, corpus=True)
    with rule.strictly():
        check_file(rule, path.read_bytes(), tmp_path / "config.yaml")


# -- generated documents -------------------------------------------------------------------------------------

KEYS = [
    "trust_domain", "state_dir", "ca", "metrics", "xds", "mesh_file", "plugins", "identities", "provider", "mode",
    "key_type", "workload_ttl", "intermediate_ttl", "rotate_after", "jitter", "provider_options", "listen", "audit",
    "enabled",
]  # fmt: skip
WORDS = [
    "example.org", "Example.org", "spiffe://example.org", "builtin", "vault", "intermediate", "per-workload",
    "ecdsa-p256", "ecdsa-p384", "rsa-2048", "rsa-3072", "ed25519", "1h", "24h", "90s", "1h30m", "0s", "-1h",
    "1.5h", "500ms", "7d", "1e3s", "99999999999d", "9" * 30 + "h", "127.0.0.1:0", "[::1]:9102", "host:99999", ":",
    "127.0.0.1:", "spiffe://example.org/ns/a/sa/b", "spiffe://example.org", "spiffe://evil.org/a", "./state", "/",
    "",
]  # fmt: skip
scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(2**70), 2**70),
    st.floats(),
    st.sampled_from(WORDS),
    st.text(max_size=20),
    st.dates(),
    st.binary(max_size=8),
)
keys = st.sampled_from(KEYS) | st.text(max_size=10)


def _containers(children: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    return st.lists(children, max_size=4) | st.dictionaries(keys, children, max_size=4)


documents = st.recursive(scalars, _containers, max_leaves=8)
sections = st.dictionaries(keys, scalars, max_size=6) | documents
config_like = st.fixed_dictionaries(
    {"trust_domain": st.sampled_from(WORDS[:3]) | scalars},
    optional={
        "ca": sections,
        "metrics": sections,
        "xds": sections,
        "identities": st.lists(scalars, max_size=4) | scalars,
        "state_dir": scalars,
        "mesh_file": scalars,
        "plugins": documents,
    },
)
EXAMPLE_DOC = yaml.safe_load(EXAMPLE)
mutations = mutated(EXAMPLE_DOC, max_mutations=4, vocabulary=[*WORDS, *KEYS, 0.5, 0.0, 1, True], values=documents)


@fuzz_settings(300)
@given(data=st.one_of(config_like, documents))
def test_generated_documents(rule: Rule, data: Any) -> None:
    count(TARGET)
    check_data(rule, data, Path("/nonexistent/base"))


@fuzz_settings(300)
@given(data=mutations)
def test_mutations_of_the_example(rule: Rule, data: Any) -> None:
    count(TARGET)
    check_data(rule, data, Path("/nonexistent/base"))


FILES = [path.read_bytes() for path in sorted((CORPUS / TARGET).iterdir()) if not path.name.startswith("finding-")]


@pytest.fixture(scope="module")
def config_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("config-files") / "config.yaml"


@fuzz_settings(200)
@given(
    data=st.one_of(st.binary(max_size=300), st.one_of(*[mutated_bytes(f) for f in FILES]), mutated_bytes(EXAMPLE, 8))
)
def test_file_bytes(rule: Rule, config_path: Path, data: bytes) -> None:
    count(TARGET)
    check_file(rule, data, config_path)
