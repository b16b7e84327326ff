"""The ``inject`` section of the config: the sidecar injector (``mesh_identity.inject``), part of ``serve``.

::

    inject:
      listen: 0.0.0.0:9443                  # the admission webhook (HTTPS; its certificate from the mesh CA)
      cert_ttl: 24h                         # the serving certificate's lifetime; renewed at ca.rotate_after of it
      failure_mode: deny                    # a pod that cannot be injected: deny (refused, the reason named) or
                                            #   allow (admitted unmodified, with a warning)
      webhook:
        name: mesh-identity-injector        # the MutatingWebhookConfiguration the control plane keeps current
        failure_policy: Fail                # Fail (default) or Ignore: when the API server cannot call the webhook
        timeout: 10s                        # 1s to 30s, the API server's limit
        service: {namespace: mesh-identity-system, name: mesh-identity-injector, port: 443}
        # url: https://10.0.0.4:9443/mutate # instead of service: a webhook outside the cluster
      sidecars:                             # where an injected pod's sidecars reach the control plane
        xds: mesh-identity.mesh-identity-system.svc:15010
        signing: mesh-identity.mesh-identity-system.svc:15011
        attest: mesh-identity.mesh-identity-system.svc:15012
      images:
        envoy: docker.io/envoyproxy/envoy:v1.36.2
        agent: ghcr.io/mesh-identity/mesh-identity:0.1.0
        capture: ghcr.io/mesh-identity/mesh-identity:0.1.0   # runs sh and iptables
      capture:                              # mesh-wide exclusions; pods add theirs with annotations
        exclude_outbound_ports: []
        exclude_inbound_ports: [15090]
        exclude_outbound_ip_ranges: []

The serving certificate's names are the Service's (``<name>.<namespace>.svc``), or the URL's host. Injection needs
the Kubernetes registry, ``xds.secrets: agent``, ``signing.kubernetes`` (the agents authenticate with the pods'
service-account tokens) and ``ca.mode: intermediate`` (the certificate is signed by the replica's intermediate):
:func:`mesh_identity.config.parse_config` checks them together.
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass
from datetime import timedelta
from typing import Any
from urllib.parse import urlsplit

from mesh_identity.document import integer, keys, mapping, sequence, shown, string
from mesh_identity.durations import parse_duration
from mesh_identity.errors import ConfigError
from mesh_identity.ports import is_ip_address

DEFAULT_ENVOY_IMAGE = "docker.io/envoyproxy/envoy:v1.36.2"
DEFAULT_AGENT_IMAGE = "ghcr.io/mesh-identity/mesh-identity:0.1.0"
FAILURE_POLICIES = ("Fail", "Ignore")
FAILURE_MODES = ("deny", "allow")
_LABEL = re.compile(r"^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$")
_HOST = re.compile(r"^[A-Za-z0-9]([A-Za-z0-9.-]{0,251}[A-Za-z0-9])?$")

_TOP = ("listen", "cert_ttl", "failure_mode", "webhook", "sidecars", "images", "capture")
_WEBHOOK = ("name", "failure_policy", "timeout", "service", "url")
_SERVICE = ("namespace", "name", "port")
_SIDECARS = ("xds", "signing", "attest")
_IMAGES = ("envoy", "agent", "capture")
_CAPTURE = ("exclude_outbound_ports", "exclude_inbound_ports", "exclude_outbound_ip_ranges")


@dataclass(frozen=True, slots=True)
class WebhookService:
    namespace: str
    name: str
    port: int = 443

    @property
    def host(self) -> str:
        """The name the API server checks the webhook's certificate against."""
        return f"{self.name}.{self.namespace}.svc"


@dataclass(frozen=True, slots=True)
class HostPort:
    host: str
    port: int

    def __str__(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


@dataclass(frozen=True, slots=True)
class InjectConfig:
    listen: HostPort
    xds: HostPort
    signing: HostPort
    attest: HostPort
    service: WebhookService | None = None
    url: str | None = None
    webhook_name: str = "mesh-identity-injector"
    failure_policy: str = "Fail"
    timeout: timedelta = timedelta(seconds=10)
    failure_mode: str = "deny"
    cert_ttl: timedelta = timedelta(hours=24)
    envoy_image: str = DEFAULT_ENVOY_IMAGE
    agent_image: str = DEFAULT_AGENT_IMAGE
    capture_image: str = DEFAULT_AGENT_IMAGE
    exclude_outbound_ports: tuple[int, ...] = ()
    exclude_inbound_ports: tuple[int, ...] = (15090,)
    exclude_outbound_ip_ranges: tuple[str, ...] = ()

    @property
    def server_names(self) -> tuple[str, ...]:
        """The names of the webhook's serving certificate: the Service's, or the URL's host."""
        if self.service is not None:
            return (self.service.host,)
        assert self.url is not None
        return (str(urlsplit(self.url).hostname),)


def _host_port(value: Any, path: str, *, listen: bool = False) -> HostPort:
    text = string(value, path)
    host, sep, port = text.rpartition(":")
    host = host[1:-1] if host.startswith("[") and host.endswith("]") else host
    lowest = 0 if listen else 1
    if (
        not sep
        or (not _HOST.match(host) and not is_ip_address(host))
        or not port.isdigit()
        or not lowest <= int(port) <= 65535
    ):
        raise ConfigError(
            f"{path}: {shown(value)} is not HOST:PORT (e.g. mesh-identity.mesh-identity-system.svc:15010)"
        )
    return HostPort(host, int(port))


def _label(value: Any, path: str) -> str:
    text = string(value, path)
    if not _LABEL.match(text):
        raise ConfigError(
            f"{path}: {shown(text)} is not a Kubernetes name (lowercase letters, digits, '-'; 63 at most)"
        )
    return text


def _choice(value: Any, path: str, choices: tuple[str, ...]) -> str:
    if value not in choices:
        raise ConfigError(f"{path}: {shown(value)} is not one of {', '.join(choices)}")
    return str(value)


def _duration(value: Any, path: str, low: timedelta, high: timedelta | None = None) -> timedelta:
    try:
        found = parse_duration(string(value, path))
    except ValueError as err:
        raise ConfigError(f"{path}: {err}") from None
    if found < low or (high is not None and found > high):
        bound = f"between {low} and {high}" if high is not None else f"at least {low}"
        raise ConfigError(f"{path}: {shown(value)} is not {bound}")
    return found


def _url(value: Any, path: str) -> str:
    text = string(value, path)
    parts = urlsplit(text)
    if parts.scheme != "https" or not parts.hostname or parts.query or parts.fragment or parts.username:
        raise ConfigError(
            f"{path}: {shown(text)} is not an https:// URL with a host and no query (the API server's rule)"
        )
    return text


def _image(value: Any, path: str) -> str:
    text = string(value, path)
    if text != text.strip() or any(c.isspace() for c in text):
        raise ConfigError(f"{path}: {shown(text)} is not an image reference")
    return text


def _ports(value: Any, path: str) -> tuple[int, ...]:
    return tuple(integer(v, f"{path}[{i}]", 1, 65535) for i, v in enumerate(sequence(value, path)))


def _cidrs(value: Any, path: str) -> tuple[str, ...]:
    found = []
    for index, item in enumerate(sequence(value, path)):
        text = string(item, f"{path}[{index}]")
        try:
            network = ipaddress.ip_network(text, strict=True)
        except ValueError as err:
            raise ConfigError(f"{path}[{index}]: {shown(text)} is not a CIDR ({err})") from None
        if network.version != 4:
            raise ConfigError(f"{path}[{index}]: {shown(text)} is IPv6; the capture rules are IPv4 (iptables)")
        found.append(str(network))
    return tuple(found)


def parse_inject(value: Any) -> InjectConfig | None:
    """The ``inject`` section (see the module docstring); ConfigError naming the key path."""
    if value is None:
        return None
    raw = mapping(value, "inject")
    keys(raw, _TOP, ("listen", "webhook", "sidecars"), "inject")
    webhook = mapping(raw["webhook"], "inject.webhook")
    keys(webhook, _WEBHOOK, (), "inject.webhook")
    if ("service" in webhook) == ("url" in webhook):
        raise ConfigError("inject.webhook: give either service: {namespace, name, port} or url: https://...")
    service = None
    if "service" in webhook:
        found = mapping(webhook["service"], "inject.webhook.service")
        keys(found, _SERVICE, ("namespace", "name"), "inject.webhook.service")
        service = WebhookService(
            _label(found["namespace"], "inject.webhook.service.namespace"),
            _label(found["name"], "inject.webhook.service.name"),
            integer(found.get("port", 443), "inject.webhook.service.port", 1, 65535),
        )
    sidecars = mapping(raw["sidecars"], "inject.sidecars")
    keys(sidecars, _SIDECARS, _SIDECARS, "inject.sidecars")
    images = mapping(raw.get("images") or {}, "inject.images")
    keys(images, _IMAGES, (), "inject.images")
    capture = mapping(raw.get("capture") or {}, "inject.capture")
    keys(capture, _CAPTURE, (), "inject.capture")
    agent_image = _image(images.get("agent", DEFAULT_AGENT_IMAGE), "inject.images.agent")
    return InjectConfig(
        listen=_host_port(raw["listen"], "inject.listen", listen=True),
        xds=_host_port(sidecars["xds"], "inject.sidecars.xds"),
        signing=_host_port(sidecars["signing"], "inject.sidecars.signing"),
        attest=_host_port(sidecars["attest"], "inject.sidecars.attest"),
        service=service,
        url=_url(webhook["url"], "inject.webhook.url") if "url" in webhook else None,
        webhook_name=_label(webhook.get("name", "mesh-identity-injector"), "inject.webhook.name"),
        failure_policy=_choice(
            webhook.get("failure_policy", "Fail"), "inject.webhook.failure_policy", FAILURE_POLICIES
        ),
        timeout=_duration(webhook.get("timeout", "10s"), "inject.webhook.timeout", timedelta(seconds=1),
                          timedelta(seconds=30)),
        failure_mode=_choice(raw.get("failure_mode", "deny"), "inject.failure_mode", FAILURE_MODES),
        cert_ttl=_duration(raw.get("cert_ttl", "24h"), "inject.cert_ttl", timedelta(seconds=10)),
        envoy_image=_image(images.get("envoy", DEFAULT_ENVOY_IMAGE), "inject.images.envoy"),
        agent_image=agent_image,
        capture_image=_image(images.get("capture", agent_image), "inject.images.capture"),
        exclude_outbound_ports=_ports(
            capture.get("exclude_outbound_ports", []), "inject.capture.exclude_outbound_ports"
        ),
        exclude_inbound_ports=_ports(
            capture.get("exclude_inbound_ports", [15090]), "inject.capture.exclude_inbound_ports"
        ),
        exclude_outbound_ip_ranges=_cidrs(
            capture.get("exclude_outbound_ip_ranges", []), "inject.capture.exclude_outbound_ip_ranges"
        ),
    )  # fmt: skip
