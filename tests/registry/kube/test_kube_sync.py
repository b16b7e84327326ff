"""The Kubernetes registry against the test API server, through the real client: the first sync, and the mesh
following pods, Services, ServiceAccounts and namespace labels as they change."""

from __future__ import annotations

from mesh_identity.mesh.model import Address, Instance, Protocol
from mesh_identity.registry.kube import INBOUND_PORT
from mesh_identity.spiffe import SpiffeId
from tests.registry.kube.conftest import TD, Cluster, Start
from tests.waiting import wait_until

WEB = SpiffeId.for_kubernetes(TD, "shop", "web")
API = SpiffeId.for_kubernetes(TD, "shop", "api")


def shop(cluster: Cluster, *, web_pods: int = 1, api_pods: int = 2) -> None:
    cluster.namespace("shop")
    for account in ("web", "api"):
        cluster.service_account("shop", account)
    for i in range(web_pods):
        cluster.pod("shop", f"web-{i}", "web", {"app": "web"})
    for i in range(api_pods):
        cluster.pod("shop", f"api-{i}", "api", {"app": "api"}, port=9090)
    cluster.service("shop", "web", {"app": "web"})
    cluster.service("shop", "api", {"app": "api"}, target=9090, port_name="tcp-api", app_protocol="tcp")


def nodes(registry, service: str) -> list[str]:  # type: ignore[no-untyped-def]
    found = registry.current().mesh.services.get(service)
    return sorted(i.node for i in found.instances) if found is not None else []


def test_the_first_sync_publishes_the_services_their_identities_and_sidecars(
    cluster: Cluster, start_registry: Start
) -> None:
    shop(cluster)
    cluster.namespace("elsewhere", mesh=None)  # not of the mesh: ignored
    cluster.service_account("elsewhere", "web")
    cluster.pod("elsewhere", "web-0", "web", {"app": "web"})
    cluster.service("elsewhere", "web", {"app": "web"})
    wait_until(lambda: len(cluster.server.objects(cluster.kind("EndpointSlice"))) == 3, "the slices of the 3 Services")

    registry = start_registry()  # start() returns once a first mesh is made from a full view of the API

    assert registry.synced
    mesh = registry.current().mesh
    assert sorted(mesh.services) == ["api.shop", "web.shop"]
    assert mesh.identities == {WEB, API}
    web = mesh.services["web.shop"]
    ip = cluster.ip_of("shop", "web-0")
    assert web.instances == (Instance("web-0.shop", Address(ip, 8080), Address(ip, INBOUND_PORT), "node-a"),)
    assert web.protocol is Protocol.HTTP
    api = mesh.services["api.shop"]
    assert api.protocol is Protocol.TCP  # appProtocol: tcp
    assert sorted(i.node for i in api.instances) == ["api-0.shop", "api-1.shop"]
    assert {i.app.port for i in api.instances} == {9090}
    assert mesh.node_identity("api-1.shop") == API
    assert mesh.identities_on_host("node-a") == {WEB, API}
    assert not registry.refusals and not cluster.events()


def test_pods_scaled_up_and_down_add_and_remove_sidecars_and_identities(
    cluster: Cluster, start_registry: Start
) -> None:
    shop(cluster, api_pods=1)
    registry = start_registry()
    version = registry.current().version

    cluster.pod("shop", "api-1", "api", {"app": "api"}, port=9090)
    wait_until(lambda: nodes(registry, "api.shop") == ["api-0.shop", "api-1.shop"], "api-1 as a sidecar of api")
    assert registry.current().version > version

    cluster.run("shop", "api-1", ready=False)  # not ready: no longer an endpoint
    wait_until(lambda: nodes(registry, "api.shop") == ["api-0.shop"], "api-1 out of the endpoints")

    cluster.delete_pod("shop", "api-0")
    cluster.run("shop", "api-1", ready=True)
    wait_until(lambda: nodes(registry, "api.shop") == ["api-1.shop"], "api-0 gone, api-1 back")

    cluster.delete_pod("shop", "api-1")  # the last pod of service account api
    wait_until(lambda: API not in registry.current().identities, "the api identity to leave the mesh")
    assert "api.shop" not in registry.current().mesh.services
    assert WEB in registry.current().identities


def test_a_pod_that_is_not_running_is_no_sidecar(cluster: Cluster, start_registry: Start) -> None:
    shop(cluster, api_pods=1)
    cluster.pod("shop", "web-1", "web", {"app": "web"}, run=False)  # Pending, no IP
    registry = start_registry()
    assert nodes(registry, "web.shop") == ["web-0.shop"]
    cluster.run("shop", "web-1")
    wait_until(lambda: nodes(registry, "web.shop") == ["web-0.shop", "web-1.shop"], "web-1 once it runs")


def test_a_namespace_whose_label_is_removed_leaves_the_mesh(cluster: Cluster, start_registry: Start) -> None:
    shop(cluster)
    cluster.namespace("billing")
    cluster.service_account("billing", "ledger")
    cluster.pod("billing", "ledger-0", "ledger", {"app": "ledger"})
    cluster.service("billing", "ledger", {"app": "ledger"})
    ledger = SpiffeId.for_kubernetes(TD, "billing", "ledger")
    registry = start_registry()
    wait_until(lambda: ledger in registry.current().identities, "billing's identity")

    cluster.label_namespace("shop", None)
    wait_until(lambda: registry.current().identities == {ledger}, "shop's identities to leave")

    cluster.label_namespace("shop", "another-mesh")  # labelled for another mesh: still not ours
    cluster.namespace("late")  # written after it: once it is in the mesh, the relabelling has been seen too
    cluster.service_account("late", "batch")
    cluster.pod("late", "batch-0", "batch", {"app": "batch"})
    cluster.service("late", "batch", {"app": "batch"})
    batch = SpiffeId.for_kubernetes(TD, "late", "batch")
    wait_until(lambda: batch in registry.current().identities, "the namespace created after the relabelling")
    assert registry.current().identities == {ledger, batch}

    cluster.label_namespace("shop", "demo")
    wait_until(lambda: registry.current().identities == {ledger, batch, WEB, API}, "shop back in the mesh")


def test_a_pod_of_a_service_account_that_does_not_exist_is_refused_with_an_event(
    cluster: Cluster, start_registry: Start
) -> None:
    shop(cluster)
    cluster.pod("shop", "web-9", "ghost", {"app": "web"})  # the admission plugin of a real cluster would refuse it
    registry = start_registry()
    assert nodes(registry, "web.shop") == ["web-0.shop"]
    events = wait_until(lambda: cluster.events("shop"), "an Event on the pod")
    (event,) = events
    assert event["involvedObject"]["kind"] == "Pod" and event["involvedObject"]["name"] == "web-9"
    assert event["reason"] == "UnknownServiceAccount" and event["type"] == "Warning"
    assert "service account 'ghost', which does not exist" in event["message"]


def test_a_service_whose_pods_run_as_several_service_accounts_is_refused(
    cluster: Cluster, start_registry: Start
) -> None:
    shop(cluster)
    cluster.pod("shop", "intruder", "api", {"app": "web"})
    registry = start_registry()
    wait_until(lambda: "web.shop" not in registry.current().mesh.services and registry.refusals, "web refused")
    (refusal,) = registry.refusals
    assert refusal.reason == "SeveralServiceAccounts"
    assert refusal.message == (
        "Service shop/web selects pods of the service accounts api, web; a mesh service has one identity: it is left out"
    )
    event = wait_until(lambda: cluster.events("shop"), "the Event")[0]
    assert event["involvedObject"]["kind"] == "Service" and event["message"] == refusal.message
