"""CustomResourceDefinitions in the Kubernetes fake, as the real API server installs them: the kind
``CustomResourceDefinition`` (``apiextensions.k8s.io/v1``; creating one serves its kinds from then on, as
``kubectl apply -f crds/`` does in a cluster) and :func:`install_crds` for tests that start from CRD files.

A CRD is checked against the official schema (``kubernetes_validate``, strict) before it is taken, and gets the
status the real server writes (``NamesAccepted``, ``Established``). Each served version becomes a
:func:`~tests.fakes.kube.kinds.custom_resource` kind (a status subresource only when the CRD declares one)
whose objects are validated against that version's ``openAPIV3Schema`` with ``jsonschema``, strictly: an
unknown field is a 422 naming it (the real server prunes unknown fields, or refuses them under strict field
validation, which is what ``kubectl apply`` asks for), as is a value of another type or out of its range.
"""

from __future__ import annotations

import copy
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import jsonschema
import yaml

from tests.fakes.kube.errors import JsonObj
from tests.fakes.kube.kinds import Kind, custom_resource
from tests.fakes.kube.store import now
from tests.fakes.kube.workloads import schema_errors

if TYPE_CHECKING:
    from tests.fakes.kube.server import KubeServer

CRD_GROUP = "apiextensions.k8s.io"


def strict_schema(schema: Any) -> Any:
    """``schema`` (an ``openAPIV3Schema``) as a JSON schema that refuses unknown fields: every object schema with
    ``properties`` and neither ``additionalProperties`` nor ``x-kubernetes-preserve-unknown-fields`` gets
    ``additionalProperties: false``; ``metadata`` is left to the server (any object)."""
    if isinstance(schema, list):
        return [strict_schema(s) for s in schema]
    if not isinstance(schema, dict):
        return schema
    out = {k: strict_schema(v) for k, v in schema.items() if not k.startswith("x-kubernetes-") and k != "nullable"}
    if "properties" in schema:
        out["properties"] = {k: strict_schema(v) for k, v in schema["properties"].items()}
        if "additionalProperties" not in schema and not schema.get("x-kubernetes-preserve-unknown-fields"):
            out["additionalProperties"] = False
    return out


def schema_validator(schema: Mapping[str, Any]) -> jsonschema.Draft4Validator:
    """A validator of custom resources for one version's ``openAPIV3Schema`` (see :func:`strict_schema`)."""
    document = strict_schema(schema)
    properties = document.setdefault("properties", {})
    properties["metadata"] = {"type": "object"}
    properties.setdefault("apiVersion", {"type": "string"})
    properties.setdefault("kind", {"type": "string"})
    jsonschema.Draft4Validator.check_schema(document)
    return jsonschema.Draft4Validator(document)


def _path(error: jsonschema.ValidationError) -> str:
    out = ""
    for part in error.absolute_path:
        out += f"[{part}]" if isinstance(part, int) else f".{part}" if out else str(part)
    return out or "<root>"


def crd_kinds(crd: JsonObj) -> list[Kind]:
    """The kinds a CRD serves, one per served version, validating against that version's schema."""
    spec = crd["spec"]
    names = spec["names"]
    kinds = []
    for version in spec["versions"]:
        if not version.get("served", True):
            continue
        validator = schema_validator(version["schema"]["openAPIV3Schema"])

        def validate(kind: Kind, old: JsonObj | None, new: JsonObj, validator: Any = validator) -> list[str]:
            return [f"{_path(e)}: Invalid value: {e.message}" for e in validator.iter_errors(new)]

        kinds.append(
            custom_resource(
                names["kind"],
                names["plural"],
                spec["group"],
                version["name"],
                namespaced=spec.get("scope", "Namespaced") == "Namespaced",
                status_subresource="status" in (version.get("subresources") or {}),
                short_names=tuple(names.get("shortNames") or ()),
                validate=validate,
            )
        )
    return kinds


def _prepare_crd(obj: JsonObj) -> None:
    names = copy.deepcopy((obj.get("spec") or {}).get("names") or {})
    names.setdefault("singular", str(names.get("kind", "")).lower())
    names.setdefault("listKind", f"{names.get('kind', '')}List")
    versions = [v.get("name") for v in (obj.get("spec") or {}).get("versions") or [] if v.get("storage")]
    conditions = [
        {"type": kind, "status": "True", "reason": reason, "message": message, "lastTransitionTime": now()}
        for kind, reason, message in (
            ("NamesAccepted", "NoConflicts", "no conflicts found"),
            ("Established", "InitialNamesAccepted", "the initial names have been accepted"),
        )
    ]
    obj["status"] = {"acceptedNames": names, "storedVersions": versions, "conditions": conditions}


def crd_kind(server: KubeServer) -> Kind:
    """The ``CustomResourceDefinition`` kind, installing what it defines on ``server`` when one is written."""

    def validate(kind: Kind, old: JsonObj | None, new: JsonObj) -> list[str]:
        errors = schema_errors(new)
        if not errors:
            try:
                kinds = crd_kinds(new)
            except (KeyError, TypeError, jsonschema.SchemaError) as err:
                return [f"spec.versions: Invalid value: not a usable schema: {err}"]
            served = {(k.group, k.version, k.plural) for k in server.kinds}
            server.register(*(k for k in kinds if (k.group, k.version, k.plural) not in served))
        return errors

    return Kind(
        "CustomResourceDefinition",
        "customresourcedefinitions",
        group=CRD_GROUP,
        namespaced=False,
        status_subresource=True,
        short_names=("crd", "crds"),
        prepare=_prepare_crd,
        validate=validate,
    )


def read_crds(paths: Iterable[Path]) -> list[JsonObj]:
    """The CRD documents in ``paths`` (files, or directories of ``*.yaml``), in order."""
    documents: list[JsonObj] = []
    for path in paths:
        files = sorted(path.glob("*.yaml")) if path.is_dir() else [path]
        for file in files:
            documents.extend(d for d in yaml.safe_load_all(file.read_text()) if d)
    return documents


def install_crds(server: KubeServer, paths: Iterable[Path]) -> dict[str, Kind]:
    """Serve the CustomResourceDefinition kind on ``server`` and create the CRDs in ``paths`` through it (as
    ``kubectl apply`` would); returns the custom kinds by name."""
    kind = crd_kind(server)
    server.register(kind)
    wanted: set[tuple[str, str, str]] = set()
    for document in read_crds(paths):
        server.put_object(kind, document)
        spec = document["spec"]
        wanted |= {(spec["group"], v["name"], spec["names"]["plural"]) for v in spec["versions"]}
    return {k.kind: k for k in server.kinds if (k.group, k.version, k.plural) in wanted}
