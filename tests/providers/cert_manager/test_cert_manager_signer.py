"""The cert-manager stand-in, driven through the real ``kubernetes`` client against the test API server."""

from __future__ import annotations

import base64
import datetime as dt
from typing import Any

import kubernetes
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from tests.fakes.cert_manager import SIGNER_USER, Behaviour, CertManagerSigner, parse_go_duration
from tests.fakes.kube import KubeServer
from tests.pki import TestCa

G, V, CRS = "cert-manager.io", "v1", "certificaterequests"
NS = "mesh"
SPIFFE = "spiffe://cluster.local/ns/mesh/sa/web"


@pytest.fixture
def custom(kube_api_client: kubernetes.client.ApiClient) -> kubernetes.client.CustomObjectsApi:
    return kubernetes.client.CustomObjectsApi(kube_api_client)


@pytest.fixture(scope="module")
def root() -> TestCa:
    return TestCa.create("test root")


def csr_b64(uri: str = SPIFFE, common_name: str | None = None) -> str:
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)] if common_name else [])
    csr = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(subject)
        .add_extension(x509.SubjectAlternativeName([x509.UniformResourceIdentifier(uri)]), critical=True)
        .sign(key, hashes.SHA256())
    )
    return base64.b64encode(csr.public_bytes(serialization.Encoding.PEM)).decode()


def request(name: str, issuer: str = "mesh-ca", kind: str = "Issuer", group: str = G, **spec: Any) -> dict[str, Any]:
    return {
        "apiVersion": f"{G}/{V}",
        "kind": "CertificateRequest",
        "metadata": {"name": name},
        "spec": {"request": csr_b64(), "issuerRef": {"name": issuer, "kind": kind, "group": group}, **spec},
    }


def submit(
    custom: kubernetes.client.CustomObjectsApi, signer: CertManagerSigner, body: dict[str, Any], outcomes: int = 1
) -> dict[str, Any]:
    """Create a request, wait for the signer to finish with it, and read it back."""
    before = len(signer.outcomes)
    custom.create_namespaced_custom_object(G, V, NS, CRS, body)
    assert signer.wait_for_outcomes(before + outcomes)
    result: dict[str, Any] = custom.get_namespaced_custom_object(G, V, NS, CRS, body["metadata"]["name"])
    return result


def conditions(cr: dict[str, Any]) -> dict[str, tuple[str, str, str]]:
    return {c["type"]: (c["status"], c["reason"], c["message"]) for c in cr["status"]["conditions"]}


def certificates(cr: dict[str, Any]) -> list[x509.Certificate]:
    return x509.load_pem_x509_certificates(base64.b64decode(cr["status"]["certificate"]))


def test_issues_a_certificate_as_a_ca_issuer(
    cert_manager_signer: CertManagerSigner, custom: kubernetes.client.CustomObjectsApi, root: TestCa
) -> None:
    cert_manager_signer.add_ca_issuer("mesh-ca", root, namespace=NS)
    usages = ["digital signature", "key encipherment", "server auth", "client auth"]
    cr = submit(custom, cert_manager_signer, request("web", duration="1h0m0s", usages=usages))
    assert conditions(cr) == {
        "Approved": ("True", "cert-manager.io", "Certificate request has been approved by cert-manager.io"),
        "Ready": ("True", "Issued", "Certificate fetched from issuer successfully"),
    }
    [leaf] = certificates(cr)
    leaf.verify_directly_issued_by(root.certificate)
    assert base64.b64decode(cr["status"]["ca"]) == root.pem()
    assert leaf.not_valid_after_utc - leaf.not_valid_before_utc == dt.timedelta(hours=1, seconds=30)
    sans = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert sans.get_values_for_type(x509.UniformResourceIdentifier) == [SPIFFE]
    assert leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).critical  # empty subject
    key_usage = leaf.extensions.get_extension_for_class(x509.KeyUsage).value
    assert (key_usage.digital_signature, key_usage.key_encipherment, key_usage.key_cert_sign) == (True, True, False)
    assert list(leaf.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value) == [
        ExtendedKeyUsageOID.SERVER_AUTH,
        ExtendedKeyUsageOID.CLIENT_AUTH,
    ]
    assert leaf.extensions.get_extension_for_class(x509.BasicConstraints).value.ca is False


def test_is_ca_request_under_an_intermediate_cluster_issuer(
    cert_manager_signer: CertManagerSigner, custom: kubernetes.client.CustomObjectsApi, root: TestCa
) -> None:
    intermediate = TestCa.create("test intermediate", parent=root)
    cert_manager_signer.add_ca_issuer("upstream", intermediate)
    cr = submit(
        custom,
        cert_manager_signer,
        request(
            "mesh-intermediate", issuer="upstream", kind="ClusterIssuer", isCA=True, usages=["cert sign", "crl sign"]
        ),
    )
    assert conditions(cr)["Ready"][1] == "Issued"
    leaf, chain = certificates(cr)
    assert chain == intermediate.certificate
    leaf.verify_directly_issued_by(intermediate.certificate)
    intermediate.certificate.verify_directly_issued_by(root.certificate)
    assert base64.b64decode(cr["status"]["ca"]) == root.pem()
    assert leaf.extensions.get_extension_for_class(x509.BasicConstraints).value.ca is True
    key_usage = leaf.extensions.get_extension_for_class(x509.KeyUsage).value
    assert (key_usage.key_cert_sign, key_usage.crl_sign, key_usage.digital_signature) == (True, True, False)
    with pytest.raises(x509.ExtensionNotFound):
        leaf.extensions.get_extension_for_class(x509.ExtendedKeyUsage)


def test_default_usages_and_duration(
    cert_manager_signer: CertManagerSigner, custom: kubernetes.client.CustomObjectsApi, root: TestCa
) -> None:
    cert_manager_signer.add_ca_issuer(
        "mesh-ca", TestCa.create("long root", lifetime=dt.timedelta(days=365)), namespace=NS
    )
    [leaf] = certificates(submit(custom, cert_manager_signer, request("defaults")))
    assert leaf.not_valid_after_utc - leaf.not_valid_before_utc == dt.timedelta(days=90, seconds=30)
    key_usage = leaf.extensions.get_extension_for_class(x509.KeyUsage).value
    assert (key_usage.digital_signature, key_usage.key_encipherment) == (True, True)


def test_duration_capped_by_issuer_policy_and_ca_expiry(
    cert_manager_signer: CertManagerSigner, custom: kubernetes.client.CustomObjectsApi
) -> None:
    short_root = TestCa.create("short root", lifetime=dt.timedelta(hours=3))
    cert_manager_signer.add_ca_issuer("capped", short_root, namespace=NS, max_duration=dt.timedelta(minutes=30))
    cert_manager_signer.add_ca_issuer("mesh-ca", short_root, namespace=NS)
    [capped] = certificates(submit(custom, cert_manager_signer, request("c", issuer="capped", duration="2h")))
    assert capped.not_valid_after_utc - capped.not_valid_before_utc == dt.timedelta(minutes=30, seconds=30)
    [expiry] = certificates(submit(custom, cert_manager_signer, request("e", duration="2160h")))
    assert expiry.not_valid_after_utc == short_root.certificate.not_valid_after_utc


def test_omit_ca_leaves_status_ca_empty(
    cert_manager_signer: CertManagerSigner, custom: kubernetes.client.CustomObjectsApi, root: TestCa
) -> None:
    cert_manager_signer.add_ca_issuer("acme-like", root, namespace=NS, omit_ca=True)
    cr = submit(custom, cert_manager_signer, request("no-ca", issuer="acme-like"))
    assert conditions(cr)["Ready"][1] == "Issued"
    assert "ca" not in cr["status"]
    certificates(cr)[0].verify_directly_issued_by(root.certificate)


OUTCOMES = [
    (
        "deny",
        Behaviour.DENY,
        "mesh-ca",
        "Issuer",
        {
            "Denied": ("True", "cert-manager.io", "Denied by mesh-identity test policy"),
            "Ready": ("False", "Denied", "The CertificateRequest was denied by an approval controller"),
        },
    ),
    (
        "fail",
        Behaviour.FAIL,
        "mesh-ca",
        "Issuer",
        {
            "Approved": ("True", "cert-manager.io", "Certificate request has been approved by cert-manager.io"),
            "Ready": ("False", "Failed", "Failed to sign certificate: the issuing CA refused the request"),
        },
    ),
    (
        "stall",
        Behaviour.STALL,
        "mesh-ca",
        "Issuer",
        {
            "Approved": ("True", "cert-manager.io", "Certificate request has been approved by cert-manager.io"),
            "Ready": ("False", "Pending", "Waiting on certificate issuance from the issuer"),
        },
    ),
    (
        "issuer not found",
        Behaviour.ISSUE,
        "missing",
        "Issuer",
        {
            "Approved": ("True", "cert-manager.io", "Certificate request has been approved by cert-manager.io"),
            "Ready": ("False", "Pending", 'Referenced "Issuer" not found: issuer.cert-manager.io "missing" not found'),
        },
    ),
    (
        "cluster issuer not found",
        Behaviour.ISSUE,
        "missing",
        "ClusterIssuer",
        {
            "Approved": ("True", "cert-manager.io", "Certificate request has been approved by cert-manager.io"),
            "Ready": (
                "False",
                "Pending",
                'Referenced "ClusterIssuer" not found: clusterissuer.cert-manager.io "missing" not found',
            ),
        },
    ),
]


@pytest.mark.parametrize(
    ("behaviour", "issuer", "kind", "expected"), [o[1:] for o in OUTCOMES], ids=[o[0] for o in OUTCOMES]
)
def test_unsuccessful_outcomes(
    cert_manager_signer: CertManagerSigner,
    custom: kubernetes.client.CustomObjectsApi,
    root: TestCa,
    behaviour: Behaviour,
    issuer: str,
    kind: str,
    expected: dict[str, tuple[str, str, str]],
) -> None:
    cert_manager_signer.add_ca_issuer("mesh-ca", root, namespace=NS)
    cert_manager_signer.behaviour = behaviour
    cr = submit(custom, cert_manager_signer, request("r", issuer=issuer, kind=kind))
    assert conditions(cr) == expected
    assert "certificate" not in cr["status"]
    assert ("failureTime" in cr["status"]) == (expected["Ready"][1] in ("Denied", "Failed"))


def test_bad_csr_fails(
    cert_manager_signer: CertManagerSigner, custom: kubernetes.client.CustomObjectsApi, root: TestCa
) -> None:
    cert_manager_signer.add_ca_issuer("mesh-ca", root, namespace=NS)
    body = request("bad")
    body["spec"]["request"] = base64.b64encode(b"-----BEGIN CERTIFICATE REQUEST-----\nAAAA\n").decode()
    status, reason, message = conditions(submit(custom, cert_manager_signer, body))["Ready"]
    assert (status, reason) == ("False", "Failed")
    assert message.startswith("Failed to sign certificate: error decoding certificate request PEM block: ")


def test_issuer_created_later_resumes_pending_requests(
    cert_manager_signer: CertManagerSigner, custom: kubernetes.client.CustomObjectsApi, root: TestCa
) -> None:
    pending = submit(custom, cert_manager_signer, request("early"))
    assert conditions(pending)["Ready"][1] == "Pending"
    cert_manager_signer.add_ca_issuer("mesh-ca", root, namespace=NS)
    assert cert_manager_signer.wait_for_outcomes(2)
    issued = custom.get_namespaced_custom_object(G, V, NS, CRS, "early")
    assert conditions(issued)["Ready"][1] == "Issued"


def test_ignored_and_external_requests_are_left_alone(
    cert_manager_signer: CertManagerSigner, custom: kubernetes.client.CustomObjectsApi, root: TestCa
) -> None:
    cert_manager_signer.add_ca_issuer("mesh-ca", root, namespace=NS)
    cert_manager_signer.decide = lambda cr: Behaviour.IGNORE if cr["metadata"]["name"] == "ignored" else Behaviour.ISSUE
    custom.create_namespaced_custom_object(G, V, NS, CRS, request("ignored"))
    custom.create_namespaced_custom_object(G, V, NS, CRS, request("external", group="awspca.cert-manager.io"))
    submit(custom, cert_manager_signer, request("after"))  # handled strictly after the two above
    assert [o.name for o in cert_manager_signer.outcomes] == ["after"]
    for name in ("ignored", "external"):
        assert "status" not in custom.get_namespaced_custom_object(G, V, NS, CRS, name)


def test_signer_survives_an_outage_and_an_expired_watch(
    kube_server: KubeServer,
    cert_manager_signer: CertManagerSigner,
    custom: kubernetes.client.CustomObjectsApi,
    root: TestCa,
) -> None:
    cert_manager_signer.add_ca_issuer("mesh-ca", root, namespace=NS)
    submit(custom, cert_manager_signer, request("before"))
    kube_server.go_down()
    kube_server.compact()
    kube_server.come_up()
    assert conditions(submit(custom, cert_manager_signer, request("after")))["Ready"][1] == "Issued"


def test_signer_writes_as_its_own_user(
    kube_server: KubeServer,
    cert_manager_signer: CertManagerSigner,
    custom: kubernetes.client.CustomObjectsApi,
    root: TestCa,
) -> None:
    cert_manager_signer.add_ca_issuer("mesh-ca", root, namespace=NS)
    submit(custom, cert_manager_signer, request("who"))
    status_writers = {r.user for r in kube_server.requests if r.resource == "certificaterequests/status"}
    assert status_writers == {SIGNER_USER}


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("2160h", dt.timedelta(days=90)),
        ("1h30m0s", dt.timedelta(minutes=90)),
        ("90s", dt.timedelta(seconds=90)),
        ("1.5h", dt.timedelta(minutes=90)),
        ("500ms", dt.timedelta(milliseconds=500)),
    ],
)
def test_parse_go_duration(text: str, expected: dt.timedelta) -> None:
    assert parse_go_duration(text) == expected


@pytest.mark.parametrize("text", ["", "1d", "h", "1h 2m", "-1h"])
def test_parse_go_duration_rejects(text: str) -> None:
    with pytest.raises(ValueError, match=f"invalid duration {text!r}"):
        parse_go_duration(text)
