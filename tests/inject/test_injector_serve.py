"""The injector as ``mesh-identity serve`` runs it (``compose.build`` with ``inject``), against the Kubernetes API test
server: the MutatingWebhookConfiguration appears with the mesh's roots as its caBundle, the API server calls the
webhook over HTTPS verified by that caBundle (the webhook's certificate names ``<service>.<namespace>.svc``), and
pods created while the serving certificate rotates, every few seconds, are all injected: no admission fails.
No Secret is written by any of it."""

from __future__ import annotations

import base64
import json
import threading
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import kubernetes
import pytest
from cryptography import x509
from prometheus_client.parser import text_string_to_metric_families

from mesh_identity.compose import Stage, System, build
from mesh_identity.config import parse_config
from mesh_identity.inject.component import InjectorComponent
from mesh_identity.ports import free_port
from tests.e2e.kubepods import PodCluster, kube_cluster
from tests.fakes.kube.admission import MutatingWebhooks
from tests.metrics.test_alerts import injector_metrics
from tests.waiting import wait_until

MESH = "demo"
WEBHOOK_SERVICE = ("mesh-identity-system", "mesh-identity-injector")


@dataclass
class Plane:
    cluster: PodCluster
    webhooks: MutatingWebhooks
    system: System

    @property
    def injector(self) -> InjectorComponent:
        assert self.system.injector is not None
        return self.system.injector

    def configuration(self) -> dict[str, Any] | None:
        api = kubernetes.client.AdmissionregistrationV1Api(self.cluster.api)
        try:
            found = api.read_mutating_webhook_configuration("mesh-identity-injector", _preload_content=False)
        except kubernetes.client.ApiException as err:
            if err.status == 404:
                return None
            raise
        return dict(json.loads(found.data))

    def create_pod(self, name: str) -> dict[str, Any]:
        body = {
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": {"name": name, "namespace": "shop", "labels": {"app": "web"}},
            "spec": {
                "serviceAccountName": "web",
                "containers": [{"name": "app", "image": "example.org/web:1", "ports": [{"containerPort": 8080}]}],
            },
        }
        response = self.cluster.core.create_namespaced_pod("shop", body, _preload_content=False)
        return dict(json.loads(response.data))


def _config(tmp_path: Path, kubeconfig: Path, port: int, cert_ttl: str) -> dict[str, Any]:
    return {
        "trust_domain": "cluster.local",
        "state_dir": "state",
        "metrics": {"listen": "127.0.0.1:0"},
        "xds": {"listen": "127.0.0.1:0", "secrets": "agent"},
        "signing": {
            "listen": "127.0.0.1:0",
            "attest_listen": "127.0.0.1:0",
            "kubernetes": {"kubeconfig": str(kubeconfig)},
        },
        "registry": {"kind": "kubernetes", "mesh_name": MESH, "kubeconfig": str(kubeconfig), "namespace": "mesh"},
        "plugins": {"audit": {"enabled": False}},
        "inject": {
            "listen": f"127.0.0.1:{port}",
            "cert_ttl": cert_ttl,
            "webhook": {"service": {"namespace": WEBHOOK_SERVICE[0], "name": WEBHOOK_SERVICE[1]}},
            "sidecars": {"xds": "10.96.0.5:15010", "signing": "10.96.0.5:15011", "attest": "10.96.0.5:15012"},
        },
    }


@pytest.fixture
def plane(tmp_path: Path) -> Iterator[Plane]:
    with kube_cluster() as cluster:
        webhooks = MutatingWebhooks.install(cluster.server)
        port = free_port()
        webhooks.route_service(*WEBHOOK_SERVICE, address=("127.0.0.1", port))
        for namespace in ("mesh", "shop"):
            cluster.namespace(namespace, MESH if namespace == "shop" else None)
        cluster.namespace("elsewhere", None)
        for namespace in ("shop", "elsewhere"):
            cluster.service_account(namespace, "web")
        kubeconfig = cluster.server.write_kubeconfig(tmp_path / "kubeconfig")
        config = parse_config(_config(tmp_path, kubeconfig, port, "10s"), tmp_path)
        system = build(config, Stage.SERVER, create=True)
        assert system.service is not None
        system.service.start()
        try:
            yield Plane(cluster, webhooks, system)
        finally:
            system.service.stop()


def test_serve_keeps_the_webhook_configuration_with_the_mesh_roots_and_injects_pods(plane: Plane) -> None:
    wait_until(lambda: plane.configuration() is not None, "the MutatingWebhookConfiguration", 30)
    found = plane.configuration()
    assert found is not None
    [webhook] = found["webhooks"]
    assert webhook["clientConfig"]["service"]["name"] == "mesh-identity-injector"
    assert webhook["failurePolicy"] == "Fail"
    assert webhook["namespaceSelector"] == {"matchLabels": {"mesh-identity.io/monitored-by": MESH}}
    roots = x509.load_pem_x509_certificates(base64.b64decode(webhook["clientConfig"]["caBundle"]))
    assert plane.system.authority is not None
    assert roots == list(plane.system.authority.bundle().authorities)
    served = plane.injector.certificates.current
    assert served is not None
    assert served.leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value.get_values_for_type(
        x509.DNSName
    ) == ["mesh-identity-injector.mesh-identity-system.svc"]

    pod = plane.create_pod("web-0")
    names = [c["name"] for c in pod["spec"]["containers"]]
    assert names == ["app", "mesh-identity-envoy", "mesh-identity-agent"]
    assert pod["metadata"]["annotations"]["mesh-identity.io/injected"] == "true"

    # someone deletes the configuration: it comes back, and pods are injected again
    api = kubernetes.client.AdmissionregistrationV1Api(plane.cluster.api)
    api.delete_mutating_webhook_configuration("mesh-identity-injector")
    wait_until(lambda: plane.configuration() is not None, "the configuration recreated", 30)
    assert [c["name"] for c in plane.create_pod("web-1")["spec"]["containers"]][1:] == [
        "mesh-identity-envoy",
        "mesh-identity-agent",
    ]
    assert plane.cluster.core.list_secret_for_all_namespaces().items == []  # nothing of this holds a key anywhere


def test_the_injector_metrics_the_alerts_name_are_exported(plane: Plane) -> None:
    wait_until(lambda: plane.configuration() is not None, "the MutatingWebhookConfiguration", 30)
    for name in ("web-0", "web-1"):
        assert plane.create_pod(name)["metadata"]["annotations"]["mesh-identity.io/injected"] == "true"
    assert plane.system.service is not None
    with urllib.request.urlopen(plane.system.service.url + "/metrics", timeout=30) as response:
        text = response.read().decode()
    samples = {s.name: s for family in text_string_to_metric_families(text) for s in family.samples}
    names = injector_metrics()
    assert names and names <= set(samples), sorted(names - set(samples))
    assert samples["mesh_identity_injector_admissions_total"].labels == {"outcome": "injected"}
    assert samples["mesh_identity_injector_admissions_total"].value == 2
    served = plane.injector.certificates.current
    assert served is not None
    expiry = samples["mesh_identity_injector_certificate_expiry_timestamp_seconds"].value
    assert expiry == served.leaf.not_valid_after_utc.timestamp()


def test_pods_created_while_the_serving_certificate_rotates_are_all_injected(plane: Plane) -> None:
    wait_until(lambda: plane.configuration() is not None, "the MutatingWebhookConfiguration", 30)
    certificates = plane.injector.certificates
    assert plane.injector.server is not None
    tls = plane.injector.server.tls
    first = certificates.issued
    failures: list[str] = []
    created: list[str] = []
    stop = threading.Event()

    def create() -> None:
        index = 0
        while not stop.is_set() and index < 2000:
            name = f"rot-{index}"
            try:
                pod = plane.create_pod(name)
                containers = [c["name"] for c in pod["spec"]["containers"]]
                if "mesh-identity-envoy" not in containers:
                    failures.append(f"{name}: not injected: {containers}")
                created.append(name)
            except kubernetes.client.ApiException as err:
                failures.append(f"{name}: {err.status} {err.body}")
            index += 1

    worker = threading.Thread(target=create)
    worker.start()
    try:
        # the certificate lives 10 s and is renewed at half of it: wait for three renewals (bounded)
        wait_until(lambda: certificates.issued >= first + 3 and tls.reloads >= 3, "three certificate rotations", 60)
    finally:
        stop.set()
        worker.join(60)
    assert not worker.is_alive()
    assert failures == []
    assert len(created) >= 20, created  # pods were being created all along
    # every renewal was loaded by the server, and the pods of each period were admitted with it
    assert tls.reloads >= certificates.issued - first
