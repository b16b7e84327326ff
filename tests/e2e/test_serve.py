"""``mesh-identity serve`` with a mesh file, as users run it: a real subprocess, sidecars bootstrapped with
``mesh-identity bootstrap`` and run as real Envoys, steered with signals and the CLI."""

from __future__ import annotations

import base64
import json
import os
import signal
import subprocess
import sys
import threading
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import yaml
from cryptography import x509

from mesh_identity.cli.main import main
from mesh_identity.demo.apps import DemoApp, get_json
from mesh_identity.mesh.model import Address
from mesh_identity.server.service import ADMIN_ADDR, ADMIN_TOKEN
from mesh_identity.svid import load_certs_pem
from tests.e2e.harness import Envoy, free_address, free_port
from tests.waiting import wait_until
from xds_sds.mesh.component import XDS_ADDR

pytestmark = pytest.mark.e2e

TD = "e2e.mesh"
FRONTEND = f"spiffe://{TD}/ns/e2e/sa/frontend"
BACKEND = f"spiffe://{TD}/ns/e2e/sa/backend"
RATINGS = f"spiffe://{TD}/ns/e2e/sa/ratings"
SERVER = f"spiffe://{TD}/mesh-identity/xds"


def service_doc(name: str, upstreams: dict[str, Address] | None = None) -> dict[str, Any]:
    return {
        "identity": {"namespace": "e2e", "service_account": name},
        "instances": [{"node": f"{name}-1", "app": str(free_address()), "inbound": str(free_address())}],
        "upstreams": [{"service": s, "listen": str(a)} for s, a in (upstreams or {}).items()],
    }


@dataclass
class Served:
    """A ``serve`` subprocess and the sidecars and apps of its mesh."""

    directory: Path
    mesh: dict[str, Any]
    proc: subprocess.Popen[bytes] | None = None
    envoys: dict[str, Envoy] = field(default_factory=dict)
    apps: list[DemoApp] = field(default_factory=list)

    @property
    def config(self) -> Path:
        return self.directory / "config.yaml"

    @property
    def state(self) -> Path:
        return self.directory / "state"

    def write_mesh(self, document: dict[str, Any] | str) -> None:
        text = document if isinstance(document, str) else yaml.safe_dump(document)
        (self.directory / "mesh.yaml").write_text(text)

    def start(self) -> None:
        (self.state / XDS_ADDR).unlink(missing_ok=True)
        with (self.directory / "serve.out").open("ab") as out, (self.directory / "serve.err").open("ab") as err:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "mesh_identity", "serve", "--config", str(self.config)],
                cwd=self.directory,
                stdout=out,
                stderr=err,
                env={**os.environ, "MESH_IDENTITY_CONFIG": ""},
            )
        wait_until(lambda: (self.state / XDS_ADDR).exists() or self.proc.poll() is not None, "serve to listen")
        assert self.proc.poll() is None, self.err()

    def stop(self) -> int:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGTERM)
        code = self.proc.wait(60)
        self.proc = None
        return code

    def out(self) -> str:
        return (self.directory / "serve.out").read_text()

    def err(self) -> str:
        return (self.directory / "serve.err").read_text()

    def url(self) -> str:
        return (self.state / ADMIN_ADDR).read_text().strip()

    def metrics(self) -> str:
        with urllib.request.urlopen(self.url() + "/metrics", timeout=10) as response:
            return response.read().decode()

    def cli(self, capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
        capsys.readouterr()
        code = main([*args, "--config", str(self.config)])
        out, err = capsys.readouterr()
        return code, out, err

    def sidecar(self, capsys: pytest.CaptureFixture[str], service: str) -> Envoy:
        """Bootstrap the sidecar of ``service`` with the CLI, start its app and its Envoy."""
        doc = self.mesh["services"][service]
        instance = doc["instances"][0]
        out = self.directory / "sidecars" / instance["node"]
        code, text, err = self.cli(
            capsys, "bootstrap", "--identity", f"spiffe://{TD}/ns/e2e/sa/{service}", "--node", instance["node"],
            "--out", str(out),
        )  # fmt: skip
        assert code == 0, err
        assert (
            text.splitlines()[0]
            == f"wrote the bootstrap of sidecar {instance['node']} (spiffe://{TD}/ns/e2e/sa/{service}) to {out / 'envoy.json'}"
        )
        upstreams = {u["service"]: _address(u["listen"]) for u in doc["upstreams"]}
        self.apps.append(DemoApp(service, _address(instance["app"]), upstreams).start())
        envoy = Envoy(out / "envoy.json", out, name=instance["node"]).start()
        self.envoys[service] = envoy
        expected = {f"inbound|{service}", *(f"outbound|{u}" for u in upstreams)}
        wait_until(lambda: expected <= set(envoy.listeners()), f"{service}'s listeners")
        return envoy

    def request(self, client: str, upstream: str) -> tuple[int, Any]:
        [listen] = [u["listen"] for u in self.mesh["services"][client]["upstreams"] if u["service"] == upstream]
        return get_json(_address(listen), "/")

    def close(self) -> None:
        for envoy in self.envoys.values():
            envoy.stop()
        for app in self.apps:
            app.stop()
        if self.proc is not None and self.proc.poll() is None:
            self.stop()


def _address(text: str) -> Address:
    host, _, port = text.rpartition(":")
    return Address(host, int(port))


def served_dir(directory: Path, mesh: dict[str, Any], *, xds_port: int = 0) -> Served:
    served = Served(directory, mesh)
    config = {
        "trust_domain": TD,
        "state_dir": "state",
        "metrics": {"listen": "127.0.0.1:0"},
        "xds": {"listen": f"127.0.0.1:{xds_port}"},
        "mesh_file": "mesh.yaml",
    }
    served.config.write_text(yaml.safe_dump(config))
    served.write_mesh(mesh)
    return served


@pytest.fixture
def served(tmp_path: Path) -> Iterator[Served]:
    backend = service_doc("backend")
    mesh = {"services": {"frontend": service_doc("frontend", {"backend": free_address()}), "backend": backend}}
    running = served_dir(tmp_path, mesh)
    try:
        running.start()
        yield running
    finally:
        running.close()


class Loop:
    """Requests from frontend to an upstream, one after another in a thread; failures kept."""

    def __init__(self, served: Served, upstream: str = "backend") -> None:
        self.served, self.upstream = served, upstream
        self.ok, self.failures = 0, []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                status, answer = self.served.request("frontend", self.upstream)
            except OSError as err:
                self.failures.append(repr(err))
                continue
            if status == 200 and answer["peer"] == FRONTEND:
                self.ok += 1
            else:
                self.failures.append(f"{status} {answer}")

    def wait_for(self, more: int) -> None:
        target = self.ok + more
        wait_until(lambda: self.ok >= target or self.failures, f"{more} more requests")

    def __enter__(self) -> Loop:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(30)


def _sample(metrics: str, name: str) -> float | None:
    for line in metrics.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[-1])
    return None


def test_serve_delivers_the_mesh_file_reloads_it_on_sighup_and_stops_on_sigterm(served: Served, capsys) -> None:
    frontend, backend = served.sidecar(capsys, "frontend"), served.sidecar(capsys, "backend")
    status, answer = served.request("frontend", "backend")
    assert (status, answer["service"], answer["peer"]) == (200, "backend", FRONTEND)

    code, out, _ = served.cli(capsys, "status", "--json")
    assert code == 0
    serials = {i["subject"]: i["serial"] for i in json.loads(out)["identities"]}
    assert set(serials) == {FRONTEND, BACKEND, SERVER}
    assert int(serials[BACKEND], 16) in backend.cert_serials(BACKEND)
    assert int(serials[FRONTEND], 16) in frontend.cert_serials(FRONTEND)

    metrics = served.metrics()
    assert _sample(metrics, 'mesh_identity_xds_streams{service="ads"}') == 2.0
    assert (_sample(metrics, 'mesh_identity_xds_acks_total{type="Secret"}') or 0) >= 2
    assert _sample(metrics, f'mesh_identity_certificate_expiry_timestamp_seconds{{spiffe_id="{BACKEND}"}}')
    assert _sample(metrics, f'mesh_identity_certificate_expiry_timestamp_seconds{{spiffe_id="{SERVER}"}}')
    assert _sample(metrics, 'mesh_identity_certificates_issued_total{kind="workload",provider="builtin"}')

    with Loop(served) as loop:
        loop.wait_for(5)
        # a mesh file that does not validate: logged, the last good mesh stays in service
        bad = json.loads(json.dumps(served.mesh))
        bad["services"]["frontend"]["upstreams"][0]["service"] = "billing"
        served.write_mesh(bad)
        served.proc.send_signal(signal.SIGHUP)
        message = (
            f"ERROR mesh_identity.registry.meshfile: reloading {served.directory / 'mesh.yaml'} failed, keeping the last "
            "good mesh: services.frontend.upstreams[0].service: 'billing' is not a service of this mesh"
        )
        wait_until(lambda: message in served.err(), "the reload error in the log")
        loop.wait_for(5)

        # a good one: ratings joins, frontend calls it; its sidecar can be bootstrapped now
        served.mesh["services"]["ratings"] = service_doc("ratings")
        served.mesh["services"]["frontend"]["upstreams"].append({"service": "ratings", "listen": str(free_address())})
        served.write_mesh(served.mesh)
        served.proc.send_signal(signal.SIGHUP)
        wait_until(lambda: "outbound|ratings" in frontend.listeners(), "frontend's new listener")
        assert (
            f"INFO mesh_identity.registry.meshfile: reloaded {served.directory / 'mesh.yaml'}: 3 services, 3 sidecars"
            in served.err()
        )
        served.sidecar(capsys, "ratings")
        status, answer = served.request("frontend", "ratings")
        assert (status, answer["service"], answer["peer"]) == (200, "ratings", FRONTEND)
        loop.wait_for(5)
    assert loop.failures == []
    code, out, _ = served.cli(capsys, "status", "--json")
    assert {i["subject"] for i in json.loads(out)["identities"]} == {FRONTEND, BACKEND, RATINGS, SERVER}

    assert served.stop() == 0
    lines = served.out().splitlines()
    assert lines[1] == f"serving 3 identities of {TD} (provider builtin, intermediate mode)"
    assert lines[3].startswith("  xDS (ADS over mTLS) on 127.0.0.1:")
    assert lines[3].endswith(
        f"for 2 services, 2 sidecars; mesh file {served.directory / 'mesh.yaml'} (SIGHUP reloads it)"
    )
    assert lines[-1] == "stopped"
    assert not (served.state / XDS_ADDR).exists() and not (served.state / ADMIN_TOKEN).exists()
    assert "Traceback" not in served.err()


def _bundle_roots(directory: Path) -> tuple[x509.Certificate, ...]:
    secret = json.loads((directory / "sds" / "xds-bundle.json").read_text())["resources"][0]
    return load_certs_pem(base64.b64decode(secret["validationContext"]["trustedCa"]["inlineBytes"]))


def _bootstrap_chain(directory: Path) -> tuple[x509.Certificate, ...]:
    secret = json.loads((directory / "sds" / "xds-cert.json").read_text())["resources"][0]
    return load_certs_pem(base64.b64decode(secret["tlsCertificate"]["certificateChain"]["inlineBytes"]))


def test_root_rotation_through_serve_renews_the_sidecar_bootstraps(tmp_path: Path, capsys) -> None:
    mesh = {
        "services": {
            "frontend": service_doc("frontend", {"backend": free_address()}),
            "backend": service_doc("backend"),
        }
    }
    served = served_dir(tmp_path, mesh, xds_port=free_port())
    try:
        served.start()
        sidecars = {name: served.sidecar(capsys, name) for name in ("frontend", "backend")}
        dirs = {name: served.state / "sidecars" / f"{name}-1" for name in sidecars}
        assert all(d.is_symlink() and d.resolve() == tmp_path / "sidecars" / f"{n}-1" for n, d in dirs.items())
        [old_root] = _bundle_roots(dirs["frontend"])
        with Loop(served) as loop:
            loop.wait_for(5)
            code, out, err = served.cli(capsys, "ca", "rotate-root", "prepare")
            assert code == 0, err
            for name, directory in dirs.items():
                wait_until(
                    lambda d=directory: len(_bundle_roots(d)) == 2, f"{name}'s bootstrap bundle to hold both roots"
                )
            new_root = next(r for r in _bundle_roots(dirs["frontend"]) if r != old_root)
            for name, envoy in sidecars.items():
                wait_until(lambda e=envoy: new_root.serial_number in e.ca_serials(), f"{name} to trust the new root")

            wait_until(lambda: served.cli(capsys, "ca", "rotate-root", "activate")[0] == 0, "activate to be accepted")
            for name, directory in dirs.items():
                chain = _bootstrap_chain(directory)
                assert chain[-1].issuer == new_root.subject, name  # the bootstrap certificate moved to the new root
            loop.wait_for(5)

            wait_until(lambda: served.cli(capsys, "ca", "rotate-root", "retire")[0] == 0, "retire to be accepted")
            for name, directory in dirs.items():
                assert _bundle_roots(directory) == (new_root,), name
            loop.wait_for(5)

            # a restarted server trusts only the new root: the sidecars reconnect with their renewed bootstraps
            assert served.stop() == 0
            served.start()
            wait_until(
                lambda: _sample(served.metrics(), 'mesh_identity_xds_streams{service="ads"}') == 2.0,
                "both to reconnect",
            )
            code, out, _ = served.cli(capsys, "status", "--json")
            serials = {i["subject"]: int(i["serial"], 16) for i in json.loads(out)["identities"]}
            for name, envoy in sidecars.items():
                identity = f"spiffe://{TD}/ns/e2e/sa/{name}"
                wait_until(lambda e=envoy, i=identity: serials[i] in e.cert_serials(i), f"{name} to get its new SVID")
            loop.wait_for(5)
        assert loop.failures == []
        assert old_root.serial_number not in sidecars["backend"].ca_serials()
    finally:
        served.close()
