"""The real webhook called by the Kubernetes API test server as a real API server calls it: the
MutatingWebhookConfiguration registered through the real ``kubernetes`` client (caBundle = the webhook CA's root),
pods created with the client and with ``kubectl apply`` come back injected; opted-out pods and pods of an
unmonitored namespace come back as they were; a caBundle that does not verify the webhook refuses the create
(failurePolicy Fail) or lets it through unmodified (Ignore); a denial reaches kubectl's stderr, and so does the
webhook's probe warning (a ``Warning`` header); ``kubectl apply --dry-run=server`` prints the injected pod and
stores nothing. (The kubectl
tests are deselected, with the reason in pytest's header, where kubectl is not installed: tests/inject/conftest.py.)
"""

from __future__ import annotations

import base64
import copy
import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import kubernetes
import pytest
from cryptography.hazmat.primitives import serialization

from mesh_identity.inject import patch as p
from mesh_identity.inject.review import Injector
from mesh_identity.inject.server import WebhookServer
from tests.fakes.kube import DEFAULT_KINDS, SECRET, ApiError, KubeServer
from tests.fakes.kube.admission import MUTATING_WEBHOOK_CONFIGURATION, MutatingWebhooks, rules_match, selector_matcher
from tests.fakes.kube.kubectl import kubectl_for
from tests.fakes.kube.server import Warnings
from tests.fakes.kube.workloads import kind_named, schema_errors, workload_kinds
from tests.inject.kit import pod, settings
from tests.pki import TestCa, key_pem

MONITORED = "mesh-identity.io/monitored-by"
WEBHOOK = "inject.mesh-identity.io"
SERVICE = ("mesh-identity", "mesh-identity-injector")

# The real API server appends ``?timeout=<n>s`` to the webhook's path (``Post "https://...:443/mutate?timeout=10s"``);
# set False while mesh_identity.inject.server compares the whole request target with "/mutate" (it answers 404 to
# the real server's call: see test_the_webhook_takes_the_real_servers_timeout_query).
TIMEOUT_QUERY = True


@dataclass
class Setup:
    server: KubeServer
    api: kubernetes.client.ApiClient
    webhooks: MutatingWebhooks
    webhook: WebhookServer
    ca: TestCa

    @property
    def core(self) -> kubernetes.client.CoreV1Api:
        return kubernetes.client.CoreV1Api(self.api)

    def register(
        self, *, failure_policy: str = "Fail", ca_pem: bytes | None = None, service: bool = False, name: str = WEBHOOK
    ) -> None:
        """The MutatingWebhookConfiguration of the injector, created through the real client."""
        host, port = self.webhook.address
        bundle = base64.b64encode(ca_pem if ca_pem is not None else self.ca.pem()).decode()
        if service:
            self.webhooks.route_service(*SERVICE, address=(host, port))
            client_config: dict[str, Any] = {
                "service": {"namespace": SERVICE[0], "name": SERVICE[1], "path": "/mutate"},
                "caBundle": bundle,
            }
        else:
            client_config = {"url": f"https://localhost:{port}/mutate", "caBundle": bundle}
        body = {
            "apiVersion": "admissionregistration.k8s.io/v1",
            "kind": "MutatingWebhookConfiguration",
            "metadata": {"name": "mesh-identity-injector"},
            "webhooks": [
                {
                    "name": name,
                    "clientConfig": client_config,
                    "rules": [
                        {"operations": ["CREATE"], "apiGroups": [""], "apiVersions": ["v1"], "resources": ["pods"]}
                    ],
                    "namespaceSelector": {"matchExpressions": [{"key": MONITORED, "operator": "Exists"}]},
                    "failurePolicy": failure_policy,
                    "sideEffects": "None",
                    "admissionReviewVersions": ["v1"],
                    "timeoutSeconds": 5,
                }
            ],
        }
        kubernetes.client.AdmissionregistrationV1Api(self.api).create_mutating_webhook_configuration(body)

    def namespace(self, name: str, monitored: bool = True) -> None:
        labels = {MONITORED: "demo"} if monitored else {}
        self.core.create_namespace(
            {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": name, "labels": labels}}
        )


def serving_pair(ca: TestCa, directory: Path) -> tuple[Path, Path]:
    names = ["localhost", f"{SERVICE[1]}.{SERVICE[0]}.svc"]
    certificate, key = ca.leaf(dns=names, ips=["127.0.0.1"])
    (directory / "tls.crt").write_bytes(certificate.public_bytes(serialization.Encoding.PEM))
    (directory / "tls.key").write_bytes(key_pem(key))
    return directory / "tls.crt", directory / "tls.key"


@pytest.fixture
def setup(tmp_path: Path) -> Iterator[Setup]:
    ca = TestCa.create("webhook test CA")
    cert, key = serving_pair(ca, tmp_path)
    server = KubeServer(kinds=(*DEFAULT_KINDS, *workload_kinds()))
    webhooks = MutatingWebhooks.install(server, timeout_query=TIMEOUT_QUERY)
    with (
        server,
        WebhookServer(Injector(settings()), cert, key) as webhook,
        kubernetes.client.ApiClient(server.client_configuration()) as api,
    ):
        found = Setup(server, api, webhooks, webhook, ca)
        found.namespace("shop")
        found.namespace("plain", monitored=False)
        yield found


def app_pod(namespace: str = "shop", name: str = "web-1", annotations: dict[str, str] | None = None) -> dict[str, Any]:
    found = pod(annotations)
    found["metadata"]["namespace"] = namespace
    found["metadata"]["name"] = name
    return found


def assert_injected(obj: dict[str, Any]) -> None:
    spec = obj["spec"]
    assert [c["name"] for c in spec["initContainers"]] == [p.CAPTURE_CONTAINER]
    assert [c["name"] for c in spec["containers"]] == ["app", p.ENVOY_CONTAINER, p.AGENT_CONTAINER]
    assert obj["metadata"]["annotations"][p.INJECTED] == "true"
    assert {v["name"] for v in spec["volumes"]} >= set(p.VOLUMES)
    stored = {k: v for k, v in obj.items() if k != "status"}
    stored["metadata"] = {k: v for k, v in obj["metadata"].items() if k not in ("managedFields",)}
    assert schema_errors(stored) == []


def assert_unmodified(obj: dict[str, Any], sent: dict[str, Any]) -> None:
    assert obj["spec"]["containers"] == sent["spec"]["containers"]
    assert "initContainers" not in obj["spec"] and "volumes" not in obj["spec"]
    assert p.INJECTED not in (obj["metadata"].get("annotations") or {})


# -- through the kubernetes client


def test_a_pod_created_with_the_client_comes_back_injected(setup: Setup) -> None:
    setup.register()
    created = setup.api.sanitize_for_serialization(setup.core.create_namespaced_pod("shop", app_pod()))
    assert_injected(created)
    stored = setup.server.objects(kind_named(setup.server.kinds, "Pod"), "shop")
    assert len(stored) == 1
    assert_injected(stored[0])
    (call,) = setup.webhooks.calls
    request = call.review["request"]
    assert call.review["apiVersion"] == "admission.k8s.io/v1" and call.review["kind"] == "AdmissionReview"
    assert request["operation"] == "CREATE" and request["namespace"] == "shop" and request["name"] == "web-1"
    assert request["kind"] == {"group": "", "version": "v1", "kind": "Pod"}
    assert request["resource"] == {"group": "", "version": "v1", "resource": "pods"}
    assert request["dryRun"] is False and request["userInfo"]["username"]
    assert call.response is not None and call.response["response"]["uid"] == request["uid"]


def test_a_service_client_config_is_called_by_its_service_name(setup: Setup) -> None:
    setup.register(service=True)
    created = setup.api.sanitize_for_serialization(setup.core.create_namespaced_pod("shop", app_pod()))
    assert_injected(created)
    assert setup.webhooks.calls[0].url.startswith("https://mesh-identity-injector.mesh-identity.svc:443/mutate")


def test_opted_out_and_unmonitored_pods_come_back_unmodified(setup: Setup) -> None:
    setup.register()
    out = app_pod(name="out", annotations={p.INJECT: "false"})
    created = setup.api.sanitize_for_serialization(setup.core.create_namespaced_pod("shop", copy.deepcopy(out)))
    assert_unmodified(created, out)
    assert len(setup.webhooks.calls) == 1  # called, and answered allowed with no patch

    plain = app_pod("plain", "plain-1")
    created = setup.api.sanitize_for_serialization(setup.core.create_namespaced_pod("plain", copy.deepcopy(plain)))
    assert_unmodified(created, plain)
    assert len(setup.webhooks.calls) == 1  # the namespaceSelector did not select it: not called


def test_a_wrong_ca_bundle_refuses_the_create_with_failure_policy_fail(setup: Setup) -> None:
    setup.register(ca_pem=TestCa.create("another CA").pem())
    with pytest.raises(kubernetes.client.ApiException) as raised:
        setup.core.create_namespaced_pod("shop", app_pod())
    assert raised.value.status == 500
    message = json.loads(raised.value.body)["message"]
    assert f'failed calling webhook "{WEBHOOK}"' in message
    assert "tls: failed to verify certificate" in message and "unable to get local issuer certificate" in message
    assert setup.server.objects(kind_named(setup.server.kinds, "Pod")) == []


def test_a_wrong_ca_bundle_with_failure_policy_ignore_creates_the_pod_unmodified(setup: Setup) -> None:
    setup.register(ca_pem=TestCa.create("another CA").pem(), failure_policy="Ignore")
    sent = app_pod()
    created = setup.api.sanitize_for_serialization(setup.core.create_namespaced_pod("shop", copy.deepcopy(sent)))
    assert_unmodified(created, sent)
    assert (
        "certificate verify failed" in setup.webhooks.calls[0].error
        or "failed to verify" in setup.webhooks.calls[0].error
    )


def test_an_unreachable_webhook_refuses_with_fail(setup: Setup) -> None:
    setup.register()
    setup.webhook.stop()
    with pytest.raises(kubernetes.client.ApiException) as raised:
        setup.core.create_namespaced_pod("shop", app_pod())
    message = json.loads(raised.value.body)["message"]
    assert raised.value.status == 500 and f'failed calling webhook "{WEBHOOK}"' in message
    assert "connection refused" in message.lower()


def test_a_denial_is_the_webhooks_message(setup: Setup) -> None:
    setup.register()
    bad = app_pod(annotations={p.EXCLUDE_OUTBOUND_PORTS: "not-a-port"})
    with pytest.raises(kubernetes.client.ApiException) as raised:
        setup.core.create_namespaced_pod("shop", bad)
    assert raised.value.status == 403
    message = json.loads(raised.value.body)["message"]
    assert message.startswith(f'admission webhook "{WEBHOOK}" denied the request: mesh-identity cannot inject')


def test_a_bad_configuration_is_refused(setup: Setup) -> None:
    webhook: dict[str, Any] = {
        "name": "bad.example.org",
        "clientConfig": {"url": "https://x/"},
        "sideEffects": "None",
        "admissionReviewVersions": ["v1"],
        "timeoutSeconds": 60,
    }
    body = {
        "apiVersion": "admissionregistration.k8s.io/v1",
        "kind": "MutatingWebhookConfiguration",
        "metadata": {"name": "bad"},
        "webhooks": [webhook],
    }
    with pytest.raises(kubernetes.client.ApiException) as raised:
        kubernetes.client.AdmissionregistrationV1Api(setup.api).create_mutating_webhook_configuration(body)
    assert raised.value.status == 422
    assert "webhooks[0].timeoutSeconds: Invalid value: 60" in json.loads(raised.value.body)["message"]
    # the official schema, strict (the client refuses an unknown field itself, so this one is written directly)
    webhook.update(timeoutSeconds=5, unknownField=1)
    with pytest.raises(ApiError) as refused:
        setup.server.put_object(MUTATING_WEBHOOK_CONFIGURATION, body)
    assert refused.value.code == 422 and "unknownField" in refused.value.message


def test_the_webhook_takes_the_real_servers_timeout_query(setup: Setup) -> None:
    setup.webhooks.timeout_query = True
    setup.register()
    created = setup.api.sanitize_for_serialization(setup.core.create_namespaced_pod("shop", app_pod()))
    assert setup.webhooks.calls[0].url.endswith("/mutate?timeout=5s")
    assert_injected(created)


def test_selectors_and_rules_match_as_the_real_server_matches_them() -> None:
    selector = selector_matcher(
        {
            "matchLabels": {"team": "a"},
            "matchExpressions": [
                {"key": "tier", "operator": "In", "values": ["web", "api"]},
                {"key": "legacy", "operator": "DoesNotExist"},
            ],
        }
    )
    assert selector({"team": "a", "tier": "web"})
    assert not selector({"team": "a", "tier": "db"}) and not selector({"team": "a", "tier": "web", "legacy": ""})
    assert selector_matcher({})({}) and selector_matcher({"matchExpressions": [{"key": "x", "operator": "NotIn",
                                                                               "values": ["1"]}]})({})  # fmt: skip
    pods = kind_named(workload_kinds(()), "Pod")
    rule = {"operations": ["CREATE"], "apiGroups": [""], "apiVersions": ["v1"], "resources": ["pods"], "scope": "*"}
    assert rules_match({"rules": [rule]}, pods, "CREATE")
    assert not rules_match({"rules": [rule]}, pods, "UPDATE") and not rules_match({"rules": [rule]}, SECRET, "CREATE")
    assert rules_match({"rules": [{**rule, "resources": ["*"], "operations": ["*"]}]}, SECRET, "CREATE")
    assert not rules_match({"rules": [{**rule, "scope": "Cluster"}]}, pods, "CREATE")


def test_an_unmapped_service_follows_the_failure_policy(setup: Setup) -> None:
    setup.register(service=True, failure_policy="Ignore")
    setup.webhooks.services.clear()
    sent = app_pod()
    created = setup.api.sanitize_for_serialization(setup.core.create_namespaced_pod("shop", copy.deepcopy(sent)))
    assert_unmodified(created, sent)
    assert "no endpoints" in setup.webhooks.calls[0].error


# -- through kubectl


@pytest.fixture
def kubectl(setup: Setup, tmp_path: Path) -> Any:
    return kubectl_for(setup.server, tmp_path)


def test_kubectl_apply_of_a_pod_yields_an_injected_pod(setup: Setup, kubectl: Any, tmp_path: Path) -> None:
    setup.register()
    (tmp_path / "pod.json").write_text(json.dumps(app_pod()))
    assert "pod/web-1 created" in kubectl("apply", "--validate=false", "-f", str(tmp_path / "pod.json")).stdout
    got = json.loads(kubectl("get", "pod", "web-1", "-n", "shop", "-o", "json").stdout)
    assert_injected(got)

    out = app_pod(name="out", annotations={p.INJECT: "false"})
    (tmp_path / "out.json").write_text(json.dumps(out))
    kubectl("apply", "--validate=false", "-f", str(tmp_path / "out.json"))
    assert_unmodified(json.loads(kubectl("get", "pod", "out", "-n", "shop", "-o", "json").stdout), out)


def test_kubectl_shows_the_webhooks_denial(setup: Setup, kubectl: Any, tmp_path: Path) -> None:
    setup.register()
    (tmp_path / "bad.json").write_text(json.dumps(app_pod(annotations={p.EXCLUDE_OUTBOUND_PORTS: "not-a-port"})))
    done = kubectl("apply", "--validate=false", "-f", str(tmp_path / "bad.json"), check=False)
    assert done.returncode == 1
    assert f'admission webhook "{WEBHOOK}" denied the request: mesh-identity cannot inject this pod' in done.stderr
    assert "Error from server (Forbidden)" in done.stderr


# -- dry runs and warnings


def probed_pod(port: int = 8080) -> dict[str, Any]:
    """A pod whose liveness probe goes through the sidecar (its port is not excluded from capture)."""
    found = app_pod()
    found["spec"]["containers"][0]["livenessProbe"] = {"httpGet": {"path": "/healthz", "port": port}}
    return found


def probe_warning(port: int = 8080) -> str:
    return (
        f"mesh-identity: spec.containers[0].livenessProbe.httpGet (port {port}) goes through the sidecar's mTLS "
        f"listener and fails; exclude its port with {p.EXCLUDE_INBOUND_PORTS} or use an exec probe"
    )


def test_kubectl_apply_dry_run_server_prints_the_injected_pod_and_stores_nothing(
    setup: Setup, kubectl: Any, tmp_path: Path
) -> None:
    setup.register()
    (tmp_path / "pod.json").write_text(json.dumps(app_pod()))
    version = setup.server.store.resource_version
    done = kubectl("apply", "--dry-run=server", "--validate=false", "-f", str(tmp_path / "pod.json"), "-o", "json")
    got = json.loads(done.stdout)
    assert_injected(got)
    assert got["metadata"]["name"] == "web-1" and got["metadata"]["uid"]
    assert "resourceVersion" not in got["metadata"]  # never stored
    (call,) = setup.webhooks.calls
    assert call.review["request"]["dryRun"] is True
    assert setup.server.objects(kind_named(setup.server.kinds, "Pod")) == []
    assert setup.server.store.resource_version == version  # nothing written: no watch event either
    listed = kubectl("get", "pods", "-n", "shop", "-o", "json").stdout
    assert json.loads(listed)["items"] == []
    plain = kubectl("apply", "--dry-run=server", "--validate=false", "-f", str(tmp_path / "pod.json"))
    assert "pod/web-1 created (server dry run)" in plain.stdout


def test_a_dry_run_through_the_client_is_answered_and_not_stored(setup: Setup) -> None:
    setup.register()
    sent = app_pod()
    sent["metadata"] = {"generateName": "web-", "namespace": "shop"}
    core = setup.core
    answered = setup.api.sanitize_for_serialization(core.create_namespaced_pod("shop", sent, dry_run="All"))
    assert_injected(answered)
    assert answered["metadata"]["name"].startswith("web-") and len(answered["metadata"]["name"]) == 9
    assert setup.server.objects(kind_named(setup.server.kinds, "Pod")) == []
    # the real server's refusals: another value, and (in this server) a dry run of another verb
    with pytest.raises(kubernetes.client.ApiException) as raised:
        core.create_namespaced_pod("shop", app_pod(), dry_run="Some")
    assert raised.value.status == 400 and 'supported values: "All"' in json.loads(raised.value.body)["message"]
    with pytest.raises(kubernetes.client.ApiException) as raised:
        core.patch_namespace("shop", {"metadata": {"labels": {"x": "y"}}}, dry_run="All")
    assert raised.value.status == 400 and "creates only" in json.loads(raised.value.body)["message"]
    assert "x" not in setup.server.objects(kind_named(setup.server.kinds, "Namespace"))[0]["metadata"]["labels"]


def test_a_webhook_with_side_effects_refuses_a_dry_run(setup: Setup, monkeypatch: pytest.MonkeyPatch) -> None:
    """``sideEffects: Unknown`` or ``Some`` are refused by admissionregistration.k8s.io/v1 (and by this server),
    but a configuration stored through v1beta1 keeps them: the real server then refuses every dry run the
    webhook matches, and calls it for the other requests."""
    setup.register()
    stored = setup.server.objects

    def legacy(kind: Any, namespace: str | None = None, label_selector: str = "") -> list[dict[str, Any]]:
        found = stored(kind, namespace, label_selector)
        if kind is MUTATING_WEBHOOK_CONFIGURATION:
            for configuration in found:
                for webhook in configuration["webhooks"]:
                    webhook["sideEffects"] = "Unknown"
        return found

    monkeypatch.setattr(setup.server, "objects", legacy)
    with pytest.raises(kubernetes.client.ApiException) as raised:
        setup.core.create_namespaced_pod("shop", app_pod(), dry_run="All")
    assert raised.value.status == 400
    assert json.loads(raised.value.body)["message"] == f'admission webhook "{WEBHOOK}" does not support dry run'
    assert setup.webhooks.calls == []  # refused before the call
    created = setup.api.sanitize_for_serialization(setup.core.create_namespaced_pod("shop", app_pod()))
    assert_injected(created)


def test_kubectl_prints_the_webhooks_probe_warning(setup: Setup, kubectl: Any, tmp_path: Path) -> None:
    setup.register()
    (tmp_path / "pod.json").write_text(json.dumps(probed_pod()))
    done = kubectl("apply", "--validate=false", "-f", str(tmp_path / "pod.json"))
    assert "pod/web-1 created" in done.stdout
    assert f"Warning: {probe_warning()}\n" in done.stderr
    assert done.stderr.count("Warning:") == 1
    assert_injected(json.loads(kubectl("get", "pod", "web-1", "-n", "shop", "-o", "json").stdout))
    # the same on a dry run; and nothing for a pod whose probe port is excluded
    dry = probed_pod()
    dry["metadata"]["name"] = "web-2"
    (tmp_path / "dry.json").write_text(json.dumps(dry))
    done = kubectl("apply", "--dry-run=server", "--validate=false", "-f", str(tmp_path / "dry.json"))
    assert f"Warning: {probe_warning()}" in done.stderr
    excluded = probed_pod()
    excluded["metadata"].update(name="web-3", annotations={p.EXCLUDE_INBOUND_PORTS: "8080"})
    (tmp_path / "excluded.json").write_text(json.dumps(excluded))
    done = kubectl("apply", "--validate=false", "-f", str(tmp_path / "excluded.json"))
    assert "Warning" not in done.stderr


def test_the_warning_header_is_the_real_servers(setup: Setup) -> None:
    setup.register()
    _, status, headers = setup.core.create_namespaced_pod_with_http_info("shop", probed_pod())
    assert status == 201
    assert headers.getlist("Warning") == [f'299 - "{probe_warning()}"']
    assert setup.webhooks.warnings == [probe_warning()]
    _, _, headers = setup.core.read_namespaced_pod_with_http_info("web-1", "shop")
    assert not headers.getlist("Warning")  # the next request on the connection has none


def test_warnings_are_kept_as_the_real_server_keeps_them() -> None:
    found = Warnings()
    for text in ('a "quoted" \\ text', 'a "quoted" \\ text', "two\nlines", "", "é"):
        found.add(text)
    assert found.headers() == ['299 - "a \\"quoted\\" \\\\ text"', '299 - "é"'.encode().decode("latin-1")]
    many = Warnings()
    for index in range(20):
        many.add(f"{index:03d}" + "x" * 297)  # 300 characters each: 13 fit in 4,096, then each is cut to 256
    kept = many.kept()
    assert len(kept) == 16 and all(len(t) == 256 for t in kept)
    assert [t[:3] for t in kept] == [f"{i:03d}" for i in range(16)]
