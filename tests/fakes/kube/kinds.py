"""The kinds the Kubernetes fake serves: :class:`Kind` (group, version, plural, scope, subresources, and the hooks
that normalise and validate an object), the built-in kinds it serves by default (Secret, ConfigMap, Namespace),
and :func:`custom_resource` for a CRD's kind, which other fakes register with
:meth:`~tests.fakes.kube.server.KubeServer.register` (as installing a CRD does)."""

from __future__ import annotations

import base64
import binascii
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from tests.fakes.kube.errors import JsonObj, bad_request

Validator = Callable[["Kind", "JsonObj | None", JsonObj], list[str]]
Preparer = Callable[[JsonObj], None]

ALL_VERBS = ("create", "delete", "deletecollection", "get", "list", "patch", "update", "watch")


@dataclass(frozen=True)
class Kind:
    """One served kind. ``prepare`` normalises an object before it is stored (may raise
    :class:`~tests.fakes.kube.errors.ApiError`); ``validate(kind, old, new)`` returns field errors
    (``"spec: Forbidden: ..."``) that make a 422."""

    kind: str
    plural: str
    group: str = ""
    version: str = "v1"
    namespaced: bool = True
    status_subresource: bool = False
    unconditional_update: bool = True
    strategic_merge: bool = True
    short_names: tuple[str, ...] = ()
    field_labels: tuple[str, ...] = ()
    prepare: Preparer | None = None
    validate: Validator | None = None

    @property
    def api_version(self) -> str:
        return f"{self.group}/{self.version}" if self.group else self.version

    @property
    def qualified(self) -> str:
        """``secrets`` or ``widgets.example.com``: how the real server names it in messages."""
        return f"{self.plural}.{self.group}" if self.group else self.plural

    @property
    def prefix(self) -> str:
        return f"/apis/{self.group}/{self.version}" if self.group else f"/api/{self.version}"


def custom_resource(kind: str, plural: str, group: str, version: str = "v1", **options: Any) -> Kind:
    """The kind of a custom resource (a CRD), with the real server's rules for them: a status subresource
    (unless ``status_subresource=False``), no unconditional update (a PUT needs a ``resourceVersion``), and no
    strategic merge patch (415)."""
    options.setdefault("status_subresource", True)
    return Kind(
        kind, plural, group=group, version=version, unconditional_update=False, strategic_merge=False, **options
    )


def _prepare_secret(obj: JsonObj) -> None:
    data = obj.get("data") or {}
    if not isinstance(data, dict):
        raise bad_request('Secret in version "v1" cannot be handled as a Secret: data is not an object')
    for key, value in data.items():
        try:
            base64.b64decode(str(value), validate=True)
        except binascii.Error:
            raise bad_request(
                f'Secret in version "v1" cannot be handled as a Secret: illegal base64 data in data.{key}'
            ) from None
    for key, value in (obj.pop("stringData", None) or {}).items():
        data[key] = base64.b64encode(str(value).encode()).decode()
    if data:
        obj["data"] = data
    obj.setdefault("type", "Opaque")


def _validate_config_map(kind: Kind, old: JsonObj | None, new: JsonObj) -> list[str]:
    data = new.get("data") or {}
    return [f"data[{k}]: Invalid value: must be a string" for k, v in data.items() if not isinstance(v, str)]


SECRET = Kind("Secret", "secrets", field_labels=("type",), prepare=_prepare_secret)
CONFIG_MAP = Kind("ConfigMap", "configmaps", short_names=("cm",), validate=_validate_config_map)
NAMESPACE = Kind("Namespace", "namespaces", namespaced=False, status_subresource=True, short_names=("ns",))

LEASE = Kind("Lease", "leases", group="coordination.k8s.io")

DEFAULT_KINDS: tuple[Kind, ...] = (SECRET, CONFIG_MAP, NAMESPACE, LEASE)
