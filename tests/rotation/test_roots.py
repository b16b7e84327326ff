"""Root rotation, end to end through the admin endpoint, with a restart in the middle; and its refusals."""

from __future__ import annotations

import json
import threading
import urllib.error
import urllib.request
from collections.abc import Sequence
from datetime import timedelta

import pytest

from mesh_identity.assembly import build_service
from mesh_identity.clock import utcnow
from mesh_identity.errors import RotationError
from mesh_identity.events import CaRotated, CertKind
from mesh_identity.rotation.roots import RootStep, StepOverride, root_of
from mesh_identity.server.service import ADMIN_TOKEN, Service
from mesh_identity.svid import TrustBundle, X509Svid, fingerprint_of, serial_of
from tests.rotation.helpers import FlakyPlugin, Recorder, ids, make_config, provider_for, verify_problem

TEAM = ids("web", "api", "db")


class Witness:
    """Checks, at every change, that every SVID being served verifies against the bundle being served."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.problems: list[str] = []
        self.checked = 0
        self.bundles_seen: list[frozenset[str]] = []

    def attach(self, service: Service) -> None:
        engine = service.engine
        self.check_all(service)
        engine.bundles.subscribe(lambda bundle: self.on_bundle(service, bundle))
        for source in engine.sources():
            source.subscribe(lambda svid: self.check(svid, engine.bundles.bundle()))

    def check(self, svid: X509Svid, bundle: TrustBundle) -> None:
        problem = verify_problem(svid, bundle, utcnow())
        with self.lock:
            self.checked += 1
            if problem is not None:
                self.problems.append(f"{svid.spiffe_id} {svid.serial}: {problem}")

    def on_bundle(self, service: Service, bundle: TrustBundle) -> None:
        self.bundles_seen.append(bundle.fingerprints)
        for source in service.engine.sources():
            self.check(source.svid(), bundle)

    def check_all(self, service: Service) -> None:
        bundle = service.engine.bundles.bundle()
        self.bundles_seen.append(bundle.fingerprints)
        for source in service.engine.sources():
            self.check(source.svid(), bundle)


def admin(service: Service, step: str, token: str | None = None) -> tuple[int, dict[str, str]]:
    token = token if token is not None else (service.config.state_dir / ADMIN_TOKEN).read_text().strip()
    request = urllib.request.Request(
        f"{service.url}/admin/root/{step}", method="POST", data=b"", headers={"Authorization": f"Bearer {token}"}
    )
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read())


def status(service: Service) -> dict:
    with urllib.request.urlopen(service.url + "/status", timeout=30) as response:
        return json.loads(response.read())


@pytest.fixture
def make_service(tmp_path):
    running: list[Service] = []

    def make(*, plugin=None, recorder=None, **ca):
        config = make_config(tmp_path, identities=TEAM, provider="flaky" if plugin else "builtin", **ca)
        service = build_service(config, provider_for(config, plugin), events=recorder or Recorder())
        service.start()
        running.append(service)
        return service

    def stop(service: Service) -> None:
        running.remove(service)
        service.stop()

    make.stop = stop  # type: ignore[attr-defined]
    yield make
    for service in running:
        service.stop()


@pytest.mark.parametrize("mode", ["intermediate", "per-workload"])
def test_root_rotation_end_to_end_with_a_restart_in_the_middle(make_service, mode):
    recorder = Recorder()
    witness = Witness()
    first = make_service(mode=mode, recorder=recorder)
    witness.attach(first)
    old_root = first.engine.bundles.bundle().authorities[0]
    assert status(first)["ca"]["phase"] == "steady"

    code, reply = admin(first, "prepare")
    assert code == 200, reply
    assert reply["message"].startswith("prepared root ")
    prepared = status(first)["ca"]
    assert prepared["phase"] == "prepared"
    assert prepared["next_step"] == "ready: mesh-identity ca rotate-root activate"
    assert [(r["signing"], r["new"], r["leaves"]) for r in prepared["roots"]] == [(True, False, 3), (False, True, 0)]
    new_root = next(r for r in prepared["roots"] if r["new"])

    # restart: a new provider and service on the same state resume in the prepared phase
    make_service.stop(first)
    second = make_service(mode=mode, recorder=recorder)
    witness.attach(second)
    assert second.roots.phase() == "prepared"
    assert second.engine.bundles.bundle().fingerprints == {fingerprint_of(old_root), new_root["fingerprint"]}

    code, reply = admin(second, "activate")
    assert code == 200, reply
    assert reply["message"] == (
        f"activated root {new_root['serial']}: 3 identities renewed from it. "
        "Next, once nothing chains to the old root: mesh-identity ca rotate-root retire"
    )
    activated = status(second)["ca"]
    assert activated["next_step"] == "ready: mesh-identity ca rotate-root retire"
    assert [(r["signing"], r["new"], r["leaves"]) for r in activated["roots"]] == [(False, False, 0), (True, True, 3)]

    code, reply = admin(second, "retire")
    assert code == 200, reply
    assert reply["message"] == (
        f"retired root {serial_of(old_root)}: the trust bundle holds only root {new_root['serial']} now"
    )
    assert second.engine.bundles.bundle().fingerprints == {new_root["fingerprint"]}
    assert status(second)["ca"]["phase"] == "steady"
    for source in second.engine.sources():
        assert (
            root_of(
                source.svid().chain[-1] if source.svid().chain else source.svid().leaf,
                second.engine.bundles.bundle().authorities,
            )
            == new_root["fingerprint"]
        )
    # every SVID, at every change on the way, verified against the bundle served at that moment
    assert witness.problems == []
    assert witness.checked >= 3 * 5
    assert witness.bundles_seen[-1] == {new_root["fingerprint"]}
    phases = [e.phase for e in recorder.of(CaRotated) if e.kind is CertKind.ROOT]
    assert phases == ["prepared", "activated", "retired"]


@pytest.mark.parametrize(
    ("steps", "step", "message"),
    [
        (
            (),
            "activate",
            "cannot activate: the root rotation is in phase 'steady', not 'prepared'; "
            "next step: mesh-identity ca rotate-root prepare",
        ),
        (
            (),
            "retire",
            "cannot retire: the root rotation is in phase 'steady', not 'activated'; "
            "next step: mesh-identity ca rotate-root prepare",
        ),
        (
            ("prepare",),
            "prepare",
            "cannot prepare: the root rotation is in phase 'prepared', not 'steady'; "
            "next step: mesh-identity ca rotate-root activate",
        ),
        (
            ("prepare",),
            "retire",
            "cannot retire: the root rotation is in phase 'prepared', not 'activated'; "
            "next step: mesh-identity ca rotate-root activate",
        ),
        (
            ("prepare", "activate"),
            "activate",
            "cannot activate: the root rotation is in phase 'activated', not "
            "'prepared'; next step: mesh-identity ca rotate-root retire",
        ),
    ],
)
def test_steps_out_of_order_are_refused(make_service, steps, step, message):
    service = make_service()
    for done in steps:
        getattr(service.roots, done)()
    code, reply = admin(service, step)
    assert (code, reply) == (409, {"error": message})


class Acks:
    """An acknowledgement source like the one the xDS server offers: which proxies hold what."""

    def __init__(self) -> None:
        self.without_bundle: list[str] = []
        self.on_old: list[str] = []
        self.asked: list[frozenset[str]] = []
        self.lagging: list[str] = []
        self.lagging_after: timedelta | None = None

    def proxies_missing_bundle(self, fingerprints: frozenset[str]) -> Sequence[str]:
        self.asked.append(fingerprints)
        return self.without_bundle

    def proxies_chaining_to(self, fingerprints: frozenset[str]) -> Sequence[str]:
        self.asked.append(fingerprints)
        return self.on_old

    def proxies_lagging(self, older_than: timedelta) -> Sequence[str]:
        self.lagging_after = older_than
        return self.lagging


def test_activate_waits_until_every_proxy_has_the_new_bundle(make_service):
    service = make_service()
    acks = Acks()
    service.set_ack_source(acks)
    service.roots.prepare()
    acks.without_bundle = ["web-1", "api-1"]
    with pytest.raises(RotationError) as raised:
        service.roots.activate()
    assert str(raised.value) == (
        "cannot activate: 2 proxies have not acknowledged the trust bundle with the new root yet: web-1, api-1"
    )
    assert acks.asked[-1] == service.engine.bundles.bundle().fingerprints
    assert service.roots.phase() == "prepared"
    assert service.roots.evidence().next_step == (
        "waiting: 2 proxies have not acknowledged the trust bundle with the new root yet: web-1, api-1"
    )
    acks.without_bundle = []
    assert service.roots.activate().startswith("activated root ")


def test_retire_waits_for_proxies_still_presenting_old_certificates(make_service):
    service = make_service()
    acks = Acks()
    service.set_ack_source(acks)
    old = service.engine.bundles.bundle().authorities[0]
    service.roots.prepare()
    service.roots.activate()
    acks.on_old = ["db-1"]
    with pytest.raises(RotationError) as raised:
        service.roots.retire()
    assert str(raised.value) == (
        f"cannot retire root {serial_of(old)}: 1 proxy still presents a certificate that chains to it: db-1"
    )
    assert acks.asked[-1] == {fingerprint_of(old)}
    acks.on_old = []
    assert service.roots.retire().startswith(f"retired root {serial_of(old)}")


def test_retire_is_refused_while_an_identity_still_holds_a_leaf_from_the_old_root(make_service):
    plugin = FlakyPlugin()
    service = make_service(plugin=plugin, mode="per-workload")
    stuck = TEAM[2]
    old = service.engine.bundles.bundle().authorities[0]
    service.roots.prepare()
    new = next(root for root in service.roots.evidence().roots if root.fingerprint == service.roots.evidence().new_root)
    plugin.switch.deny = {stuck}
    assert service.roots.activate() == (
        f"activated root {new.serial}: 2 identities renewed from it; 1 identity failed to renew and is retried with "
        f"backoff: {stuck}. Next, once nothing chains to the old root: mesh-identity ca rotate-root retire"
    )
    code, reply = admin(service, "retire")
    assert (code, reply) == (
        409,
        {"error": f"cannot retire root {serial_of(old)}: 1 identity still holds a leaf that chains to it: {stuck}"},
    )
    assert status(service)["ca"]["next_step"] == (f"waiting: 1 identity still holds a leaf that chains to it: {stuck}")
    # the stuck identity still verifies against the served bundle, which still holds the old root
    assert verify_problem(service.engine.source(stuck).svid(), service.engine.bundles.bundle(), utcnow()) is None
    plugin.switch.deny = set()
    assert service.engine.rotate(stuck) is True
    code, reply = admin(service, "retire")
    assert code == 200, reply


def test_retire_is_refused_while_the_intermediate_still_chains_to_the_old_root(make_service):
    plugin = FlakyPlugin()
    service = make_service(plugin=plugin, mode="intermediate")
    old = service.engine.bundles.bundle().authorities[0]
    service.roots.prepare()
    plugin.switch.refusing = True
    message = service.roots.activate()
    assert (
        "the new intermediate could not be obtained yet (flaky: upstream CA unreachable while signing an "
        "intermediate); it is retried with backoff" in message
    )
    with pytest.raises(RotationError) as raised:
        service.roots.retire()
    assert str(raised.value) == (
        f"cannot retire root {serial_of(old)}: the signing intermediate still chains to an old root (its renewal "
        f"has not succeeded); 3 identities still hold leaves that chain to it: {', '.join(sorted(map(str, TEAM)))}"
    )
    plugin.switch.refusing = False
    assert service.engine.rotate_intermediate() is True
    service.engine.rotate_all()
    assert service.roots.retire().startswith(f"retired root {serial_of(old)}")


def test_admin_needs_the_token(make_service):
    service = make_service()
    for token in ("", "not-the-token"):
        code, _ = admin_raw(service, token)
        assert code == 401
    assert service.roots.phase() == "steady"


def admin_raw(service: Service, token: str) -> tuple[int, str]:
    request = urllib.request.Request(
        f"{service.url}/admin/root/prepare", method="POST", data=b"", headers={"Authorization": f"Bearer {token}"}
    )
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as err:
        return err.code, err.read().decode()


def test_activate_can_give_up_on_named_proxies_and_says_so(make_service):
    recorder = Recorder()
    service = make_service(recorder=recorder)
    acks = Acks()
    service.set_ack_source(acks)
    service.roots.prepare()
    acks.without_bundle = ["web-1", "api-1"]
    with pytest.raises(RotationError) as raised:
        service.roots.step(RootStep.ACTIVATE, StepOverride(exclude=frozenset({"web-1"})))
    assert str(raised.value) == (
        "cannot activate: 1 proxy has not acknowledged the trust bundle with the new root yet: api-1"
    )
    with pytest.raises(RotationError) as raised:
        service.roots.step(RootStep.ACTIVATE, StepOverride(exclude=frozenset({"web-1", "wbe-2"})))
    assert str(raised.value) == (
        "cannot activate: --exclude names wbe-2, which is not holding this step up (waiting for: web-1, api-1)"
    )
    assert service.roots.phase() == "prepared"

    message = service.roots.step(RootStep.ACTIVATE, StepOverride(exclude=frozenset({"web-1", "api-1"})))
    assert "taken without the acknowledgement of web-1, api-1 (excluded by the operator)" in message
    (event,) = [e for e in recorder.of(CaRotated) if e.phase == "activated" and e.kind is CertKind.ROOT]
    assert (event.excluded, event.forced) == (("web-1", "api-1"), None)


def test_force_needs_a_reason_and_never_overrides_the_identities_evidence(make_service):
    plugin = FlakyPlugin()
    recorder = Recorder()
    service = make_service(plugin=plugin, recorder=recorder, mode="per-workload")
    acks = Acks()
    service.set_ack_source(acks)
    stuck = TEAM[2]
    service.roots.prepare()
    with pytest.raises(RotationError, match="prepare waits for no proxy"):
        service.roots.step(RootStep.PREPARE, StepOverride(force="x"))
    plugin.switch.deny = {stuck}  # it cannot renew: it keeps a leaf from the old root
    service.roots.activate()
    acks.on_old = ["db-1"]
    with pytest.raises(RotationError) as raised:
        service.roots.step(RootStep.RETIRE, StepOverride(force="  "))
    assert str(raised.value) == "cannot retire: --force needs a reason"
    with pytest.raises(RotationError) as raised:
        service.roots.step(RootStep.RETIRE, StepOverride(force="db-1 is being decommissioned"))
    assert str(raised.value).endswith(f": 1 identity still holds a leaf that chains to it: {stuck}")
    assert "db-1" not in str(raised.value)

    plugin.switch.deny = set()
    assert service.engine.rotate(stuck) is True
    message = service.roots.step(RootStep.RETIRE, StepOverride(force="db-1 is being decommissioned"))
    assert message.endswith(
        "taken without db-1, still on the old root (forced by the operator: db-1 is being decommissioned)"
    )
    (event,) = [e for e in recorder.of(CaRotated) if e.phase == "retired" and e.kind is CertKind.ROOT]
    assert (event.excluded, event.forced) == (("db-1",), "db-1 is being decommissioned")


def test_lagging_proxies_are_in_the_status_with_the_configured_timeout(make_service):
    service = make_service()
    acks = Acks()
    service.set_ack_source(acks)
    acks.lagging = ["web-1: rejected its Secret config: bad certificate"]
    assert status(service)["ca"]["proxies_lagging"] == ["web-1: rejected its Secret config: bad certificate"]
    assert acks.lagging_after == service.config.xds_ack_timeout == timedelta(minutes=1)
