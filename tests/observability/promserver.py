"""The real Prometheus (Debian's ``prometheus``) for tests: its own config, data directory and loopback port.

:class:`PrometheusServer` writes a config into a temporary directory, starts ``/usr/bin/prometheus`` on a free
loopback port, waits until it is ready, answers queries through the HTTP API, and is stopped by its pid
(SIGTERM, then SIGKILL). Nothing else on the machine is touched: no system service is started or stopped.
"""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any

import yaml

from mesh_identity.mesh.model import Address
from tests.e2e.harness import free_address
from tests.waiting import wait_until

PROMETHEUS = shutil.which("prometheus") or "/usr/bin/prometheus"
PROMTOOL = shutil.which("promtool") or "/usr/bin/promtool"


class PrometheusError(AssertionError):
    pass


class PrometheusServer:
    def __init__(self, config: dict[str, Any], workdir: Path) -> None:
        self.config = config
        self.workdir = workdir
        self.address: Address = free_address()
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://{self.address}"

    def start(self, timeout: float = 60.0) -> PrometheusServer:
        self.workdir.mkdir(parents=True, exist_ok=True)
        config = self.workdir / "prometheus.yml"
        config.write_text(yaml.safe_dump(self.config, sort_keys=False))
        log = (self.workdir / "prometheus.log").open("wb")
        self.process = subprocess.Popen(
            [
                PROMETHEUS,
                f"--config.file={config}",
                f"--storage.tsdb.path={self.workdir / 'data'}",
                f"--web.listen-address={self.address}",
                "--log.level=warn",
            ],
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        log.close()
        wait_until(self._ready, "prometheus to be ready", timeout)
        return self

    def _ready(self) -> bool:
        assert self.process is not None
        if self.process.poll() is not None:
            raise PrometheusError(f"prometheus exited with {self.process.returncode}:\n{self.log()}")
        try:
            with urllib.request.urlopen(self.url + "/-/ready", timeout=5) as response:
                return bool(response.status == 200)
        except OSError:
            return False

    def log(self) -> str:
        path = self.workdir / "prometheus.log"
        return path.read_text(errors="replace")[-4000:] if path.exists() else ""

    def stop(self) -> None:
        process, self.process = self.process, None
        if process is None or process.poll() is not None:
            return
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()

    def api(self, path: str, **params: str) -> Any:
        url = f"{self.url}/api/v1/{path}" + ("?" + urllib.parse.urlencode(params) if params else "")
        try:
            with urllib.request.urlopen(url, timeout=30) as response:
                answer = json.loads(response.read())
        except urllib.error.HTTPError as err:
            raise PrometheusError(f"{path} {params}: {err.code} {err.read().decode(errors='replace')}") from None
        if answer.get("status") != "success":
            raise PrometheusError(f"{path} {params}: {answer}")
        return answer["data"]

    def query(self, expr: str) -> list[dict[str, Any]]:
        """An instant vector: ``[{"metric": {labels}, "value": [t, "v"]}, ...]``."""
        data = self.api("query", query=expr)
        if data["resultType"] != "vector":
            raise PrometheusError(f"{expr}: a {data['resultType']}, not a vector")
        return list(data["result"])

    def metric_names(self) -> set[str]:
        return set(self.api("label/__name__/values"))

    def firing(self, alertname: str) -> list[dict[str, str]]:
        """The labels of every firing alert of that name."""
        return [
            alert["labels"]
            for alert in self.api("alerts")["alerts"]
            if alert["labels"].get("alertname") == alertname and alert["state"] == "firing"
        ]

    def targets_up(self) -> dict[str, int]:
        """Active targets by ``job/instance``: 1 when the last scrape succeeded."""
        return {
            f"{t['labels']['job']}/{t['labels']['instance']}": int(t["health"] == "up")
            for t in self.api("targets")["activeTargets"]
        }
