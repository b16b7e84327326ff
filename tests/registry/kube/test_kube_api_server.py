"""The Kubernetes registry in the whole server, built by the composition root from a config's ``registry``
section: a service account's running pods get its identity issued and rotated; when its last pod goes, its
rotation stops."""

from __future__ import annotations

from pathlib import Path

from mesh_identity.compose import Stage, build
from mesh_identity.config import parse_config
from mesh_identity.registry.kube import KubernetesRegistry
from mesh_identity.spiffe import SpiffeId
from tests.registry.kube.conftest import MESH, TD, Cluster
from tests.waiting import wait_until

WEB = SpiffeId.for_kubernetes(TD, "shop", "web")


def test_identities_follow_the_pods_of_their_service_account(cluster: Cluster, tmp_path: Path) -> None:
    cluster.namespace("shop")
    cluster.service_account("shop", "web")
    cluster.pod("shop", "web-0", "web", {"app": "web"})
    cluster.service("shop", "web", {"app": "web"})
    kubeconfig = cluster.server.write_kubeconfig(tmp_path / "kubeconfig")
    config = parse_config(
        {
            "trust_domain": TD.name,
            "state_dir": "state",
            "metrics": {"listen": "127.0.0.1:0"},
            "xds": {"listen": "127.0.0.1:0"},
            "plugins": {"audit": {"enabled": False}},
            "registry": {"kind": "kubernetes", "mesh_name": MESH, "kubeconfig": str(kubeconfig)},
        },
        tmp_path,
    )
    system = build(config, Stage.SERVER, create=True)
    assert isinstance(system.registry, KubernetesRegistry) and system.service is not None
    engine = system.service.engine
    system.service.start()
    try:
        assert WEB in engine.identities()  # the first mesh is read before start() returns
        svid = engine.source(WEB).current()
        assert svid is not None and svid.spiffe_id == WEB

        cluster.pod("shop", "web-1", "web", {"app": "web"})
        wait_until(lambda: len(system.registry.current().mesh.nodes_of(WEB)) == 2, "web-1 as a sidecar")  # type: ignore[union-attr]
        cluster.delete_pod("shop", "web-0")
        cluster.delete_pod("shop", "web-1")  # the last pod of service account web
        wait_until(lambda: WEB not in engine.identities(), "web's rotation to stop")
    finally:
        system.service.stop()
    wait_until(lambda: cluster.server.open_watches == 0, "the registry's watch streams to close with the server")
