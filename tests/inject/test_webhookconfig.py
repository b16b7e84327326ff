"""The injector's MutatingWebhookConfiguration reconciler against the Kubernetes API test server, through the real
``kubernetes`` client: the desired object (accepted by the official schemas, stored as written), its arguments
checked; the writer creates it when missing, recreates it when deleted and restores it when someone edits what
we own (noticed by its watch, not its resync), follows the serving CA, leaves a configuration that is not ours
alone, writes nothing while it does not lead, drops a write that lost a race (409) and reads again. End to end:
the reconciled configuration makes the API server call a running WebhookServer for the pods of the mesh's
namespaces, and only those; after a serving CA rotation too."""

from __future__ import annotations

import base64
import contextlib
import copy
import dataclasses
import json
import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any

import kubernetes
import pytest
import yaml
from cryptography.hazmat.primitives import serialization

from mesh_identity.config import RegistryConfig
from mesh_identity.inject import patch as p
from mesh_identity.inject import webhookconfig as wc
from mesh_identity.inject.review import Injector
from mesh_identity.inject.server import WebhookServer
from mesh_identity.inject.webhookconfig import WebhookConfigurations, WebhookTarget, desired_configuration
from mesh_identity.registry.kube.client import KubeClient, connect
from mesh_identity.registry.kube.errors import KubeApiError
from mesh_identity.registry.kube.resources import MONITORED_BY, MUTATING_WEBHOOK_CONFIGURATIONS
from tests.fakes.kube import DEFAULT_KINDS, KubeServer
from tests.fakes.kube.admission import MUTATING_WEBHOOK_CONFIGURATION, MutatingWebhooks
from tests.fakes.kube.workloads import kind_named, schema_errors, workload_kinds
from tests.inject.kit import pod, settings
from tests.pki import TestCa, key_pem
from tests.waiting import wait_until

ROOT = Path(__file__).resolve().parents[2]
MESH = "demo"
NAME = wc.NAME
WRITER = "system:serviceaccount:mesh-identity-system:mesh-identity"
TOKENS = {"admin-token": "kubernetes-admin", "writer-token": WRITER}
SERVICE = ("mesh-identity-system", "mesh-identity-injector")
CA_1 = TestCa.create("injector CA 1")
CA_2 = TestCa.create("injector CA 2")
URL = WebhookTarget(url="https://localhost:8443/mutate")
WATCHED = 60.0  # a resync period no test waits for: what is repaired at once was seen by the watch


# --------------------------------------------------------------------------------------------- the cluster


@dataclass
class Cluster:
    server: KubeServer
    webhooks: MutatingWebhooks | None
    api: kubernetes.client.ApiClient
    directory: Path
    clients: list[KubeClient] = field(default_factory=list)
    writers: list[WebhookConfigurations] = field(default_factory=list)

    @property
    def admission(self) -> Any:
        return kubernetes.client.AdmissionregistrationV1Api(self.api)

    def client(self) -> KubeClient:
        path = self.directory / f"kubeconfig-{len(self.clients)}"
        self.server.write_kubeconfig(path, token="writer-token")
        client = connect(RegistryConfig(MESH, path, timedelta(seconds=2)))
        self.clients.append(client)
        return client

    def writer(
        self,
        pem: bytes | None = CA_1.pem(),
        *,
        target: WebhookTarget = URL,
        is_leader: Callable[[], bool] = lambda: True,
        resync_period: float | None = WATCHED,
        **options: Any,
    ) -> WebhookConfigurations:
        def make(ca: str) -> dict[str, Any]:
            return desired_configuration(NAME, MESH, target, ca, **options)

        writer = WebhookConfigurations(
            self.client(), NAME, make, retry_period=0.1, is_leader=is_leader, resync_period=resync_period
        )
        if pem is not None:
            writer.set_bundle(pem.decode())
        self.writers.append(writer)
        return writer

    # -- as someone else (the admin), through the real client, raw JSON
    def stored(self) -> dict[str, Any] | None:
        found = [o for o in self.server.objects(MUTATING_WEBHOOK_CONFIGURATION) if o["metadata"]["name"] == NAME]
        return copy.deepcopy(found[0]) if found else None

    def read(self) -> dict[str, Any]:
        response = self.admission.read_mutating_webhook_configuration(NAME, _preload_content=False)
        return dict(json.loads(response.read()))

    def create(self, body: dict[str, Any]) -> None:
        self.admission.create_mutating_webhook_configuration(body, _preload_content=False).read()

    def replace(self, body: dict[str, Any]) -> None:
        self.admission.replace_mutating_webhook_configuration(NAME, body, _preload_content=False).read()

    def edit(self, change: Callable[[dict[str, Any]], None]) -> None:
        current = self.read()
        change(current)
        self.replace(current)

    def delete(self) -> None:
        self.admission.delete_mutating_webhook_configuration(NAME, _preload_content=False).read()

    def namespace(self, name: str, mesh: str | None = MESH) -> None:
        labels = {MONITORED_BY: mesh} if mesh else {}
        kubernetes.client.CoreV1Api(self.api).create_namespace(
            {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": name, "labels": labels}}
        )

    def writes(self) -> list[tuple[str, int]]:
        """The writer's writes of the configuration: (verb, code)."""
        return [
            (r.verb, r.code)
            for r in list(self.server.requests)
            if r.user == WRITER and r.resource == "mutatingwebhookconfigurations" and r.verb in ("create", "update")
        ]

    def requests(self) -> list[str]:
        return [r.verb for r in list(self.server.requests) if r.user == WRITER]


@contextlib.contextmanager
def running(server: KubeServer, tmp_path: Path, webhooks: MutatingWebhooks | None = None) -> Iterator[Cluster]:
    with server, kubernetes.client.ApiClient(server.client_configuration(token="admin-token")) as api:
        cluster = Cluster(server, webhooks, api, tmp_path)
        try:
            yield cluster
        finally:
            for writer in cluster.writers:
                writer.stop()
            for client in cluster.clients:
                client.close()


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[Cluster]:
    server = KubeServer(kinds=(*DEFAULT_KINDS, *workload_kinds()), tokens=TOKENS)
    webhooks = MutatingWebhooks.install(server)
    with running(server, tmp_path, webhooks) as cluster:
        yield cluster


def desired(pem: bytes = CA_1.pem(), target: WebhookTarget = URL, **options: Any) -> dict[str, Any]:
    return desired_configuration(NAME, MESH, target, pem, **options)


def in_sync(cluster: Cluster, pem: bytes = CA_1.pem(), target: WebhookTarget = URL) -> bool:
    stored = cluster.stored()
    want = desired(pem, target)
    return (
        stored is not None
        and stored["webhooks"] == want["webhooks"]
        and all(stored["metadata"].get("labels", {}).get(k) == v for k, v in want["metadata"]["labels"].items())
    )


# ------------------------------------------------------------------------------------------ the object


@pytest.mark.parametrize(
    "target",
    [URL, WebhookTarget(*SERVICE), WebhookTarget(*SERVICE, port=8443, path="/inject/pods")],
    ids=["url", "service", "service-port-path"],
)
def test_the_desired_object_passes_the_official_schemas_and_is_stored_as_written(
    cluster: Cluster, target: WebhookTarget
) -> None:
    want = desired(target=target, failure_policy="Ignore", timeout_seconds=5)
    assert schema_errors(want) == []
    (webhook,) = want["webhooks"]
    assert want["apiVersion"] == "admissionregistration.k8s.io/v1" and want["kind"] == "MutatingWebhookConfiguration"
    assert want["metadata"] == {
        "name": NAME,
        "labels": {"app.kubernetes.io/managed-by": "mesh-identity", "mesh-identity.io/mesh": MESH},
    }
    assert webhook["name"] == "inject.mesh-identity.io"
    assert webhook["admissionReviewVersions"] == ["v1"] and webhook["sideEffects"] == "None"
    assert webhook["rules"] == [
        {
            "operations": ["CREATE"],
            "apiGroups": [""],
            "apiVersions": ["v1"],
            "resources": ["pods"],
            "scope": "Namespaced",
        }
    ]
    assert webhook["namespaceSelector"] == {"matchLabels": {"mesh-identity.io/monitored-by": MESH}}
    assert (webhook["failurePolicy"], webhook["timeoutSeconds"]) == ("Ignore", 5)
    assert (webhook["matchPolicy"], webhook["reinvocationPolicy"]) == ("Equivalent", "Never")
    assert base64.b64decode(webhook["clientConfig"]["caBundle"], validate=True) == CA_1.pem()
    if target.url:
        assert webhook["clientConfig"]["url"] == target.url
    else:
        assert webhook["clientConfig"]["service"] == {
            "namespace": target.namespace,
            "name": target.name,
            "port": target.port,
            "path": target.path,
        }
    cluster.create(want)  # through the real client: the fake's validation and the schemas, strict
    stored = cluster.stored()
    assert stored is not None and stored["webhooks"] == want["webhooks"]  # every default written out: no drift


def test_the_defaults_are_those_of_the_real_server() -> None:
    want = desired()
    assert wc.desired_configuration(NAME, MESH, URL, CA_1.pem().decode()) == want  # str or bytes
    (webhook,) = want["webhooks"]
    assert (webhook["failurePolicy"], webhook["timeoutSeconds"]) == ("Fail", 10)
    # an object written without the server's defaults is the same object (drift() names no field)
    sparse = copy.deepcopy(want)
    for key in ("objectSelector", "matchPolicy", "reinvocationPolicy", "failurePolicy", "timeoutSeconds"):
        del sparse["webhooks"][0][key]
    assert wc.drift(sparse, want) == []
    service = desired(target=WebhookTarget(*SERVICE))
    portless = copy.deepcopy(service)
    del portless["webhooks"][0]["clientConfig"]["service"]["port"]
    assert wc.drift(portless, service) == []
    changed = copy.deepcopy(want)
    changed["webhooks"][0]["clientConfig"]["caBundle"] = "eA=="
    changed["webhooks"][0]["failurePolicy"] = "Ignore"
    changed["metadata"]["labels"] = {}
    assert wc.drift(changed, want) == [
        "metadata.labels[app.kubernetes.io/managed-by]",
        "metadata.labels[mesh-identity.io/mesh]",
        "webhooks[0].clientConfig.caBundle",
        "webhooks[0].failurePolicy",
    ]
    assert wc.drift({**want, "webhooks": []}, want) == ["webhooks (0 webhooks, not 1)"]


BAD_ARGUMENTS: list[tuple[str, Callable[[], object], str]] = [
    ("name", lambda: desired_configuration("Not_A_Name", MESH, URL, CA_1.pem()), "name: 'Not_A_Name'"),
    ("long name", lambda: desired_configuration("a" * 254, MESH, URL, CA_1.pem()), "name: "),
    ("mesh", lambda: desired_configuration(NAME, "two words", URL, CA_1.pem()), "mesh_name: 'two words'"),
    ("empty mesh", lambda: desired_configuration(NAME, "", URL, CA_1.pem()), "mesh_name: ''"),
    ("policy", lambda: desired(failure_policy="Sometimes"), "failure_policy: 'Sometimes' is not one of Fail, Ignore"),
    ("timeout 0", lambda: desired(timeout_seconds=0), "timeout_seconds: 0"),
    ("timeout 31", lambda: desired(timeout_seconds=31), "timeout_seconds: 31"),
    ("timeout bool", lambda: desired(timeout_seconds=True), "timeout_seconds: True"),
    ("timeout float", lambda: desired(timeout_seconds=2.5), "timeout_seconds: 2.5"),
    ("target", lambda: desired_configuration(NAME, MESH, "https://x/", CA_1.pem()), "target: str"),  # type: ignore[arg-type]
    ("not PEM", lambda: desired(pem=b"hello"), "ca_bundle_pem: not a PEM certificate"),
    ("empty PEM", lambda: desired(pem=b""), "ca_bundle_pem:"),
    ("key PEM", lambda: desired(pem=CA_1.pem() + CA_1.key_pem()), "ca_bundle_pem: holds PEM blocks other than"),
    ("http url", lambda: WebhookTarget(url="http://localhost/mutate"), "WebhookTarget.url: 'http://localhost/mutate'"),
    ("no host", lambda: WebhookTarget(url="https:///mutate"), "WebhookTarget.url: 'https:///mutate' has no host"),
    ("user", lambda: WebhookTarget(url="https://u:pw@x/mutate"), "WebhookTarget.url: a user or password"),
    ("query", lambda: WebhookTarget(url="https://x/mutate?a=1"), "WebhookTarget.url: 'https://x/mutate?a=1': a query"),
    ("fragment", lambda: WebhookTarget(url="https://x/mutate#f"), "a query or fragment is not allowed"),
    ("bad port", lambda: WebhookTarget(url="https://x:http/mutate"), "WebhookTarget.url: 'https://x:http/mutate'"),
    ("both", lambda: WebhookTarget(*SERVICE, url="https://x/"), "WebhookTarget: give either url or a Service"),
    ("neither", WebhookTarget, "WebhookTarget: give a url or a Service"),
    ("url path", lambda: WebhookTarget(url="https://x/", path="/other"), "WebhookTarget: port and path belong"),
    ("namespace", lambda: WebhookTarget("Mesh", "injector"), "WebhookTarget.namespace: 'Mesh'"),
    ("no name", lambda: WebhookTarget("mesh", ""), "WebhookTarget.name: ''"),
    ("name", lambda: WebhookTarget("mesh", "1injector"), "WebhookTarget.name: '1injector'"),
    ("port", lambda: WebhookTarget(*SERVICE, port=0), "WebhookTarget.port: 0"),
    ("port high", lambda: WebhookTarget(*SERVICE, port=70000), "WebhookTarget.port: 70000"),
    ("path", lambda: WebhookTarget(*SERVICE, path="mutate"), "WebhookTarget.path: 'mutate' does not start with /"),
    ("path query", lambda: WebhookTarget(*SERVICE, path="/mutate?x"), "WebhookTarget.path: '/mutate?x' is not"),
]


@pytest.mark.parametrize(("case", "call", "message"), BAD_ARGUMENTS, ids=[c for c, _, _ in BAD_ARGUMENTS])
def test_bad_arguments_are_named(case: str, call: Callable[[], object], message: str) -> None:
    with pytest.raises(ValueError) as raised:
        call()
    assert message in str(raised.value)


def test_a_private_key_is_named_never_shown() -> None:
    key = CA_1.key_pem()
    with pytest.raises(ValueError) as raised:
        desired(pem=CA_1.pem() + key)
    assert "PRIVATE KEY" in str(raised.value)
    body = b"".join(line for line in key.splitlines() if not line.startswith(b"-----"))
    assert body[:20].decode() not in str(raised.value)


def test_a_bad_bundle_is_the_callers_error_and_changes_nothing(cluster: Cluster) -> None:
    writer = cluster.writer()
    before = writer.desired()
    with pytest.raises(ValueError, match="ca_bundle_pem"):
        writer.set_bundle("not a certificate")
    assert writer.desired() == before
    other = WebhookConfigurations(cluster.client(), "another-name", lambda pem: desired(pem.encode()))
    with pytest.raises(ValueError, match="named 'mesh-identity-injector', not 'another-name'"):
        other.set_bundle(CA_1.pem().decode())


# ------------------------------------------------------------------------------------------ the writer


def test_created_when_missing_then_left_as_it_is(cluster: Cluster) -> None:
    writer = cluster.writer(resync_period=None)
    assert writer.sync()
    assert writer.created == 1 and writer.in_sync and writer.last_error == ""
    assert in_sync(cluster)
    assert writer.sync() and writer.sync()
    assert cluster.writes() == [("create", 201)]
    assert writer.status() == wc.WebhookConfigStatus(NAME, True, 1, 0, 0, "", "", False)


def test_nothing_is_written_before_the_bundle_is_known(cluster: Cluster) -> None:
    writer = cluster.writer(pem=None)
    assert writer.sync()
    assert cluster.requests() == [] and cluster.stored() is None


def test_a_deleted_configuration_is_recreated_at_once(cluster: Cluster) -> None:
    writer = cluster.writer()
    writer.start()
    wait_until(lambda: in_sync(cluster), "the configuration created")
    assert cluster.server.wait_for_watch(user=WRITER, kind=MUTATING_WEBHOOK_CONFIGURATION)
    cluster.delete()
    wait_until(lambda: writer.created == 2 and in_sync(cluster), "the configuration created again", timeout=10)
    assert writer.status().watching and writer.events >= 1


def _ca_bundle(obj: dict[str, Any]) -> None:
    obj["webhooks"][0]["clientConfig"]["caBundle"] = base64.b64encode(CA_2.pem()).decode()


def _failure_policy(obj: dict[str, Any]) -> None:
    obj["webhooks"][0]["failurePolicy"] = "Ignore"


def _no_webhook(obj: dict[str, Any]) -> None:
    obj["webhooks"] = []


def _every_namespace(obj: dict[str, Any]) -> None:
    obj["webhooks"][0]["namespaceSelector"] = {}


def _another_webhook(obj: dict[str, Any]) -> None:
    extra = copy.deepcopy(obj["webhooks"][0])
    extra["name"] = "extra.example.org"
    obj["webhooks"].append(extra)


def _labels(obj: dict[str, Any]) -> None:
    del obj["metadata"]["labels"]["mesh-identity.io/mesh"]


@pytest.mark.parametrize(
    "change",
    [_ca_bundle, _failure_policy, _no_webhook, _every_namespace, _another_webhook, _labels],
    ids=["caBundle", "failurePolicy", "webhook removed", "namespaceSelector", "webhook added", "mesh label"],
)
def test_an_edit_of_what_we_own_is_restored_at_once(
    cluster: Cluster, change: Callable[[dict[str, Any]], None], caplog: pytest.LogCaptureFixture
) -> None:
    writer = cluster.writer()
    writer.start()
    wait_until(lambda: in_sync(cluster), "the configuration created")
    assert cluster.server.wait_for_watch(user=WRITER, kind=MUTATING_WEBHOOK_CONFIGURATION)

    def edit(obj: dict[str, Any]) -> None:
        change(obj)
        obj["metadata"]["labels"]["team"] = "platform"  # not ours: kept
        obj["metadata"]["annotations"] = {"example.org/note": "kept"}

    with caplog.at_level(logging.INFO, logger=wc.__name__):
        cluster.edit(edit)
        wait_until(lambda: writer.replaced == 1 and in_sync(cluster), "the edit restored", timeout=10)
    stored = cluster.stored()
    assert stored is not None
    assert stored["metadata"]["labels"]["team"] == "platform"
    assert stored["metadata"]["annotations"] == {"example.org/note": "kept"}
    assert cluster.writes() == [("create", 201), ("update", 200)]
    (restored,) = [r for r in caplog.records if r.name == wc.__name__ and "restored" in r.getMessage()]
    assert restored.levelno == logging.WARNING
    assert base64.b64encode(CA_2.pem()).decode()[:40] not in restored.getMessage()  # field names, never values


def test_an_edit_of_what_we_do_not_own_is_left(cluster: Cluster) -> None:
    writer = cluster.writer()
    assert writer.sync()

    def edit(obj: dict[str, Any]) -> None:
        obj["metadata"]["labels"]["team"] = "platform"
        obj["metadata"]["annotations"] = {"example.org/note": "mine"}

    cluster.edit(edit)
    assert writer.sync() and writer.replaced == 0
    assert cluster.writes() == [("create", 201)]


def test_a_new_bundle_updates_it(cluster: Cluster) -> None:
    writer = cluster.writer()
    writer.start()
    wait_until(lambda: in_sync(cluster), "the configuration created")
    writer.set_bundle((CA_1.pem() + CA_2.pem()).decode())  # a rotation's overlap: both CAs
    wait_until(lambda: in_sync(cluster, CA_1.pem() + CA_2.pem()), "both CAs in the caBundle", timeout=10)
    writer.set_bundle(CA_2.pem().decode())
    # the writer counts a write once the server has answered it: wait for the count too, not only the object
    wait_until(lambda: in_sync(cluster, CA_2.pem()) and writer.replaced == 2, "the new CA alone", timeout=10)
    assert writer.replaced == 2 and writer.created == 1
    assert [verb for verb, _ in cluster.writes()] == ["create", "update", "update"]


def test_the_watch_survives_ended_streams_and_compaction(cluster: Cluster) -> None:
    writer = cluster.writer()
    writer.start()
    wait_until(lambda: in_sync(cluster), "the configuration created")
    assert cluster.server.wait_for_watch(user=WRITER, kind=MUTATING_WEBHOOK_CONFIGURATION)
    cluster.namespace("elsewhere", mesh=None)  # a write after the writer's last event
    since = cluster.server.compact()
    cluster.server.end_watches()
    assert cluster.server.wait_for_watch(user=WRITER, kind=MUTATING_WEBHOOK_CONFIGURATION, since=since)
    cluster.edit(_failure_policy)
    wait_until(lambda: writer.replaced == 1 and in_sync(cluster), "the edit restored", timeout=10)
    assert writer.streams >= 2


def test_the_resync_repairs_what_no_watch_told(cluster: Cluster) -> None:
    writer = cluster.writer(resync_period=0.2)
    cluster.server.deny("watch", "mutatingwebhookconfigurations")
    writer.start()
    wait_until(lambda: in_sync(cluster), "the configuration created")
    cluster.edit(_ca_bundle)
    wait_until(lambda: writer.replaced == 1 and in_sync(cluster), "the edit restored by a resync", timeout=10)
    assert "not allowed to watch MutatingWebhookConfiguration" in writer.watch_error
    assert writer.events == 0


def test_a_configuration_that_is_not_ours_is_left_alone(cluster: Cluster, caplog: pytest.LogCaptureFixture) -> None:
    foreign = desired()
    foreign["metadata"]["labels"] = {"app.kubernetes.io/managed-by": "someone-else"}
    foreign["webhooks"][0]["failurePolicy"] = "Ignore"
    cluster.create(foreign)
    before = cluster.stored()
    writer = cluster.writer()
    with caplog.at_level(logging.ERROR, logger=wc.__name__):
        assert writer.sync() and writer.sync() and writer.sync()
    assert [r.levelno for r in caplog.records if r.name == wc.__name__] == [logging.ERROR]  # logged once
    assert "without the label app.kubernetes.io/managed-by=mesh-identity" in writer.refusal
    assert "left alone" in writer.refusal and not writer.in_sync
    assert writer.status().refusal == writer.refusal
    assert cluster.stored() == before and cluster.writes() == []

    cluster.delete()  # once it is gone, ours is written
    assert writer.sync() and in_sync(cluster) and writer.refusal == ""


def test_another_meshs_configuration_is_left_alone(cluster: Cluster) -> None:
    other = desired_configuration(NAME, "other", URL, CA_2.pem())
    cluster.create(other)
    writer = cluster.writer()
    assert writer.sync()
    assert "belongs to the mesh 'other', not 'demo'" in writer.refusal
    stored = cluster.stored()
    assert stored is not None and stored["webhooks"] == other["webhooks"] and cluster.writes() == []


def test_a_replica_that_does_not_lead_writes_nothing(cluster: Cluster) -> None:
    leads = False
    writer = cluster.writer(is_leader=lambda: leads, resync_period=0.05)
    writer.start()
    wait_until(lambda: writer.passes >= 5, "a few passes")
    assert cluster.requests() == [] and cluster.stored() is None  # not even a read or a watch
    leads = True
    wait_until(lambda: in_sync(cluster), "the configuration created once it leads", timeout=10)
    assert cluster.server.wait_for_watch(user=WRITER, kind=MUTATING_WEBHOOK_CONFIGURATION)


def test_leadership_lost_before_the_write_writes_nothing(cluster: Cluster) -> None:
    answers = iter([True, False])  # leads when the pass starts, no longer when it would write
    writer = cluster.writer(is_leader=lambda: next(answers, False))
    assert not writer.sync()
    assert cluster.writes() == [] and cluster.stored() is None


def test_a_replace_that_lost_a_race_gets_409_and_reads_again(cluster: Cluster) -> None:
    writer = cluster.writer()
    assert writer.sync()
    cluster.edit(_failure_policy)
    calls = 0

    def leads() -> bool:
        nonlocal calls
        calls += 1
        if calls == 2:  # between the writer's read and its write, another writer changes the object
            cluster.edit(_ca_bundle)
        return True

    writer.is_leader = leads
    assert not writer.sync()
    assert writer.conflicts == 1 and "409" in writer.last_error and not writer.in_sync
    assert writer.sync() and in_sync(cluster)
    assert cluster.writes() == [("create", 201), ("update", 409), ("update", 200)]
    assert writer.replaced == 1 and writer.last_error == ""


def test_a_create_that_lost_a_race_reads_the_winners(cluster: Cluster) -> None:
    calls = 0
    foreign = desired()
    foreign["metadata"]["labels"] = {}

    def leads() -> bool:
        nonlocal calls
        calls += 1
        if calls == 2:  # someone creates it between the writer's read (404) and its create
            cluster.create(foreign)
        return True

    writer = cluster.writer(is_leader=leads)
    assert not writer.sync()
    assert writer.conflicts == 1 and "AlreadyExists" in writer.last_error
    assert writer.sync() and "not ours" in writer.refusal
    assert cluster.writes() == [("create", 409)]


def test_an_api_error_is_kept_for_status_and_retried(cluster: Cluster) -> None:
    rule = cluster.server.deny("get", "mutatingwebhookconfigurations")
    writer = cluster.writer(resync_period=None)
    writer.start()
    wait_until(lambda: "not allowed to read MutatingWebhookConfiguration mesh-identity-injector" in writer.last_error,
               "the refused read reported")  # fmt: skip
    assert not writer.status().in_sync
    cluster.server.allow(rule)
    wait_until(lambda: in_sync(cluster) and writer.last_error == "", "created once allowed", timeout=10)


def test_a_server_default_we_do_not_know_costs_one_write_at_most(tmp_path: Path) -> None:
    """A newer API server may default a field this version does not write (here ``matchConditions: []``): the
    object as the server answered our write is taken as ours, so the writer does not replace it forever."""
    prepare = MUTATING_WEBHOOK_CONFIGURATION.prepare
    assert prepare is not None

    def newer(obj: dict[str, Any]) -> None:
        prepare(obj)
        for webhook in obj.get("webhooks") or []:
            webhook.setdefault("matchConditions", [])

    server = KubeServer(tokens=TOKENS)
    server.register(dataclasses.replace(MUTATING_WEBHOOK_CONFIGURATION, prepare=newer))
    with running(server, tmp_path) as cluster:
        writer = cluster.writer()
        assert writer.sync() and writer.sync() and writer.sync()
        assert cluster.writes() == [("create", 201)]
        restarted = cluster.writer()  # a new leader: it has not seen its own write
        assert restarted.sync() and restarted.sync() and restarted.sync()
        assert cluster.writes() == [("create", 201), ("update", 200)]


# ------------------------------------------------------------------------------------------ the client


def test_the_client_reads_and_follows_the_cluster_scoped_object(cluster: Cluster) -> None:
    client = cluster.client()
    assert client.read(MUTATING_WEBHOOK_CONFIGURATIONS, "", NAME) is None
    assert client.list_webhook_configuration(NAME).items == ()
    with pytest.raises(ValueError, match="cluster-scoped"):
        client.read(MUTATING_WEBHOOK_CONFIGURATIONS, "default", NAME)
    made = client.create(MUTATING_WEBHOOK_CONFIGURATIONS, "", desired())
    cluster.create(desired_configuration("another", MESH, URL, CA_1.pem()))
    (listed,) = client.list_webhook_configuration(NAME).items
    assert listed["metadata"]["uid"] == made["metadata"]["uid"]
    stale = copy.deepcopy(made)
    cluster.edit(_failure_policy)
    with pytest.raises(KubeApiError) as raised:
        client.replace(MUTATING_WEBHOOK_CONFIGURATIONS, "", stale)
    assert raised.value.code == 409
    assert f"replace MutatingWebhookConfiguration {NAME} at resourceVersion" in str(raised.value)


def test_the_cluster_role_changes_the_configuration_by_name_only() -> None:
    documents = [d for d in yaml.safe_load_all((ROOT / "deploy" / "rbac.yaml").read_text()) if d]
    (role,) = [d for d in documents if d["kind"] == "ClusterRole"]
    rules = [r for r in role["rules"] if "mutatingwebhookconfigurations" in r["resources"]]
    assert {v for r in rules for v in r["verbs"]} == {"get", "list", "watch", "update", "create"}
    for rule in rules:
        assert rule["apiGroups"] == ["admissionregistration.k8s.io"]
        assert rule["resources"] == ["mutatingwebhookconfigurations"]
        if rule["verbs"] != ["create"]:
            assert rule["resourceNames"] == [wc.NAME], rule
        else:
            assert "resourceNames" not in rule  # create cannot be restricted by name


# ------------------------------------------------------------------------------------------ end to end


def serving_pair(ca: TestCa, directory: Path) -> tuple[Path, Path]:
    certificate, key = ca.leaf(dns=["localhost", f"{SERVICE[1]}.{SERVICE[0]}.svc"], ips=["127.0.0.1"])
    (directory / "tls.crt").write_bytes(certificate.public_bytes(serialization.Encoding.PEM))
    (directory / "tls.key").write_bytes(key_pem(key))
    return directory / "tls.crt", directory / "tls.key"


def app_pod(namespace: str, name: str = "web-1") -> dict[str, Any]:
    found = pod()
    found["metadata"].update(namespace=namespace, name=name)
    return found


def created_pod(cluster: Cluster, namespace: str, name: str = "web-1") -> dict[str, Any]:
    core = kubernetes.client.CoreV1Api(cluster.api)
    response = core.create_namespaced_pod(namespace, app_pod(namespace, name), _preload_content=False)
    return dict(json.loads(response.read()))


def injected(obj: dict[str, Any]) -> bool:
    containers = [c["name"] for c in obj["spec"]["containers"]]
    return containers == ["app", p.ENVOY_CONTAINER, p.AGENT_CONTAINER] and (
        obj["metadata"].get("annotations", {}).get(p.INJECTED) == "true"
    )


def test_pods_of_the_meshs_namespaces_are_injected_through_the_reconciled_configuration(
    cluster: Cluster, tmp_path: Path
) -> None:
    assert cluster.webhooks is not None
    cert, key = serving_pair(CA_1, tmp_path)
    with WebhookServer(Injector(settings()), cert, key) as webhook:
        cluster.namespace("shop")
        cluster.namespace("plain", mesh=None)
        cluster.namespace("theirs", mesh="other")
        target = WebhookTarget(url=f"https://localhost:{webhook.address[1]}/mutate")
        writer = cluster.writer(target=target)
        writer.start()
        wait_until(lambda: writer.in_sync, "the configuration reconciled")

        assert injected(created_pod(cluster, "shop"))
        assert not injected(created_pod(cluster, "plain"))
        assert not injected(created_pod(cluster, "theirs"))
        assert [c.review["request"]["namespace"] for c in cluster.webhooks.calls] == ["shop"]
        pods = cluster.server.objects(kind_named(cluster.server.kinds, "Pod"), "shop")
        assert len(pods) == 1 and injected(pods[0])


def test_a_service_target_and_a_serving_ca_rotation(cluster: Cluster, tmp_path: Path) -> None:
    assert cluster.webhooks is not None
    cert, key = serving_pair(CA_1, tmp_path)
    with WebhookServer(Injector(settings()), cert, key) as webhook:
        cluster.webhooks.route_service(*SERVICE, address=webhook.address)
        cluster.namespace("shop")
        service = WebhookTarget(*SERVICE)
        writer = cluster.writer(target=service)
        writer.start()
        wait_until(lambda: writer.in_sync, "the configuration reconciled")
        assert injected(created_pod(cluster, "shop", "web-1"))
        assert cluster.webhooks.calls[0].url.startswith("https://mesh-identity-injector.mesh-identity-system.svc:443/")

        # the rotation: both CAs published first, then the webhook serves the new CA's certificate
        writer.set_bundle((CA_1.pem() + CA_2.pem()).decode())
        wait_until(lambda: in_sync(cluster, CA_1.pem() + CA_2.pem(), service), "both CAs published", timeout=10)
        serving_pair(CA_2, tmp_path)
        assert injected(created_pod(cluster, "shop", "web-2"))
        writer.set_bundle(CA_2.pem().decode())
        wait_until(lambda: in_sync(cluster, CA_2.pem(), service) and writer.replaced == 2, "the old CA retired", 10)
        assert injected(created_pod(cluster, "shop", "web-3"))
        assert writer.replaced == 2
