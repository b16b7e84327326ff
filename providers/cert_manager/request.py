"""CertificateRequest objects: building one for a CSR, checking the shape of one the API server sent, and reading
where one stands.

Pure functions of plain dicts (the ``cert-manager.io/v1`` wire format); no API calls here. Every object the
provider gets is checked by :func:`read_request` where it comes in (:mod:`providers.cert_manager.kube`), and
read through :mod:`providers.cert_manager.shapes` here, so an object of another shape is a
:class:`~providers.cert_manager.errors.MalformedAnswerError` naming it and the key, never a TypeError.

What the provider asks for:

* workload SVIDs (per-workload mode): ``usages`` digital signature, server auth and client auth (plus key
  encipherment for an RSA key), ``isCA: false``;
* the mesh's intermediate (intermediate mode): ``usages`` digital signature, cert sign and crl sign, ``isCA:
  true``;
* ``duration`` the requested TTL in Go's format (``1h30m0s``); the issuer may shorten it, and expiry is always
  read from the returned certificate;
* labels saying who made the request and for what: ``app.kubernetes.io/managed-by: mesh-identity``, the trust
  domain, the purpose, a hash of the identity and the provider instance; the SPIFFE ID itself in an
  annotation (label values cannot hold it).
"""

from __future__ import annotations

import base64
import enum
import hashlib
import re
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import serialization

from providers.cert_manager.options import Settings, valid_label_value
from providers.cert_manager.shapes import Condition, JsonObj, conditions, key_path, mapping, obj, string, text

LABEL_MANAGED_BY = "app.kubernetes.io/managed-by"
MANAGED_BY = "mesh-identity"
LABEL_TRUST_DOMAIN = "mesh-identity.io/trust-domain"
LABEL_PURPOSE = "mesh-identity.io/purpose"
LABEL_IDENTITY = "mesh-identity.io/identity"
LABEL_INSTANCE = "mesh-identity.io/instance"
ANNOTATION_SPIFFE_ID = "mesh-identity.io/spiffe-id"


class Purpose(enum.StrEnum):
    WORKLOAD = "workload"
    INTERMEDIATE = "intermediate"
    BUNDLE_PROBE = "bundle-probe"  # a throwaway request whose only use is to find the root to trust on first use


WORKLOAD_USAGES = ("digital signature", "server auth", "client auth")
RSA_WORKLOAD_USAGES = ("digital signature", "key encipherment", "server auth", "client auth")
INTERMEDIATE_USAGES = ("digital signature", "cert sign", "crl sign")


def go_duration(value: timedelta) -> str:
    """A duration as Go prints it (``1h30m0s``), rounded up to whole seconds."""
    total = max(1, int(-(-value.total_seconds() // 1)))
    hours, rest = divmod(total, 3600)
    minutes, seconds = divmod(rest, 60)
    return f"{hours}h{minutes}m{seconds}s"


def label_value(text: str) -> str:
    """``text`` when it is a valid label value, else a stable hash of it."""
    return text if valid_label_value(text) else hashlib.sha256(text.encode()).hexdigest()[:40]


def identity_hash(subject: str) -> str:
    return hashlib.sha256(subject.encode()).hexdigest()[:40]


def build_request(
    settings: Settings,
    csr: x509.CertificateSigningRequest,
    ttl: timedelta,
    purpose: Purpose,
    subject: str,
    trust_domain: str,
    instance: str,
    *,
    rsa: bool = False,
) -> JsonObj:
    """The CertificateRequest for ``csr``: ``subject`` is the SPIFFE ID it is for."""
    is_ca = purpose is Purpose.INTERMEDIATE
    usages = INTERMEDIATE_USAGES if is_ca else RSA_WORKLOAD_USAGES if rsa else WORKLOAD_USAGES
    labels = {
        **settings.labels,
        LABEL_MANAGED_BY: MANAGED_BY,
        LABEL_TRUST_DOMAIN: label_value(trust_domain),
        LABEL_PURPOSE: purpose.value,
        LABEL_IDENTITY: identity_hash(subject),
        LABEL_INSTANCE: instance,
    }
    return {
        "apiVersion": "cert-manager.io/v1",
        "kind": "CertificateRequest",
        "metadata": {
            "generateName": settings.name_prefix,
            "labels": labels,
            "annotations": {ANNOTATION_SPIFFE_ID: subject},
        },
        "spec": {
            "request": base64.b64encode(csr.public_bytes(serialization.Encoding.PEM)).decode(),
            "issuerRef": {"name": settings.issuer_name, "kind": settings.issuer_kind, "group": settings.issuer_group},
            "duration": go_duration(ttl),
            "usages": list(usages),
            "isCA": is_ca,
        },
    }


class Phase(enum.StrEnum):
    PENDING = "pending"
    ISSUED = "issued"
    DENIED = "denied"
    FAILED = "failed"
    ISSUER_NOT_FOUND = "issuer-not-found"

    @property
    def terminal(self) -> bool:
        """cert-manager will not change the request any more (Issued, Failed, Denied)."""
        return self in (Phase.ISSUED, Phase.DENIED, Phase.FAILED)

    @property
    def final(self) -> bool:
        """The provider stops waiting: terminal, or an issuer that does not exist."""
        return self.terminal or self is Phase.ISSUER_NOT_FOUND


_ISSUER_NOT_FOUND = re.compile(r'^Referenced "[^"]+" not found')


@dataclass(frozen=True, slots=True)
class State:
    """Where a CertificateRequest stands, as its conditions say, with cert-manager's words."""

    phase: Phase
    detail: str  # e.g. "Ready=False (Pending): Waiting on certificate issuance from order ..."


KIND = "CertificateRequest"
META_STRINGS = ("namespace", "uid", "resourceVersion", "creationTimestamp")  # besides name, the metadata read


def _meta(cr: JsonObj) -> JsonObj:
    meta = cr.get("metadata")
    return meta if isinstance(meta, dict) else {}


def name_of(cr: JsonObj) -> str:
    """``namespace/name``, for messages (escaped; never an error, whatever ``cr`` holds)."""
    meta = _meta(cr)
    namespace, name = meta.get("namespace"), meta.get("name")
    return text(f"{namespace if isinstance(namespace, str) else ''}/{name if isinstance(name, str) else ''}")


def describe(cr: JsonObj) -> str:
    """How messages name the request: ``CertificateRequest mesh/web-abc``."""
    return f"{KIND} {name_of(cr)}"


def read_request(value: Any, what: str, namespace: str, path: str = "") -> JsonObj:
    """``value`` (an answer, a listed item, a watched object) checked to be a CertificateRequest as the provider
    reads it, and returned: ``metadata.name`` a non-empty string; ``metadata.namespace``, ``uid``,
    ``resourceVersion`` and ``creationTimestamp``, ``status.certificate`` and ``status.ca`` strings when present;
    ``status.conditions`` objects (see :func:`~providers.cert_manager.shapes.conditions`). Until its name is
    read, messages name it by ``what`` and ``path`` (``the answer to list ...: items[3]``), then by its name (its
    namespace, when it gives none, is ``namespace``, where it was asked for)."""
    cr = obj(value, what, path)
    meta = mapping(cr, "metadata", what, path)
    where = key_path(path, "metadata")
    string(meta, "name", what, where, required=True)
    for key in META_STRINGS:
        string(meta, key, what, where)
    named = f"{KIND} {text(meta.get('namespace') or namespace)}/{text(meta['name'])}"
    status = mapping(cr, "status", named)
    for key in ("certificate", "ca"):
        string(status, key, named, "status")
    conditions(cr, named)
    return cr


def request_ref(cr: JsonObj) -> tuple[str, str | None]:
    """The ``name`` and ``uid`` (None when it has none) of a request checked by :func:`read_request`."""
    what = describe(cr)
    meta = mapping(cr, "metadata", what)
    return string(meta, "name", what, "metadata", required=True), string(meta, "uid", what, "metadata") or None


def resource_version(cr: JsonObj) -> str:
    """``metadata.resourceVersion`` ("" when it has none)."""
    what = describe(cr)
    return string(mapping(cr, "metadata", what), "resourceVersion", what, "metadata")


def created_at(cr: JsonObj) -> str:
    """``metadata.creationTimestamp`` as the API server wrote it ("" when it has none)."""
    what = describe(cr)
    return string(mapping(cr, "metadata", what), "creationTimestamp", what, "metadata")


def _show(condition: Condition) -> str:
    shown = f"{condition.type}={condition.status} ({text(condition.reason) or 'no reason'})"
    return f"{shown}: {text(condition.message)}" if condition.message else shown


def state_of(cr: JsonObj) -> State:
    what = describe(cr)
    found = {c.type: c for c in conditions(cr, what)}
    denied, ready = found.get("Denied"), found.get("Ready")
    invalid = found.get("InvalidRequest")
    if denied is not None and denied.status == "True":
        by = text(denied.reason) or "an approver"
        return State(Phase.DENIED, f"denied by {by}: {text(denied.message) or 'no message'}")
    if ready is not None and ready.reason == "Denied":
        return State(Phase.DENIED, f"denied: {text(ready.message) or 'no message'}")
    if invalid is not None and invalid.status == "True":
        return State(Phase.FAILED, _show(invalid))
    if ready is not None:
        if ready.status == "True" and string(mapping(cr, "status", what), "certificate", what, "status"):
            return State(Phase.ISSUED, _show(ready))
        if ready.reason == "Failed":
            return State(Phase.FAILED, _show(ready))
        if ready.reason == "Pending" and _ISSUER_NOT_FOUND.match(ready.message):
            return State(Phase.ISSUER_NOT_FOUND, text(ready.message))
        return State(Phase.PENDING, _show(ready))
    approved = found.get("Approved")
    if approved is not None and approved.status == "True":
        return State(Phase.PENDING, "approved, no Ready condition yet")
    return State(Phase.PENDING, "not approved or denied yet (no approver running?)")


def issued_certificates(cr: JsonObj) -> tuple[list[x509.Certificate], list[x509.Certificate]]:
    """``status.certificate`` (leaf first, then whatever chain the issuer added) and ``status.ca`` (may be
    empty). ValueError when either is not base64 PEM."""
    what = describe(cr)
    status = mapping(cr, "status", what)
    try:
        certificate = x509.load_pem_x509_certificates(base64.b64decode(string(status, "certificate", what, "status")))
    except ValueError as err:
        raise ValueError(f"status.certificate is not base64 PEM certificates ({err})") from None
    ca_text = string(status, "ca", what, "status")
    if not ca_text:
        return certificate, []
    try:
        ca = x509.load_pem_x509_certificates(base64.b64decode(ca_text))
    except ValueError as err:
        raise ValueError(f"status.ca is not base64 PEM certificates ({err})") from None
    return certificate, ca
