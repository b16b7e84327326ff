"""Vault's PKI secrets engine as the provider uses it: signing, reading the CA chain and a role.

Answers are read with :mod:`providers.vault.answers` and parsed here into certificates (never trusted as text),
and Vault's 400/404 answers become errors that name the mount, the role and the fix.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, TypeVar

import hvac.utils
import requests
from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.x509.oid import NameOID

from mesh_identity.errors import ProviderError, ProviderRejectedError
from providers.vault.answers import Fields, answer_of, data_of, kind
from providers.vault.connection import NAME, Connection
from providers.vault.errors import VaultAnswerError, VaultMountError, VaultRequestError, VaultRoleError, VaultTtlError

T = TypeVar("T")

_ROLE_REFUSALS = (
    "not allowed by this role",
    "not valid for this role",
    "not allowed in this role",
    "role requires",
    "common_name field is required",
    'role key type "any"',
    "unsafe and not supported",
)


def seconds(ttl: timedelta) -> str:
    return f"{max(1, int(ttl.total_seconds()))}s"


@functools.lru_cache(maxsize=64)
def is_self_signed(cert: x509.Certificate) -> bool:
    """Issuer equals subject and the signature verifies with its own key (cached: Vault repeats its chain)."""
    if cert.issuer != cert.subject:
        return False
    try:
        cert.verify_directly_issued_by(cert)
    except (ValueError, TypeError, InvalidSignature):
        return False
    return True


def parse_certs(text: str, what: str) -> list[x509.Certificate]:
    """PEM certificates from PEM text (none when it holds no certificate block)."""
    if "-----BEGIN CERTIFICATE-----" not in text:
        return []
    try:
        return list(x509.load_pem_x509_certificates(text.encode()))
    except ValueError as err:
        raise ProviderRejectedError(NAME, f"Vault returned {what} that is not valid PEM: {err}") from None


@dataclass(frozen=True, slots=True)
class Signed:
    """What a sign call returned: the certificate, Vault's CA chain (issuing CA first) and its warnings."""

    certificate: x509.Certificate
    ca_chain: tuple[x509.Certificate, ...]
    warnings: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class Role:
    """The parts of a PKI role the provider checks."""

    name: str
    allowed_uri_sans: tuple[str, ...]
    max_ttl: timedelta | None
    ttl: timedelta | None
    key_type: str
    key_bits: int
    require_cn: bool
    use_csr_sans: bool
    use_csr_common_name: bool
    allow_any_name: bool
    enforce_hostnames: bool

    @classmethod
    def from_data(cls, name: str, data: Fields) -> Role:
        """From the ``data`` of a role read; unset fields take Vault's defaults."""
        return cls(
            name=name,
            allowed_uri_sans=data.strings("allowed_uri_sans", comma=True),
            max_ttl=_positive(data.seconds("max_ttl", 0.0)),
            ttl=_positive(data.seconds("ttl", 0.0)),
            key_type=data.string("key_type", "") or "rsa",
            key_bits=data.integer("key_bits", 0),
            require_cn=data.boolean("require_cn", True),
            use_csr_sans=data.boolean("use_csr_sans", True),
            use_csr_common_name=data.boolean("use_csr_common_name", True),
            allow_any_name=data.boolean("allow_any_name", False),
            enforce_hostnames=data.boolean("enforce_hostnames", True),
        )


def _positive(seconds: float) -> timedelta | None:
    """A TTL Vault gave in seconds; None for 0 (unset)."""
    return timedelta(seconds=seconds) if seconds > 0 else None


class Pki:
    """One PKI mount, through a :class:`Connection`. ``run`` wraps each call (token handling, retries)."""

    def __init__(self, connection: Connection, mount: str, run: Callable[[str, Callable[[], T]], T]) -> None:
        self.connection = connection
        self.mount = mount
        self._run: Callable[[str, Callable[[], Any]], Any] = run

    @property
    def _where(self) -> str:
        return f"mount {self.mount!r}{self.connection.settings.namespace_label}"

    def _call(
        self, what: str, function: Callable[[], Any], role: str | None = None, ttl: str = "", *, token: bool = True
    ) -> Any:
        """Run an hvac call (with a valid token unless ``token`` is False: the CA endpoints need none)."""
        try:
            return self._run(what, function) if token else self.connection.call(what, function)
        except VaultRequestError as err:
            raise self._refine(err, role, ttl) from err

    def _refine(self, err: VaultRequestError, role: str | None, ttl: str) -> ProviderError:
        """Name the mount, the role and the fix in Vault's 4xx answers."""
        says = "; ".join(err.errors) or "no error text"
        what, where = err.what, self._where
        if err.status == 404 and ("no handler for route" in says or "unsupported path" in says):
            return VaultMountError(
                NAME,
                f"{what}: no PKI secrets engine is mounted at {where}; enable one (vault secrets enable "
                f"-path={self.mount} pki) or fix pki_mount",
            )
        if "no default issuer" in says:
            return VaultMountError(NAME, f"{what}: {where} has no CA ({says}); generate or import one into it")
        if says.startswith("unknown role"):
            return VaultRoleError(
                NAME, f"{what}: PKI role {role!r} does not exist on {where}; create it or fix pki_role"
            )
        if "TTL" in says or 'field "ttl"' in says or "notAfter" in says:
            return VaultTtlError(
                NAME, f"{what}: Vault refused the TTL {ttl} ({says}); ask for a shorter TTL or renew the CA of {where}"
            )
        if any(refusal in says for refusal in _ROLE_REFUSALS):
            return VaultRoleError(NAME, f"{what}: role {role!r} on {where} refused it: {says}; {_hint(says)}")
        return err

    # -- reads ----------------------------------------------------------------------------------------------

    def _read_pem(self, what: str, url: str) -> str:
        """The PEM text at ``url`` (``/v1/<mount>/ca_chain``), read without a token. Through hvac's adapter, not
        its ``read_ca_certificate_chain``, which takes ``.text`` of whatever came (a JSON answer is a dict)."""
        client = self.connection.client
        answer: object = self._call(what, lambda: client.adapter.get(url=url), token=False)
        if not isinstance(answer, requests.Response):  # hvac decoded it: JSON, where PEM text belongs
            path = self.connection.where(url.removeprefix("/v1/"))
            raise VaultAnswerError(NAME, f"{path}: answer is not PEM text (got JSON: {kind(answer)})", path=path)
        return answer.text

    def ca_chain(self) -> list[x509.Certificate]:
        """The mount's CA chain, issuing CA first (``ca_chain``; ``ca/pem`` on Vaults that return it empty)."""
        what = f"read the CA chain of {self._where}"
        text = self._read_pem(what, hvac.utils.format_url("/v1/{mount_point}/ca_chain", mount_point=self.mount))
        chain = parse_certs(text, "a CA chain")
        if not chain:
            text = self._read_pem(what, hvac.utils.format_url("/v1/{mount_point}/ca/pem", mount_point=self.mount))
            chain = parse_certs(text, "a CA certificate")
        if not chain:
            raise VaultMountError(NAME, f"{what}: {self._where} returned no CA certificate; generate or import one")
        return chain

    def role(self, name: str) -> Role:
        client = self.connection.client
        what = f"read PKI role {name!r} of {self._where}"
        try:
            answer = self._run(what, lambda: client.secrets.pki.read_role(name, mount_point=self.mount))
        except VaultRequestError as err:
            if err.status == 404 and not err.errors:
                raise VaultRoleError(NAME, f"{what}: it does not exist; create it or fix pki_role") from err
            raise self._refine(err, name, "") from err
        return Role.from_data(name, data_of(answer, self.connection.where(f"{self.mount}/roles/{name}")))

    def mount_max_ttl(self) -> timedelta | None:
        """The mount's max lease TTL, when the token may read ``sys/mounts/<mount>/tune`` (else None); a
        :class:`~providers.vault.errors.VaultAnswerError` when Vault's answer is malformed."""
        client = self.connection.client
        try:
            answer = self._run("read the mount's TTLs", lambda: client.sys.read_mount_configuration(self.mount))
        except ProviderError:
            return None
        tune = _data_or_top(answer, self.connection.where(f"sys/mounts/{self.mount}/tune"))
        return _positive(tune.seconds("max_lease_ttl", 0.0))

    def token_capabilities(self, paths: Sequence[str]) -> dict[str, frozenset[str]]:
        """The token's capabilities on each of ``paths`` (``sys/capabilities-self``); none for a path not listed."""
        client = self.connection.client
        answer = self._run("read the token's capabilities", lambda: client.sys.get_capabilities(list(paths)))
        data = _data_or_top(answer, self.connection.where("sys/capabilities-self"))
        return {path: frozenset(data.strings(path)) for path in paths}

    # -- signing --------------------------------------------------------------------------------------------

    def sign_intermediate(self, csr: x509.CertificateSigningRequest, ttl: timedelta) -> Signed:
        """``<mount>/root/sign-intermediate`` with the CSR's subject and URI SANs, path length 0."""
        subject = csr.subject
        params: dict[str, Any] = {
            "ttl": seconds(ttl),
            "format": "pem",
            "max_path_length": 0,
            "exclude_cn_from_sans": True,
            "organization": ",".join(_values(subject, NameOID.ORGANIZATION_NAME)),
            "ou": ",".join(_values(subject, NameOID.ORGANIZATIONAL_UNIT_NAME)),
            "uri_sans": ",".join(_csr_uris(csr)),
        }
        common_name = ",".join(_values(subject, NameOID.COMMON_NAME))
        client = self.connection.client
        pem = csr.public_bytes(serialization.Encoding.PEM).decode()
        answer = self._call(
            f"sign the intermediate CA CSR at {self.mount}/root/sign-intermediate",
            lambda: client.secrets.pki.sign_intermediate(pem, common_name, extra_params=params, mount_point=self.mount),
            ttl=seconds(ttl),
        )
        return self._signed(answer, "the intermediate", f"{self.mount}/root/sign-intermediate")

    def sign_workload(
        self, csr: x509.CertificateSigningRequest, spiffe_id: str, ttl: timedelta, role: str, common_name: str
    ) -> Signed:
        """``<mount>/sign/<role>`` with the SPIFFE ID as URI SAN."""
        params: dict[str, Any] = {
            "ttl": seconds(ttl),
            "format": "pem",
            "uri_sans": spiffe_id,
            "exclude_cn_from_sans": True,
        }
        client = self.connection.client
        pem = csr.public_bytes(serialization.Encoding.PEM).decode()
        answer = self._call(
            f"sign {spiffe_id} at {self.mount}/sign/{role}",
            lambda: client.secrets.pki.sign_certificate(
                role, pem, common_name, extra_params=params, mount_point=self.mount
            ),
            role=role,
            ttl=seconds(ttl),
        )
        return self._signed(answer, f"the certificate for {spiffe_id}", f"{self.mount}/sign/{role}")

    def _signed(self, answer: object, what: str, path: str) -> Signed:
        """The certificate, chain and warnings of a sign answer from ``path`` (``pki/sign/web``)."""
        top = answer_of(answer, self.connection.where(path))
        data = top.fields("data")
        certs = parse_certs(data.pem("certificate"), what)
        if not certs:
            raise ProviderRejectedError(NAME, f"Vault's answer for {what} holds no certificate")
        chain = parse_certs(data.pem("ca_chain", ""), "a CA chain") or parse_certs(
            data.pem("issuing_ca", ""), "an issuing CA"
        )
        return Signed(certs[0], tuple(chain), top.strings("warnings"))


def _data_or_top(answer: object, path: str) -> Fields:
    """The ``data`` object of a ``sys/`` answer, or the answer itself (Vault puts the fields in both)."""
    top = answer_of(answer, path)
    return top.fields("data") if top.has("data") else top


def _values(name: x509.Name, oid: x509.ObjectIdentifier) -> list[str]:
    return [str(a.value) for a in name.get_attributes_for_oid(oid)]


def _csr_uris(csr: x509.CertificateSigningRequest) -> list[str]:
    try:
        san = csr.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return []
    return san.get_values_for_type(x509.UniformResourceIdentifier)


def _hint(vault_says: str) -> str:
    if "URI Subject Alternative Names" in vault_says:
        return "allow our SPIFFE IDs with allowed_uri_sans (e.g. spiffe://<trust domain>/*) on the role"
    if "role requires" in vault_says:
        return "set key_type=any on the role, or a ca.key_type the role accepts"
    if "common_name" in vault_says:
        return "set require_cn=false on the role, or set common_name in the provider options"
    return "change the role, or what is requested"
