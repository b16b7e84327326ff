"""Kubelet's ConfigMap and Secret volumes as :class:`tests.fakes.kube.volumes.ProjectedVolume` writes them: the
layout of kubelet's atomic writer (``..data`` -> a hidden timestamped directory, user-visible links through
``..data``), the swap by one rename that no reader sees half done, projection from the API test server, and the
two places a file reaches our pods that way: the trust bundle ConfigMap a sidecar's bootstrap names
(``write_bootstrap(ca_dir=...)``; a real Envoy follows it in ``tests/e2e/test_kubelet_volume.py``) and the
root key passphrase Secret the built-in CA reads at start."""

from __future__ import annotations

import base64
import json
import os
import re
import stat
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import kubernetes
import pytest

from mesh_identity.errors import StateError
from mesh_identity.mesh.model import Address
from mesh_identity.provider import ProviderContext
from providers.builtin.provider import SPEC as BUILTIN
from tests.fakes.kube import KubeServer
from tests.fakes.kube.volumes import DATA_DIR, NEW_DATA_DIR, ProjectedVolume, VolumeSourceError
from tests.fakes.kube.workloads import schema_errors
from tests.mesh_identity.test_cli_mesh import FRONTEND, bootstrap, cli
from tests.mesh_identity.test_cli_mesh import write as write_cli_config
from tests.pki import TestCa
from tests.waiting import wait_until
from xds_sds.resources.bootstrap import check_ca_dir, renew_bootstrap_bundle, write_bootstrap

TIMESTAMPED = re.compile(r"^\.\.\d{4}_\d{2}_\d{2}_\d{2}_\d{2}_\d{2}\.\d{9}$")
CA = TestCa.for_trust_domain("cluster.mesh")
NEXT = TestCa.for_trust_domain("cluster.mesh", name="next root")


def _entries(directory: Path) -> dict[str, str]:
    """Each entry of the volume directory: ``-> target`` for a link, ``dir`` or ``file``."""
    out = {}
    for entry in directory.iterdir():
        if entry.is_symlink():
            out[entry.name] = f"-> {os.readlink(entry)}"
        else:
            out[entry.name] = "dir" if entry.is_dir() else "file"
    return out


# ------------------------------------------------------------------------------------------------- layout


def test_first_write_lays_out_the_volume_as_kubelet(tmp_path: Path) -> None:
    volume = ProjectedVolume(tmp_path / "root-ca")
    assert volume.update({"ca.crt": CA.pem()})
    data = volume.data_dir()
    assert data is not None and TIMESTAMPED.match(data.name)
    assert _entries(volume.directory) == {data.name: "dir", DATA_DIR: f"-> {data.name}", "ca.crt": "-> ..data/ca.crt"}
    assert stat.S_IMODE(data.stat().st_mode) == 0o755
    assert stat.S_IMODE((data / "ca.crt").stat().st_mode) == 0o644
    assert volume.path("ca.crt").read_bytes() == CA.pem()
    assert [p.name for p in data.iterdir()] == ["ca.crt"]


def test_a_secret_volume_keeps_its_default_mode(tmp_path: Path) -> None:
    volume = ProjectedVolume(tmp_path / "passphrase", default_mode=0o400)
    volume.update({"passphrase": b"s3cret"})
    assert stat.S_IMODE(volume.path("passphrase").stat().st_mode) == 0o400


def test_update_swaps_data_and_removes_the_old_directory(tmp_path: Path) -> None:
    volume = ProjectedVolume(tmp_path / "root-ca")
    volume.update({"ca.crt": CA.pem()})
    first = volume.data_dir()
    link = os.lstat(volume.directory / "ca.crt")
    assert volume.update({"ca.crt": CA.pem() + NEXT.pem()})
    second = volume.data_dir()
    assert first is not None and second is not None and second != first
    assert not first.exists()  # removed after the swap
    assert not (volume.directory / NEW_DATA_DIR).exists()  # renamed over ..data
    assert os.lstat(volume.directory / "ca.crt").st_ino == link.st_ino  # the visible link was made once
    assert volume.path("ca.crt").read_bytes() == CA.pem() + NEXT.pem()
    assert sorted(_entries(volume.directory)) == sorted([second.name, DATA_DIR, "ca.crt"])
    assert volume.updates == 2


def test_an_unchanged_payload_writes_nothing(tmp_path: Path) -> None:
    volume = ProjectedVolume(tmp_path / "root-ca")
    volume.update({"ca.crt": CA.pem()})
    before = volume.data_dir()
    assert not volume.update({"ca.crt": CA.pem()})
    assert volume.data_dir() == before and volume.updates == 1


def test_keys_that_come_and_go_get_and_lose_their_links(tmp_path: Path) -> None:
    volume = ProjectedVolume(tmp_path / "v")
    volume.update({"a": b"1", "b": b"2"})
    volume.update({"b": b"2", "c": b"3"})
    entries = _entries(volume.directory)
    assert "a" not in entries
    assert entries["b"] == "-> ..data/b" and entries["c"] == "-> ..data/c"
    assert volume.payload() == {"b": b"2", "c": b"3"}


def test_a_nested_item_path_is_reached_through_its_first_directory(tmp_path: Path) -> None:
    volume = ProjectedVolume(tmp_path / "v")
    volume.update({"certs/ca.crt": CA.pem()})
    assert _entries(volume.directory)["certs"] == "-> ..data/certs"
    assert volume.path("certs/ca.crt").read_bytes() == CA.pem()


@pytest.mark.parametrize(
    ("path", "message"),
    [
        ("", "a payload path is empty"),
        ("/etc/ca.crt", "is absolute"),
        ("a/../b", "contains '..'"),
        ("..data", "starts with '..'"),
        ("a//b", "empty or '.' element"),
        ("x" * 256, "longer than 255"),
    ],
)
def test_paths_kubelet_refuses_are_refused(tmp_path: Path, path: str, message: str) -> None:
    volume = ProjectedVolume(tmp_path / "v")
    with pytest.raises(VolumeSourceError, match=re.escape(message)):
        volume.update({path: b"x"})
    assert not (tmp_path / "v").exists() or not any((tmp_path / "v").iterdir())


def test_a_reader_never_sees_a_partial_file_and_finds_one_on_rereading(tmp_path: Path) -> None:
    """Readers open ``ca.crt`` in a loop while the payload alternates between two sizes: each read is one of the
    two payloads, whole. A read may find no file, rarely: when kubelet removes the previous timestamped directory
    while that read's path walk, begun before the swap, is between ``..data`` and the file (kubelet has the same
    window; without the removal no read misses). Read again, the file is there with the new payload: the writer
    here waits for every reader's next good read before it updates again, so a reread is never in a window."""
    small, large = CA.pem(), (CA.pem() + NEXT.pem()) * 200  # about 1 KiB and 300 KiB
    volume = ProjectedVolume(tmp_path / "root-ca")
    volume.update({"ca.crt": small})
    done = threading.Event()
    good = [0, 0]
    missed = [0, 0]
    wrong: list[str] = []

    def read(me: int) -> None:
        while not done.is_set():
            try:
                content = volume.path("ca.crt").read_bytes()
            except FileNotFoundError:
                missed[me] += 1
                continue
            except OSError as err:
                wrong.append(f"{type(err).__name__}: {err}")
                continue
            if content in (small, large):
                good[me] += 1
            else:
                wrong.append(f"a read of {len(content)} bytes, neither payload")

    readers = [threading.Thread(target=read, args=(i,), daemon=True) for i in range(2)]
    for reader in readers:
        reader.start()
    try:
        for i in range(300):
            volume.update({"ca.crt": large if i % 2 == 0 else small})
            before = list(good)
            wait_until(
                lambda b=before: all(g > n for g, n in zip(good, b, strict=True)), "a good read by each", 10, 0.001
            )
    finally:
        done.set()
        for reader in readers:
            reader.join(10)
    assert wrong == []
    assert volume.updates == 301
    assert sum(missed) < sum(good)  # misses are the rare window, not the rule
    assert len([e for e in volume.directory.iterdir() if e.name.startswith("..")]) == 2  # ..data and one dir


# ------------------------------------------------------------------------------ from the API test server


@pytest.fixture
def kube() -> Iterator[KubeServer]:
    with KubeServer() as server:
        yield server


@pytest.fixture
def core(kube: KubeServer) -> Iterator[kubernetes.client.CoreV1Api]:
    with kubernetes.client.ApiClient(kube.client_configuration()) as api:
        core = kubernetes.client.CoreV1Api(api)
        core.create_namespace({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "shop"}})
        yield core


def _create(core: kubernetes.client.CoreV1Api, body: dict[str, object]) -> None:
    assert schema_errors(body) == []
    if body["kind"] == "ConfigMap":
        core.create_namespaced_config_map("shop", body)
    else:
        core.create_namespaced_secret("shop", body)


def test_sync_projects_a_config_map_text_and_binary(
    kube: KubeServer, core: kubernetes.client.CoreV1Api, tmp_path: Path
) -> None:
    _create(core, {
        "apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "mesh-identity-root-ca", "namespace": "shop"},
        "data": {"ca.crt": CA.pem().decode()}, "binaryData": {"raw.der": base64.b64encode(b"\x00\x01").decode()},
    })  # fmt: skip
    volume = ProjectedVolume(tmp_path / "v")
    assert volume.sync_from(kube, "ConfigMap", "shop", "mesh-identity-root-ca")
    assert volume.payload() == {"ca.crt": CA.pem(), "raw.der": b"\x00\x01"}
    assert not volume.sync_from(kube, "ConfigMap", "shop", "mesh-identity-root-ca")  # nothing changed

    body = {
        "apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "mesh-identity-root-ca", "namespace": "shop"},
        "data": {"ca.crt": (CA.pem() + NEXT.pem()).decode()},
    }  # fmt: skip
    assert schema_errors(body) == []
    core.replace_namespaced_config_map("mesh-identity-root-ca", "shop", body)
    assert volume.sync_from(kube, "ConfigMap", "shop", "mesh-identity-root-ca")
    assert volume.payload() == {"ca.crt": CA.pem() + NEXT.pem()}
    assert "raw.der" not in _entries(volume.directory)


def test_sync_projects_a_secret_and_its_items(
    kube: KubeServer, core: kubernetes.client.CoreV1Api, tmp_path: Path
) -> None:
    _create(core, {
        "apiVersion": "v1", "kind": "Secret", "metadata": {"name": "ca-passphrase", "namespace": "shop"},
        "stringData": {"passphrase": "s3cret", "other": "x"},
    })  # fmt: skip
    volume = ProjectedVolume(tmp_path / "v", default_mode=0o400)
    volume.sync_from(kube, "Secret", "shop", "ca-passphrase", items={"passphrase": "keys/passphrase"})
    assert volume.payload() == {"keys/passphrase": b"s3cret"}
    with pytest.raises(VolumeSourceError, match=r"Secret shop/ca-passphrase has no key 'nope' \(volume items\)"):
        volume.sync_from(kube, "Secret", "shop", "ca-passphrase", items={"nope": "nope"})


def test_a_missing_object_fails_unless_optional(
    kube: KubeServer, core: kubernetes.client.CoreV1Api, tmp_path: Path
) -> None:
    volume = ProjectedVolume(tmp_path / "v")
    with pytest.raises(VolumeSourceError, match='configmap "absent" not found in namespace shop'):
        volume.sync_from(kube, "ConfigMap", "shop", "absent")
    assert volume.data_dir() is None
    assert volume.sync_from(kube, "ConfigMap", "shop", "absent", optional=True)
    assert volume.payload() == {} and volume.data_dir() is not None


# ----------------------------------------------------------------------------- where our pods meet it


def test_the_bootstrap_names_the_mounted_bundle_and_serve_leaves_it_alone(tmp_path: Path) -> None:
    volume = ProjectedVolume(tmp_path / "root-ca")
    volume.update({"ca.crt": CA.pem()})
    files = write_bootstrap(
        CA.svid("/ns/shop/sa/web"), tmp_path / "sidecar", node="web-1", xds=Address("127.0.0.1", 15010),
        server_identity=CA.id("/mesh-identity/xds"), ca_dir=volume.directory,
    )  # fmt: skip
    [secret] = json.loads(files.bundle.read_text())["resources"]
    assert secret["name"] == "xds-trust-bundle"
    assert secret["validationContext"] == {
        "trustedCa": {"filename": str(volume.directory / "ca.crt")},
        "watchedDirectory": {"path": str(volume.directory)},
    }
    before = files.bundle.read_bytes()
    assert renew_bootstrap_bundle(CA.bundle, files.directory) is False  # the volume is the bundle's one source
    assert files.bundle.read_bytes() == before
    plain = write_bootstrap(
        CA.svid("/ns/shop/sa/web"), tmp_path / "plain", node="web-1", xds=Address("127.0.0.1", 15010),
        server_identity=CA.id("/mesh-identity/xds"),
    )  # fmt: skip
    assert renew_bootstrap_bundle(CA.bundle, plain.directory) is True


@pytest.mark.parametrize(
    ("setup", "message"),
    [
        ("relative", "is not an absolute path"),
        ("missing", "cannot read"),
        ("not-pem", "holds no PEM certificate"),
    ],
)
def test_a_ca_dir_that_cannot_verify_the_server_is_refused(tmp_path: Path, setup: str, message: str) -> None:
    volume = ProjectedVolume(tmp_path / "root-ca")
    if setup == "not-pem":
        volume.update({"ca.crt": b"not a certificate"})
    directory = Path("root-ca") if setup == "relative" else volume.directory
    with pytest.raises(ValueError, match=message):
        check_ca_dir(directory)
    with pytest.raises(ValueError, match=message):
        write_bootstrap(
            CA.svid("/ns/shop/sa/web"), tmp_path / "sidecar", node="web-1", xds=Address("127.0.0.1", 15010),
            server_identity=CA.id("/mesh-identity/xds"), ca_dir=directory,
        )  # fmt: skip
    assert not (tmp_path / "sidecar").exists()  # nothing written


def test_the_builtin_ca_reads_its_passphrase_through_a_secret_volume(
    make_context: Callable[..., ProviderContext], tmp_path: Path
) -> None:
    volume = ProjectedVolume(tmp_path / "ca-passphrase", default_mode=0o400)
    volume.update({"passphrase": b"s3cret"})
    options = BUILTIN.validate_options({"passphrase_file": str(volume.path("passphrase"))})
    first = BUILTIN.factory(make_context(), options)
    assert "BEGIN ENCRYPTED PRIVATE KEY" in (tmp_path / "state" / "builtin" / "root-1.key").read_text()
    second = BUILTIN.factory(make_context(), options)  # a restart reads it again, through ..data
    assert first.trust_bundle().authorities == second.trust_bundle().authorities
    volume.update({"passphrase": b"another"})  # the Secret changed under a running pod: the next start sees it
    with pytest.raises(StateError, match="wrong passphrase"):
        BUILTIN.factory(make_context(), options)


def test_the_bootstrap_command_takes_the_mounted_bundle(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    volume = ProjectedVolume(tmp_path / "root-ca")
    volume.update({"ca.crt": CA.pem()})
    config = write_cli_config(tmp_path)
    assert cli(capsys, "init", "-c", str(config))[0] == 0
    code, out, err = bootstrap(capsys, config, FRONTEND, "frontend-1", "--ca-dir", str(volume.directory))
    assert (code, err) == (0, "")
    assert f"  the xDS server is verified with {volume.directory / 'ca.crt'} (a mounted trust bundle" in out
    [secret] = json.loads((tmp_path / "out" / "frontend-1" / "sds" / "xds-bundle.json").read_text())["resources"]
    assert secret["validationContext"]["watchedDirectory"] == {"path": str(volume.directory)}


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (
            ["--ca-dir", "{tmp}/absent"],
            "--ca-dir: cannot read {tmp}/absent/ca.crt (the trust bundle's ca.crt): No such",
        ),
        (
            ["--ca-dir", "{tmp}/empty"],
            "--ca-dir: {tmp}/empty/ca.crt holds no PEM certificate (the trust bundle's ca.crt)",
        ),
    ],
)
def test_the_bootstrap_command_refuses_a_ca_dir_it_cannot_use(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], extra: list[str], message: str
) -> None:
    ProjectedVolume(tmp_path / "empty").update({"ca.crt": b""})
    config = write_cli_config(tmp_path)
    assert cli(capsys, "init", "-c", str(config))[0] == 0
    code, out, err = bootstrap(capsys, config, FRONTEND, "frontend-1", *(e.format(tmp=tmp_path) for e in extra))
    assert (code, out) == (2, "")
    assert err.startswith(f"mesh-identity: error: {message.format(tmp=tmp_path)}")
    assert not (tmp_path / "out").exists()
