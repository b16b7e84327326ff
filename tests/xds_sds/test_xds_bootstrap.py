"""The Envoy bootstrap files, read back (Envoy itself validates them in tests/e2e/test_bootstrap.py)."""

from __future__ import annotations

import base64
import json
import logging
import os
import shutil
import stat
from pathlib import Path

import pytest

from mesh_identity.mesh.model import Address
from tests.pki import TestCa
from xds_sds.mesh.sidecars import SidecarDirs
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


# -- renewal writes only inside the bootstrap directory, never through a link, only where the server owns ----

XDS = Address("127.0.0.1", 7443)
NOBODY = 65534
as_root = pytest.mark.skipif(os.geteuid() != 0, reason="giving a directory to another uid needs root")


def _bootstrapped(directory: Path) -> Path:
    write_bootstrap(CA.svid("/ns/shop/sa/web"), directory, node=directory.name, xds=XDS, server_identity=SERVER)
    return directory


def _swap_sds_for_a_link(directory: Path, target: Path) -> None:
    """What someone with write access to the bootstrap directory (but not to ``target``'s files) would do."""
    target.mkdir(exist_ok=True)
    shutil.rmtree(directory / "sds")
    (directory / "sds").symlink_to(target)


@pytest.mark.parametrize("renew", ["certificate", "bundle"])
def test_renewal_does_not_follow_a_swapped_sds_link(tmp_path: Path, renew: str) -> None:
    web = _bootstrapped(tmp_path / "web-1")
    elsewhere = tmp_path / "elsewhere"
    _swap_sds_for_a_link(web, elsewhere)
    with pytest.raises(OSError, match=r"web-1/sds is a symbolic link: refusing to follow it"):
        if renew == "certificate":
            renew_bootstrap(CA.svid("/ns/shop/sa/web"), web)
        else:
            renew_bootstrap_bundle(CA.bundle, web)
    assert list(elsewhere.iterdir()) == []


def test_renewal_does_not_follow_a_linked_bootstrap_directory(tmp_path: Path) -> None:
    real = _bootstrapped(tmp_path / "real")
    (tmp_path / "web-1").symlink_to(real)
    before = (real / "sds" / "xds-cert.json").read_bytes()
    with pytest.raises(OSError, match=r"web-1 is a symbolic link: refusing to follow it"):
        renew_bootstrap(CA.svid("/ns/shop/sa/web"), tmp_path / "web-1")
    assert (real / "sds" / "xds-cert.json").read_bytes() == before


def test_renewal_replaces_a_linked_certificate_file_without_writing_through_it(tmp_path: Path) -> None:
    web = _bootstrapped(tmp_path / "web-1")
    victim = tmp_path / "victim.pem"
    victim.write_bytes(b"not yours\n")
    cert = web / "sds" / "xds-cert.json"
    cert.unlink()
    cert.symlink_to(victim)
    with pytest.raises(OSError, match=r"xds-cert.json is a symbolic link, not a regular file"):
        renew_bootstrap(CA.svid("/ns/shop/sa/web"), web)
    assert victim.read_bytes() == b"not yours\n"


@as_root
@pytest.mark.parametrize("owned_by_another", ["", "sds", "sds/xds-cert.json"])
def test_renewal_refuses_what_the_server_does_not_own(tmp_path: Path, owned_by_another: str) -> None:
    web = _bootstrapped(tmp_path / "web-1")
    os.chown(web / owned_by_another, NOBODY, NOBODY)
    before = (web / "sds" / "xds-cert.json").read_bytes()
    shown = str(web / owned_by_another).rstrip("/")
    with pytest.raises(OSError, match=rf"{shown} is owned by uid {NOBODY}, not this server's uid 0"):
        renew_bootstrap(CA.svid("/ns/shop/sa/web"), web)
    assert (web / "sds" / "xds-cert.json").read_bytes() == before


def test_a_tampered_sidecar_is_skipped_and_the_others_renewed(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    sidecars = SidecarDirs(tmp_path / "state")
    svid = CA.svid("/ns/shop/sa/web")
    for node in ("web-1", "web-2", "web-3"):
        sidecars.write(svid, node=node, cluster="web", xds=XDS, server_identity=SERVER, out_dir=tmp_path / node)
    elsewhere = tmp_path / "elsewhere"
    _swap_sds_for_a_link(tmp_path / "web-2", elsewhere)
    caplog.set_level(logging.WARNING, logger="xds_sds")
    renewed = CA.svid("/ns/shop/sa/web")
    assert sidecars.renew(renewed, ["web-1", "web-2", "web-3"]) == ["web-1", "web-3"]
    assert sidecars.renew_bundle(CA.bundle, ["web-1", "web-2", "web-3"]) == ["web-1", "web-3"]
    assert list(elsewhere.iterdir()) == []
    for node in ("web-1", "web-3"):
        doc = json.loads((tmp_path / node / "sds" / "xds-cert.json").read_text())
        chain = doc["resources"][0]["tlsCertificate"]["certificateChain"]["inlineBytes"]
        assert base64.b64decode(chain) == renewed.cert_chain_pem()
    web_2 = tmp_path / "web-2"
    assert (
        f"cannot renew the bootstrap certificate of web-2 in {web_2}: {web_2}/sds is a symbolic link: refusing to "
        "follow it"
    ) in caplog.messages


def test_bootstrap_through_a_linked_out_dir_writes_the_real_paths(tmp_path: Path) -> None:
    """``bootstrap --out LINK``: the operator named the link, so it is resolved once; Envoy gets the real paths."""
    real = tmp_path / "real"
    real.mkdir()
    (tmp_path / "link").symlink_to(real)
    sidecars = SidecarDirs(tmp_path / "state")
    files = sidecars.write(
        CA.svid("/ns/shop/sa/web"), node="web-1", cluster="web", xds=XDS, server_identity=SERVER,
        out_dir=tmp_path / "link",
    )  # fmt: skip
    assert files.certificate == real / "sds" / "xds-cert.json"
    assert sidecars.directory("web-1") == real
    assert sidecars.renew(CA.svid("/ns/shop/sa/web"), ["web-1"]) == ["web-1"]
