"""cert-manager's custom resources as the Kubernetes fake serves them: the kinds ``CertificateRequest``,
``Issuer`` and ``ClusterIssuer`` (``cert-manager.io/v1``), with what cert-manager's CRD schema and validating
webhook enforce on a CertificateRequest, and :func:`install_crds`, which registers them with a
:class:`~tests.fakes.kube.server.KubeServer` (as installing cert-manager's CRDs into a cluster does)."""

from __future__ import annotations

from typing import Any

from tests.fakes.kube import JsonObj, Kind, KubeServer, custom_resource

GROUP, VERSION = "cert-manager.io", "v1"


def _conditions(obj: JsonObj | None) -> dict[str, JsonObj]:
    conditions = ((obj or {}).get("status") or {}).get("conditions") or []
    return {c.get("type", ""): c for c in conditions if isinstance(c, dict)}


USAGES = (
    "signing",
    "digital signature",
    "content commitment",
    "key encipherment",
    "key agreement",
    "data encipherment",
    "cert sign",
    "crl sign",
    "encipher only",
    "decipher only",
    "any",
    "server auth",
    "client auth",
    "code signing",
    "email protection",
    "s/mime",
    "ipsec end system",
    "ipsec tunnel",
    "ipsec user",
    "timestamping",
    "ocsp signing",
    "microsoft sgc",
    "netscape sgc",
)


def _validate_certificate_request(kind: Kind, old: JsonObj | None, new: JsonObj) -> list[str]:
    """What cert-manager's CRD schema and validating webhook enforce on a CertificateRequest."""
    errors: list[str] = []
    spec = new.get("spec") or {}
    if old is None:
        if not spec.get("request"):
            errors.append("spec.request: Required value")
        if not (spec.get("issuerRef") or {}).get("name"):
            errors.append("spec.issuerRef.name: Required value")
        for index, usage in enumerate(spec.get("usages") or []):
            if usage not in USAGES:
                errors.append(f'spec.usages[{index}]: Unsupported value: "{usage}"')
    elif spec != (old.get("spec") or {}):
        errors.append("spec: Forbidden: field is immutable")
    conditions = _conditions(new)
    if "Approved" in conditions and "Denied" in conditions:
        errors.append("status.conditions: Forbidden: 'Approved' and 'Denied' conditions cannot coexist")
    before = _conditions(old)
    for approval in ("Approved", "Denied"):
        if approval in before and approval in conditions and before[approval] != conditions[approval]:
            errors.append(f"status.conditions: Forbidden: '{approval}' condition may not be modified once set")
        if approval in before and approval not in conditions:
            errors.append(f"status.conditions: Forbidden: '{approval}' condition may not be removed once set")
        if approval in conditions and conditions[approval].get("status") != "True":
            errors.append(f"status.conditions: Forbidden: '{approval}' condition may only have status True")
    return errors


def cert_manager_kind(kind: str, plural: str, **options: Any) -> Kind:
    """A cert-manager custom resource (with a status subresource, as all of cert-manager's have)."""
    return custom_resource(kind, plural, GROUP, VERSION, **options)


CERTIFICATE_REQUEST = cert_manager_kind(
    "CertificateRequest", "certificaterequests", short_names=("cr", "crs"), validate=_validate_certificate_request
)
ISSUER = cert_manager_kind("Issuer", "issuers")
CLUSTER_ISSUER = cert_manager_kind("ClusterIssuer", "clusterissuers", namespaced=False)

CRDS: tuple[Kind, ...] = (CERTIFICATE_REQUEST, ISSUER, CLUSTER_ISSUER)


def install_crds(server: KubeServer) -> KubeServer:
    """Serve cert-manager's kinds on ``server`` (if it does not yet); returns ``server``."""
    server.register(*CRDS)
    return server
