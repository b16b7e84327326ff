"""The webhook's HTTPS server: POST /mutate over real TLS, clear 4xx answers, request size limits, and the
serving certificate swapped on disk and used from the next handshake on, seen by Python's ssl and by the real
``openssl s_client``."""

from __future__ import annotations

import http.client
import json
import os
import shutil
import socket
import ssl
import subprocess
import warnings
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from mesh_identity.inject.review import Injector
from mesh_identity.inject.server import WebhookServer
from tests.inject.kit import decoded_patch, review, settings
from tests.pki import TestCa, key_pem

OPENSSL = shutil.which("openssl")


def write_pair(ca: TestCa, directory: Path, cert_name: str = "tls.crt", key_name: str = "tls.key") -> int:
    """A new serving certificate for localhost/127.0.0.1, written next to the files and renamed over them (as a
    rotation does); returns its serial."""
    certificate, key = ca.leaf(dns=["localhost"], ips=["127.0.0.1"])
    for name, data in ((cert_name, certificate.public_bytes(serialization.Encoding.PEM)), (key_name, key_pem(key))):
        temporary = directory / f".{name}.new"
        temporary.write_bytes(data)
        os.replace(temporary, directory / name)
    return certificate.serial_number


@pytest.fixture
def ca():
    return TestCa.create("webhook test CA")


@pytest.fixture
def server(ca, tmp_path):
    serial = write_pair(ca, tmp_path)
    with WebhookServer(Injector(settings()), tmp_path / "tls.crt", tmp_path / "tls.key", max_body=64 * 1024) as found:
        found.first_serial = serial
        yield found


def client_context(ca: TestCa) -> ssl.SSLContext:
    return ssl.create_default_context(cadata=ca.pem().decode())


def served_serial(server: WebhookServer, ca: TestCa) -> int:
    host, port = server.address
    with socket.create_connection((host, port), timeout=10) as raw:
        with client_context(ca).wrap_socket(raw, server_hostname="localhost") as tls:
            der = tls.getpeercert(binary_form=True)
    return x509.load_der_x509_certificate(der).serial_number


def openssl_serial(server: WebhookServer, ca: TestCa, tmp_path: Path) -> int:
    assert OPENSSL, "openssl is required (Debian package openssl)"
    host, port = server.address
    (tmp_path / "ca.pem").write_bytes(ca.pem())
    shown = subprocess.run(
        [OPENSSL, "s_client", "-connect", f"{host}:{port}", "-servername", "localhost", "-CAfile",
         str(tmp_path / "ca.pem"), "-verify_return_error", "-tls1_2"],
        input=b"", capture_output=True, timeout=30, check=True,
    )  # fmt: skip
    assert b"Verify return code: 0 (ok)" in shown.stdout
    certificate = x509.load_pem_x509_certificate(shown.stdout)
    return certificate.serial_number


def post(server: WebhookServer, ca: TestCa, body: bytes, headers: dict[str, str] | None = None, path: str = "/mutate"):
    host, port = server.address
    connection = http.client.HTTPSConnection(host, port, context=client_context(ca), timeout=10)
    connection.putrequest("POST", path, skip_accept_encoding=True)
    sent = {"Content-Type": "application/json", "Content-Length": str(len(body)), **(headers or {})}
    for name, value in sent.items():
        if value is not None:
            connection.putheader(name, value)
    connection.endheaders()
    if body:
        connection.send(body)
    response = connection.getresponse()
    data = response.read()
    connection.close()
    return response.status, data


def test_a_review_is_answered_over_https(server, ca):
    status, data = post(server, ca, json.dumps(review()).encode())
    assert status == 200
    answer = json.loads(data)
    assert answer["response"]["uid"] == "705ab4f5-6393-11e8-b7cc-42010a800002"
    assert decoded_patch(answer)


def test_a_malformed_review_is_a_400_naming_the_field(server, ca):
    bad = review(operation="DELETE")
    status, data = post(server, ca, json.dumps(bad).encode())
    assert (status, data) == (
        400,
        b'malformed AdmissionReview: request.operation: "DELETE" is not CREATE; pods are injected on creation\n',
    )


@pytest.mark.parametrize(
    ("body", "headers", "path", "status", "message"),
    [
        (b"{not json", {}, "/mutate", 400, b"the body is not JSON: Expecting property name"),
        (b"{}", {"Content-Type": "text/plain"}, "/mutate", 415, b"Content-Type 'text/plain' is not application/json"),
        (b"{}", {}, "/other", 404, b"'/other': not found (the webhook serves POST /mutate)"),
        (b"", {"Content-Length": None}, "/mutate", 411, b"Content-Length is required (no chunked body)"),
        (b"", {"Content-Length": "12x"}, "/mutate", 400, b"Content-Length '12x' is not a number of bytes"),
        (
            b"",
            {"Content-Length": str(64 * 1024 + 1)},
            "/mutate",
            413,
            b"the body is 65537 bytes, more than the 65536 allowed",
        ),
    ],
)
def test_bad_requests_get_a_clear_4xx(server, ca, body, headers, path, status, message):
    got, data = post(server, ca, body, headers, path)
    assert got == status
    assert data.startswith(message), data


def test_other_methods_and_health(server, ca):
    host, port = server.address
    for method, path, status in (("GET", "/mutate", 405), ("PUT", "/mutate", 405), ("GET", "/healthz", 200)):
        connection = http.client.HTTPSConnection(host, port, context=client_context(ca), timeout=10)
        connection.request(method, path)
        response = connection.getresponse()
        response.read()
        connection.close()
        assert response.status == status, (method, path)


def test_tls_below_1_2_is_refused(server, ca):
    assert server.tls.context().minimum_version == ssl.TLSVersion.TLSv1_2
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # TLS 1.1 is what this client must offer
        context = client_context(ca)
        context.minimum_version = ssl.TLSVersion.TLSv1
        context.maximum_version = ssl.TLSVersion.TLSv1_1
    context.set_ciphers("DEFAULT:@SECLEVEL=0")
    host, port = server.address
    with socket.create_connection((host, port), timeout=10) as raw, pytest.raises(ssl.SSLError) as caught:
        context.wrap_socket(raw, server_hostname="localhost")
    assert "ALERT" in str(caught.value).upper() or "VERSION" in str(caught.value).upper()


def test_a_swapped_certificate_is_served_without_a_restart(server, ca, tmp_path):
    assert served_serial(server, ca) == server.first_serial
    assert openssl_serial(server, ca, tmp_path) == server.first_serial
    second = write_pair(ca, tmp_path)
    assert served_serial(server, ca) == second
    assert openssl_serial(server, ca, tmp_path) == second
    assert server.tls.reloads == 1
    status, _ = post(server, ca, json.dumps(review()).encode())
    assert status == 200


def test_a_pair_that_does_not_load_keeps_the_previous_certificate(server, ca, tmp_path):
    other = TestCa.create("another CA")
    _, stray = other.leaf(dns=["localhost"])
    (tmp_path / ".key").write_bytes(key_pem(stray))
    os.replace(tmp_path / ".key", tmp_path / "tls.key")  # a key that does not match the certificate
    assert served_serial(server, ca) == server.first_serial
    assert server.tls.reloads == 0
    third = write_pair(ca, tmp_path)
    assert served_serial(server, ca) == third


def test_a_kubelet_style_link_swap_is_followed(ca, tmp_path):
    first, second = tmp_path / "..2026_1", tmp_path / "..2026_2"
    first.mkdir()
    second.mkdir()
    serial = write_pair(ca, first)
    (tmp_path / "..data").symlink_to(first.name)
    (tmp_path / "tls.crt").symlink_to("..data/tls.crt")
    (tmp_path / "tls.key").symlink_to("..data/tls.key")
    with WebhookServer(Injector(settings()), tmp_path / "tls.crt", tmp_path / "tls.key") as server:
        assert served_serial(server, ca) == serial
        newer = write_pair(ca, second)
        (tmp_path / "..data_tmp").symlink_to(second.name)
        os.replace(tmp_path / "..data_tmp", tmp_path / "..data")
        assert served_serial(server, ca) == newer


def test_a_pair_that_does_not_load_at_start_is_an_error(ca, tmp_path):
    (tmp_path / "tls.crt").write_bytes(b"not a certificate")
    (tmp_path / "tls.key").write_bytes(b"not a key")
    with pytest.raises(ssl.SSLError):
        WebhookServer(Injector(settings()), tmp_path / "tls.crt", tmp_path / "tls.key")


def test_admissions_keep_succeeding_while_the_certificate_rotates(server, ca, tmp_path):
    body = json.dumps(review()).encode()
    statuses: list[int] = []
    serials = {server.first_serial}
    for _ in range(5):
        for _ in range(10):
            statuses.append(post(server, ca, body)[0])
        serials.add(write_pair(ca, tmp_path))
        assert served_serial(server, ca) in serials
    assert statuses == [200] * 50
    assert server.tls.reloads == 5


def test_a_failing_documents_callable_is_a_500_not_a_partial_patch(ca, tmp_path):
    def broken(workload):
        raise RuntimeError("no bootstrap today")

    write_pair(ca, tmp_path)
    injector = Injector(settings(documents=broken))
    with WebhookServer(injector, tmp_path / "tls.crt", tmp_path / "tls.key") as server:
        status, data = post(server, ca, json.dumps(review()).encode())
    assert (status, data) == (500, b"internal error: the webhook could not answer this review\n")
