"""``mesh-identity bootstrap`` without a running server: what it writes, where it registers it, and its errors."""

from __future__ import annotations

import base64
import json
from pathlib import Path

import pytest
import yaml

from mesh_identity.cli.main import main
from mesh_identity.clock import utcnow
from mesh_identity.spiffe import SpiffeId, TrustDomain
from mesh_identity.svid import TrustBundle, load_certs_pem, spiffe_id_of
from mesh_identity.verify import chain_problem

FRONTEND = "spiffe://example.org/ns/shop/sa/frontend"
BACKEND = "spiffe://example.org/ns/shop/sa/backend"
MESH = {
    "services": {
        "frontend": {
            "identity": {"namespace": "shop", "service_account": "frontend"},
            "instances": [{"node": "frontend-1", "app": "127.0.0.1:18080", "inbound": "127.0.0.1:18443"}],
            "upstreams": [{"service": "backend", "listen": "127.0.0.1:18081"}],
        },
        "backend": {
            "identity": BACKEND,
            "instances": [{"node": "backend-1", "app": "127.0.0.1:18180", "inbound": "127.0.0.1:18543"}],
        },
    }
}


def write(directory: Path, *, mesh: dict[str, object] | None = MESH, xds: str | None = "127.0.0.1:1") -> Path:
    config: dict[str, object] = {"trust_domain": "example.org", "state_dir": "state"}
    if mesh is not None:
        (directory / "mesh.yaml").write_text(yaml.safe_dump(mesh))
        config["mesh_file"] = "mesh.yaml"
    if xds is not None:
        config["xds"] = {"listen": xds}
    path = directory / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def cli(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    code = main(list(args))
    out, err = capsys.readouterr()
    return code, out, err


def bootstrap(capsys: pytest.CaptureFixture[str], config: Path, identity: str, node: str, *extra: str):
    out = config.parent / "out" / node
    return cli(
        capsys, "bootstrap", "-c", str(config), "--identity", identity, "--node", node, "--out", str(out), *extra
    )


def test_bootstrap_writes_files_with_a_certificate_of_the_identity_and_registers_them(tmp_path, capsys) -> None:
    config = write(tmp_path)
    assert cli(capsys, "init", "-c", str(config))[0] == 0
    code, out, err = bootstrap(capsys, config, FRONTEND, "frontend-1", "--admin", "127.0.0.1:9901")
    assert (code, err) == (0, "")
    directory = tmp_path / "out" / "frontend-1"
    lines = out.splitlines()
    assert lines[0] == f"wrote the bootstrap of sidecar frontend-1 ({FRONTEND}) to {directory / 'envoy.json'}"
    assert lines[1] == "  xDS server 127.0.0.1:1 over mTLS (state of the world ADS)"
    assert lines[3] == f"  run: envoy -c {directory / 'envoy.json'} --admin-address-path {directory / 'admin.addr'}"

    registered = tmp_path / "state" / "sidecars" / "frontend-1"
    assert registered.is_symlink() and registered.resolve() == directory
    document = json.loads((directory / "envoy.json").read_text())
    assert document["node"] == {"id": "frontend-1", "cluster": "frontend"}
    assert document["admin"]["address"]["socketAddress"] == {"address": "127.0.0.1", "portValue": 9901}
    secret = json.loads((directory / "sds" / "xds-cert.json").read_text())["resources"][0]
    chain = load_certs_pem(base64.b64decode(secret["tlsCertificate"]["certificateChain"]["inlineBytes"]))
    assert spiffe_id_of(chain[0]) == SpiffeId.parse(FRONTEND)
    assert lines[2].startswith(f"  bootstrap certificate serial {chain[0].serial_number:x}, expires ")
    bundle = json.loads((directory / "sds" / "xds-bundle.json").read_text())["resources"][0]
    roots = load_certs_pem(base64.b64decode(bundle["validationContext"]["trustedCa"]["inlineBytes"]))
    assert chain_problem(chain[0], chain[1:], TrustBundle(TrustDomain("example.org"), roots), utcnow()) is None
    assert (directory / "sds" / "xds-cert.json").stat().st_mode & 0o777 == 0o600

    # bootstrapping again elsewhere moves the registration
    code, _, err = cli(capsys, "bootstrap", "-c", str(config), "--identity", FRONTEND, "--node", "frontend-1",
                       "--out", str(tmp_path / "elsewhere"))  # fmt: skip
    assert (code, err) == (0, "")
    assert registered.resolve() == tmp_path / "elsewhere"


@pytest.mark.parametrize(
    ("setup", "identity", "node", "extra", "message"),
    [
        ({"mesh": None}, FRONTEND, "frontend-1", [],
         "bootstrap: the config has no mesh_file (the sidecars and their identities are listed there)"),
        ({}, "spiffe://example.org/ns/shop/sa/billing", "frontend-1", [],
         "--identity: spiffe://example.org/ns/shop/sa/billing is not an identity of the mesh in {mesh} "
         f"({BACKEND}, {FRONTEND})"),
        ({}, "spiffe://example.org/a/../b", "frontend-1", [],
         "Invalid SPIFFE ID 'spiffe://example.org/a/../b': path segment '..' is not allowed"),
        ({}, FRONTEND, "frontend-9", [],
         f"--node: 'frontend-9' is not a sidecar of the mesh in {{mesh}} (those of {FRONTEND}: frontend-1)"),
        ({}, FRONTEND, "backend-1", [], f"--node: 'backend-1' is a sidecar of {BACKEND}, not {FRONTEND}"),
        ({"xds": "127.0.0.1:0"}, FRONTEND, "frontend-1", [],
         "the xDS server's address is unknown: xds.listen is 127.0.0.1:0 and no running server wrote "
         "{state}/xds.addr; start 'mesh-identity serve' first, set a fixed xds.listen port, or pass --xds"),
        ({"xds": None}, FRONTEND, "frontend-1", ["--xds", "xds.example.org:15010"],
         "--xds: 'xds.example.org:15010' is not IP:PORT (e.g. 127.0.0.1:15010)"),
        ({}, FRONTEND, "frontend-1", ["--admin", "10.0.0.1:9901"],
         "--admin: '10.0.0.1:9901' is not a loopback address (the Envoy admin stays local)"),
        ({"mesh": {"services": {"xds": {"identity": "spiffe://example.org/mesh-identity/xds",
                                        "instances": [{"node": "x-1", "app": "127.0.0.1:1", "inbound": "127.0.0.1:2"}]}}}},
         FRONTEND, "frontend-1", [],
         "services.xds.identity: spiffe://example.org/mesh-identity/xds is under /mesh-identity/, the control plane's own identities (its xDS server's and the node agents')"),
    ],
)  # fmt: skip
def test_bootstrap_errors_are_one_line_and_write_nothing(
    tmp_path, capsys, setup: dict[str, object], identity: str, node: str, extra: list[str], message: str
) -> None:
    config = write(tmp_path, **setup)  # type: ignore[arg-type]
    code, out, err = bootstrap(capsys, config, identity, node, *extra)
    expected = message.format(mesh=tmp_path / "mesh.yaml", state=tmp_path / "state")
    assert (code, out, err) == (2, "", f"mesh-identity: error: {expected}\n")
    assert not (tmp_path / "out").exists()
    assert not (tmp_path / "state" / "sidecars").exists()


def test_bootstrap_needs_the_ca(tmp_path, capsys) -> None:
    config = write(tmp_path)
    code, out, err = bootstrap(capsys, config, FRONTEND, "frontend-1")
    assert (code, out) == (1, "")
    assert err == f"mesh-identity: error: no CA state in {tmp_path / 'state'}: run 'mesh-identity init' first\n"
    assert not (tmp_path / "out").exists()
