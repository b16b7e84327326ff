"""The kinds of the control plane's own deployment (``deploy/``), for the Kubernetes fake: Deployment
(``apps/v1``), PodDisruptionBudget (``policy/v1``), ClusterRole, ClusterRoleBinding, Role and RoleBinding
(``rbac.authorization.k8s.io/v1``), each checked against the official schemas (strict, both versions of
:data:`~tests.fakes.kube.workloads.SCHEMA_VERSIONS`), and :func:`schema_checked` for the default kinds (Namespace,
ConfigMap) whose default validation is the server's own rules only.

Not served by default: a test that applies ``deploy/`` registers them (``KubeServer(kinds=(..., *deploy_kinds()))``).

A little of the real validation, with the real server's messages: a Deployment's selector must match its
template's labels and never changes; a PodDisruptionBudget has ``minAvailable`` or ``maxUnavailable``, not
both; every RBAC rule has verbs, and a Role's rules name API groups and resources (no non-resource URLs); a
binding's ``roleRef`` never changes and names a kind it may, a ServiceAccount subject names its namespace.
Defaults, as the real server sets them: a Deployment's ``replicas`` (1), ``strategy`` (RollingUpdate, 25%/25%),
``revisionHistoryLimit`` (10) and ``progressDeadlineSeconds`` (600). No controller runs: a Deployment makes
no pods.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

from tests.fakes.kube.errors import JsonObj
from tests.fakes.kube.kinds import Kind, Validator
from tests.fakes.kube.workloads import SCHEMA_VERSIONS, checked

RBAC_GROUP = "rbac.authorization.k8s.io"


def _field(obj: JsonObj, name: str) -> JsonObj:
    """``obj[name]`` when it is an object, else an empty one (the schemas report the wrong type)."""
    value = obj.get(name)
    return value if isinstance(value, dict) else {}


def _spec(obj: JsonObj) -> JsonObj:
    return _field(obj, "spec")


# ------------------------------------------------------------------------------------------ Deployments


def _prepare_deployment(obj: JsonObj) -> None:
    spec = obj.setdefault("spec", {})
    if not isinstance(spec, dict):
        return
    spec.setdefault("replicas", 1)
    spec.setdefault("revisionHistoryLimit", 10)
    spec.setdefault("progressDeadlineSeconds", 600)
    strategy = spec.setdefault("strategy", {"type": "RollingUpdate"})
    if isinstance(strategy, dict) and strategy.get("type", "RollingUpdate") == "RollingUpdate":
        strategy.setdefault("type", "RollingUpdate")
        rolling = strategy.setdefault("rollingUpdate", {})
        if isinstance(rolling, dict):
            rolling.setdefault("maxUnavailable", "25%")
            rolling.setdefault("maxSurge", "25%")


def _validate_deployment(kind: Kind, old: JsonObj | None, new: JsonObj) -> list[str]:
    spec = _spec(new)
    selector = spec.get("selector")
    if not isinstance(selector, dict) or not (selector.get("matchLabels") or selector.get("matchExpressions")):
        return ["spec.selector: Required value"]
    labels = _field(_field(_field(spec, "template"), "metadata"), "labels")
    errors = []
    wanted = selector.get("matchLabels") or {}
    if any(labels.get(key) != value for key, value in wanted.items()):
        errors.append(
            f"spec.template.metadata.labels: Invalid value: {labels!r}: `selector` does not match template `labels`"
        )
    if old is not None and _spec(old).get("selector") != selector:
        errors.append(f"spec.selector: Invalid value: {selector!r}: field is immutable")
    return errors


# ------------------------------------------------------------------------------- PodDisruptionBudgets


def _validate_pdb(kind: Kind, old: JsonObj | None, new: JsonObj) -> list[str]:
    spec = _spec(new)
    if "minAvailable" in spec and "maxUnavailable" in spec:
        return ["spec: Invalid value: minAvailable and maxUnavailable cannot be both set"]
    return []


# ------------------------------------------------------------------------------------------------ RBAC


def _rules_checker(namespaced: bool) -> Validator:
    def validate(kind: Kind, old: JsonObj | None, new: JsonObj) -> list[str]:
        errors = []
        for i, rule in enumerate(new.get("rules") or []):
            if not isinstance(rule, dict):
                continue
            if not rule.get("verbs"):
                errors.append(f"rules[{i}].verbs: Required value: verbs must contain at least one value")
            if rule.get("nonResourceURLs"):
                if namespaced:
                    errors.append(
                        f"rules[{i}].nonResourceURLs: Invalid value: {rule['nonResourceURLs']!r}: "
                        "namespaced rules cannot apply to non-resource URLs"
                    )
                continue
            if "apiGroups" not in rule:
                errors.append(
                    f"rules[{i}].apiGroups: Required value: resource rules must supply at least one api group"
                )
            if not rule.get("resources"):
                errors.append(f"rules[{i}].resources: Required value: resource rules must supply at least one resource")
        return errors

    return validate


def _binding_checker(role_kinds: tuple[str, ...]) -> Validator:
    def validate(kind: Kind, old: JsonObj | None, new: JsonObj) -> list[str]:
        errors = []
        ref = _field(new, "roleRef")
        if ref.get("apiGroup") != RBAC_GROUP:
            errors.append(
                f'roleRef.apiGroup: Unsupported value: "{ref.get("apiGroup")}": supported values: "{RBAC_GROUP}"'
            )
        if ref.get("kind") not in role_kinds:
            supported = ", ".join(f'"{k}"' for k in role_kinds)
            errors.append(f'roleRef.kind: Unsupported value: "{ref.get("kind")}": supported values: {supported}')
        if not ref.get("name"):
            errors.append("roleRef.name: Required value")
        for i, subject in enumerate(new.get("subjects") or []):
            if isinstance(subject, dict) and subject.get("kind") == "ServiceAccount" and not subject.get("namespace"):
                if kind.namespaced:  # a RoleBinding's subject defaults to its own namespace
                    continue
                errors.append(f"subjects[{i}].namespace: Required value")
        if old is not None and old.get("roleRef") != new.get("roleRef"):
            errors.append(f"roleRef: Invalid value: {new.get('roleRef')!r}: cannot change roleRef")
        return errors

    return validate


# ------------------------------------------------------------------------------------------------ kinds


def deploy_kinds(versions: Sequence[str] = SCHEMA_VERSIONS) -> tuple[Kind, ...]:
    """Deployment, PodDisruptionBudget, ClusterRole, ClusterRoleBinding, Role and RoleBinding, each validated
    against ``versions``."""
    return (
        Kind(
            "Deployment",
            "deployments",
            group="apps",
            status_subresource=True,
            short_names=("deploy",),
            prepare=_prepare_deployment,
            validate=checked(_validate_deployment, versions=versions),
        ),
        Kind(
            "PodDisruptionBudget",
            "poddisruptionbudgets",
            group="policy",
            status_subresource=True,
            short_names=("pdb",),
            validate=checked(_validate_pdb, versions=versions),
        ),
        Kind(
            "ClusterRole",
            "clusterroles",
            group=RBAC_GROUP,
            namespaced=False,
            validate=checked(_rules_checker(namespaced=False), versions=versions),
        ),
        Kind(
            "ClusterRoleBinding",
            "clusterrolebindings",
            group=RBAC_GROUP,
            namespaced=False,
            validate=checked(_binding_checker(("ClusterRole",)), versions=versions),
        ),
        Kind(
            "Role",
            "roles",
            group=RBAC_GROUP,
            validate=checked(_rules_checker(namespaced=True), versions=versions),
        ),
        Kind(
            "RoleBinding",
            "rolebindings",
            group=RBAC_GROUP,
            validate=checked(_binding_checker(("Role", "ClusterRole")), versions=versions),
        ),
    )


def schema_checked(kind: Kind, versions: Sequence[str] = SCHEMA_VERSIONS) -> Kind:
    """``kind`` (e.g. the default Namespace or ConfigMap) with the official schemas checked after its own rules."""
    own = kind.validate
    return dataclasses.replace(kind, validate=checked(*(own,) if own is not None else (), versions=versions))
