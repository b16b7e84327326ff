"""The webhook's serving certificate from the mesh CA: its profile, the Authority's refusals, the files and their
renewal (mesh_identity.inject.component.ServingCertificates), checked with the openssl CLI and real TLS."""

from __future__ import annotations

import http.client
import json
import ssl
import stat
import subprocess
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.x509.oid import ExtendedKeyUsageOID

from mesh_identity.authority import Authority
from mesh_identity.errors import IssuanceError
from mesh_identity.events import CertificateIssued, CertKind, ListSink
from mesh_identity.inject.component import InjectorComponent, InjectorMetrics, ServingCertificates
from mesh_identity.inject.review import Injector
from mesh_identity.provider import Mode
from mesh_identity.rotation.source import BundleSource
from mesh_identity.svid import serial_of
from tests.inject import kit

NAME = "mesh-identity-injector.mesh-identity-system.svc"


def _certificates(authority: Authority, tmp_path: Path, **changes: object) -> ServingCertificates:
    values: dict[str, object] = {"ttl": timedelta(hours=1), "rotate_after": 0.5}
    values.update(changes)
    return ServingCertificates(authority, [NAME, "10.96.0.7"], tmp_path / "injector", **values)  # type: ignore[arg-type]


def test_the_serving_certificate_names_the_webhook_and_is_for_servers_only(authority: Authority) -> None:
    served = authority.issue_serving([NAME, "10.96.0.7"], timedelta(hours=1))
    san = served.leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == [NAME]
    assert [str(ip) for ip in san.get_values_for_type(x509.IPAddress)] == ["10.96.0.7"]
    assert san.get_values_for_type(x509.UniformResourceIdentifier) == []  # not an SVID: no SPIFFE ID
    eku = served.leaf.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert list(eku) == [ExtendedKeyUsageOID.SERVER_AUTH]  # its key cannot pass for a mesh client
    assert not served.leaf.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    assert served.chain and served.chain[0] == authority.signing_ca.certificate  # type: ignore[union-attr]
    lifetime = served.leaf.not_valid_after_utc - served.leaf.not_valid_before_utc
    assert timedelta(hours=1) <= lifetime <= timedelta(hours=1, minutes=1)  # backdated by the clock skew


@pytest.mark.parametrize(
    ("names", "message"),
    [
        ([], "at least one DNS name or IP address"),
        (["*.svc"], "'\\*.svc' is not a DNS name"),
        (["Web.svc"], "'Web.svc' is not a DNS name"),
        (["web..svc"], "'web..svc' is not a DNS name"),
        (["a" * 64 + ".svc"], "is not a DNS name"),
        ([NAME, NAME], "list a name twice"),
        (["x"] * 17, "at most 16 names"),
    ],
)
def test_bad_server_names_are_refused_with_the_name(authority: Authority, names: list[str], message: str) -> None:
    with pytest.raises(IssuanceError, match=message):
        authority.issue_serving(names, timedelta(hours=1))


def test_a_serving_certificate_needs_the_authoritys_own_intermediate(
    make_authority: Callable[..., Authority],
) -> None:
    per_workload = make_authority(mode=Mode.PER_WORKLOAD)
    with pytest.raises(IssuanceError, match=r"ca\.mode per-workload has none"):
        per_workload.issue_serving([NAME], timedelta(hours=1))


def test_a_serving_certificate_never_outlives_its_intermediate_and_is_reported(
    make_authority: Callable[..., Authority], tmp_path: Path
) -> None:
    sink = ListSink()
    authority = make_authority(sink=sink, intermediate_ttl=timedelta(hours=2))
    certificates = _certificates(authority, tmp_path, ttl=timedelta(days=30))
    served = certificates.renew()
    assert served.leaf.not_valid_after_utc <= authority.signing_ca.certificate.not_valid_after_utc  # type: ignore[union-attr]
    issued = [e for e in sink.events if isinstance(e, CertificateIssued) and e.kind is CertKind.SERVING]
    assert [e.serial for e in issued] == [serial_of(served.leaf)]
    assert issued[0].subject == f"{NAME}, 10.96.0.7" and issued[0].requested_by == "injector"
    with pytest.raises(IssuanceError, match=r"TTL .* is not positive"):
        authority.issue_serving([NAME], timedelta(0))


def test_the_files_are_private_and_verify_with_openssl_for_the_webhooks_name(
    authority: Authority, tmp_path: Path
) -> None:
    certificates = _certificates(authority, tmp_path)
    certificates.renew()
    assert stat.S_IMODE(certificates.key_file.stat().st_mode) == 0o600
    assert stat.S_IMODE(certificates.directory.stat().st_mode) == 0o700
    bundle = tmp_path / "bundle.pem"
    bundle.write_bytes(authority.bundle().pem())
    chain = certificates.cert_file.read_bytes().split(b"-----END CERTIFICATE-----\n")
    leaf, untrusted = tmp_path / "leaf.pem", tmp_path / "chain.pem"
    leaf.write_bytes(chain[0] + b"-----END CERTIFICATE-----\n")
    untrusted.write_bytes(b"-----END CERTIFICATE-----\n".join(chain[1:]))
    argv = ["openssl", "verify", "-CAfile", str(bundle), "-untrusted", str(untrusted), "-purpose", "sslserver"]
    done = subprocess.run([*argv, "-verify_hostname", NAME, str(leaf)], capture_output=True, text=True, check=False)
    assert done.returncode == 0 and done.stdout.strip().endswith(": OK"), done.stdout + done.stderr
    other = subprocess.run(
        [*argv, "-verify_hostname", "evil.svc", str(leaf)], capture_output=True, text=True, check=False
    )
    assert other.returncode != 0 and "hostname mismatch" in other.stdout + other.stderr
    client = subprocess.run(
        ["openssl", "verify", "-CAfile", str(bundle), "-untrusted", str(untrusted), "-purpose", "sslclient", str(leaf)],
        capture_output=True, text=True, check=False,
    )  # fmt: skip
    assert client.returncode != 0  # serverAuth only


class Clock:
    def __init__(self) -> None:
        self.now = datetime.now(UTC)

    def __call__(self) -> datetime:
        return self.now


def test_renewal_is_due_at_rotate_after_and_when_the_intermediate_changes(authority: Authority, tmp_path: Path) -> None:
    clock = Clock()
    certificates = _certificates(authority, tmp_path, clock=clock, rotate_after=0.5)
    assert certificates.due()  # nothing issued yet
    served = certificates.renew()
    assert not certificates.due()
    start = clock.now  # when it was issued: NotBefore is a minute earlier (clock skew)
    assert served.leaf.not_valid_before_utc < start - timedelta(seconds=59)
    clock.now = start + (served.leaf.not_valid_after_utc - start) * 0.49
    assert not certificates.due()
    clock.now = start + (served.leaf.not_valid_after_utc - start) * 0.51
    assert certificates.due()
    clock.now = datetime.now(UTC)
    certificates.renew()
    assert not certificates.due()
    authority.rotate_intermediate()
    assert certificates.due()  # the new intermediate signs from now on: the certificate follows it


def test_the_component_serves_with_the_certificate_and_renews_it_without_a_restart(
    authority: Authority, tmp_path: Path
) -> None:
    bundles = BundleSource()
    bundles.publish(authority.bundle())
    metrics = InjectorMetrics()
    certificates = ServingCertificates(
        authority, ["localhost"], tmp_path / "injector", ttl=timedelta(hours=1), rotate_after=0.5,
        on_issued=lambda served: metrics.expiry.set(served.leaf.not_valid_after_utc.timestamp()),
    )  # fmt: skip
    injector = Injector(kit.settings(), observe=metrics.observe)
    component = InjectorComponent(certificates, injector, host="127.0.0.1", port=0, bundles=bundles)
    component.start()
    try:
        assert component.server is not None
        port = component.server.address[1]
        bundle = tmp_path / "bundle.pem"
        bundle.write_bytes(authority.bundle().pem())
        context = ssl.create_default_context(cafile=str(bundle))
        serials = []
        for _ in range(3):
            connection = http.client.HTTPSConnection("localhost", port, context=context, timeout=10)
            body = json.dumps(kit.review()).encode()
            connection.request("POST", "/mutate", body, {"Content-Type": "application/json"})
            answer = json.loads(connection.getresponse().read())
            assert answer["response"]["allowed"] is True and answer["response"]["patchType"] == "JSONPatch"
            peer = connection.sock.getpeercert(binary_form=True)  # type: ignore[union-attr]
            assert peer is not None
            serials.append(x509.load_der_x509_certificate(peer).serial_number)
            connection.close()
            certificates.renew()  # as the renewer does at rotate_after
        assert len(set(serials)) == 3  # each handshake after a renewal got the new certificate
        assert component.server.tls.reloads == 2
        assert (
            metrics.registry.get_sample_value("mesh_identity_injector_admissions_total", {"outcome": "injected"}) == 3
        )
        expiry = metrics.registry.get_sample_value("mesh_identity_injector_certificate_expiry_timestamp_seconds")
        assert expiry == certificates.current.leaf.not_valid_after_utc.timestamp()  # type: ignore[union-attr]
    finally:
        component.stop()
