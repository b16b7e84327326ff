"""The kinds the Kubernetes registry follows, and the names it reads and writes.

One watch per kind (:mod:`~mesh_identity.registry.kube.watch`), across all namespaces except Namespaces
themselves, which are watched with the label selector ``mesh-identity.io/monitored-by=<mesh name>``.
"""

from __future__ import annotations

from dataclasses import dataclass

MONITORED_BY = "mesh-identity.io/monitored-by"
"""The label of a Namespace of the mesh; its value is the mesh's name (``registry.mesh_name``)."""
INJECTED = "mesh-identity.io/injected"
"""The annotation the injector sets (``"true"``) on a pod it injected: its traffic is captured by its sidecar."""
SERVICE_NAME = "kubernetes.io/service-name"
"""The label of an EndpointSlice naming the Service it belongs to."""
COMPONENT = "mesh-identity"
"""The component that reports the Events the registry writes."""


@dataclass(frozen=True, slots=True)
class Resource:
    """A kind of the Kubernetes API, by its group, version and plural."""

    kind: str
    plural: str
    group: str = ""
    version: str = "v1"
    namespaced: bool = True

    @property
    def api_version(self) -> str:
        return f"{self.group}/{self.version}" if self.group else self.version

    def __str__(self) -> str:
        return self.plural if not self.group else f"{self.plural}.{self.group}"


NAMESPACES = Resource("Namespace", "namespaces", namespaced=False)
SERVICE_ACCOUNTS = Resource("ServiceAccount", "serviceaccounts")
PODS = Resource("Pod", "pods")
SERVICES = Resource("Service", "services")
ENDPOINT_SLICES = Resource("EndpointSlice", "endpointslices", "discovery.k8s.io")
TRAFFIC_TARGETS = Resource("TrafficTarget", "traffictargets", "access.smi-spec.io", "v1alpha3")
HTTP_ROUTE_GROUPS = Resource("HTTPRouteGroup", "httproutegroups", "specs.smi-spec.io", "v1alpha4")
TCP_ROUTES = Resource("TCPRoute", "tcproutes", "specs.smi-spec.io", "v1alpha4")
TRAFFIC_SPLITS = Resource("TrafficSplit", "trafficsplits", "split.smi-spec.io", "v1alpha4")
EVENTS = Resource("Event", "events")
SECRETS = Resource("Secret", "secrets")
CONFIG_MAPS = Resource("ConfigMap", "configmaps")
LEASES = Resource("Lease", "leases", "coordination.k8s.io")
MUTATING_WEBHOOK_CONFIGURATIONS = Resource(
    "MutatingWebhookConfiguration", "mutatingwebhookconfigurations", "admissionregistration.k8s.io", namespaced=False
)

SMI = (HTTP_ROUTE_GROUPS, TCP_ROUTES, TRAFFIC_TARGETS, TRAFFIC_SPLITS)
WATCHED = (NAMESPACES, SERVICE_ACCOUNTS, PODS, SERVICES, ENDPOINT_SLICES, *SMI)
