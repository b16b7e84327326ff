"""What a sidecar with ``stats`` and ``access_log`` gets (without Envoy; tests/observability/test_observed_mesh.py
runs it in real Envoys): labelled stat prefixes, the tag extraction that reads them back, its stats endpoint in
the bootstrap, JSON access logs; and that a sidecar without them gets the config it had before."""

from __future__ import annotations

import json
import re
from dataclasses import replace
from pathlib import Path
from types import MappingProxyType

import pytest
from envoy.config.bootstrap.v3 import bootstrap_pb2
from envoy.config.cluster.v3 import cluster_pb2
from envoy.config.listener.v3 import listener_pb2
from envoy.extensions.access_loggers.file.v3 import file_pb2
from envoy.extensions.access_loggers.stream.v3 import stream_pb2
from envoy.extensions.filters.network.http_connection_manager.v3 import http_connection_manager_pb2 as hcm_pb2
from envoy.extensions.filters.network.tcp_proxy.v3 import tcp_proxy_pb2
from google.protobuf import json_format
from google.protobuf.message import Message

from mesh_identity.errors import ConfigError
from mesh_identity.mesh.model import Address, Instance, Mesh, Protocol, Service, Upstream, parse_mesh
from mesh_identity.mesh.policy import Backend, Policy, TrafficSplit
from mesh_identity.spiffe import TrustDomain
from tests.pki import TestCa
from xds_sds.protocol.typeurls import CLUSTER, LISTENER
from xds_sds.resources import stats
from xds_sds.resources.bootstrap import write_agent_bootstrap, write_bootstrap
from xds_sds.resources.proxy import proxy_resources
from xds_sds.resources.stats import Direction, Peer, stat_prefix

CA = TestCa.for_trust_domain("example.org")
FRONTEND, BACKEND, V2, LEDGER = (CA.id(f"/ns/shop/sa/{n}") for n in ("frontend", "backend", "backend-v2", "ledger"))
STATS = Address("127.0.0.1", 15090)


def _mesh(*, stats: Address | None = STATS, access_log: str | None = "/var/log/frontend.json") -> Mesh:
    def instance(node: str, port: int, **extra: object) -> Instance:
        return Instance(node, Address("127.0.0.1", port), Address("127.0.0.1", port + 7000), **extra)  # type: ignore[arg-type]

    services = {
        "frontend": Service(
            "frontend", FRONTEND, Protocol.HTTP, (instance("frontend-1", 8080, stats=stats, access_log=access_log),),
            (Upstream("backend", Address("127.0.0.1", 16081)), Upstream("ledger", Address("127.0.0.1", 16082))),
        ),
        "backend": Service("backend", BACKEND, Protocol.HTTP, (instance("backend-1", 8081),)),
        "backend-v2": Service("backend-v2", V2, Protocol.HTTP, (instance("backend-v2-1", 8083),)),
        "ledger": Service("ledger", LEDGER, Protocol.TCP, (instance("ledger-1", 8082, stats=Address("127.0.0.1", 15091), access_log="stdout"),)),
    }  # fmt: skip
    split = TrafficSplit("split", "shop", "backend", (Backend("backend", 90), Backend("backend-v2", 10)))
    return Mesh(CA.trust_domain, MappingProxyType(services), Policy(splits=(split,)))


def unpack(message: Message, cls: type[Message]) -> Message:
    out = cls()
    assert message.typed_config.Unpack(out)  # type: ignore[attr-defined]
    return out


def front(listener: Message) -> Message:
    """The connection manager or tcp_proxy of a listener's (one) filter chain."""
    assert isinstance(listener, listener_pb2.Listener)
    last = listener.filter_chains[0].filters[-1]
    return unpack(
        last, hcm_pb2.HttpConnectionManager if last.name.endswith("http_connection_manager") else tcp_proxy_pb2.TcpProxy
    )


def test_a_sidecar_without_stats_or_access_log_keeps_its_old_names() -> None:
    out = proxy_resources(_mesh(stats=None, access_log=None), "frontend-1")
    assert front(out[LISTENER]["inbound|frontend"]).stat_prefix == "inbound|frontend"  # type: ignore[attr-defined]
    outbound = front(out[LISTENER]["outbound|backend"])
    assert (outbound.stat_prefix, list(outbound.access_log)) == ("outbound|backend", [])  # type: ignore[attr-defined]
    assert front(out[LISTENER]["outbound|ledger"]).stat_prefix == "outbound|ledger"  # type: ignore[attr-defined]
    assert all(c.alt_stat_name == "" for c in out[CLUSTER].values())  # type: ignore[attr-defined]


def test_stat_prefixes_name_both_ends_of_every_hop() -> None:
    out = proxy_resources(_mesh(), "frontend-1")
    td = "example.org/ns/shop/sa"
    assert front(out[LISTENER]["inbound|frontend"]).stat_prefix == (  # type: ignore[attr-defined]
        f"mi;d=inbound;p=http;r=inbound|frontend;ds=frontend;di={td}/frontend;"
    )
    assert front(out[LISTENER]["outbound|backend"]).stat_prefix == (  # type: ignore[attr-defined]
        f"mi;d=outbound;p=http;r=outbound|backend;ss=frontend;si={td}/frontend;ds=backend;di=;"  # split: per backend
    )
    assert front(out[LISTENER]["outbound|ledger"]).stat_prefix == (  # type: ignore[attr-defined]
        f"mi;d=outbound;p=tcp;r=outbound|ledger;ss=frontend;si={td}/frontend;ds=ledger;di={td}/ledger;"
    )
    names = {name: c.alt_stat_name for name, c in out[CLUSTER].items()}  # type: ignore[attr-defined]
    assert names == {
        "inbound|frontend|app": f"mi;d=inbound;p=http;r=inbound|frontend;ds=frontend;di={td}/frontend;",
        "outbound|backend": f"mi;d=outbound;p=http;ss=frontend;si={td}/frontend;ds=backend;di={td}/backend;",
        "outbound|backend-v2": f"mi;d=outbound;p=http;ss=frontend;si={td}/frontend;ds=backend-v2;di={td}/backend-v2;",
        "outbound|ledger": f"mi;d=outbound;p=tcp;ss=frontend;si={td}/frontend;ds=ledger;di={td}/ledger;",
    }


def test_the_tags_turn_a_stat_name_back_into_its_labels() -> None:
    """The regexes of stats_config, applied as Envoy does (all to the full name; the matched intervals removed)."""
    prefix = stat_prefix(
        Direction.OUTBOUND,
        Protocol.HTTP,
        Peer("backend", BACKEND),
        source=Peer("frontend", FRONTEND),
        route="outbound|backend",
    )
    tags = [(t.tag_name, t.regex) for t in stats.stats_config().stats_tags if t.tag_name in stats.LABELS]
    for name in (f"http.{prefix}.downstream_rq_total", f"cluster.{prefix}.upstream_rq_time", f"listener.127.0.0.1_15080.http.{prefix}.downstream_rq_2xx"):  # fmt: skip
        removed: set[int] = set()
        labels = {}
        for tag, regex in tags:
            match = re.search(regex, name)
            if match:
                labels[tag] = match.group(2)
                removed.update(range(match.start(1), match.end(1)))
        rest = "".join(c for i, c in enumerate(name) if i not in removed)
        assert rest == name.replace(prefix + ".", "")
        assert labels == {
            "direction": "outbound", "protocol": "http", "route": "outbound|backend", "source_service": "frontend",
            "source_identity": "example.org/ns/shop/sa/frontend", "destination_service": "backend",
            "destination_identity": "example.org/ns/shop/sa/backend",
        }  # fmt: skip
    assert stats.identity_of_label(labels["source_identity"]) == str(FRONTEND)
    assert stats.identity_of_label("") == ""


def test_a_field_with_a_separator_is_refused() -> None:
    with pytest.raises(ValueError, match="may not contain"):
        stat_prefix(Direction.INBOUND, Protocol.HTTP, Peer("a;b", None))


def test_json_access_logs_to_a_file_or_stdout() -> None:
    out = proxy_resources(_mesh(), "frontend-1")
    [log] = front(out[LISTENER]["outbound|backend"]).access_log  # type: ignore[attr-defined]
    config = file_pb2.FileAccessLog()
    assert log.name == "envoy.access_loggers.file" and log.typed_config.Unpack(config)
    assert config.path == "/var/log/frontend.json"
    fields = json_format.MessageToDict(config.log_format.json_format)
    assert fields["peer"] == "%UPSTREAM_PEER_URI_SAN%"
    assert (fields["direction"], fields["route"], fields["source_identity"]) == (
        "outbound",
        "outbound|backend",
        str(FRONTEND),
    )
    assert fields["destination_identity"] == "%UPSTREAM_PEER_URI_SAN%"  # as the handshake verified it
    assert {"response_code", "duration_ms", "method", "path"} <= set(fields)
    assert fields["path"] == "%REQ_WITHOUT_QUERY(X-ENVOY-ORIGINAL-PATH?:PATH)%"  # no query strings in logs
    [inbound] = front(out[LISTENER]["inbound|frontend"]).access_log  # type: ignore[attr-defined]
    assert inbound.typed_config.Unpack(config)
    assert json_format.MessageToDict(config.log_format.json_format)["source_identity"] == "%DOWNSTREAM_PEER_URI_SAN%"

    ledger = proxy_resources(_mesh(), "ledger-1")
    [tcp] = front(ledger[LISTENER]["inbound|ledger"]).access_log  # type: ignore[attr-defined]
    stdout = stream_pb2.StdoutAccessLog()
    assert tcp.name == "envoy.access_loggers.stdout" and tcp.typed_config.Unpack(stdout)
    fields = json_format.MessageToDict(stdout.log_format.json_format)
    assert fields["peer"] == "%DOWNSTREAM_PEER_URI_SAN%" and "response_code" not in fields


def test_access_logs_alone_keep_the_old_stat_names() -> None:
    out = proxy_resources(_mesh(stats=None), "frontend-1")
    manager = front(out[LISTENER]["outbound|backend"])
    assert manager.stat_prefix == "outbound|backend" and len(manager.access_log) == 1  # type: ignore[attr-defined]


def test_the_bootstrap_gets_the_stats_endpoint(tmp_path: Path) -> None:
    svid = CA.svid("/ns/shop/sa/frontend")
    server = CA.id("/mesh-identity/xds")
    files = write_bootstrap(svid, tmp_path / "b", node="frontend-1", xds=Address("127.0.0.1", 15010), server_identity=server, stats=STATS)  # fmt: skip
    document = json_format.Parse(files.bootstrap.read_text(), bootstrap_pb2.Bootstrap())
    [listener] = document.static_resources.listeners
    assert (listener.name, listener.address.socket_address.port_value) == ("mesh-identity-stats", 15090)
    manager = front(listener)
    routes = manager.route_config.virtual_hosts[0].routes  # type: ignore[attr-defined]
    assert (routes[0].match.path, routes[0].route.cluster) == ("/stats/prometheus", "mesh-identity-admin")
    assert routes[0].match.headers[0].string_match.exact == "GET"
    assert routes[1].direct_response.status == 404
    admin = next(c for c in document.static_resources.clusters if c.name == "mesh-identity-admin")
    assert isinstance(admin, cluster_pb2.Cluster)
    port = document.admin.address.socket_address.port_value
    assert port != 0  # the static cluster must know it: a free port was chosen
    assert admin.load_assignment.endpoints[0].lb_endpoints[0].endpoint.address.socket_address.port_value == port
    assert document.stats_flush_on_admin and not document.stats_config.use_all_default_tags.value
    assert {t.tag_name for t in document.stats_config.stats_tags} >= set(stats.LABELS)

    plain = write_bootstrap(svid, tmp_path / "plain", node="frontend-1", xds=Address("127.0.0.1", 15010), server_identity=server)  # fmt: skip
    document = json.loads(plain.bootstrap.read_text())
    assert "listeners" not in document["staticResources"] and "statsConfig" not in document
    assert document["admin"]["address"]["socketAddress"].get("portValue", 0) == 0  # Envoy still picks


def test_the_stats_endpoint_cannot_be_the_admin(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="cannot share"):
        write_bootstrap(
            CA.svid("/ns/shop/sa/frontend"), tmp_path, node="frontend-1", xds=Address("127.0.0.1", 15010),
            server_identity=CA.id("/mesh-identity/xds"), admin=STATS, stats=STATS,
        )  # fmt: skip


def _document(**instance: object) -> dict[str, object]:
    return {
        "services": {
            "web": {"instances": [{"node": "web-1", "app": "127.0.0.1:8080", "inbound": "127.0.0.1:15080", **instance}]}
        }
    }


def test_the_mesh_file_keys() -> None:
    mesh = parse_mesh(_document(stats="127.0.0.1:15090", access_log="stdout"), TrustDomain("example.org"))
    [instance] = mesh.service("web").instances
    assert (instance.stats, instance.access_log) == (Address("127.0.0.1", 15090), "stdout")
    assert replace(instance, stats=None, access_log=None) == Instance(
        "web-1", Address("127.0.0.1", 8080), Address("127.0.0.1", 15080)
    )


@pytest.mark.parametrize(
    ("instance", "error"),
    [
        ({"stats": "localhost:15090"}, "services.web.instances[0].stats: host 'localhost' is not an IP address"),
        ({"stats": "127.0.0.1:15080"}, "services.web.instances[0].stats: 127.0.0.1:15080 is already used by services.web.instances[0].inbound"),
        ({"access_log": "logs/web.json"}, "services.web.instances[0].access_log: 'logs/web.json' is neither 'stdout' nor an absolute file path"),
        ({"access_log": 7}, "services.web.instances[0].access_log: 7 is not a non-empty string"),
    ],
)  # fmt: skip
def test_bad_mesh_file_keys_are_named(instance: dict[str, object], error: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse_mesh(_document(**instance), TrustDomain("example.org"))
    assert str(info.value).startswith(error), str(info.value)


def test_an_agent_bootstrap_gets_the_stats_endpoint_too(tmp_path: Path) -> None:
    path = write_agent_bootstrap(
        tmp_path, node="frontend-1", identity=FRONTEND, xds=Address("127.0.0.1", 15010),
        server_identity=CA.id("/mesh-identity/xds"), agent_socket=tmp_path / "sds.sock", stats=STATS,
    )  # fmt: skip
    document = json_format.Parse(path.read_text(), bootstrap_pb2.Bootstrap())
    assert [listener.name for listener in document.static_resources.listeners] == ["mesh-identity-stats"]
    assert "mesh-identity-admin" in {c.name for c in document.static_resources.clusters}
    assert document.admin.address.socket_address.port_value != 0
