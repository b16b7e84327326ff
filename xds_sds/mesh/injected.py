"""The config files of an injected pod's sidecars: Envoy's bootstrap and the node agent's config.

The injector (:mod:`mesh_identity.inject`) puts both into the pod as annotations, which a downwardAPI volume turns
into files; :func:`sidecar_documents` writes them for one pod. Nothing in them is secret:

* **Envoy** (:func:`~xds_sds.resources.bootstrap.agent_bootstrap`): ADS over mTLS to the control plane at
  ``xds`` (an IP address, or the control plane Service's DNS name), its client certificate and the bundle that
  verifies the server from the agent's SDS socket; admin on ``127.0.0.1:15000``, the Prometheus endpoint on
  ``0.0.0.0:15090``. The node id in the file is the pod's name at admission; the container's command sets the
  real one (``--service-node <pod>.<namespace>``) once the pod has its name.
* **The agent** (:mod:`xds_sds.agent.config`): first contact at ``attest`` with the pod's projected
  service-account token (the control plane's TokenReview decides the identity, ``ns/<namespace>/sa/<account>``),
  renewals at ``signing``, the roots that verify the control plane from the trust-bundle ConfigMap's file; one
  entry: the pod's identity, to Envoy's user and, when the pod asks for the Workload API
  (:mod:`mesh_identity.inject.workloadapi`), to each app user it names (``runAsUser``); its health on loopback.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import yaml
from google.protobuf import json_format

from mesh_identity.mesh.model import Address
from mesh_identity.mesh.ports import ADMIN_PORT, AGENT_HEALTH_PORT, STATS_PORT
from mesh_identity.spiffe import SpiffeId, TrustDomain
from xds_sds.mesh.component import server_identity
from xds_sds.resources.bootstrap import agent_bootstrap
from xds_sds.resources.stats import add_stats_endpoint

ENVOY_UID = 1337
_DUMPER = getattr(yaml, "CSafeDumper", yaml.SafeDumper)  # libyaml's: six times faster (bench/inject_webhook.py)


@dataclass(frozen=True, slots=True)
class PodPaths:
    """Where the injected pod's volumes are mounted (:mod:`mesh_identity.inject.patch` decides)."""

    sds_socket: Path
    workload_socket: Path
    agent_state_dir: Path
    token_file: Path
    bundle_file: Path


@dataclass(frozen=True, slots=True)
class ControlPlaneAddresses:
    """Where an injected pod's sidecars reach the control plane."""

    xds: Address
    signing: Address
    attest: Address


def sidecar_documents(
    trust_domain: TrustDomain,
    control_plane: ControlPlaneAddresses,
    paths: PodPaths,
    *,
    namespace: str,
    pod_name: str,
    service_account: str,
    identity: SpiffeId,
    app_uids: Sequence[int] = (),
    envoy_uid: int = ENVOY_UID,
) -> tuple[str, str]:
    """Envoy's bootstrap (JSON) and the agent's config (YAML) for the pod (see the module docstring)."""
    if identity.trust_domain != trust_domain:
        raise ValueError(f"{identity} is not in trust domain {trust_domain}")
    admin = Address("127.0.0.1", ADMIN_PORT)
    document = agent_bootstrap(
        node=f"{pod_name}.{namespace}",
        cluster=service_account,
        identity=identity,
        xds=control_plane.xds,
        server_identity=server_identity(trust_domain),
        agent_socket=paths.sds_socket,
        admin=admin,
    )
    add_stats_endpoint(document, Address("0.0.0.0", STATS_PORT), admin)  # noqa: S104 - scraped from outside
    bootstrap = json.dumps(json_format.MessageToDict(document), separators=(",", ":"), sort_keys=True)
    users = sorted({envoy_uid, *app_uids})
    agent = {
        "trust_domain": trust_domain.name,
        "host": pod_name,
        "state_dir": str(paths.agent_state_dir),
        "control_plane": {
            "signing": str(control_plane.signing),
            "attest": str(control_plane.attest),
            "bundle": str(paths.bundle_file),
        },
        "credential": {"kubernetes_token_file": str(paths.token_file)},
        "sockets": {"sds": str(paths.sds_socket), "workload_api": str(paths.workload_socket)},
        "metrics": {"listen": f"127.0.0.1:{AGENT_HEALTH_PORT}"},
        "entries": [{"spiffe_id": str(identity), "selectors": [f"unix:uid:{uid}"]} for uid in users],
    }
    return bootstrap, yaml.dump(agent, Dumper=_DUMPER, sort_keys=False)
