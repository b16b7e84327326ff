"""The cert-manager provider's options (``ca.provider_options``) and the checks across them.

Example::

    ca:
      provider: cert-manager
      mode: intermediate              # or per-workload
      provider_options:
        issuer_name: mesh-ca          # the Issuer (or ClusterIssuer) that signs
        issuer_kind: ClusterIssuer    # default Issuer; external issuers have their own kinds and groups
        namespace: mesh-identity      # where CertificateRequests are created
        kubeconfig: ~/.kube/config    # default: in-cluster when running in a pod, else $KUBECONFIG
        context: prod                 # default: the kubeconfig's current-context
        timeout: 2m                   # wait this long for Ready, Failed or Denied
        trust_bundle_configmap: cert-manager/mesh-root   # the pinned roots: only these are trusted

How the provider reaches the API server: ``in_cluster: true`` (or no ``kubeconfig`` while running in a pod)
uses the pod's service account from ``service_account_dir``; otherwise the kubeconfig file (``kubeconfig``,
else ``$KUBECONFIG``, else ``~/.kube/config``) with ``context``.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any

from mesh_identity.errors import ConfigError
from mesh_identity.provider import OptionSpec, OptionType

PREFIX = "ca.provider_options"
SERVICE_ACCOUNT_DIR = Path("/var/run/secrets/kubernetes.io/serviceaccount")
CERT_MANAGER_GROUP = "cert-manager.io"

OPTIONS = (
    OptionSpec("issuer_name", OptionType.STRING, "the cert-manager issuer that signs", required=True),
    OptionSpec(
        "issuer_kind",
        OptionType.STRING,
        "Issuer (in the namespace), ClusterIssuer, or an external issuer's kind",
        default="Issuer",
    ),
    OptionSpec(
        "issuer_group",
        OptionType.STRING,
        "API group of the issuer (external issuers have their own)",
        default=CERT_MANAGER_GROUP,
    ),
    OptionSpec(
        "namespace",
        OptionType.STRING,
        "namespace of the CertificateRequests (default: the service account's, else the context's, else default)",
    ),
    OptionSpec("kubeconfig", OptionType.PATH, "kubeconfig file (default: in-cluster in a pod, else $KUBECONFIG)"),
    OptionSpec("context", OptionType.STRING, "kubeconfig context (default: its current-context)"),
    OptionSpec("in_cluster", OptionType.BOOL, "use the pod's service account", default=False),
    OptionSpec(
        "service_account_dir",
        OptionType.PATH,
        "where the pod's service-account token, ca.crt and namespace are mounted",
        default=SERVICE_ACCOUNT_DIR,
    ),
    OptionSpec(
        "timeout",
        OptionType.DURATION,
        "how long to wait for a CertificateRequest to be Ready, Failed or Denied",
        default=timedelta(seconds=60),
    ),
    OptionSpec("api_timeout", OptionType.DURATION, "timeout of one Kubernetes API call", default=timedelta(seconds=10)),
    OptionSpec(
        "keep_requests", OptionType.BOOL, "keep finished CertificateRequests instead of deleting them", default=False
    ),
    OptionSpec(
        "trust_bundle_file",
        OptionType.PATH,
        "the pinned PEM roots: every chain must end at one of them (without a pin: trust on first use)",
    ),
    OptionSpec("trust_bundle_secret", OptionType.STRING, "[namespace/]name of a Secret holding those roots"),
    OptionSpec("trust_bundle_configmap", OptionType.STRING, "[namespace/]name of a ConfigMap holding those roots"),
    OptionSpec("trust_bundle_key", OptionType.STRING, "key of the roots in that Secret or ConfigMap", default="ca.crt"),
    OptionSpec("labels", OptionType.MAPPING, "extra labels on every CertificateRequest"),
    OptionSpec(
        "name_prefix", OptionType.STRING, "generateName prefix of CertificateRequests", default="mesh-identity-"
    ),
)

_LABEL_NAME = re.compile(r"([A-Za-z0-9]([-A-Za-z0-9_.]{0,61}[A-Za-z0-9])?)")
_DNS_SUBDOMAIN = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*")
_LABEL_VALUE = re.compile(r"(([A-Za-z0-9][-A-Za-z0-9_.]{0,61})?[A-Za-z0-9])?")
_DNS_LABEL = re.compile(r"[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?")
_NAME_PREFIX = re.compile(r"[a-z0-9]([-a-z0-9.]{0,40})?")


def valid_label_key(key: str) -> bool:
    prefix, _, name = key.rpartition("/")
    if prefix and (len(prefix) > 253 or not _DNS_SUBDOMAIN.fullmatch(prefix)):
        return False
    return bool(_LABEL_NAME.fullmatch(name))


def valid_label_value(value: str) -> bool:
    return bool(_LABEL_VALUE.fullmatch(value))


@dataclass(frozen=True, slots=True)
class ObjectRef:
    """A ``[namespace/]name`` reference to a Secret or ConfigMap; ``namespace`` None: the provider's."""

    namespace: str | None
    name: str

    @classmethod
    def parse(cls, text: str, key_path: str) -> ObjectRef:
        namespace, slash, name = text.partition("/")
        if not slash:
            namespace, name = "", text
        if (slash and not _DNS_LABEL.fullmatch(namespace)) or len(name) > 253 or not _DNS_SUBDOMAIN.fullmatch(name):
            raise ConfigError(f"{key_path}: {text!r} is not [namespace/]name")
        return cls(namespace or None, name)

    def show(self, default_namespace: str) -> str:
        return f"{self.namespace or default_namespace}/{self.name}"


@dataclass(frozen=True, slots=True)
class Settings:
    """The options after schema validation, checked across each other."""

    issuer_name: str
    issuer_kind: str
    issuer_group: str
    namespace: str | None
    kubeconfig: Path | None
    context: str | None
    in_cluster: bool
    service_account_dir: Path
    timeout: timedelta
    api_timeout: timedelta
    keep_requests: bool
    trust_bundle_file: Path | None
    trust_bundle_secret: ObjectRef | None
    trust_bundle_configmap: ObjectRef | None
    trust_bundle_key: str
    labels: Mapping[str, str] = field(default_factory=dict)
    name_prefix: str = "mesh-identity-"

    @classmethod
    def from_options(cls, options: Mapping[str, Any]) -> Settings:
        problems = check(options)
        if problems:
            raise ConfigError(problems[0])
        secret, configmap = options.get("trust_bundle_secret"), options.get("trust_bundle_configmap")
        return cls(
            issuer_name=options["issuer_name"],
            issuer_kind=options.get("issuer_kind") or "Issuer",
            issuer_group=options.get("issuer_group") or CERT_MANAGER_GROUP,
            namespace=options.get("namespace"),
            kubeconfig=options.get("kubeconfig"),
            context=options.get("context"),
            in_cluster=bool(options.get("in_cluster")),
            service_account_dir=options.get("service_account_dir") or SERVICE_ACCOUNT_DIR,
            timeout=options.get("timeout") or timedelta(seconds=60),
            api_timeout=options.get("api_timeout") or timedelta(seconds=10),
            keep_requests=bool(options.get("keep_requests")),
            trust_bundle_file=options.get("trust_bundle_file"),
            trust_bundle_secret=ObjectRef.parse(secret, f"{PREFIX}.trust_bundle_secret") if secret else None,
            trust_bundle_configmap=(
                ObjectRef.parse(configmap, f"{PREFIX}.trust_bundle_configmap") if configmap else None
            ),
            trust_bundle_key=options.get("trust_bundle_key") or "ca.crt",
            labels=dict(options.get("labels") or {}),
            name_prefix=options.get("name_prefix") or "mesh-identity-",
        )

    @property
    def issuer(self) -> str:
        """How messages name the issuer: ``Issuer mesh/mesh-ca`` or ``ClusterIssuer mesh-ca``."""
        namespaced = self.issuer_kind == "Issuer" and self.issuer_group == CERT_MANAGER_GROUP
        where = f"{self.namespace}/" if namespaced and self.namespace else ""
        group = "" if self.issuer_group == CERT_MANAGER_GROUP else f".{self.issuer_group}"
        return f"{self.issuer_kind}{group} {where}{self.issuer_name}"

    @property
    def has_configured_bundle(self) -> bool:
        return bool(self.trust_bundle_file or self.trust_bundle_secret or self.trust_bundle_configmap)


def check(options: Mapping[str, Any]) -> list[str]:
    """Problems across options (after schema validation), each naming its key."""
    problems: list[str] = []
    bundles = [k for k in ("trust_bundle_file", "trust_bundle_secret", "trust_bundle_configmap") if options.get(k)]
    if len(bundles) > 1:
        problems.append(
            f"{PREFIX}.{bundles[1]}: give only one of trust_bundle_file, trust_bundle_secret and "
            f"trust_bundle_configmap (also set: {bundles[0]})"
        )
    if options.get("in_cluster") and (options.get("kubeconfig") or options.get("context")):
        other = "kubeconfig" if options.get("kubeconfig") else "context"
        problems.append(f"{PREFIX}.in_cluster: in-cluster config uses the service account, not {other}")
    namespace = options.get("namespace")
    if namespace is not None and not _DNS_LABEL.fullmatch(namespace):
        problems.append(f"{PREFIX}.namespace: {namespace!r} is not a valid namespace name")
    prefix = options.get("name_prefix")
    if prefix is not None and not _NAME_PREFIX.fullmatch(prefix):
        problems.append(
            f"{PREFIX}.name_prefix: {prefix!r} must be lowercase letters, digits, '-' or '.', start "
            "with a letter or digit, and be at most 41 characters"
        )
    for key, value in (options.get("labels") or {}).items():
        if not isinstance(key, str) or not valid_label_key(key):
            problems.append(f"{PREFIX}.labels: {key!r} is not a valid label key")
        elif not isinstance(value, str) or not valid_label_value(value):
            problems.append(f"{PREFIX}.labels.{key}: {value!r} is not a valid label value")
    for key in ("timeout", "api_timeout"):
        value = options.get(key)
        if isinstance(value, timedelta) and value < timedelta(seconds=1):
            problems.append(f"{PREFIX}.{key}: {value.total_seconds():g}s is shorter than 1s")
    for key in ("trust_bundle_secret", "trust_bundle_configmap"):
        if options.get(key):
            try:
                ObjectRef.parse(options[key], f"{PREFIX}.{key}")
            except ConfigError as err:
                problems.append(str(err))
    return problems
