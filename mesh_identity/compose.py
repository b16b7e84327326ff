"""The composition root: every command builds what it needs here, from a config, in one order.

::

    config ─► plugins ─► CA provider ─► Authority                                       (Stage.AUTHORITY)
                  │            │
                  │            └──► rotation engine + metrics + root rotation ─► Service (Stage.SERVER)
                  │                         ▲ membership
    workload registry (mesh file | …) ──────┴──────────────► xDS component (a Service component)
                                                     └──────► signing API (a Service component, with ``signing``)

:func:`build` takes the stage a command needs: ``init``, ``doctor`` and the offline ``ca status`` stop at the
provider, ``issue`` and ``bootstrap`` at a started Authority, ``serve`` and the demo build the whole server.
Nothing else in the project builds a provider, an Authority, a rotation engine or an xDS server from a config.
It is the one module of the core that knows the plugin manager and the xDS layer.
"""

from __future__ import annotations

import dataclasses
import enum
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from types import TracebackType
from typing import Any

from mesh_identity.assembly import build_authority, build_provider, build_service
from mesh_identity.authority import Authority
from mesh_identity.clock import Clock, utcnow
from mesh_identity.config import Config, ListenConfig, SecretSource
from mesh_identity.errors import ConfigError
from mesh_identity.inject import patch as inject_patch
from mesh_identity.inject.component import InjectorComponent, InjectorMetrics, ServingCertificates
from mesh_identity.inject.patch import FailureMode, InjectSettings, SidecarDocuments, Workload
from mesh_identity.inject.review import Injector
from mesh_identity.inject.rules import CaptureSettings
from mesh_identity.inject.webhookconfig import WebhookConfigurations, WebhookTarget, desired_configuration
from mesh_identity.jwtkeys import JwtAuthority
from mesh_identity.mesh.model import Address, Mesh
from mesh_identity.provider import CAProvider, ProviderSpec
from mesh_identity.registry.base import StaticRegistry, WorkloadRegistry
from mesh_identity.registry.kube import KubernetesRegistry
from mesh_identity.registry.kube.bundles import DATA_KEY as BUNDLE_KEY
from mesh_identity.registry.kube.client import connect
from mesh_identity.registry.meshfile import MeshFileRegistry
from mesh_identity.server.cluster import HaComponent
from mesh_identity.server.service import Service
from plugins.manager import Plugins
from xds_sds.mesh.component import XDS_ADDR, XdsComponent, connection_age, server_identity, xds_connection_age
from xds_sds.mesh.injected import ControlPlaneAddresses, PodPaths, sidecar_documents
from xds_sds.mesh.prober import SidecarProber, probe_interval, reload_grace
from xds_sds.mesh.sidecars import SidecarDirs
from xds_sds.mesh.targets import ScrapeTargets
from xds_sds.protocol.metrics import XdsMetrics
from xds_sds.signing.component import SigningComponent, bundle_refresh_hint, signing_connection_age
from xds_sds.signing.metrics import SigningMetrics

DEFAULT_XDS_LISTEN = ListenConfig("127.0.0.1", 0)


class Stage(enum.IntEnum):
    """How far :func:`build` goes."""

    PROVIDER = 1  # the plugins and the provider
    AUTHORITY = 2  # and a started Authority over it
    SERVER = 3  # and the server: rotation engine, membership, endpoint, the xDS component with a registry


@dataclass
class System:
    """What :func:`build` made. ``authority`` is set from Stage.AUTHORITY on (the service's at SERVER);
    ``registry`` when the config has a mesh (``mesh_file``, or ``xds.listen`` alone: an empty one) or one was
    given; ``xds`` at SERVER with a registry."""

    config: Config
    plugins: Plugins
    provider: CAProvider
    registry: WorkloadRegistry | None = None
    authority: Authority | None = None
    service: Service | None = None
    xds: XdsComponent | None = None
    prober: SidecarProber | None = None
    signing: SigningComponent | None = None
    ha: HaComponent | None = None
    injector: InjectorComponent | None = None

    def close(self) -> None:
        """Release the provider (a started service releases it when it stops)."""
        self.provider.close()

    def __enter__(self) -> System:
        return self

    def __exit__(self, kind: type[BaseException] | None, err: BaseException | None, tb: TracebackType | None) -> None:
        if self.service is not None:
            self.service.stop()
        else:
            self.close()


def provider_specs(*, debug: bool = False) -> list[ProviderSpec]:
    """Every installed CA provider (``mesh-identity providers``)."""
    return list(Plugins.load(trace=debug).providers().values())


def registry_for(config: Config) -> WorkloadRegistry | None:
    """The registry a config describes: its mesh file, or the Kubernetes API (``registry``); an empty set when
    only ``xds.listen`` is set; else None. A mesh file that does not validate, or a kubeconfig that cannot be
    used, raises ConfigError naming the file or the key path."""
    if config.mesh_file is not None:
        return MeshFileRegistry(config.mesh_file, config.trust_domain)
    if config.registry is not None:
        return KubernetesRegistry(config.registry, config.trust_domain)
    if config.xds_listen is not None or config.signing is not None:
        return StaticRegistry(Mesh(config.trust_domain))
    return None


def build(
    config: Config,
    until: Stage,
    *,
    create: bool,
    debug: bool = False,
    registry: WorkloadRegistry | None = None,
    with_registry: bool | None = None,
    clock: Clock = utcnow,
) -> System:
    """Build up to ``until`` (see the module docstring). ``create`` lets the provider create new CA state;
    ``registry`` replaces the config's (another source of workloads); ``with_registry`` (default: at SERVER)
    loads the config's registry at an earlier stage too (``bootstrap`` checks nodes against it). The registry
    is loaded first, so a bad mesh file fails before any CA state is touched."""
    if registry is None and (until is Stage.SERVER if with_registry is None else with_registry):
        registry = registry_for(config)
    plugins = Plugins.load(trace=debug)
    plugins.configure(
        {"trust_domain": config.trust_domain.name, "state_dir": config.state_dir, "plugins": config.plugins}
    )
    spec = plugins.provider(config.ca.provider)
    options = plugins.validate_provider_options(spec.name, config.ca.provider_options)
    provider = build_provider(config, spec, options, create=create, clock=clock)
    system = System(config, plugins, provider, registry)
    if until is Stage.PROVIDER:
        return system
    if until is Stage.AUTHORITY:
        try:
            system.authority = build_authority(config, provider, events=plugins, clock=clock)
            system.authority.start()
        except BaseException:
            provider.close()
            raise
        return system
    keep = (*config.identities, *([server_identity(config.trust_domain)] if registry is not None else []))
    service = build_service(
        config, provider, events=plugins, identities=dict.fromkeys(keep), registry=registry, clock=clock
    )
    system.service, system.authority = service, service.authority
    if registry is not None:
        system.xds = attach_xds(service, registry)
        system.prober = attach_observability(service, registry)
        if config.signing is not None:
            system.signing = attach_signing(service, registry)
        if isinstance(registry, KubernetesRegistry):
            system.ha = attach_ha(service, registry)
            if config.inject is not None:
                system.injector = attach_injector(service, registry, system.ha)
    return system


HA_REQUEST_TIMEOUT = timedelta(seconds=5)  # one request of the election: half the renew deadline


def attach_ha(service: Service, registry: KubernetesRegistry) -> HaComponent:
    """High availability with the Kubernetes registry (:mod:`mesh_identity.server.cluster`): the Lease election,
    the replica's evidence, and on the leader the trust-bundle ConfigMaps and the root rotation driver; with
    its own client (the registry's settings, requests cut at :data:`HA_REQUEST_TIMEOUT`)."""
    settings = registry.settings
    client = connect(dataclasses.replace(settings, timeout=min(settings.timeout, HA_REQUEST_TIMEOUT)))
    component = HaComponent(service, client, settings, registry=registry, clock=service.clock)
    service.add_component(component)
    return component


def injector_settings(config: Config) -> InjectSettings:
    """What the webhook injects for ``config.inject``: the images, the capture exclusions, the failure mode, and
    the sidecars' documents (:func:`xds_sds.mesh.injected.sidecar_documents`) for each pod. ConfigError naming
    ``inject.capture`` for exclusions the capture rules refuse."""
    inject = config.inject
    assert inject is not None
    addresses = ControlPlaneAddresses(
        Address(inject.xds.host, inject.xds.port),
        Address(inject.signing.host, inject.signing.port),
        Address(inject.attest.host, inject.attest.port),
    )
    paths = PodPaths(
        sds_socket=Path(inject_patch.SDS_SOCKET),
        workload_socket=Path(inject_patch.WORKLOAD_SOCKET),
        agent_state_dir=Path(inject_patch.AGENT_STATE_DIR) / "state",  # made by the agent: owned by its uid
        token_file=Path(inject_patch.TOKEN_FILE),
        bundle_file=Path(inject_patch.CA_DIR) / BUNDLE_KEY,
    )

    def documents(workload: Workload) -> SidecarDocuments:
        bootstrap, agent = sidecar_documents(
            config.trust_domain, addresses, paths, namespace=workload.namespace, pod_name=workload.pod_name,
            service_account=workload.service_account, identity=workload.spiffe_id, app_uids=workload.app_uids,
        )  # fmt: skip
        return SidecarDocuments(bootstrap, agent)

    try:
        capture = CaptureSettings(
            exclude_inbound_ports=inject.exclude_inbound_ports,
            exclude_outbound_ports=inject.exclude_outbound_ports,
            exclude_outbound_cidrs=inject.exclude_outbound_ip_ranges,
        )
    except ValueError as err:
        raise ConfigError(f"inject.capture: {err}") from None
    return InjectSettings(
        trust_domain=config.trust_domain,
        envoy_image=inject.envoy_image,
        agent_image=inject.agent_image,
        capture_image=inject.capture_image,
        documents=documents,
        capture=capture,
        failure_mode=FailureMode(inject.failure_mode),
    )


def attach_injector(service: Service, registry: KubernetesRegistry, ha: HaComponent | None) -> InjectorComponent:
    """The sidecar injector of ``service`` (``config.inject``, :mod:`mesh_identity.inject.component`): its serving
    certificate in ``<state_dir>/injector``, the webhook server, and, written by the leader (``ha``), the
    MutatingWebhookConfiguration with the trust bundle as its caBundle, over its own client."""
    config = service.config
    inject = config.inject
    assert inject is not None
    metrics = InjectorMetrics(service.metrics.registry)
    certificates = ServingCertificates(
        service.authority, inject.server_names, config.state_dir / "injector", ttl=inject.cert_ttl,
        rotate_after=config.ca.rotate_after, clock=service.clock,
        on_issued=lambda served: metrics.expiry.set(served.leaf.not_valid_after_utc.timestamp()),
    )  # fmt: skip
    injector = Injector(injector_settings(config), observe=metrics.observe)
    if inject.service is not None:
        target = WebhookTarget(inject.service.namespace, inject.service.name, inject.service.port)
    else:
        assert inject.url is not None
        target = WebhookTarget(url=inject.url)
    mesh_name = registry.settings.mesh_name
    seconds = int(inject.timeout.total_seconds())

    def desired(pem: str) -> dict[str, Any]:
        return desired_configuration(
            inject.webhook_name, mesh_name, target, pem, failure_policy=inject.failure_policy, timeout_seconds=seconds
        )

    settings = registry.settings
    client = connect(dataclasses.replace(settings, timeout=min(settings.timeout, HA_REQUEST_TIMEOUT)))
    webhooks = WebhookConfigurations(
        client, inject.webhook_name, desired, is_leader=ha.is_leader if ha is not None else lambda: True
    )
    component = InjectorComponent(
        certificates, injector, host=inject.listen.host, port=inject.listen.port, bundles=service.engine.bundles,
        webhooks=webhooks,
    )  # fmt: skip
    service.add_component(component)
    return component


def attach_xds(service: Service, registry: WorkloadRegistry) -> XdsComponent:
    """The xDS component of ``service``: fed by ``registry`` and the service's engine, reporting to its event
    sinks (plugins and metrics) and its metrics registry, the root rotation's ack source. With ``xds.secrets:
    agent`` it sends no certificate and renews no bootstrap directory (the node agents deliver both)."""
    config = service.config
    listen = config.xds_listen or DEFAULT_XDS_LISTEN
    component = XdsComponent(
        service.engine,
        registry,
        address=Address(listen.host, listen.port),
        sidecars=SidecarDirs(config.state_dir) if config.xds_secrets is SecretSource.CONTROL_PLANE else None,
        audit=service.events,
        metrics=XdsMetrics(service.metrics.registry),
        max_connection_age=connection_age(config.ca.workload_ttl, config.ca.rotate_after),
        addr_file=config.state_dir / XDS_ADDR,
        xds_connection_age=xds_connection_age(config.ca.workload_ttl, config.ca.rotate_after),
        secrets=config.xds_secrets,
    )
    service.add_component(component)
    service.set_ack_source(component)
    return component


def attach_signing(service: Service, registry: WorkloadRegistry) -> SigningComponent:
    """The signing API of ``service`` (``config.signing``): its Authority and engine, ``registry`` for who may
    have what, the trust domain's JWT keys (``<state_dir>/jwt``), auditing to the service's event sinks."""
    config = service.config
    assert config.signing is not None
    component = SigningComponent(
        service.engine,
        registry,
        JwtAuthority(config.trust_domain, config.state_dir, settings=config.jwt, clock=service.clock),
        settings=config.signing,
        state_dir=config.state_dir,
        workload_ttl=config.ca.workload_ttl,
        events=service.events,
        metrics=SigningMetrics(service.metrics.registry),
        max_connection_age=signing_connection_age(config.ca.workload_ttl, config.ca.rotate_after),
        refresh_hint=bundle_refresh_hint(config.jwt),
        clock=service.clock,
    )
    service.add_component(component)
    return component


def attach_observability(service: Service, registry: WorkloadRegistry) -> SidecarProber:
    """The sidecars seen from outside: the Prometheus file SD of their stats endpoints
    (``<state_dir>/prometheus/sidecars.json``) and the prober of the certificates they serve, whose metrics go
    to the service's registry (see :mod:`xds_sds.mesh.prober`, :mod:`xds_sds.mesh.targets`)."""
    ca = service.config.ca
    service.add_component(ScrapeTargets(registry, service.config.state_dir))
    prober = SidecarProber(
        service.engine,
        registry,
        interval=probe_interval(ca.workload_ttl, ca.rotate_after),
        grace=reload_grace(ca.workload_ttl, ca.rotate_after),
        metrics=service.metrics.registry,
        clock=service.clock,
    )
    service.add_component(prober)
    return prober
