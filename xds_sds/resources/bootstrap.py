"""The Envoy bootstrap of a sidecar: ADS over mTLS to our xDS server, admin on loopback.

The sidecar authenticates to the xDS server with a bootstrap certificate (an SVID of the sidecar's own
identity). Envoy reads it, and the trust bundle that verifies the server, through file-based SDS: two small
JSON files in ``<out>/sds/``, each a discovery response with one secret, watched by Envoy. Renewing them
(:func:`renew_bootstrap`) writes a new file next to the old one and renames it over it, which Envoy's
directory watch picks up: no restart, and never a half-written certificate.

The server renews these files in directories others may write to (the sidecar's operator, or its user), so it
writes them relative to open directory descriptors without following a symbolic link (``out_dir`` itself, its
``sds/``, the files), and only into a directory and over files its own uid owns
(:func:`mesh_identity.files.owned_dir`, :func:`~mesh_identity.files.write_private_at`): a swapped ``sds/``
link cannot make it write a certificate and key elsewhere. ``out_dir`` is taken as given; a caller that
accepts a link there (``bootstrap --out LINK``) resolves it first.

Layout of ``out_dir``::

    envoy.json            the bootstrap (pass it to envoy -c)
    sds/xds-cert.json     the bootstrap SVID and key (mode 0600)
    sds/xds-bundle.json   the trust bundle that verifies the xDS server

A mesh in agent mode (``xds.secrets: agent``) needs no certificate file at all: :func:`write_agent_bootstrap`
writes ``envoy.json`` alone, with a second static cluster, :data:`~xds_sds.resources.tls.AGENT_CLUSTER`, whose
one endpoint is the node agent's SDS socket (a ``pipe`` address). The xDS cluster takes its client certificate
(the sidecar's SVID, secret ``tls_secret_name(identity)``) and the bundle that verifies the server (secret
``bundle_secret_name(trust_domain)``) from the agent; the mesh's TLS contexts, which come over ADS, name the
agent for their certificate too (:mod:`xds_sds.resources.tls`). Nothing in that bootstrap is secret, and
nothing renews it.

Given ``ca_dir`` (:func:`write_bootstrap`), the bundle that verifies the xDS server is not a copy in
``sds/xds-bundle.json`` but the file ``<ca_dir>/ca.crt`` of a mounted volume: the trust bundle ConfigMap
(``mesh-identity-root-ca``, key ``ca.crt``) as kubelet projects it into the pod. ``xds-bundle.json`` then names
that file (``trusted_ca.filename``) with ``watched_directory: <ca_dir>``, Envoy's documented way to follow kubelet's
update of a ConfigMap volume: kubelet writes the new payload into a new hidden directory and renames a link over
``<ca_dir>/..data`` (atomic), a move inside ``ca_dir`` that makes Envoy read ``ca.crt`` again, with no restart
(``tests/e2e/test_kubelet_volume.py``). Nothing of ours renews that file: :func:`renew_bootstrap_bundle` leaves
such a bootstrap alone.

Given ``standby_xds`` (the other replicas of an HA control plane, :mod:`mesh_identity.server.cluster`), the xDS
cluster lists them too: ``xds`` at priority 0, the standbys at priority 1, with a TCP health check (connect only,
every second; one failure marks a host down, one success up again). The stream goes to ``xds`` while it is up;
when it is down (a replica killed), Envoy's priority failover sends the reconnecting stream to a standby, as a
Kubernetes Service in front of the replicas would. Without ``standby_xds`` the cluster is as before: ``xds``
alone, no health check.

Given ``stats`` (the instance's ``stats`` address in the mesh file), either bootstrap also gets the sidecar's
Prometheus endpoint: a static listener there that serves ``GET /stats/prometheus`` from the admin through a
static cluster, the tag extraction of the labelled stat names, and stats flushed when scraped
(:func:`xds_sds.resources.stats.add_stats_endpoint`).
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from envoy.config.bootstrap.v3 import bootstrap_pb2
from envoy.config.cluster.v3 import cluster_pb2
from envoy.config.core.v3 import (
    address_pb2,
    backoff_pb2,
    base_pb2,
    config_source_pb2,
    grpc_service_pb2,
    health_check_pb2,
    protocol_pb2,
)
from envoy.config.endpoint.v3 import endpoint_components_pb2, endpoint_pb2
from envoy.config.overload.v3 import overload_pb2
from envoy.extensions.resource_monitors.downstream_connections.v3 import downstream_connections_pb2
from envoy.extensions.transport_sockets.tls.v3 import common_pb2, secret_pb2, tls_pb2
from envoy.extensions.upstreams.http.v3 import http_protocol_options_pb2
from envoy.service.discovery.v3 import discovery_pb2
from google.protobuf import duration_pb2, json_format, wrappers_pb2

from mesh_identity.files import owned_dir, write_private_at
from mesh_identity.mesh.model import Address
from mesh_identity.ports import free_port, is_ip_address
from mesh_identity.spiffe import SpiffeId
from mesh_identity.svid import TrustBundle, X509Svid
from xds_sds.protocol.auth import bundle_secret_name, tls_secret_name
from xds_sds.resources import clusters
from xds_sds.resources.packing import pack, socket_address
from xds_sds.resources.stats import add_stats_endpoint
from xds_sds.resources.tls import AGENT_CLUSTER, TRANSPORT_SOCKET, agent_sds, uri_san_matcher

XDS_CLUSTER = "mesh-identity-xds"
CERT_SECRET_NAME = "xds-client-certificate"  # noqa: S105 - an SDS secret name
BUNDLE_SECRET_NAME = "xds-trust-bundle"  # noqa: S105 - an SDS secret name
BOOTSTRAP_FILE = "envoy.json"
MAX_DOWNSTREAM_CONNECTIONS = 10_000  # a sidecar's limit on accepted connections (Envoy's overload manager)
SDS_DIR = "sds"
CERT_FILE = "xds-cert.json"
BUNDLE_FILE = "xds-bundle.json"
CA_FILE = "ca.crt"  # the trust bundle ConfigMap's key: the file of its mounted volume that ca_dir holds
MAX_SOCKET_PATH = 107  # bytes of a Unix socket path (sun_path holds 108 with the final NUL)


@dataclass(frozen=True, slots=True)
class BootstrapFiles:
    directory: Path
    bootstrap: Path
    certificate: Path
    bundle: Path


def files_in(out_dir: Path) -> BootstrapFiles:
    sds = out_dir / SDS_DIR
    return BootstrapFiles(out_dir, out_dir / BOOTSTRAP_FILE, sds / CERT_FILE, sds / BUNDLE_FILE)


def write_bootstrap(
    svid: X509Svid,
    out_dir: Path,
    *,
    node: str,
    xds: Address,
    server_identity: SpiffeId,
    cluster: str | None = None,
    admin: Address | None = None,
    delta: bool = False,
    max_connections: int = MAX_DOWNSTREAM_CONNECTIONS,
    stats: Address | None = None,
    ca_dir: Path | None = None,
    standby_xds: Sequence[Address] = (),
) -> BootstrapFiles:
    """Write the bootstrap of the sidecar ``node`` (of ``svid``'s identity) and its certificate files.

    :param svid: the bootstrap certificate: an SVID of the sidecar's identity, with its key.
    :param xds: where the xDS server listens.
    :param server_identity: the SPIFFE ID the xDS server's certificate must carry.
    :param cluster: Envoy's ``node.cluster`` (the service name); defaults to the node id.
    :param admin: the admin address, loopback only; port 0 (the default) lets Envoy pick one (see
        ``--admin-address-path``).
    :param delta: use the incremental xDS protocol instead of state of the world.
    :param max_connections: the most connections the sidecar accepts at once (Envoy's overload manager).
    :param stats: the sidecar's Prometheus endpoint (the mesh file's ``instances[].stats``; see
        :mod:`xds_sds.resources.stats`); it reaches the admin through a static cluster, so with it an admin
        port 0 becomes a free port chosen now.
    :param ca_dir: verify the xDS server with the roots in ``<ca_dir>/ca.crt``, a mounted trust bundle ConfigMap
        that Envoy follows as kubelet updates it (see the module docstring), instead of ``svid``'s bundle. An
        absolute directory whose ``ca.crt`` holds a PEM certificate now; ValueError otherwise.
    :param standby_xds: the addresses of the xDS server's other replicas, where the stream goes when ``xds`` is
        down (see the module docstring).
    """
    admin = _loopback_admin(admin)
    if ca_dir is not None:
        check_ca_dir(ca_dir)
    if stats is not None and admin.port == 0:
        admin = Address(admin.host, free_port(admin.host))
    files = files_in(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    document = bootstrap(
        files,
        node=node,
        cluster=cluster or node,
        xds=xds,
        server_identity=server_identity,
        admin=admin,
        delta=delta,
        max_connections=max_connections,
        standby_xds=standby_xds,
    )
    if stats is not None:
        add_stats_endpoint(document, stats, admin)
    with owned_dir(out_dir) as top:
        with _sds(out_dir, top, create=True) as sds:
            _write_certificate(sds, svid, files)
            if ca_dir is None:
                _write_bundle(sds, svid.bundle, files)
            else:
                secret = _mounted_bundle_secret(ca_dir)
                write_private_at(sds, BUNDLE_FILE, _secrets_file(secret), 0o644, shown=str(files.bundle))
        write_private_at(
            top, BOOTSTRAP_FILE, json_format.MessageToJson(document, indent=2).encode(), 0o644,
            shown=str(files.bootstrap),
        )  # fmt: skip
    return files


def write_agent_bootstrap(
    out_dir: Path,
    *,
    node: str,
    identity: SpiffeId,
    xds: Address,
    server_identity: SpiffeId,
    agent_socket: Path,
    cluster: str | None = None,
    admin: Address | None = None,
    delta: bool = False,
    max_connections: int = MAX_DOWNSTREAM_CONNECTIONS,
    stats: Address | None = None,
) -> Path:
    """Write the bootstrap of the sidecar ``node`` of ``identity`` in a mesh whose node agents deliver the
    certificates (see the module docstring): ``out_dir/envoy.json`` only; returns its path.

    :param agent_socket: the node agent's SDS socket (absolute; at most :data:`MAX_SOCKET_PATH` bytes). It need
        not exist yet: Envoy waits for the agent (the xDS cluster has no certificate until the agent answers).
    The other parameters are :func:`write_bootstrap`'s.
    """
    admin = _loopback_admin(admin)
    if stats is not None and admin.port == 0:
        admin = Address(admin.host, free_port(admin.host))
    document = agent_bootstrap(
        node=node, cluster=cluster or node, identity=identity, xds=xds, server_identity=server_identity,
        agent_socket=agent_socket, admin=admin, delta=delta, max_connections=max_connections,
    )  # fmt: skip
    if stats is not None:
        add_stats_endpoint(document, stats, admin)
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / BOOTSTRAP_FILE
    with owned_dir(out_dir) as top:
        text = json_format.MessageToJson(document, indent=2).encode()
        write_private_at(top, BOOTSTRAP_FILE, text, 0o644, shown=str(path))
    return path


def check_agent_socket(path: Path) -> None:
    """ValueError unless ``path`` can be a Unix socket's address for Envoy: absolute, at most
    :data:`MAX_SOCKET_PATH` bytes, no NUL (Linux's abstract namespace is not used)."""
    raw = os.fsencode(path)
    if not path.is_absolute():
        raise ValueError(f"the agent socket {str(path)!r} is not an absolute path")
    if b"\0" in raw:
        raise ValueError(f"the agent socket {str(path)!r} contains a NUL byte")
    if len(raw) > MAX_SOCKET_PATH:
        raise ValueError(
            f"the agent socket path is {len(raw)} bytes long; a Unix socket's is at most {MAX_SOCKET_PATH}"
        )


def check_ca_dir(ca_dir: Path) -> None:
    """ValueError unless ``ca_dir`` can verify the xDS server: absolute, and its ``ca.crt`` (through kubelet's
    links) holds at least one PEM certificate."""
    if not ca_dir.is_absolute():
        raise ValueError(f"the CA directory {str(ca_dir)!r} is not an absolute path")
    path = ca_dir / CA_FILE
    try:
        text = path.read_bytes()
    except OSError as err:
        raise ValueError(f"cannot read {path} (the trust bundle's {CA_FILE}): {err.strerror}") from None
    if b"-----BEGIN CERTIFICATE-----" not in text:
        raise ValueError(f"{path} holds no PEM certificate (the trust bundle's {CA_FILE})")


def _loopback_admin(admin: Address | None) -> Address:
    admin = admin if admin is not None else Address("127.0.0.1", 0)
    if admin.host not in ("127.0.0.1", "::1"):
        raise ValueError(f"the Envoy admin must listen on loopback, not {admin.host}")
    return admin


def renew_bootstrap(svid: X509Svid, out_dir: Path) -> None:
    """Replace the bootstrap certificate (Envoy reloads it without a restart). Written without following a
    link and only where this uid owns (see the module docstring); :class:`~mesh_identity.files.UnsafePathError`
    otherwise."""
    with owned_dir(out_dir) as top, _sds(out_dir, top) as sds:
        _write_certificate(sds, svid, files_in(out_dir))


def renew_bootstrap_bundle(bundle: TrustBundle, out_dir: Path) -> bool:
    """Replace the bundle that verifies the xDS server (root rotation), as :func:`renew_bootstrap` does. A
    bootstrap whose bundle is a mounted file (``ca_dir``) is left alone: returns False, True when written."""
    with owned_dir(out_dir) as top, _sds(out_dir, top) as sds:
        if _names_a_file(sds):
            return False
        _write_bundle(sds, bundle, files_in(out_dir))
    return True


def _names_a_file(sds: int) -> bool:
    """Whether ``sds/xds-bundle.json`` names its roots' file (``ca_dir``) instead of holding them; read without
    following a link."""
    try:
        fd = os.open(BUNDLE_FILE, os.O_RDONLY | os.O_NOFOLLOW, dir_fd=sds)
    except FileNotFoundError:
        return False
    with os.fdopen(fd, "rb") as file:
        text = file.read()
    try:
        [resource] = json.loads(text)["resources"]
        return "filename" in resource["validationContext"]["trustedCa"]
    except (ValueError, KeyError, TypeError):
        return False


def _sds(out_dir: Path, top: int, *, create: bool = False) -> contextlib.AbstractContextManager[int]:
    return owned_dir(SDS_DIR, dir_fd=top, create=create, shown=str(out_dir / SDS_DIR))


def _write_certificate(sds: int, svid: X509Svid, files: BootstrapFiles) -> None:
    secret = secret_pb2.Secret(
        name=CERT_SECRET_NAME,
        tls_certificate=common_pb2.TlsCertificate(
            certificate_chain=base_pb2.DataSource(inline_bytes=svid.cert_chain_pem()),
            private_key=base_pb2.DataSource(inline_bytes=svid.key_pem()),
        ),
    )
    write_private_at(sds, CERT_FILE, _secrets_file(secret), 0o600, shown=str(files.certificate))


def _write_bundle(sds: int, bundle: TrustBundle, files: BootstrapFiles) -> None:
    write_private_at(sds, BUNDLE_FILE, _secrets_file(_bundle_secret(bundle)), 0o644, shown=str(files.bundle))


def bootstrap(
    files: BootstrapFiles,
    *,
    node: str,
    cluster: str,
    xds: Address,
    server_identity: SpiffeId,
    admin: Address,
    delta: bool = False,
    max_connections: int = MAX_DOWNSTREAM_CONNECTIONS,
    standby_xds: Sequence[Address] = (),
) -> bootstrap_pb2.Bootstrap:
    """The bootstrap document (see :func:`write_bootstrap`)."""
    static = [_xds_cluster(files, xds, server_identity, standby_xds)]
    return _document(node, cluster, admin, static, delta=delta, max_connections=max_connections)


def agent_bootstrap(
    *,
    node: str,
    cluster: str,
    identity: SpiffeId,
    xds: Address,
    server_identity: SpiffeId,
    agent_socket: Path,
    admin: Address,
    delta: bool = False,
    max_connections: int = MAX_DOWNSTREAM_CONNECTIONS,
) -> bootstrap_pb2.Bootstrap:
    """The bootstrap document of a sidecar whose node agent delivers its certificates (see
    :func:`write_agent_bootstrap`)."""
    check_agent_socket(agent_socket)
    certificate = secret_pb2.SdsSecretConfig(name=tls_secret_name(identity), sds_config=agent_sds())
    bundle = secret_pb2.SdsSecretConfig(name=bundle_secret_name(identity.trust_domain), sds_config=agent_sds())
    static = [_xds_cluster_over(xds, server_identity, certificate, bundle), _agent_cluster(agent_socket)]
    return _document(node, cluster, admin, static, delta=delta, max_connections=max_connections)


def _document(
    node: str,
    cluster: str,
    admin: Address,
    static_clusters: list[cluster_pb2.Cluster],
    *,
    delta: bool,
    max_connections: int,
) -> bootstrap_pb2.Bootstrap:
    api = config_source_pb2.ApiConfigSource
    ads_source = api(
        api_type=api.DELTA_GRPC if delta else api.GRPC,
        transport_api_version=config_source_pb2.ApiVersion.V3,
        set_node_on_first_message_only=True,
        grpc_services=[
            grpc_service_pb2.GrpcService(
                envoy_grpc=grpc_service_pb2.GrpcService.EnvoyGrpc(
                    cluster_name=XDS_CLUSTER,
                    retry_policy=base_pb2.RetryPolicy(
                        retry_back_off=backoff_pb2.BackoffStrategy(
                            base_interval=duration_pb2.Duration(nanos=250_000_000),
                            max_interval=duration_pb2.Duration(seconds=5),
                        )
                    ),
                )
            )
        ],
    )
    from_ads = config_source_pb2.ConfigSource(
        ads=config_source_pb2.AggregatedConfigSource(), resource_api_version=config_source_pb2.ApiVersion.V3
    )
    return bootstrap_pb2.Bootstrap(
        node=base_pb2.Node(id=node, cluster=cluster),
        admin=bootstrap_pb2.Admin(address=socket_address(admin)),
        dynamic_resources=bootstrap_pb2.Bootstrap.DynamicResources(
            ads_config=ads_source, cds_config=from_ads, lds_config=from_ads
        ),
        static_resources=bootstrap_pb2.Bootstrap.StaticResources(clusters=static_clusters),
        overload_manager=overload_pb2.OverloadManager(
            resource_monitors=[
                overload_pb2.ResourceMonitor(
                    name="envoy.resource_monitors.global_downstream_max_connections",
                    typed_config=pack(
                        downstream_connections_pb2.DownstreamConnectionsConfig(
                            max_active_downstream_connections=max_connections
                        )
                    ),
                )
            ]
        ),
    )


def _xds_cluster(
    files: BootstrapFiles, xds: Address, server_identity: SpiffeId, standby_xds: Sequence[Address] = ()
) -> cluster_pb2.Cluster:
    watched = config_source_pb2.ConfigSource(
        path_config_source=config_source_pb2.PathConfigSource(
            path=str(files.certificate),
            watched_directory=base_pb2.WatchedDirectory(path=str(files.certificate.parent)),
        ),
        resource_api_version=config_source_pb2.ApiVersion.V3,
    )
    bundle_source = config_source_pb2.ConfigSource()
    bundle_source.CopyFrom(watched)
    bundle_source.path_config_source.path = str(files.bundle)
    cluster = _xds_cluster_over(
        xds,
        server_identity,
        secret_pb2.SdsSecretConfig(name=CERT_SECRET_NAME, sds_config=watched),
        secret_pb2.SdsSecretConfig(name=BUNDLE_SECRET_NAME, sds_config=bundle_source),
    )
    if standby_xds:
        _add_standbys(cluster, standby_xds)
    return cluster


def _add_standbys(cluster: cluster_pb2.Cluster, standby_xds: Sequence[Address]) -> None:
    """The other replicas at priority 1, and the health check that moves the stream there (module docstring)."""
    standby = clusters.load_assignment(XDS_CLUSTER, standby_xds).endpoints[0]
    standby.priority = 1
    cluster.load_assignment.endpoints.append(standby)
    second = duration_pb2.Duration(seconds=1)
    cluster.health_checks.append(
        health_check_pb2.HealthCheck(
            timeout=second,
            interval=second,
            no_traffic_interval=second,
            unhealthy_threshold=wrappers_pb2.UInt32Value(value=1),
            healthy_threshold=wrappers_pb2.UInt32Value(value=1),
            tcp_health_check=health_check_pb2.HealthCheck.TcpHealthCheck(),
        )
    )


def _xds_cluster_over(
    xds: Address,
    server_identity: SpiffeId,
    certificate: secret_pb2.SdsSecretConfig,
    bundle: secret_pb2.SdsSecretConfig,
) -> cluster_pb2.Cluster:
    """The cluster of the xDS server: mTLS presenting the secret ``certificate``, accepting a server certificate
    of ``server_identity`` that chains to the secret ``bundle``; HTTP/2 with keepalives."""
    tls_context = tls_pb2.UpstreamTlsContext(
        common_tls_context=tls_pb2.CommonTlsContext(
            tls_certificate_sds_secret_configs=[certificate],
            combined_validation_context=tls_pb2.CommonTlsContext.CombinedCertificateValidationContext(
                default_validation_context=common_pb2.CertificateValidationContext(
                    match_typed_subject_alt_names=[uri_san_matcher(exact=str(server_identity))]
                ),
                validation_context_sds_secret_config=bundle,
            ),
            alpn_protocols=["h2"],
        )
    )
    http2 = http_protocol_options_pb2.HttpProtocolOptions(
        explicit_http_config=http_protocol_options_pb2.HttpProtocolOptions.ExplicitHttpConfig(
            http2_protocol_options=protocol_pb2.Http2ProtocolOptions(
                connection_keepalive=protocol_pb2.KeepaliveSettings(
                    interval=duration_pb2.Duration(seconds=30), timeout=duration_pb2.Duration(seconds=5)
                )
            )
        )
    )
    cluster = cluster_pb2.Cluster(
        name=XDS_CLUSTER,
        # an IP address, or a DNS name (an injected pod's: the control plane's Service) resolved by Envoy
        type=cluster_pb2.Cluster.STATIC if is_ip_address(xds.host) else cluster_pb2.Cluster.LOGICAL_DNS,
        connect_timeout=clusters.CONNECT_TIMEOUT,
        load_assignment=clusters.load_assignment(XDS_CLUSTER, [xds]),
        transport_socket=base_pb2.TransportSocket(name=TRANSPORT_SOCKET, typed_config=pack(tls_context)),
    )
    cluster.typed_extension_protocol_options[clusters.HTTP_PROTOCOL_OPTIONS].CopyFrom(pack(http2))
    return cluster


def _agent_cluster(socket: Path) -> cluster_pb2.Cluster:
    """The node agent: one endpoint, its SDS socket (a ``pipe`` address), gRPC over plaintext HTTP/2 (the agent
    tells its callers apart by the socket's peer credentials, not by a certificate)."""
    endpoint = endpoint_components_pb2.Endpoint(address=address_pb2.Address(pipe=address_pb2.Pipe(path=str(socket))))
    cluster = cluster_pb2.Cluster(
        name=AGENT_CLUSTER,
        type=cluster_pb2.Cluster.STATIC,
        connect_timeout=clusters.CONNECT_TIMEOUT,
        load_assignment=endpoint_pb2.ClusterLoadAssignment(
            cluster_name=AGENT_CLUSTER,
            endpoints=[
                endpoint_components_pb2.LocalityLbEndpoints(
                    lb_endpoints=[endpoint_components_pb2.LbEndpoint(endpoint=endpoint)]
                )
            ],
        ),
    )
    http2 = http_protocol_options_pb2.HttpProtocolOptions(
        explicit_http_config=http_protocol_options_pb2.HttpProtocolOptions.ExplicitHttpConfig(
            http2_protocol_options=protocol_pb2.Http2ProtocolOptions()
        )
    )
    cluster.typed_extension_protocol_options[clusters.HTTP_PROTOCOL_OPTIONS].CopyFrom(pack(http2))
    return cluster


def _bundle_secret(bundle: TrustBundle) -> secret_pb2.Secret:
    return secret_pb2.Secret(
        name=BUNDLE_SECRET_NAME,
        validation_context=common_pb2.CertificateValidationContext(
            trusted_ca=base_pb2.DataSource(inline_bytes=bundle.pem())
        ),
    )


def _mounted_bundle_secret(ca_dir: Path) -> secret_pb2.Secret:
    """The bundle secret naming ``<ca_dir>/ca.crt``, reloaded when anything is moved into ``ca_dir`` (kubelet's
    ``..data`` swap)."""
    return secret_pb2.Secret(
        name=BUNDLE_SECRET_NAME,
        validation_context=common_pb2.CertificateValidationContext(
            trusted_ca=base_pb2.DataSource(filename=str(ca_dir / CA_FILE)),
            watched_directory=base_pb2.WatchedDirectory(path=str(ca_dir)),
        ),
    )


def _secrets_file(secret: secret_pb2.Secret) -> bytes:
    response = discovery_pb2.DiscoveryResponse(resources=[pack(secret)])
    return json.dumps(json_format.MessageToDict(response), indent=2).encode()
