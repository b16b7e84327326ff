"""The configuration file (YAML), validated with errors that name the key path and the bad value.

Example (``examples/config.yaml``, loaded by a test)::

    trust_domain: example.org
    state_dir: ./state
    ca:
      provider: builtin
      mode: intermediate
      key_type: ecdsa-p256
      workload_ttl: 1h
      intermediate_ttl: 24h
      rotate_after: 0.5
      provider_options: {}
"""

from __future__ import annotations

import difflib
import enum
import os
import re
import socket
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any

from mesh_identity.document import read_yaml, shown
from mesh_identity.durations import parse_duration
from mesh_identity.errors import ConfigError, InvalidSpiffeIdError
from mesh_identity.injectconfig import InjectConfig, parse_inject
from mesh_identity.keys import KeyType
from mesh_identity.provider import Mode
from mesh_identity.spiffe import SpiffeId, TrustDomain

CONFIG_ENV = "MESH_IDENTITY_CONFIG"
MAX_CONFIG_BYTES = 1024 * 1024


@dataclass(frozen=True, slots=True)
class CaConfig:
    provider: str = "builtin"
    mode: Mode = Mode.INTERMEDIATE
    key_type: KeyType = KeyType.ECDSA_P256
    workload_ttl: timedelta = timedelta(hours=1)
    intermediate_ttl: timedelta = timedelta(hours=24)
    rotate_after: float = 0.5
    jitter: float = 0.1
    provider_options: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class ListenConfig:
    host: str
    port: int

    def __str__(self) -> str:
        return f"{self.host}:{self.port}"


class SecretSource(enum.StrEnum):
    """Where a mesh's sidecars get their certificate and key (``xds.secrets``)."""

    CONTROL_PLANE = "control-plane"  # the control plane makes every key and sends it over SDS (OSM's, Consul's model)
    AGENT = "agent"  # a node agent makes the keys where the workload runs; SDS over a Unix socket (SPIRE's model)


class Egress(enum.StrEnum):
    """What a captured sidecar (an injected pod's) does with a connection to a destination that is no mesh
    service's ClusterIP and port (``registry.egress``)."""

    DENY = "deny"  # closed (the default: fail closed, like OSM without enableEgress)
    PASSTHROUGH = "passthrough"  # sent on, unchanged and in plaintext, to where the app dialled


@dataclass(frozen=True, slots=True)
class KubernetesAuthConfig:
    """How the signing API checks Kubernetes service-account tokens (TokenReview)."""

    kubeconfig: Path | None = None  # None: the in-cluster service-account config
    audience: str = "mesh-identity"
    timeout: timedelta = timedelta(seconds=5)


@dataclass(frozen=True, slots=True)
class SigningConfig:
    """The signing API (``signing``): CSRs in, SVIDs out, for node agents."""

    listen: ListenConfig  # mutual TLS: renewals and workload SVIDs, authenticated by the caller's SVID
    attest_listen: ListenConfig  # server-authenticated TLS: a join token or a service-account token, once
    kubernetes: KubernetesAuthConfig | None = None
    max_csr_bytes: int = 8 * 1024


@dataclass(frozen=True, slots=True)
class JwtConfig:
    """JWT-SVIDs (``jwt``): ES256 keys of the trust domain, held by the control plane."""

    ttl: timedelta = timedelta(minutes=5)  # a JWT-SVID's default lifetime
    max_ttl: timedelta = timedelta(hours=1)  # the most a caller may ask for
    key_ttl: timedelta = timedelta(days=1)  # a signing key signs for this long, then the next one takes over


@dataclass(frozen=True, slots=True)
class Config:
    trust_domain: TrustDomain
    state_dir: Path
    ca: CaConfig = field(default_factory=CaConfig)
    metrics_listen: ListenConfig | None = None
    xds_listen: ListenConfig | None = None
    xds_ack_timeout: timedelta = timedelta(minutes=1)
    admin_beyond_loopback: bool = False
    mesh_file: Path | None = None
    plugins: Mapping[str, Any] = field(default_factory=dict)
    source: Path | None = None
    identities: tuple[SpiffeId, ...] = ()
    xds_secrets: SecretSource = SecretSource.CONTROL_PLANE
    signing: SigningConfig | None = None
    jwt: JwtConfig = field(default_factory=JwtConfig)
    registry: RegistryConfig | None = None  # another source of workloads than mesh_file: the Kubernetes API
    inject: InjectConfig | None = None  # the sidecar injector (mesh_identity.injectconfig)


# -- field parsers: each takes the value and its key path, returns the parsed value or raises ConfigError ----


def _string(value: Any, path: str) -> str:
    if not isinstance(value, str) or not value:
        raise ConfigError(f"{path}: {shown(value)} is not a non-empty string")
    return value


def _duration(value: Any, path: str) -> timedelta:
    try:
        return parse_duration(value)
    except ValueError as err:
        raise ConfigError(f"{path}: {err}") from None


def _fraction(value: Any, path: str) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not 0 < value < 1:
        raise ConfigError(f"{path}: {shown(value)} is not a fraction strictly between 0 and 1")
    return float(value)


def _jitter(value: Any, path: str) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not 0 <= value < 0.5:
        raise ConfigError(f"{path}: {shown(value)} is not a fraction in [0, 0.5)")
    return float(value)


def _enum(kind: type[Mode] | type[KeyType]) -> Callable[[Any, str], Any]:
    def parse(value: Any, path: str) -> Any:
        try:
            return kind(value)
        except ValueError:
            choices = ", ".join(k.value for k in kind)
            raise ConfigError(f"{path}: {shown(value)} is not one of {choices}") from None

    return parse


def _mapping(value: Any, path: str) -> dict[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, dict) or not all(isinstance(k, str) for k in value):
        raise ConfigError(f"{path}: {shown(value)} is not a mapping")
    return dict(value)


def _listen(value: Any, path: str) -> ListenConfig:
    text = _string(value, path)
    host, sep, port = text.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ConfigError(f"{path}: {shown(value)} is not HOST:PORT (e.g. 127.0.0.1:9102; port 0 picks a free one)")
    return ListenConfig(host.strip("[]"), int(port))


_CA_FIELDS: dict[str, Callable[[Any, str], Any]] = {
    "provider": _string,
    "mode": _enum(Mode),
    "key_type": _enum(KeyType),
    "workload_ttl": _duration,
    "intermediate_ttl": _duration,
    "rotate_after": _fraction,
    "jitter": _jitter,
    "provider_options": _mapping,
}
_TOP_FIELDS = (
    "trust_domain", "state_dir", "ca", "metrics", "xds", "mesh_file", "plugins", "identities", "signing", "jwt",
    "registry", "inject",
)  # fmt: skip
_SECTION_FIELDS = {"metrics": ("listen", "admin_beyond_loopback"), "xds": ("listen", "ack_timeout", "secrets")}
_SIGNING_FIELDS = ("listen", "attest_listen", "kubernetes", "max_csr_bytes")
_KUBERNETES_FIELDS = ("kubeconfig", "in_cluster", "audience", "timeout")
_JWT_FIELDS = ("ttl", "max_ttl", "key_ttl")


def _positive(value: Any, path: str) -> timedelta:
    duration = _duration(value, path)
    if duration <= timedelta(0):
        raise ConfigError(f"{path}: {shown(value)} is not a positive duration")
    return duration


def _kubernetes_auth(value: Any, base_dir: Path) -> KubernetesAuthConfig:
    raw = _mapping(value, "signing.kubernetes")
    _reject_unknown(raw, _KUBERNETES_FIELDS, "signing.kubernetes.")
    in_cluster = raw.get("in_cluster", "kubeconfig" not in raw)
    if not isinstance(in_cluster, bool):
        raise ConfigError(f"signing.kubernetes.in_cluster: {shown(in_cluster)} is not true or false")
    if in_cluster == ("kubeconfig" in raw):
        raise ConfigError(
            "signing.kubernetes: give either kubeconfig: FILE or in_cluster: true (the pod's service account)"
        )
    kubeconfig = base_dir / _string(raw["kubeconfig"], "signing.kubernetes.kubeconfig") if "kubeconfig" in raw else None
    audience = _string(raw.get("audience", "mesh-identity"), "signing.kubernetes.audience")
    return KubernetesAuthConfig(kubeconfig, audience, _positive(raw.get("timeout", "5s"), "signing.kubernetes.timeout"))


def _signing(value: Any, base_dir: Path) -> SigningConfig | None:
    if value is None:
        return None
    raw = _mapping(value, "signing")
    _reject_unknown(raw, _SIGNING_FIELDS, "signing.")
    for key in ("listen", "attest_listen"):
        if key not in raw:
            raise ConfigError(f"signing.{key}: required (HOST:PORT; port 0 picks a free one)")
    listen, attest = _listen(raw["listen"], "signing.listen"), _listen(raw["attest_listen"], "signing.attest_listen")
    if listen.port != 0 and (listen.host, listen.port) == (attest.host, attest.port):
        raise ConfigError(f"signing.attest_listen: {attest} is signing.listen's address; they are two listeners")
    size = raw.get("max_csr_bytes", 8 * 1024)
    if isinstance(size, bool) or not isinstance(size, int) or not 512 <= size <= 64 * 1024:
        raise ConfigError(f"signing.max_csr_bytes: {shown(size)} is not a whole number of bytes in [512, 65536]")
    kubernetes = _kubernetes_auth(raw["kubernetes"], base_dir) if "kubernetes" in raw else None
    return SigningConfig(listen, attest, kubernetes, size)


def _jwt(value: Any) -> JwtConfig:
    raw = _mapping(value, "jwt")
    _reject_unknown(raw, _JWT_FIELDS, "jwt.")
    jwt = JwtConfig(
        ttl=_positive(raw.get("ttl", "5m"), "jwt.ttl"),
        max_ttl=_positive(raw.get("max_ttl", "1h"), "jwt.max_ttl"),
        key_ttl=_positive(raw.get("key_ttl", "24h"), "jwt.key_ttl"),
    )
    if jwt.ttl > jwt.max_ttl:
        raise ConfigError(f"jwt.ttl: {shown(raw.get('ttl', '5m'))} is longer than jwt.max_ttl")
    if jwt.key_ttl < jwt.max_ttl * 2:
        raise ConfigError(
            f"jwt.key_ttl: {shown(raw.get('key_ttl', '24h'))} is shorter than twice jwt.max_ttl; a key must outlive "
            "every token it signed by a margin"
        )
    return jwt


def _identities(value: Any, trust_domain: TrustDomain) -> tuple[SpiffeId, ...]:
    """The ``identities`` list: SPIFFE IDs of the trust domain, each once (kept issued besides the registry's)."""
    if value is None:
        return ()
    if not isinstance(value, list):
        raise ConfigError(f"identities: {shown(value)} is not a list of SPIFFE IDs")
    found: dict[SpiffeId, None] = {}
    for index, item in enumerate(value):
        path = f"identities[{index}]"
        try:
            spiffe_id = SpiffeId.parse(_string(item, path))
        except InvalidSpiffeIdError as err:
            raise ConfigError(f"{path}: {err}") from None
        if spiffe_id.trust_domain != trust_domain:
            raise ConfigError(f"{path}: {spiffe_id} is not in trust domain {trust_domain}")
        if not spiffe_id.path:
            raise ConfigError(f"{path}: {spiffe_id} has no path; a workload identity needs one")
        if spiffe_id in found:
            raise ConfigError(f"{path}: {spiffe_id} is listed twice")
        found[spiffe_id] = None
    return tuple(found)


def _reject_unknown(section: Mapping[str, Any], known: tuple[str, ...] | Mapping[str, Any], prefix: str) -> None:
    for key in section:
        if key not in known:
            matches = difflib.get_close_matches(str(key), list(known), n=1, cutoff=0.6)
            hint = f" (did you mean {matches[0]!r}?)" if matches else f" (known: {', '.join(known)})"
            raise ConfigError(f"{prefix}{key}: unknown key{hint}")


NAMESPACE_FILE = Path("/var/run/secrets/kubernetes.io/serviceaccount/namespace")
DEFAULT_NAMESPACE = "mesh-identity-system"
DEFAULT_LEASE = "mesh-identity-leader"
_OBJECT_NAME = r"[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*"  # an RFC 1123 subdomain
_LABEL_NAME = r"[a-z0-9]([-a-z0-9]*[a-z0-9])?"  # an RFC 1123 label (a namespace's name)


def default_namespace(path: Path = NAMESPACE_FILE) -> str:
    """The control plane's own namespace: the pod's (from its service-account mount), else ``mesh-identity-system``."""
    try:
        text = path.read_text().strip()
    except OSError:
        return DEFAULT_NAMESPACE
    return text or DEFAULT_NAMESPACE


def default_identity(environ: Mapping[str, str] | None = None) -> str:
    """This replica's name in leader election: ``POD_NAME`` (the Deployment sets it from ``metadata.name``), else
    the host name, lowercased."""
    env = os.environ if environ is None else environ
    return (env.get("POD_NAME") or socket.gethostname()).strip().lower()


@dataclass(frozen=True, slots=True)
class LeaderElectionConfig:
    """``registry.leader_election``: the Lease the replicas elect a leader with, and this replica's name in it
    ("" here: :func:`default_identity` when used)."""

    lease_name: str = DEFAULT_LEASE
    identity: str = ""


@dataclass(frozen=True, slots=True)
class RegistryConfig:
    """Where the workloads come from when not from a mesh file (``registry``): the Kubernetes API."""

    mesh_name: str  # the namespaces labelled mesh-identity.io/monitored-by: <mesh_name> are the mesh's
    kubeconfig: Path | None = None  # None: the in-cluster service-account config
    timeout: timedelta = timedelta(seconds=10)  # one API request (a watch stream: beyond its own duration)
    kind: str = "kubernetes"
    namespace: str = DEFAULT_NAMESPACE  # the control plane's own namespace: its Leases (and the CA's Secret)
    leader_election: LeaderElectionConfig = field(default_factory=LeaderElectionConfig)
    egress: Egress = Egress.DENY  # an injected pod's sidecar, for a destination that is no mesh service


_REGISTRY_FIELDS = (
    "kind", "mesh_name", "kubeconfig", "in_cluster", "timeout", "namespace", "leader_election", "egress",
)  # fmt: skip
_LEADER_FIELDS = ("lease_name", "identity")


def _object_name(value: Any, path: str, *, label: bool = False) -> str:
    """A Kubernetes object name (a DNS-1123 label with ``label``: a namespace's), or ConfigError naming ``path``."""
    text = _string(value, path)
    if len(text) > (63 if label else 253) or not re.fullmatch(_LABEL_NAME if label else _OBJECT_NAME, text):
        what = "a namespace name (lowercase letters, digits and '-'; 63 at most)" if label else "an object name"
        raise ConfigError(
            f"{path}: {shown(text)} is not {what} (alphanumeric at both ends, also '.' in an object name)"
        )
    return text


def _leader_election(value: Any) -> LeaderElectionConfig:
    raw = _mapping(value if value is not None else {}, "registry.leader_election")
    _reject_unknown(raw, _LEADER_FIELDS, "registry.leader_election.")
    lease = _object_name(raw.get("lease_name", DEFAULT_LEASE), "registry.leader_election.lease_name")
    identity = raw.get("identity")
    if identity is None:
        identity = default_identity()
        path = "registry.leader_election.identity (default: POD_NAME, else the host name)"
    else:
        path = "registry.leader_election.identity"
    return LeaderElectionConfig(lease, _object_name(identity, path))


_LABEL_CHARS = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-_.")


def _registry(value: Any, base_dir: Path) -> RegistryConfig | None:
    """The ``registry`` section: ``{kind: kubernetes, mesh_name: NAME, kubeconfig: FILE | in_cluster: true}``."""
    if value is None:
        return None
    raw = _mapping(value, "registry")
    _reject_unknown(raw, _REGISTRY_FIELDS, "registry.")
    for key, hint in (("kind", "kubernetes"), ("mesh_name", "the value of the namespaces' monitored-by label")):
        if key not in raw:
            raise ConfigError(f"registry.{key}: required ({hint})")
    if raw["kind"] != "kubernetes":
        raise ConfigError(f"registry.kind: {shown(raw['kind'])} is not kubernetes (a mesh file is given as mesh_file)")
    name = _string(raw["mesh_name"], "registry.mesh_name")
    if len(name) > 63 or not set(name) <= _LABEL_CHARS or not (name[0].isalnum() and name[-1].isalnum()):
        raise ConfigError(
            f"registry.mesh_name: {shown(name)} is not a Kubernetes label value (letters, digits, '-', '_', '.'; "
            "63 at most; a letter or digit at both ends)"
        )
    in_cluster = raw.get("in_cluster", "kubeconfig" not in raw)
    if not isinstance(in_cluster, bool):
        raise ConfigError(f"registry.in_cluster: {shown(in_cluster)} is not true or false")
    if in_cluster == ("kubeconfig" in raw):
        raise ConfigError("registry: give either kubeconfig: FILE or in_cluster: true (the pod's service account)")
    kubeconfig = base_dir / _string(raw["kubeconfig"], "registry.kubeconfig") if "kubeconfig" in raw else None
    namespace = raw.get("namespace")
    return RegistryConfig(
        name,
        kubeconfig,
        _positive(raw.get("timeout", "10s"), "registry.timeout"),
        namespace=_object_name(namespace, "registry.namespace", label=True) if namespace else default_namespace(),
        leader_election=_leader_election(raw.get("leader_election")),
        egress=_egress(raw.get("egress", "deny")),
    )


def _egress(value: Any) -> Egress:
    try:
        return Egress(value)
    except ValueError:
        raise ConfigError(
            f"registry.egress: {shown(value)} is not deny or passthrough (what an injected pod's sidecar does with a "
            "connection to a destination outside the mesh)"
        ) from None


def parse_config(data: Any, base_dir: Path, source: Path | None = None) -> Config:
    """Validate a parsed YAML document. Relative paths are resolved against ``base_dir``."""
    if not isinstance(data, dict):
        raise ConfigError(f"config: the document must be a mapping, not {type(data).__name__}")
    _reject_unknown(data, _TOP_FIELDS, "")
    if "trust_domain" not in data:
        raise ConfigError("trust_domain: required (e.g. trust_domain: example.org)")
    try:
        trust_domain = TrustDomain.parse(_string(data["trust_domain"], "trust_domain"))
    except InvalidSpiffeIdError as err:
        raise ConfigError(f"trust_domain: {err}") from None
    state_dir = base_dir / _string(data.get("state_dir", "mesh-identity-state"), "state_dir")
    ca_raw = _mapping(data.get("ca"), "ca")
    _reject_unknown(ca_raw, _CA_FIELDS, "ca.")
    ca_values = {key: _CA_FIELDS[key](value, f"ca.{key}") for key, value in ca_raw.items()}
    ca = CaConfig(**ca_values)
    if ca.workload_ttl >= ca.intermediate_ttl and ca.mode is Mode.INTERMEDIATE:
        raise ConfigError(
            f"ca.workload_ttl: {shown(ca_raw.get('workload_ttl', '1h'))} is not shorter than ca.intermediate_ttl "
            f"{shown(ca_raw.get('intermediate_ttl', '24h'))}; a workload certificate cannot outlive its issuer"
        )
    listens: dict[str, ListenConfig | None] = {}
    sections: dict[str, Mapping[str, Any]] = {}
    for section, fields in _SECTION_FIELDS.items():
        raw = sections[section] = _mapping(data.get(section), section)
        _reject_unknown(raw, fields, f"{section}.")
        listens[section] = _listen(raw["listen"], f"{section}.listen") if "listen" in raw else None
    beyond = sections["metrics"].get("admin_beyond_loopback", False)
    if not isinstance(beyond, bool):
        raise ConfigError(f"metrics.admin_beyond_loopback: {shown(beyond)} is not true or false")
    ack_timeout = _duration(sections["xds"].get("ack_timeout", "1m"), "xds.ack_timeout")
    if ack_timeout <= timedelta(0):
        raise ConfigError(f"xds.ack_timeout: {shown(sections['xds']['ack_timeout'])} is not a positive duration")
    mesh_file = base_dir / _string(data["mesh_file"], "mesh_file") if "mesh_file" in data else None
    secrets_text = sections["xds"].get("secrets", SecretSource.CONTROL_PLANE.value)
    try:
        secrets = SecretSource(secrets_text)
    except ValueError:
        choices = ", ".join(k.value for k in SecretSource)
        raise ConfigError(f"xds.secrets: {shown(secrets_text)} is not one of {choices}") from None
    signing = _signing(data.get("signing"), base_dir)
    registry = _registry(data.get("registry"), base_dir)
    if registry is not None and mesh_file is not None:
        raise ConfigError("registry: give either mesh_file or registry, not both (each says where the workloads are)")
    if secrets is SecretSource.AGENT and signing is None:
        raise ConfigError("xds.secrets: agent needs the signing section (signing.listen, signing.attest_listen)")
    inject = parse_inject(data.get("inject"))
    if inject is not None:
        needs = [
            (registry is None, "registry (kind: kubernetes): the injector serves a Kubernetes API server"),
            (secrets is not SecretSource.AGENT, "xds.secrets: agent (the injected agent makes the keys in the pod)"),
            (signing is None or signing.kubernetes is None, "signing.kubernetes (the agents present their pods' "
             "service-account tokens)"),
            (ca.mode is not Mode.INTERMEDIATE, "ca.mode: intermediate (the webhook's certificate is signed by it)"),
        ]  # fmt: skip
        for missing, what in needs:
            if missing:
                raise ConfigError(f"inject: needs {what}")
    return Config(
        trust_domain=trust_domain,
        state_dir=state_dir,
        ca=ca,
        metrics_listen=listens["metrics"],
        xds_listen=listens["xds"],
        xds_ack_timeout=ack_timeout,
        admin_beyond_loopback=beyond,
        mesh_file=mesh_file,
        plugins=_mapping(data.get("plugins"), "plugins"),
        source=source,
        identities=_identities(data.get("identities"), trust_domain),
        xds_secrets=secrets,
        signing=signing,
        jwt=_jwt(data.get("jwt")),
        registry=registry,
        inject=inject,
    )


def load_config(path: Path | None = None) -> Config:
    """Load ``path``, or ``$MESH_IDENTITY_CONFIG``; ConfigError when neither is given or the file is bad."""
    if path is None:
        env = os.environ.get(CONFIG_ENV)
        if not env:
            raise ConfigError(f"no config: pass --config FILE or set {CONFIG_ENV}")
        path = Path(env)
    return parse_config(read_yaml(path, "config", MAX_CONFIG_BYTES), path.resolve().parent, path)
