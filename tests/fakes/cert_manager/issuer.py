"""How cert-manager's CA issuer signs a ``CertificateRequest``: the CSR in ``spec.request`` signed with real
crypto, honouring ``duration`` (cert-manager's default 90 days, capped by the issuer's ``max_duration`` and the
CA's own expiry), ``usages`` and ``isCA``."""

from __future__ import annotations

import base64
import contextlib
import datetime as dt
import re

from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.x509.oid import ExtendedKeyUsageOID

from tests.fakes.kube import JsonObj
from tests.pki import TestCa

DEFAULT_DURATION = dt.timedelta(hours=2160)  # cert-manager's default: 90 days

KEY_USAGES = {
    "signing": "digital_signature",
    "digital signature": "digital_signature",
    "content commitment": "content_commitment",
    "key encipherment": "key_encipherment",
    "key agreement": "key_agreement",
    "data encipherment": "data_encipherment",
    "cert sign": "key_cert_sign",
    "crl sign": "crl_sign",
    "encipher only": "encipher_only",
    "decipher only": "decipher_only",
}
EXTENDED_KEY_USAGES = {
    "any": ExtendedKeyUsageOID.ANY_EXTENDED_KEY_USAGE,
    "server auth": ExtendedKeyUsageOID.SERVER_AUTH,
    "client auth": ExtendedKeyUsageOID.CLIENT_AUTH,
    "code signing": ExtendedKeyUsageOID.CODE_SIGNING,
    "email protection": ExtendedKeyUsageOID.EMAIL_PROTECTION,
    "s/mime": ExtendedKeyUsageOID.EMAIL_PROTECTION,
    "timestamping": ExtendedKeyUsageOID.TIME_STAMPING,
    "ocsp signing": ExtendedKeyUsageOID.OCSP_SIGNING,
}


def parse_go_duration(text: str) -> dt.timedelta:
    """``2160h``, ``1h30m0s``, ``90s``: Go's ``time.ParseDuration`` for the units cert-manager accepts."""
    units = {"h": 3600.0, "m": 60.0, "s": 1.0, "ms": 1e-3, "us": 1e-6, "µs": 1e-6, "ns": 1e-9}
    parts = re.findall(r"(\d+(?:\.\d+)?)(h|ms|m|s|us|µs|ns)", text)
    if not parts or "".join(n + u for n, u in parts) != text:
        raise ValueError(f"invalid duration {text!r}")
    return dt.timedelta(seconds=sum(float(n) * units[u] for n, u in parts))


def sign(spec: JsonObj, ca: TestCa, max_duration: dt.timedelta | None = None) -> x509.Certificate:
    """Sign a CertificateRequest ``spec`` as cert-manager's CA issuer would; ValueError when it cannot."""
    try:
        csr = x509.load_pem_x509_csr(base64.b64decode(spec.get("request", "")))
    except ValueError as err:
        raise ValueError(f"error decoding certificate request PEM block: {err}") from None
    if not csr.is_signature_valid:
        raise ValueError("certificate request signature is invalid")
    duration = parse_go_duration(spec["duration"]) if spec.get("duration") else DEFAULT_DURATION
    if max_duration is not None:
        duration = min(duration, max_duration)
    now = dt.datetime.now(dt.UTC)
    not_after = min(now + duration, ca.certificate.not_valid_after_utc)
    is_ca = bool(spec.get("isCA"))
    usages = list(spec.get("usages") or ["digital signature", "key encipherment"])
    unknown = [u for u in usages if u not in KEY_USAGES and u not in EXTENDED_KEY_USAGES]
    if unknown:
        raise ValueError(f"unknown key usages: {', '.join(unknown)}")
    flags = dict.fromkeys(set(KEY_USAGES.values()), False)
    for usage in usages:
        if usage in KEY_USAGES:
            flags[KEY_USAGES[usage]] = True
    if is_ca:
        flags["key_cert_sign"] = True
    builder = (
        x509.CertificateBuilder()
        .subject_name(csr.subject)
        .issuer_name(ca.certificate.subject)
        .public_key(csr.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(seconds=30))
        .not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=is_ca, path_length=None), critical=True)
        .add_extension(x509.KeyUsage(**flags), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(csr.public_key()), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca.key.public_key()), critical=False)
    )
    extended = [EXTENDED_KEY_USAGES[u] for u in usages if u in EXTENDED_KEY_USAGES]
    if extended:
        builder = builder.add_extension(x509.ExtendedKeyUsage(list(dict.fromkeys(extended))), critical=False)
    with contextlib.suppress(x509.ExtensionNotFound):
        sans = csr.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        builder = builder.add_extension(sans, critical=csr.subject == x509.Name([]))
    return builder.sign(ca.key, hashes.SHA256())
