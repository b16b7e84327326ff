"""The Service seam the xDS server joins: components start after every identity has its SVID and the endpoint
listens, and stop first; a failing component's stop does not keep the rest from stopping."""

from __future__ import annotations

import pytest

from mesh_identity.assembly import build_service
from mesh_identity.server.service import Service
from tests.rotation.helpers import ids, make_config, provider_for

TEAM = ids("web", "api")


class Part:
    def __init__(self, name: str, service: Service, log: list[str], *, fail_stop: bool = False) -> None:
        self.name, self.service, self.log, self.fail_stop = name, service, log, fail_stop

    def start(self) -> int:
        engine = self.service.engine
        ready = engine.running and all(source.current() is not None for source in engine.sources())
        self.log.append(f"start {self.name} ready={ready} url={self.service.endpoint is not None}")
        return 0

    def stop(self) -> None:
        self.log.append(f"stop {self.name} engine={self.service.engine.running}")
        if self.fail_stop:
            raise RuntimeError("stop failed")


def test_components_start_after_the_engine_and_stop_before_it(tmp_path, caplog):
    config = make_config(tmp_path, identities=TEAM)
    service = build_service(config, provider_for(config))
    log: list[str] = []
    service.add_component(Part("xds", service, log, fail_stop=True))
    service.add_component(Part("other", service, log))
    service.start(paused=True)
    assert log == ["start xds ready=True url=True", "start other ready=True url=True"]
    service.stop()
    assert log[2:] == ["stop other engine=True", "stop xds engine=True"]
    assert not service.engine.running
    assert "stopping" in caplog.text and "stop failed" in caplog.text


def test_identities_can_be_given_instead_of_the_config_list(tmp_path):
    config = make_config(tmp_path, identities=TEAM)
    with build_service(config, provider_for(config), identities=TEAM[:1]) as service:
        assert service.engine.identities() == TEAM[:1]


@pytest.mark.parametrize(
    ("identities", "message"),
    [
        (
            ["spiffe://other.org/ns/a/sa/b"],
            "identities[0]: spiffe://other.org/ns/a/sa/b is not in trust domain example.org",
        ),
        (["spiffe://example.org"], "identities[0]: spiffe://example.org has no path; a workload identity needs one"),
        (
            ["spiffe://example.org/a", "spiffe://example.org/a"],
            "identities[1]: spiffe://example.org/a is listed twice",
        ),
        (
            ["spiffe://example.org/a/../b"],
            "identities[0]: Invalid SPIFFE ID 'spiffe://example.org/a/../b': path segment '..' is not allowed",
        ),
        ("spiffe://example.org/a", "identities: 'spiffe://example.org/a' is not a list of SPIFFE IDs"),
    ],
)
def test_the_identities_list_is_checked(tmp_path, identities, message):
    from mesh_identity.config import parse_config
    from mesh_identity.errors import ConfigError

    with pytest.raises(ConfigError) as raised:
        parse_config({"trust_domain": "example.org", "identities": identities}, tmp_path)
    assert str(raised.value) == message
