"""The Envoy bootstrap files, read back (Envoy itself validates them in tests/e2e/test_bootstrap.py)."""

from __future__ import annotations

import base64
import json
import stat
from pathlib import Path

import pytest

from mesh_identity.mesh.model import Address
from tests.pki import TestCa
from xds_sds.resources.bootstrap import renew_bootstrap, renew_bootstrap_bundle, write_bootstrap

CA = TestCa.for_trust_domain("example.org")
SERVER = CA.id("/mesh-identity/xds")


def _secret(path: Path) -> dict[str, object]:
    [secret] = json.loads(path.read_text())["resources"]
    return dict(secret)


@pytest.mark.parametrize(("delta", "api_type"), [(False, "GRPC"), (True, "DELTA_GRPC")])
def test_bootstrap_document(tmp_path: Path, delta: bool, api_type: str) -> None:
    svid = CA.svid("/ns/shop/sa/web")
    files = write_bootstrap(
        svid, tmp_path / "web-1", node="web-1", cluster="web", xds=Address("127.0.0.1", 7443),
        server_identity=SERVER, delta=delta,
    )  # fmt: skip
    doc = json.loads(files.bootstrap.read_text())
    assert doc["node"] == {"id": "web-1", "cluster": "web"}
    assert doc["admin"]["address"]["socketAddress"] == {"address": "127.0.0.1", "portValue": 0}  # Envoy picks
    ads = doc["dynamicResources"]["adsConfig"]
    assert ads["apiType"] == api_type
    assert ads["grpcServices"][0]["envoyGrpc"]["clusterName"] == "mesh-identity-xds"
    [cluster] = doc["staticResources"]["clusters"]
    assert cluster["loadAssignment"]["endpoints"][0]["lbEndpoints"][0]["endpoint"]["address"]["socketAddress"] == {
        "address": "127.0.0.1",
        "portValue": 7443,
    }
    tls = cluster["transportSocket"]["typedConfig"]["commonTlsContext"]
    [cert_config] = tls["tlsCertificateSdsSecretConfigs"]
    source = cert_config["sdsConfig"]["pathConfigSource"]
    assert source == {"path": str(files.certificate), "watchedDirectory": {"path": str(files.certificate.parent)}}
    validation = tls["combinedValidationContext"]
    assert validation["defaultValidationContext"]["matchTypedSubjectAltNames"] == [
        {"sanType": "URI", "matcher": {"exact": str(SERVER)}}
    ]
    assert validation["validationContextSdsSecretConfig"]["sdsConfig"]["pathConfigSource"]["path"] == str(files.bundle)
    assert stat.S_IMODE(files.certificate.stat().st_mode) == 0o600
    assert _secret(files.certificate)["name"] == "xds-client-certificate"
    assert _secret(files.bundle)["name"] == "xds-trust-bundle"


def test_renewal_replaces_the_files_in_place(tmp_path: Path) -> None:
    files = write_bootstrap(
        CA.svid("/ns/shop/sa/web"), tmp_path, node="web-1", xds=Address("127.0.0.1", 7443), server_identity=SERVER
    )
    before = files.certificate.read_text()
    renewed = CA.svid("/ns/shop/sa/web")
    renew_bootstrap(renewed, tmp_path)
    after = files.certificate.read_text()
    assert after != before
    chain = json.loads(after)["resources"][0]["tlsCertificate"]["certificateChain"]["inlineBytes"]
    assert base64.b64decode(chain) == renewed.cert_chain_pem()
    next_root = TestCa.for_trust_domain("example.org", "next root")
    renew_bootstrap_bundle(CA.bundle.with_authorities(next_root.bundle.authorities), tmp_path)
    assert len(json.loads(files.bundle.read_text())["resources"]) == 1
    assert sorted(p.name for p in files.certificate.parent.iterdir()) == ["xds-bundle.json", "xds-cert.json"]


def test_admin_must_be_loopback(tmp_path: Path) -> None:
    with pytest.raises(ValueError) as info:
        write_bootstrap(
            CA.svid("/ns/shop/sa/web"), tmp_path, node="web-1", xds=Address("127.0.0.1", 7443),
            server_identity=SERVER, admin=Address("0.0.0.0", 9901),
        )  # fmt: skip
    assert str(info.value) == "the Envoy admin must listen on loopback, not 0.0.0.0"
