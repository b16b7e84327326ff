"""CertificateRequest objects: building one for a CSR, and reading where one stands.

Pure functions of plain dicts (the ``cert-manager.io/v1`` wire format); no API calls here.

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

JsonObj = dict[str, Any]

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


def name_of(cr: JsonObj) -> str:
    meta = cr.get("metadata") or {}
    return f"{meta.get('namespace', '')}/{meta.get('name', '')}"


def _conditions(cr: JsonObj) -> dict[str, JsonObj]:
    found = ((cr.get("status") or {}).get("conditions")) or []
    return {str(c.get("type")): c for c in found if isinstance(c, dict)}


def _show(condition: JsonObj) -> str:
    text = f"{condition.get('type')}={condition.get('status')} ({condition.get('reason') or 'no reason'})"
    message = condition.get("message")
    return f"{text}: {message}" if message else text


def state_of(cr: JsonObj) -> State:
    conditions = _conditions(cr)
    denied, ready = conditions.get("Denied"), conditions.get("Ready")
    invalid = conditions.get("InvalidRequest")
    if denied is not None and denied.get("status") == "True":
        by = denied.get("reason") or "an approver"
        return State(Phase.DENIED, f"denied by {by}: {denied.get('message') or 'no message'}")
    if ready is not None and ready.get("reason") == "Denied":
        return State(Phase.DENIED, f"denied: {ready.get('message') or 'no message'}")
    if invalid is not None and invalid.get("status") == "True":
        return State(Phase.FAILED, _show(invalid))
    if ready is not None:
        if ready.get("status") == "True" and (cr.get("status") or {}).get("certificate"):
            return State(Phase.ISSUED, _show(ready))
        if ready.get("reason") == "Failed":
            return State(Phase.FAILED, _show(ready))
        if ready.get("reason") == "Pending" and _ISSUER_NOT_FOUND.match(str(ready.get("message") or "")):
            return State(Phase.ISSUER_NOT_FOUND, str(ready.get("message")))
        return State(Phase.PENDING, _show(ready))
    approved = conditions.get("Approved")
    if approved is not None and approved.get("status") == "True":
        return State(Phase.PENDING, "approved, no Ready condition yet")
    return State(Phase.PENDING, "not approved or denied yet (no approver running?)")


def issued_certificates(cr: JsonObj) -> tuple[list[x509.Certificate], list[x509.Certificate]]:
    """``status.certificate`` (leaf first, then whatever chain the issuer added) and ``status.ca`` (may be
    empty). ValueError when either is not base64 PEM."""
    status = cr.get("status") or {}
    try:
        certificate = x509.load_pem_x509_certificates(base64.b64decode(status.get("certificate") or ""))
    except ValueError as err:
        raise ValueError(f"status.certificate is not base64 PEM certificates ({err})") from None
    ca_text = status.get("ca") or ""
    if not ca_text:
        return certificate, []
    try:
        ca = x509.load_pem_x509_certificates(base64.b64decode(ca_text))
    except ValueError as err:
        raise ValueError(f"status.ca is not base64 PEM certificates ({err})") from None
    return certificate, ca
