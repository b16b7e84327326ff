"""Fuzz target: the mesh file and its SMI documents, ``parse_mesh(data, trust_domain)`` and the file reader.

Inputs: YAML-like structures built from the mesh file's and SMI's own keys and values (services, instances,
addresses, identities, HTTPRouteGroups with regexes, TCPRoutes, TrafficTargets, TrafficSplits); mutations of
the demo's mesh (``mesh_identity/demo/demo-mesh.yaml``); random and mutated bytes as the file, read as a
registry reads it (``load_mesh_file``). The rule: a ``ConfigError`` (of our tree) or a valid ``Mesh``; a
valid mesh passes a registry's checks again and every sidecar's Envoy resources can be built from it.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import given
from hypothesis import strategies as st

from mesh_identity.errors import MeshIdentityError
from mesh_identity.mesh.model import Mesh, parse_mesh
from mesh_identity.registry.base import validate_workloads
from mesh_identity.registry.meshfile import load_mesh_file
from mesh_identity.spiffe import TrustDomain
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
from xds_sds.resources.proxy import proxy_resources

TARGET = "mesh"
TD = TrustDomain("example.org")
DEMO = (Path(__file__).resolve().parents[2] / "mesh_identity" / "demo" / "demo-mesh.yaml").read_bytes()
MAX_MESSAGE = 64 * 1024


@pytest.fixture(scope="module")
def rule() -> Iterator[Rule]:
    with Watch() as watch:
        yield Rule(TARGET, allowed=(MeshIdentityError,), timeout=10.0, watch=watch)


def check_mesh(rule: Rule, mesh: Mesh) -> None:
    """A valid mesh: in the trust domain, passes a registry's checks, and every sidecar can be built."""
    assert isinstance(mesh, Mesh) and mesh.trust_domain == TD
    assert all(s.identity.trust_domain == TD and s.identity.path for s in mesh.services.values())
    assert len(set(mesh.nodes())) == len(mesh.nodes())
    ok, err = rule.call(lambda: validate_workloads(mesh, TD), "validate_workloads")
    if not ok:  # only the control plane's own identity is refused here beyond parse_mesh's checks
        assert "the control plane's own identities" in str(err), err
        return
    for node in mesh.nodes():
        built, _ = rule.call(lambda node=node: proxy_resources(mesh, node), f"proxy_resources for node {node}")
        assert built, f"a valid mesh whose node {node} cannot be built"


def check_data(rule: Rule, data: Any) -> None:
    ok, result = rule.call(lambda: parse_mesh(data, TD), "parse_mesh")
    if ok:
        check_mesh(rule, result)
        outcome(f"valid mesh ({len(result.services)} services)")
    else:
        outcome(f"ConfigError at {str(result).split(':')[0].split('.')[0][:20]}")
    rule.settle("a mesh")


def check_file(rule: Rule, data: bytes, path: Path) -> None:
    path.write_bytes(data)
    ok, result = rule.call(lambda: load_mesh_file(path, TD), "load_mesh_file")
    if ok:
        check_mesh(rule, result)
        outcome("valid mesh file")
    else:
        size = len(str(result))
        assert size <= max(MAX_MESSAGE, 16 * len(data)), f"a {len(data)}-byte file made a {size}-character message"
        outcome("ConfigError")
    rule.settle("a mesh file")


# -- the seed corpus -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("path", corpus_cases(TARGET))
def test_corpus(rule: Rule, path: Path, tmp_path: Path) -> None:
    count(TARGET, corpus=True)
    with rule.strictly():
        check_file(rule, path.read_bytes(), tmp_path / "mesh.yaml")


# -- generated documents -------------------------------------------------------------------------------------

ADDRESSES = [
    "127.0.0.1:8080", "127.0.0.1:15080", "127.0.0.1:16081", "[::1]:80", "::1:80", "localhost:80", "1.2.3.4:0",
    "1.2.3.4:65536", "1.2.3.4:", ":80", "[::1]", "127.0.0.1:08080", "127.0.0.1:+80", "fe80::1%eth0:80", 8080,
]  # fmt: skip
REGEXES = [
    "/.*", "/items(/.*)?", "(", "[", "*", "a{2,1}", "(?=x)", "(?<!x)y", "(a)\\1", "(?P<n>a)(?P=n)", "\\Z", "(?x)a",
    "(?i)a", "a++", "[]a]", "\\d+", "a{99999999999}", "((((((((((a))))))))))", "\\N{DIGIT ONE}", "",
]  # fmt: skip
WORDS = [
    *ADDRESSES, *REGEXES, "frontend", "backend", "ratings", "web-1", "backend-1", "shop", "default",
    "http", "tcp", "udp", "HTTP", "HTTPRouteGroup", "TCPRoute", "TrafficTarget", "TrafficSplit", "ServiceAccount",
    "SpiffeId", "specs.smi-spec.io/v1alpha4", "access.smi-spec.io/v1alpha3", "split.smi-spec.io/v1alpha2",
    "spiffe://example.org/ns/shop/sa/frontend", "spiffe://example.org/batch", "spiffe://evil.org/a",
    "spiffe://example.org/mesh-identity/xds-server", "GET", "POST", "*", "get", "x-role", ":path", "Bad Header",
    0, 1, 50, 80, 100, 101, -1, 5432, 65536, True, False, None,
]  # fmt: skip
KEYS = [
    "services", "permissive", "policies", "identity", "protocol", "instances", "upstreams", "node", "app",
    "inbound", "service", "listen", "namespace", "service_account", "kind", "apiVersion", "metadata", "name",
    "spec", "matches", "pathRegex", "methods", "headers", "ports", "destination", "sources", "rules", "backends",
    "weight", "id",
]  # fmt: skip
scalars = st.one_of(st.sampled_from(WORDS), st.none(), st.booleans(), st.integers(), st.text(max_size=12))


def _containers(children: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    return st.lists(children, max_size=3) | st.dictionaries(
        st.sampled_from(KEYS) | st.text(max_size=8), children, max_size=4
    )


documents = st.recursive(scalars, _containers, max_leaves=12)
names = st.sampled_from(["frontend", "backend", "ratings", "a", "b"])
addresses = st.one_of(
    st.integers(1, 65535).map(lambda port: f"127.0.0.1:{port}"),
    st.integers(1, 65535).map(lambda port: f"[::1]:{port}"),
    st.sampled_from(ADDRESSES),
)
nodes = st.sampled_from(["web-1", "backend-1", "n", "n2"]) | st.text(alphabet=st.sampled_from("ab-._1Z"), max_size=6)
instance = st.fixed_dictionaries({"node": nodes, "app": addresses, "inbound": addresses})
service = st.fixed_dictionaries(
    {"instances": st.lists(instance, max_size=2)},
    optional={
        "identity": st.sampled_from(WORDS) | st.fixed_dictionaries({"namespace": names, "service_account": names}),
        "protocol": st.sampled_from(["http", "tcp", "udp"]),
        "upstreams": st.lists(st.fixed_dictionaries({"service": names, "listen": addresses}), max_size=2),
    },
)
metadata = st.fixed_dictionaries({"name": names}, optional={"namespace": st.sampled_from(["shop", "default", "Bad"])})
match = st.fixed_dictionaries(
    {"name": st.sampled_from(["read", "all", "admin"])},
    optional={
        "pathRegex": st.sampled_from(REGEXES) | st.text(alphabet=st.sampled_from("()[]{}*+?|\\^$.:<=!#PaZ019,-"),
                                                         max_size=16),
        "methods": st.lists(st.sampled_from(["GET", "POST", "*", "get", "BREW"]), max_size=3),
        "headers": st.dictionaries(st.sampled_from(["x-role", ":path", "Bad Header", "X-Up"]),
                                   st.sampled_from(REGEXES), max_size=2),
    },
)  # fmt: skip
identity_ref = st.fixed_dictionaries(
    {}, optional={"kind": st.sampled_from(["ServiceAccount", "SpiffeId", "Group"]), "name": names,
                  "namespace": st.sampled_from(["shop", "default"]), "id": st.sampled_from(WORDS)}
)  # fmt: skip
smi = st.one_of(
    st.fixed_dictionaries(
        {"kind": st.just("HTTPRouteGroup"), "metadata": metadata,
         "spec": st.fixed_dictionaries({"matches": st.lists(match, max_size=3)})}
    ),
    st.fixed_dictionaries(
        {"kind": st.just("TCPRoute"), "metadata": metadata,
         "spec": st.fixed_dictionaries({}, optional={"matches": st.fixed_dictionaries(
             {}, optional={"ports": st.lists(st.sampled_from([0, 1, 80, 5432, 65535, 65536, -1, True, "80"]),
                                             max_size=3)})})}
    ),
    st.fixed_dictionaries(
        {"kind": st.just("TrafficTarget"), "metadata": metadata,
         "spec": st.fixed_dictionaries(
             {"destination": identity_ref, "sources": st.lists(identity_ref, max_size=2),
              "rules": st.lists(st.fixed_dictionaries(
                  {"kind": st.sampled_from(["HTTPRouteGroup", "TCPRoute"]), "name": names},
                  optional={"matches": st.lists(st.sampled_from(["read", "all", "nope"]), max_size=2)}), max_size=2)})}
    ),
    st.fixed_dictionaries(
        {"kind": st.just("TrafficSplit"), "metadata": metadata,
         "spec": st.fixed_dictionaries(
             {"service": names,
              "backends": st.lists(st.fixed_dictionaries(
                  {"service": names, "weight": st.sampled_from([0, 10, 20, 50, 80, 90, 100, 101, -1])}), max_size=3)})}
    ),
    st.dictionaries(st.sampled_from(["kind", "metadata", "spec", "apiVersion"]), documents, max_size=4),
)  # fmt: skip
mesh_like = st.fixed_dictionaries(
    {},
    optional={
        "services": st.dictionaries(names, service, max_size=4)
        | st.dictionaries(st.text(max_size=6), service, max_size=2)
        | documents,
        "policies": st.lists(smi, max_size=4) | documents,
        "permissive": st.booleans() | st.sampled_from([None, "yes", 1, "true"]),
    },
)
DEMO_DOC = yaml.safe_load(DEMO)
mutations = mutated(DEMO_DOC, max_mutations=4, vocabulary=[*WORDS, *KEYS], values=documents)


@fuzz_settings(300)
@given(data=st.one_of(mesh_like, mesh_like, mesh_like, documents))
def test_generated_documents(rule: Rule, data: Any) -> None:
    count(TARGET)
    check_data(rule, data)


@fuzz_settings(300)
@given(data=mutations)
def test_mutations_of_the_demo_mesh(rule: Rule, data: Any) -> None:
    count(TARGET)
    check_data(rule, data)


FILES = [path.read_bytes() for path in sorted((CORPUS / TARGET).iterdir()) if not path.name.startswith("finding-")]


@pytest.fixture(scope="module")
def mesh_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("mesh-files") / "mesh.yaml"


@fuzz_settings(150)
@given(data=st.one_of(st.binary(max_size=300), st.one_of(*[mutated_bytes(f) for f in FILES]), mutated_bytes(DEMO, 8)))
def test_file_bytes(rule: Rule, mesh_path: Path, data: bytes) -> None:
    count(TARGET)
    check_file(rule, data, mesh_path)
