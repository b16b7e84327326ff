"""Where Prometheus finds the sidecars' stats: a file-based service discovery file the control plane keeps.

``<state_dir>/prometheus/sidecars.json`` lists every sidecar whose instance has a ``stats`` address, in
Prometheus' ``file_sd_configs`` format, with the labels ``service``, ``identity`` (the SPIFFE ID) and ``node``::

    [{"targets": ["127.0.0.1:15090"],
      "labels": {"service": "backend", "identity": "spiffe://example.org/ns/shop/sa/backend", "node": "backend-1"}}]

:class:`ScrapeTargets` (a component of ``mesh-identity serve``) writes it at start and again whenever the
registry publishes a new set, atomically (Prometheus never reads half a file), and leaves it in place at stop:
the sidecars keep serving their stats while the control plane is down. The state directory is private (0700):
a Prometheus running as another user needs the file copied or mounted where it can read it.
``examples/prometheus/prometheus.yml`` scrapes it (path ``/stats/prometheus``).
"""

from __future__ import annotations

import json
import logging
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

from mesh_identity.files import ensure_private_dir, write_private
from mesh_identity.mesh.model import Mesh
from mesh_identity.registry.base import WorkloadRegistry, Workloads

log = logging.getLogger(__name__)

TARGETS_DIR = "prometheus"
TARGETS_FILE = "sidecars.json"


def targets_path(state_dir: Path) -> Path:
    return state_dir / TARGETS_DIR / TARGETS_FILE


def scrape_targets(mesh: Mesh) -> list[dict[str, Any]]:
    """The file SD groups of ``mesh``: one per sidecar with a ``stats`` address, ordered by node."""
    groups = [
        {
            "targets": [str(instance.stats)],
            "labels": {"service": service.name, "identity": str(service.identity), "node": instance.node},
        }
        for service in mesh.services.values()
        for instance in service.instances
        if instance.stats is not None
    ]
    return sorted(groups, key=lambda group: str(group["labels"]["node"]))


def read_targets(path: Path) -> list[tuple[str, dict[str, str]]]:
    """``(host:port, labels)`` of every target in a file SD file; ValueError naming what is wrong."""
    try:
        document = json.loads(path.read_text(encoding="utf-8"))
    except OSError as err:
        raise ValueError(f"cannot read {path}: {err.strerror}") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ValueError(f"{path} is not JSON: {err}") from None
    if not isinstance(document, list):
        raise ValueError(f"{path}: a file SD document is a list of groups, not {type(document).__name__}")
    found = []
    for index, group in enumerate(document):
        where = f"{path}: group {index}"
        if not isinstance(group, dict) or not isinstance(group.get("targets"), list):
            raise ValueError(f"{where} has no 'targets' list")
        labels = group.get("labels", {})
        if not isinstance(labels, dict) or not all(isinstance(v, str) for v in labels.values()):
            raise ValueError(f"{where}: 'labels' is not a mapping of strings")
        for target in group["targets"]:
            if not isinstance(target, str) or ":" not in target:
                raise ValueError(f"{where}: target {target!r} is not HOST:PORT")
            found.append((target, dict(labels)))
    return found


class ScrapeTargets:
    """Keeps :func:`targets_path` up to date with the registry (see the module docstring)."""

    def __init__(self, registry: WorkloadRegistry, state_dir: Path) -> None:
        self.registry = registry
        self.path = targets_path(state_dir)
        self._lock = threading.Lock()
        self._written: bytes | None = None
        self._unsubscribe: Callable[[], None] | None = None

    def start(self) -> None:
        self._unsubscribe = self.registry.subscribe(self._changed)
        self.write(self.registry.current().mesh)

    def stop(self) -> None:
        if self._unsubscribe is not None:
            self._unsubscribe()
            self._unsubscribe = None

    def _changed(self, workloads: Workloads) -> None:
        try:
            self.write(workloads.mesh)
        except OSError as err:
            log.warning("cannot write the Prometheus targets to %s: %s", self.path, err)

    def write(self, mesh: Mesh) -> None:
        """Write the targets of ``mesh`` (only when they changed)."""
        data = (json.dumps(scrape_targets(mesh), indent=2) + "\n").encode()
        with self._lock:
            if data == self._written:
                return
            ensure_private_dir(self.path.parent)
            write_private(self.path, data, mode=0o644)
            self._written = data
