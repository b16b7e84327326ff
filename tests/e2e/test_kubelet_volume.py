"""A real Envoy whose trust of the control plane is the trust bundle ConfigMap mounted into its pod, updated the way
kubelet updates a ConfigMap volume (the ``..data`` link swap, :class:`tests.fakes.kube.volumes.ProjectedVolume`).

The ConfigMap ``mesh-identity-root-ca`` (key ``ca.crt``) lives in the Kubernetes API test server; the volume is
projected from it through the real client. The sidecar's bootstrap names ``<volume>/ca.crt`` with
``watched_directory`` on the volume (``write_bootstrap(ca_dir=...)``). The control plane restarts with a serving
certificate from a new root: the sidecar, trusting only the old root, refuses it. The ConfigMap then gains the new
root, kubelet swaps the volume, and the same Envoy process reloads its CA and reconnects: its admin says so, and
the new server records its ACKs.
"""

from __future__ import annotations

import base64
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import kubernetes
import pytest

from mesh_identity.mesh.model import Mesh
from mesh_identity.spiffe import SpiffeId
from mesh_identity.svid import TrustBundle
from tests.e2e.conftest import TRUST_DOMAIN, AuthorityIssuer
from tests.e2e.harness import SERVER_PATH, Envoy, loopback_mesh
from tests.fakes.kube import KubeServer
from tests.fakes.kube.volumes import DATA_DIR, ProjectedVolume
from tests.fakes.kube.workloads import schema_errors
from tests.waiting import wait_until
from xds_sds.mesh.publisher import MeshPublisher
from xds_sds.protocol.typeurls import CLUSTER, LISTENER
from xds_sds.resources.bootstrap import BUNDLE_SECRET_NAME, XDS_CLUSTER, write_bootstrap

pytestmark = pytest.mark.e2e

NAMESPACE = "e2e"
BUNDLE_CONFIGMAP = "mesh-identity-root-ca"
NODE = "web-1"
CONNECTED = "control_plane.connected_state"
VERIFY_FAILED = f"cluster.{XDS_CLUSTER}.ssl.fail_verify_error"
CONTEXT_UPDATES = f"cluster.{XDS_CLUSTER}.client_ssl_socket_factory.ssl_context_update_by_sds"


def _config_map(bundle: TrustBundle, resource_version: str | None = None) -> dict[str, object]:
    metadata: dict[str, object] = {"name": BUNDLE_CONFIGMAP, "namespace": NAMESPACE}
    if resource_version is not None:
        metadata["resourceVersion"] = resource_version
    body: dict[str, object] = {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": metadata,
        "data": {"ca.crt": bundle.pem().decode()},
    }
    assert schema_errors(body) == []  # what a real API server takes (strict, two versions)
    return body


@dataclass
class Pod:
    """One sidecar of a pod: its Envoy, its mounted trust bundle volume, and the control plane it talks to."""

    kube: KubeServer
    core: kubernetes.client.CoreV1Api
    volume: ProjectedVolume
    issuer: AuthorityIssuer
    mesh: Mesh
    xds: MeshPublisher
    envoy: Envoy

    def kubelet_sync(self) -> bool:
        return self.volume.sync_from(self.kube, "ConfigMap", NAMESPACE, BUNDLE_CONFIGMAP)

    def restart_control_plane(self) -> MeshPublisher:
        """The control plane restarts on the same address with a serving certificate the issuer gives now."""
        address = self.xds.address
        self.xds.stop(None)
        self.xds = MeshPublisher(self.mesh, self.issuer.issue(self.xds.server_identity), address=address)
        self.xds.update_bundle(self.issuer.bundle())
        self.xds.update_identity(self.issuer.issue(self.mesh.service("web").identity))
        self.xds.start()
        return self.xds

    def stat(self, name: str) -> int:
        return self.envoy.stats(name).get(name, 0)

    def loaded_bundle(self) -> bytes:
        """The roots Envoy holds in the xDS cluster's bundle secret (its config dump shows the file's content)."""
        dump = self.envoy.config_dump("dynamic_active_secrets")
        [secret] = [c["secret"] for c in dump["configs"] if c["name"] == BUNDLE_SECRET_NAME]
        return base64.b64decode(secret["validation_context"]["trusted_ca"]["inline_bytes"])


@pytest.fixture
def pod(issuer: AuthorityIssuer, tmp_path: Path) -> Iterator[Pod]:
    mesh = loopback_mesh(TRUST_DOMAIN, {"web": []}, namespace=NAMESPACE)
    identity = mesh.service("web").identity
    with KubeServer() as kube, kubernetes.client.ApiClient(kube.client_configuration()) as api:
        core = kubernetes.client.CoreV1Api(api)
        core.create_namespace({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": NAMESPACE}})
        core.create_namespaced_config_map(NAMESPACE, _config_map(issuer.bundle()))
        volume = ProjectedVolume(tmp_path / "pod" / "volumes" / "root-ca")
        assert volume.sync_from(kube, "ConfigMap", NAMESPACE, BUNDLE_CONFIGMAP)  # kubelet mounts it

        xds = MeshPublisher(mesh, issuer.issue(SpiffeId(mesh.trust_domain, SERVER_PATH)))
        xds.update_bundle(issuer.bundle())
        xds.update_identity(issuer.issue(identity))
        xds.start()
        files = write_bootstrap(
            issuer.issue(identity), tmp_path / "pod" / "sidecar", node=NODE, cluster="web", xds=xds.address,
            server_identity=xds.server_identity, ca_dir=volume.directory,
        )  # fmt: skip
        envoy = Envoy(files.bootstrap, tmp_path / "pod" / "sidecar", name=NODE)
        running = Pod(kube, core, volume, issuer, mesh, xds, envoy)
        try:
            envoy.start()
            yield running
        finally:
            envoy.stop()
            running.xds.stop(None)


def test_envoy_follows_the_kubelet_swap_of_the_mounted_trust_bundle(pod: Pod, issuer: AuthorityIssuer) -> None:
    envoy, provider = pod.envoy, issuer.authority.provider
    pid = envoy.pid
    [old_root] = issuer.bundle().authorities
    wait_until(lambda: pod.stat(CONNECTED) == 1, "the sidecar to connect to the control plane")
    wait_until(lambda: pod.xds.acks.acked_versions(NODE, LISTENER), "the control plane to record the sidecar's ACK")
    assert envoy.ca_serials() == {old_root.serial_number}
    assert pod.loaded_bundle() == pod.volume.path("ca.crt").read_bytes() == issuer.bundle().pem()
    updates = pod.stat(CONTEXT_UPDATES)

    # root rotation: the control plane now serves with a certificate of the new root; the volume has the old only
    new_root = provider.prepare_root()
    issuer.authority.refresh_bundle()
    provider.activate_root()
    issuer.authority.rotate_intermediate(requested_by="e2e")
    failures = pod.stat(VERIFY_FAILED)
    restarted = pod.restart_control_plane()
    wait_until(lambda: pod.stat(VERIFY_FAILED) > failures, "the sidecar to refuse the new-root server certificate")
    assert pod.stat(CONNECTED) == 0
    assert NODE not in restarted.connected_nodes()
    assert not restarted.acks.acked_versions(NODE, LISTENER)

    # the bundle ConfigMap gains the new root (as the control plane's prepare step writes it); kubelet syncs
    current = pod.core.read_namespaced_config_map(BUNDLE_CONFIGMAP, NAMESPACE)
    pod.core.replace_namespaced_config_map(
        BUNDLE_CONFIGMAP, NAMESPACE, _config_map(issuer.bundle(), current.metadata.resource_version)
    )
    before = pod.volume.data_dir()
    assert pod.kubelet_sync()
    assert pod.volume.data_dir() != before and before is not None and not before.exists()
    assert (pod.volume.directory / "ca.crt").readlink() == Path(DATA_DIR) / "ca.crt"

    # the same Envoy reloads the CA from the volume, reconnects, and the new control plane records its ACKs
    wait_until(lambda: pod.stat(CONTEXT_UPDATES) > updates, "Envoy to reload the xDS cluster's CA from the volume")
    assert pod.loaded_bundle() == issuer.bundle().pem()  # both roots, read from the new ..data
    wait_until(lambda: pod.stat(CONNECTED) == 1, "the sidecar to reconnect to the restarted control plane", 60)
    wait_until(lambda: NODE in restarted.connected_nodes(), "the restarted control plane to see the sidecar")
    wait_until(lambda: restarted.acks.acked_versions(NODE, CLUSTER), "the sidecar's CDS ACK to the new server")
    wait_until(lambda: restarted.acks.acked_versions(NODE, LISTENER), "the sidecar's LDS ACK to the new server")
    wait_until(lambda: new_root.serial_number in envoy.ca_serials(), "Envoy's /certs to show the new root")
    assert old_root.serial_number in envoy.ca_serials()
    assert envoy.pid == pid and envoy.exit_code() is None  # no restart
