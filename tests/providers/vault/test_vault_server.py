"""The Vault test server, driven only through hvac over real HTTP(S): it must answer like Vault's documented API."""

from __future__ import annotations

import time
from datetime import UTC, datetime, timedelta
from typing import Any

import hvac
import hvac.exceptions
import pytest
import requests
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import NameOID

from tests.fakes.vault import ListenerTLS, VaultServer, go_duration

SPIFFE = "spiffe://example.org/ns/default/sa/web"


def client(vault: VaultServer, token: str | None = None, **kwargs: Any) -> hvac.Client:
    return hvac.Client(url=vault.url, token=token if token is not None else vault.root_token, **kwargs)


def csr_pem(
    uris: tuple[str, ...] = (SPIFFE,), common_name: str = "", dns: tuple[str, ...] = (), key: Any = None
) -> str:
    key = key or ec.generate_private_key(ec.SECP256R1())
    attributes = [x509.NameAttribute(NameOID.COMMON_NAME, common_name)] if common_name else []
    builder = x509.CertificateSigningRequestBuilder().subject_name(x509.Name(attributes))
    names: list[x509.GeneralName] = [x509.UniformResourceIdentifier(u) for u in uris]
    names += [x509.DNSName(d) for d in dns]
    if names:
        builder = builder.add_extension(x509.SubjectAlternativeName(names), critical=False)
    return builder.sign(key, hashes.SHA256()).public_bytes(serialization.Encoding.PEM).decode()


def load(pem_text: str) -> x509.Certificate:
    return x509.load_pem_x509_certificate(pem_text.encode())


def uri_sans(cert: x509.Certificate) -> list[str]:
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    return san.get_values_for_type(x509.UniformResourceIdentifier)


@pytest.fixture
def pki(vault: VaultServer) -> VaultServer:
    """A root-CA mount ``pki`` with a SPIFFE role ``spiffe`` (EC keys, max TTL 1h)."""
    vault.add_pki_mount("pki")
    vault.add_pki_role(
        "pki",
        "spiffe",
        allowed_uri_sans=["spiffe://example.org/*"],
        require_cn=False,
        key_type="ec",
        max_ttl="1h",
    )
    return vault


# --- sys ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("state", "params", "status", "sealed"),
    [
        ("active", {}, 200, False),
        ("standby", {}, 429, False),
        ("standby", {"standby_ok": True}, 200, False),
        ("sealed", {}, 503, True),
        ("sealed", {"sealed_code": 299}, 299, True),
        ("uninitialized", {}, 501, True),
    ],
)
def test_health_status_codes_follow_vault(
    vault: VaultServer, state: str, params: dict[str, Any], status: int, sealed: bool
):
    if state == "standby":
        vault.set_standby(True)
    if state == "sealed":
        vault.seal()
    if state == "uninitialized":
        vault.set_initialized(False)
    answer = client(vault).sys.read_health_status(method="GET", **params)
    body = answer if isinstance(answer, dict) else answer.json()
    code = 200 if isinstance(answer, dict) else answer.status_code
    assert (code, body["sealed"], body["initialized"]) == (status, sealed, state != "uninitialized")


def test_health_head_has_no_body(vault: VaultServer):
    vault.seal()
    answer = client(vault).sys.read_health_status(method="HEAD")
    assert (answer.status_code, answer.content) == (503, b"")


def test_seal_status_and_sealed_requests(pki: VaultServer):
    vault = pki
    api = client(vault)
    assert api.sys.read_seal_status()["sealed"] is False
    vault.seal()
    assert api.sys.is_sealed() is True
    with pytest.raises(hvac.exceptions.VaultDown) as caught:
        api.secrets.pki.sign_certificate("spiffe", csr_pem(), "")
    assert caught.value.errors == ["Vault is sealed"]
    with pytest.raises(hvac.exceptions.VaultDown):
        api.secrets.pki.read_ca_certificate_chain()
    vault.unseal()
    assert api.secrets.pki.read_ca_certificate_chain().count("BEGIN CERTIFICATE") == 1


# --- tokens ---------------------------------------------------------------------------------------------


def test_lookup_self_describes_the_token(vault: VaultServer):
    token = vault.create_token(policies=["default", "pki-sign"], ttl=600, renewable=True)
    data = client(vault, token).auth.token.lookup_self()["data"]
    assert (data["id"], data["policies"], data["renewable"], data["creation_ttl"], data["path"]) == (
        token,
        ["default", "pki-sign"],
        True,
        600,
        "auth/token/create",
    )
    assert 598 <= data["ttl"] <= 600
    assert datetime.fromisoformat(data["expire_time"]) > datetime.now(UTC) + timedelta(seconds=590)


def test_renew_self_extends_and_caps_at_the_max_ttl(vault: VaultServer):
    token = vault.create_token(ttl=60, explicit_max_ttl=120)
    api = client(vault, token)
    renewed = api.auth.token.renew_self(increment="90s")
    assert renewed["auth"]["lease_duration"] == 90
    assert renewed["warnings"] is None
    capped = api.auth.token.renew_self(increment="1h")
    left = capped["auth"]["lease_duration"]
    assert 118 <= left <= 120
    assert capped["warnings"] == [
        f'TTL of "1h0m0s" exceeded the effective max_ttl of "{go_duration(left)}"; TTL value is capped accordingly'
    ]


@pytest.mark.parametrize(
    ("make", "exception", "errors"),
    [
        (lambda v: v.create_token(ttl=60, renewable=False), hvac.exceptions.InvalidRequest, ["lease is not renewable"]),
        (lambda v: v.root_token, hvac.exceptions.InvalidRequest, ["lease is not renewable"]),
        (lambda v: "hvs.not-a-token", hvac.exceptions.Forbidden, ["permission denied"]),
    ],
    ids=["not-renewable", "root-never-expires", "unknown-token"],
)
def test_renew_self_refusals(vault: VaultServer, make, exception, errors):
    with pytest.raises(exception) as caught:
        client(vault, make(vault)).auth.token.renew_self()
    assert caught.value.errors == errors


def test_tokens_expire_on_the_wall_clock(vault: VaultServer):
    token = vault.create_token(ttl=1)
    api = client(vault, token)
    assert api.auth.token.lookup_self()["data"]["id"] == token
    time.sleep(1.2)
    with pytest.raises(hvac.exceptions.Forbidden) as caught:
        api.auth.token.lookup_self()
    assert caught.value.errors == ["permission denied"]


def test_set_token_ttl_and_revoke(vault: VaultServer):
    token = vault.create_token(ttl=3600)
    vault.set_token_ttl(token, 0)
    with pytest.raises(hvac.exceptions.Forbidden):
        client(vault, token).auth.token.lookup_self()
    other = vault.create_token(ttl=3600)
    client(vault, other).auth.token.revoke_self()
    with pytest.raises(hvac.exceptions.Forbidden):
        client(vault, other).auth.token.lookup_self()


def test_token_create_through_the_api(vault: VaultServer):
    created = client(vault).auth.token.create(policies=["pki-sign"], ttl="2m", renewable=True)
    auth = created["auth"]
    assert (auth["lease_duration"], auth["renewable"], auth["policies"]) == (120, True, ["default", "pki-sign"])
    assert client(vault, auth["client_token"]).auth.token.lookup_self()["data"]["ttl"] <= 120


# --- namespaces -----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("token_namespace", "request_namespace", "allowed"),
    [
        ("team-a", "team-a", True),
        ("team-a", "team-a/child", True),
        ("team-a", None, False),
        ("team-a", "team-b", False),
        ("", "team-b", True),
    ],
)
def test_a_token_works_only_in_its_namespace(vault: VaultServer, token_namespace, request_namespace, allowed):
    for name in ("team-a/child", "team-b"):
        vault.add_namespace(name)
    vault.add_policy("reader", {"*": ["read"]}, namespace=token_namespace)  # paths below its namespace too
    token = vault.create_token(policies=["reader"], namespace=token_namespace)
    api = client(vault, token, namespace=request_namespace)
    if allowed:
        assert api.auth.token.lookup_self()["data"]["id"] == token
    else:
        with pytest.raises(hvac.exceptions.Forbidden) as caught:
            api.auth.token.lookup_self()
        assert caught.value.errors == ["permission denied"]


def test_mounts_belong_to_their_namespace(vault: VaultServer):
    vault.add_namespace("team-a")
    team_chain = vault.add_pki_mount("pki", namespace="team-a")
    root_chain = vault.add_pki_mount("pki")
    in_team = client(vault, namespace="team-a").secrets.pki.read_ca_certificate()
    in_root = client(vault).secrets.pki.read_ca_certificate()
    assert load(in_team) == team_chain[0]
    assert load(in_root) == root_chain[0]
    assert team_chain[0] != root_chain[0]
    with pytest.raises(hvac.exceptions.InvalidPath) as caught:
        client(vault, namespace="nowhere").secrets.pki.read_ca_certificate()
    assert caught.value.errors == ['no handler for route "pki/ca/pem". route entry not found.']


# --- approle and kubernetes auth ------------------------------------------------------------------------


def test_approle_set_up_and_login_through_the_api(vault: VaultServer):
    admin = client(vault)
    admin.sys.enable_auth_method("approle", path="apps")
    admin.auth.approle.create_or_update_approle(
        "mesh", token_policies=["pki-sign"], token_ttl="5m", token_max_ttl="10m", mount_point="apps"
    )
    role_id = admin.auth.approle.read_role_id("mesh", mount_point="apps")["data"]["role_id"]
    secret_id = admin.auth.approle.generate_secret_id("mesh", mount_point="apps")["data"]["secret_id"]
    api = hvac.Client(url=vault.url)
    auth = api.auth.approle.login(role_id, secret_id, mount_point="apps")["auth"]
    assert (auth["lease_duration"], auth["renewable"], auth["policies"], auth["metadata"]) == (
        300,
        True,
        ["default", "pki-sign"],
        {"role_name": "mesh"},
    )
    assert api.auth.token.lookup_self()["data"]["path"] == "auth/apps/login"


@pytest.mark.parametrize(
    ("role_id", "secret_id", "errors"),
    [
        ("", "x", ["missing role_id"]),
        ("wrong", "x", ["invalid role or secret ID"]),
        ("RIGHT", "wrong", ["invalid role or secret ID"]),
    ],
)
def test_approle_login_refusals(vault: VaultServer, role_id, secret_id, errors):
    real_role_id, _ = vault.add_approle("mesh")
    with pytest.raises(hvac.exceptions.InvalidRequest) as caught:
        hvac.Client(url=vault.url).auth.approle.login(real_role_id if role_id == "RIGHT" else role_id, secret_id)
    assert caught.value.errors == errors


def test_approle_secret_id_ttl_expires(vault: VaultServer):
    role_id, secret_id = vault.add_approle("mesh", secret_id_ttl=1)
    time.sleep(1.1)
    with pytest.raises(hvac.exceptions.InvalidRequest) as caught:
        hvac.Client(url=vault.url).auth.approle.login(role_id, secret_id)
    assert caught.value.errors == ["invalid role or secret ID"]


def test_kubernetes_login_on_a_custom_mount(vault: VaultServer):
    vault.add_kubernetes_role(
        "mesh",
        service_account_names=["mesh-identity"],
        service_account_namespaces=["mesh-*"],
        policies=["pki-sign"],
        token_ttl=120,
        mount="k8s-prod",
    )
    jwt = vault.service_account_jwt("mesh-system", "mesh-identity")
    api = hvac.Client(url=vault.url)
    auth = api.auth.kubernetes.login("mesh", jwt, mount_point="k8s-prod")["auth"]
    assert (auth["lease_duration"], auth["policies"]) == (120, ["default", "pki-sign"])
    assert auth["metadata"]["service_account_namespace"] == "mesh-system"


@pytest.mark.parametrize(
    ("role", "jwt_of", "exception", "errors"),
    [
        ("nope", ("mesh-system", "mesh-identity"), hvac.exceptions.InvalidRequest, ['invalid role name "nope"']),
        ("mesh", ("mesh-system", "intruder"), hvac.exceptions.Forbidden, ["service account name not authorized"]),
        ("mesh", ("default", "mesh-identity"), hvac.exceptions.Forbidden, ["namespace not authorized"]),
        ("mesh", "forged", hvac.exceptions.Forbidden, ["permission denied"]),
        ("mesh", "expired", hvac.exceptions.Forbidden, ["permission denied"]),
    ],
)
def test_kubernetes_login_refusals(vault: VaultServer, role, jwt_of, exception, errors):
    vault.add_kubernetes_role(
        "mesh", service_account_names=["mesh-identity"], service_account_namespaces=["mesh-system"]
    )
    if jwt_of == "forged":
        header, payload, _ = vault.service_account_jwt("mesh-system", "mesh-identity").split(".")
        jwt = f"{header}.{payload}.AAAA"
    elif jwt_of == "expired":
        jwt = vault.service_account_jwt("mesh-system", "mesh-identity", ttl=-5)
    else:
        jwt = vault.service_account_jwt(*jwt_of)
    with pytest.raises(exception) as caught:
        hvac.Client(url=vault.url).auth.kubernetes.login(role, jwt)
    assert caught.value.errors == errors


# --- PKI ------------------------------------------------------------------------------------------------


def test_sign_with_a_spiffe_role(pki: VaultServer):
    answer = client(pki).secrets.pki.sign_certificate("spiffe", csr_pem(), "", extra_params={"ttl": "30m"})
    data = answer["data"]
    cert, issuer = load(data["certificate"]), pki.pki_issuer("pki").certificate
    cert.verify_directly_issued_by(issuer)
    assert uri_sans(cert) == [SPIFFE]
    assert data["issuing_ca"] == issuer.public_bytes(serialization.Encoding.PEM).decode()
    assert data["ca_chain"] == [data["issuing_ca"]]
    assert data["expiration"] == int(cert.not_valid_after_utc.timestamp())
    assert data["serial_number"] == ":".join(f"{b:02x}" for b in cert.serial_number.to_bytes(20, "big").lstrip(b"\0"))
    assert answer["warnings"] is None
    lifetime = cert.not_valid_after_utc - datetime.now(UTC)
    assert timedelta(minutes=29) < lifetime <= timedelta(minutes=30)
    ext = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName)
    assert ext.critical  # the subject is empty, so the SAN is critical (RFC 5280)


def test_ttl_above_the_role_max_is_capped_with_vaults_warning(pki: VaultServer):
    answer = client(pki).secrets.pki.sign_certificate("spiffe", csr_pem(), "", extra_params={"ttl": "24h"})
    cert = load(answer["data"]["certificate"])
    assert answer["warnings"] == ['TTL "24h0m0s" is longer than permitted maxTTL "1h0m0s", so maxTTL is being used']
    assert cert.not_valid_after_utc - datetime.now(UTC) <= timedelta(hours=1)


def test_ttl_past_the_ca_expiry_is_refused(vault: VaultServer):
    vault.add_pki_mount("short", ca_ttl=600)
    vault.add_pki_role("short", "spiffe", allowed_uri_sans=["spiffe://*"], require_cn=False, key_type="any")
    with pytest.raises(hvac.exceptions.InvalidRequest) as caught:
        client(vault).secrets.pki.sign_certificate(
            "spiffe", csr_pem(), "", extra_params={"ttl": "1h"}, mount_point="short"
        )
    (message,) = caught.value.errors
    assert message.startswith("cannot satisfy request, as TTL would result in notAfter of ")
    assert message.endswith(
        "that is beyond the expiration of the CA certificate at "
        + vault.pki_issuer("short").certificate.not_valid_after_utc.isoformat().replace("+00:00", "Z")
    )


RSA_KEY = rsa.generate_private_key(public_exponent=65537, key_size=2048)


@pytest.mark.parametrize(
    ("role", "csr", "params", "errors"),
    [
        (
            "spiffe",
            {"uris": ("spiffe://other.org/ns/a/sa/b",)},
            {},
            ["URI Subject Alternative Names were provided via CSR which are not valid for this role"],
        ),
        ("no-uris", {}, {}, ["URI Subject Alternative Names are not allowed in this role, but were provided via CSR"]),
        (
            "api-sans",
            {"uris": ()},
            {"uri_sans": "spiffe://other.org/x"},
            ["URI Subject Alternative Names were provided via the API which are not valid for this role"],
        ),
        ("spiffe", {"key": RSA_KEY}, {}, ["role requires keys of type ec"]),
        (
            "cn-required",
            {},
            {},
            [
                "the common_name field is required, or must be provided in a CSR with "
                '"use_csr_common_name" set to true, unless "require_cn" is set to false'
            ],
        ),
        ("any-name", {"common_name": "not a hostname"}, {}, ["common name not a hostname not allowed by this role"]),
        (
            "spiffe",
            {"dns": ("evil.example.com",)},
            {},
            ["subject alternate name evil.example.com not allowed by this role"],
        ),
        ("missing", {}, {}, ["unknown role: missing"]),
        ("spiffe", {}, {"ttl": "soon"}, ['error converting input soon for field "ttl": time: invalid duration "soon"']),
    ],
    ids=[
        "uri-outside-glob",
        "no-uri-sans-allowed",
        "api-uri-outside-glob",
        "key-type",
        "require-cn",
        "enforce-hostnames",
        "dns-not-allowed",
        "unknown-role",
        "bad-ttl",
    ],
)
def test_role_rules_refuse_with_vaults_messages(pki: VaultServer, role, csr, params, errors):
    pki.add_pki_role("pki", "no-uris", require_cn=False, key_type="ec")
    pki.add_pki_role(
        "pki",
        "api-sans",
        allowed_uri_sans=["spiffe://example.org/*"],
        require_cn=False,
        key_type="ec",
        use_csr_sans=False,
    )
    pki.add_pki_role("pki", "cn-required", allowed_uri_sans=["spiffe://*"], key_type="ec")
    pki.add_pki_role("pki", "any-name", allowed_uri_sans=["spiffe://*"], key_type="ec", allow_any_name=True)
    with pytest.raises(hvac.exceptions.InvalidRequest) as caught:
        client(pki).secrets.pki.sign_certificate(role, csr_pem(**csr), "", extra_params=params)
    assert caught.value.errors == errors


def test_allow_any_name_without_enforce_hostnames_takes_any_common_name(pki: VaultServer):
    pki.add_pki_role(
        "pki", "loose", allowed_uri_sans=["spiffe://*"], key_type="ec", allow_any_name=True, enforce_hostnames=False
    )
    data = client(pki).secrets.pki.sign_certificate("loose", csr_pem(common_name="web service"), "")["data"]
    cert = load(data["certificate"])
    assert cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == "web service"


def test_api_uri_sans_are_used_when_the_role_ignores_csr_sans(pki: VaultServer):
    pki.add_pki_role(
        "pki",
        "api-sans",
        allowed_uri_sans=["spiffe://example.org/*"],
        require_cn=False,
        key_type="ec",
        use_csr_sans=False,
    )
    api = client(pki)
    data = api.secrets.pki.sign_certificate("api-sans", csr_pem(uris=()), "", extra_params={"uri_sans": SPIFFE})["data"]
    assert uri_sans(load(data["certificate"])) == [SPIFFE]
    # and the CSR's own URI SANs are ignored by such a role
    data = api.secrets.pki.sign_certificate("api-sans", csr_pem(), "", extra_params={"uri_sans": SPIFFE + "-2"})["data"]
    assert uri_sans(load(data["certificate"])) == [SPIFFE + "-2"]


def test_unknown_parameters_are_ignored_with_a_warning(pki: VaultServer):
    answer = client(pki).secrets.pki.sign_certificate(
        "spiffe", csr_pem(), "", extra_params={"colour": "blue", "ttl": "10m"}
    )
    assert answer["warnings"] == ["Endpoint ignored these unrecognized parameters: [colour]"]


def test_issue_generates_a_key_of_the_role_type(pki: VaultServer):
    data = client(pki).secrets.pki.generate_certificate("spiffe", "", extra_params={"uri_sans": SPIFFE})["data"]
    key = serialization.load_pem_private_key(data["private_key"].encode(), None)
    cert = load(data["certificate"])
    assert isinstance(key, ec.EllipticCurvePrivateKey)
    assert data["private_key_type"] == "ec"
    assert cert.public_key().public_numbers() == key.public_key().public_numbers()
    assert uri_sans(cert) == [SPIFFE]


def test_sign_intermediate_makes_a_ca_under_the_mount_issuer(pki: VaultServer):
    key = ec.generate_private_key(ec.SECP256R1())
    request = x509.CertificateSigningRequestBuilder().subject_name(x509.Name([])).sign(key, hashes.SHA256())
    answer = client(pki).secrets.pki.sign_intermediate(
        request.public_bytes(serialization.Encoding.PEM).decode(),
        "example.org intermediate",
        extra_params={
            "ttl": "100000h",
            "max_path_length": 0,
            "uri_sans": "spiffe://example.org",
            "organization": "mesh-identity",
            "ou": "example.org",
        },
    )
    cert = load(answer["data"]["certificate"])
    root = pki.pki_issuer("pki").certificate
    cert.verify_directly_issued_by(root)
    constraints = cert.extensions.get_extension_for_class(x509.BasicConstraints)
    assert (constraints.critical, constraints.value.ca, constraints.value.path_length) == (True, True, 0)
    assert cert.subject.rfc4514_string() == "CN=example.org intermediate,OU=example.org,O=mesh-identity"
    assert uri_sans(cert) == ["spiffe://example.org"]
    # capped at the mount's max lease TTL (10 years here), with Vault's warning
    assert answer["warnings"] == [
        'TTL "100000h0m0s" is longer than permitted maxTTL "87600h0m0s", so maxTTL is being used'
    ]
    assert cert.not_valid_after_utc <= root.not_valid_after_utc


def test_sign_intermediate_is_truncated_to_the_issuer_expiry(vault: VaultServer):
    vault.add_pki_mount("short", ca_ttl=3600)
    key = ec.generate_private_key(ec.SECP256R1())
    request = x509.CertificateSigningRequestBuilder().subject_name(x509.Name([])).sign(key, hashes.SHA256())
    answer = client(vault).secrets.pki.sign_intermediate(
        request.public_bytes(serialization.Encoding.PEM).decode(),
        "int",
        extra_params={"ttl": "48h"},
        mount_point="short",
    )
    assert (
        load(answer["data"]["certificate"]).not_valid_after_utc
        == vault.pki_issuer("short").certificate.not_valid_after_utc
    )
    assert answer["warnings"] is None


def test_ca_endpoints_of_a_mount_with_a_vault_side_intermediate(vault: VaultServer):
    chain = vault.add_pki_mount("pki-int", intermediate=True)
    api = hvac.Client(url=vault.url)  # these endpoints need no token
    pems = api.secrets.pki.read_ca_certificate_chain(mount_point="pki-int")
    assert tuple(x509.load_pem_x509_certificates(pems.encode())) == tuple(chain)
    assert len(chain) == 2
    assert chain[1].subject == chain[1].issuer
    assert load(api.secrets.pki.read_ca_certificate(mount_point="pki-int")) == chain[0]
    assert load(api.read("pki-int/cert/ca")["data"]["certificate"]) == chain[0]
    raw = api.adapter.get("/v1/pki-int/ca")  # DER: hvac hands back the raw response
    assert (raw.headers["Content-Type"], x509.load_der_x509_certificate(raw.content)) == (
        "application/pkix-cert",
        chain[0],
    )


def test_a_mount_without_a_ca(vault: VaultServer):
    vault.add_pki_mount("empty", with_issuer=False)
    with pytest.raises(hvac.exceptions.InvalidRequest) as caught:
        client(vault).secrets.pki.read_ca_certificate_chain(mount_point="empty")
    assert caught.value.errors == ["no default issuer currently configured"]


def test_read_role(pki: VaultServer):
    data = client(pki).secrets.pki.read_role("spiffe")["data"]
    assert (
        data["allowed_uri_sans"],
        data["max_ttl"],
        data["ttl"],
        data["key_type"],
        data["key_bits"],
        data["require_cn"],
        data["use_csr_sans"],
    ) == (["spiffe://example.org/*"], 3600, 0, "ec", 256, False, True)
    with pytest.raises(hvac.exceptions.InvalidPath):
        client(pki).secrets.pki.read_role("missing")


def test_policies_limit_what_a_token_may_do(pki: VaultServer):
    pki.add_policy("pki-sign", {"pki/sign/spiffe": ["update"], "pki/roles/*": ["read"]})
    token = pki.create_token(policies=["default", "pki-sign"])
    api = client(pki, token)
    assert api.secrets.pki.sign_certificate("spiffe", csr_pem(), "")["data"]["certificate"]
    assert api.secrets.pki.read_role("spiffe")["data"]["key_type"] == "ec"
    for call in (
        lambda: api.secrets.pki.sign_intermediate(csr_pem(), "x"),
        lambda: api.secrets.pki.generate_certificate("spiffe", "", extra_params={"uri_sans": SPIFFE}),
    ):
        with pytest.raises(hvac.exceptions.Forbidden) as caught:
            call()
        assert caught.value.errors == ["permission denied"]


def test_pki_set_up_through_the_api_with_an_intermediate_mount(vault: VaultServer):
    """What an operator does on a real Vault: root mount, intermediate mount signed by it, a role."""
    api = client(vault)
    api.sys.enable_secrets_engine("pki", path="root-ca", config={"max_lease_ttl": "87600h"})
    api.sys.enable_secrets_engine("pki", path="int-ca", config={"max_lease_ttl": "43800h"})
    root = api.secrets.pki.generate_root(
        "internal", "Test Root", extra_params={"ttl": "87600h", "key_type": "ec"}, mount_point="root-ca"
    )["data"]["certificate"]
    csr = api.secrets.pki.generate_intermediate(
        "internal", "Test Int", extra_params={"key_type": "ec"}, mount_point="int-ca"
    )["data"]["csr"]
    signed = api.secrets.pki.sign_intermediate(csr, "Test Int", extra_params={"ttl": "43800h"}, mount_point="root-ca")[
        "data"
    ]["certificate"]
    api.secrets.pki.set_signed_intermediate(signed + "\n" + root, mount_point="int-ca")
    api.secrets.pki.create_or_update_role(
        "spiffe",
        {"allowed_uri_sans": "spiffe://example.org/*", "require_cn": False, "key_type": "ec", "max_ttl": "24h"},
        mount_point="int-ca",
    )
    leaf = api.secrets.pki.sign_certificate("spiffe", csr_pem(), "", mount_point="int-ca")["data"]
    assert [load(p) for p in leaf["ca_chain"]] == [load(signed), load(root)]
    load(leaf["certificate"]).verify_directly_issued_by(load(signed))
    api.sys.disable_secrets_engine("int-ca")
    with pytest.raises(hvac.exceptions.InvalidPath):
        api.secrets.pki.read_ca_certificate_chain(mount_point="int-ca")


def test_policy_written_in_hcl_through_the_api(pki: VaultServer):
    api = client(pki)
    api.sys.create_or_update_policy("signer", 'path "pki/sign/*" {\n  capabilities = ["update"]\n}\n')
    token = api.auth.token.create(policies=["signer"], ttl="5m")["auth"]["client_token"]
    assert client(pki, token).secrets.pki.sign_certificate("spiffe", csr_pem(), "")["data"]["certificate"]
    with pytest.raises(hvac.exceptions.Forbidden):
        client(pki, token).secrets.pki.read_role("spiffe")


# --- test controls --------------------------------------------------------------------------------------


def test_fail_next_answers_with_the_given_status(pki: VaultServer):
    pki.fail_next(2, 500, ["storage backend unavailable"], path="/v1/pki/sign/*")
    api = client(pki)
    assert api.auth.token.lookup_self()["data"]["id"] == pki.root_token  # other paths are not affected
    for _ in range(2):
        with pytest.raises(hvac.exceptions.InternalServerError) as caught:
            api.secrets.pki.sign_certificate("spiffe", csr_pem(), "")
        assert caught.value.errors == ["storage backend unavailable"]
    assert api.secrets.pki.sign_certificate("spiffe", csr_pem(), "")["data"]["certificate"]
    assert pki.request_count("/v1/pki/sign/spiffe", method="POST") == 3


def test_drop_next_cuts_the_connection(pki: VaultServer):
    pki.drop_next(1)
    with pytest.raises(requests.exceptions.ConnectionError):
        client(pki).auth.token.lookup_self()
    assert client(pki).auth.token.lookup_self()["data"]["id"] == pki.root_token


def test_stop_refuses_connections_and_start_resumes_with_the_same_state(pki: VaultServer):
    api = client(pki)
    before = api.secrets.pki.read_ca_certificate()
    port = pki.port
    pki.stop()
    with pytest.raises(requests.exceptions.ConnectionError):
        api.secrets.pki.read_ca_certificate()  # the kept-alive connection was cut, a new one is refused
    pki.start()
    assert pki.port == port
    assert api.secrets.pki.read_ca_certificate() == before


def test_request_counts_per_path_and_namespace(vault: VaultServer):
    vault.add_namespace("team-a")
    token = vault.create_token(namespace="team-a")
    for _ in range(3):
        client(vault, token, namespace="team-a").auth.token.lookup_self()
    client(vault).auth.token.lookup_self()
    assert vault.request_count("/v1/auth/token/lookup-self") == 4
    assert vault.request_count("/v1/auth/token/lookup-self", namespace="team-a") == 3
    assert vault.request_count("/v1/auth/token/lookup-self", method="POST") == 0


def test_errors_are_vault_shaped(vault: VaultServer):
    api = client(vault)
    with pytest.raises(hvac.exceptions.InvalidRequest) as caught:
        api.adapter.post("/v1/auth/token/lookup-self", data="{not json")
    (message,) = caught.value.errors
    assert message.startswith("failed to parse JSON input: ")
    with pytest.raises(hvac.exceptions.InvalidPath) as missing:
        api.adapter.get("/v1/nothing/here")
    assert missing.value.errors == ['no handler for route "nothing/here". route entry not found.']
    answer = api.adapter.get("/v1/nothing/here", raise_exception=False)
    assert (answer.status_code, answer.headers["Content-Type"]) == (404, "application/json")


# --- TLS ------------------------------------------------------------------------------------------------


def test_https_with_the_listener_ca(vault_tls: VaultServer, listener_tls: ListenerTLS):
    assert vault_tls.url.startswith("https://127.0.0.1:")
    api = client(vault_tls, verify=str(listener_tls.ca_file))
    assert api.auth.token.lookup_self()["data"]["id"] == vault_tls.root_token


def test_https_refuses_an_unknown_ca(vault_tls: VaultServer, tmp_path):
    other = ListenerTLS.create(tmp_path / "other")
    with pytest.raises(requests.exceptions.SSLError):
        client(vault_tls, verify=str(other.ca_file)).auth.token.lookup_self()


def test_mutual_tls_requires_a_client_certificate(listener_tls: ListenerTLS):
    with VaultServer(tls=listener_tls, require_client_cert=True) as vault:
        with pytest.raises(requests.exceptions.ConnectionError):  # SSLError or a reset, depending on timing
            client(vault, verify=str(listener_tls.ca_file)).auth.token.lookup_self()
        api = client(
            vault,
            verify=str(listener_tls.ca_file),
            cert=(str(listener_tls.client_cert_file), str(listener_tls.client_key_file)),
        )
        assert api.auth.token.lookup_self()["data"]["id"] == vault.root_token
