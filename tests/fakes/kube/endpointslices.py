"""The EndpointSlice controller of the Kubernetes fake, as kube-controller-manager runs it in a cluster: for
every Service with a selector, one EndpointSlice (``discovery.k8s.io/v1``, label
``kubernetes.io/service-name``, owned by the Service) listing the selected Pods that have an IP and have not
finished, with their readiness (the Pod's ``Ready`` condition), ``terminating`` (being deleted), node and
``targetRef``; its ports are the Service's, each with the target port resolved (a number, or a container port
name looked up in the Pods). A Service deleted loses its slices.

It follows the store's own watches (not HTTP), so it sees every write at once and writes slices as a client
would (they reach watchers as any other write). Tests create Pods and Services and set Pods' status (as the
kubelet does); the slices follow. Where the real controller splits at 100 endpoints or by port resolution,
this one writes one slice per Service (Pods whose named target port does not resolve are left out).
"""

from __future__ import annotations

import contextlib
import copy
import threading
from typing import TYPE_CHECKING, Any

from tests.fakes.kube.errors import ApiError, JsonObj
from tests.fakes.kube.kinds import Kind
from tests.fakes.kube.store import meta
from tests.fakes.kube.watch import Watcher
from tests.fakes.kube.workloads import kind_named

if TYPE_CHECKING:
    from tests.fakes.kube.server import KubeServer

SERVICE_NAME = "kubernetes.io/service-name"
MANAGED_BY = "endpointslice.kubernetes.io/managed-by"
CONTROLLER = "endpointslice-controller.k8s.io"


def _selected(selector: dict[str, str], pod: JsonObj) -> bool:
    labels = meta(pod).get("labels") or {}
    return all(labels.get(k) == v for k, v in selector.items())


def _ready(pod: JsonObj) -> bool:
    conditions = (pod.get("status") or {}).get("conditions") or []
    return any(c.get("type") == "Ready" and c.get("status") == "True" for c in conditions if isinstance(c, dict))


def _target_port(port: JsonObj, pod: JsonObj) -> int | None:
    target = port.get("targetPort", port.get("port"))
    if isinstance(target, int):
        return target
    for container in (pod.get("spec") or {}).get("containers") or []:
        for declared in container.get("ports") or []:
            if declared.get("name") == target and declared.get("protocol", "TCP") == port.get("protocol", "TCP"):
                return int(declared["containerPort"])
    return None


def desired_slice(service: JsonObj, pods: list[JsonObj]) -> JsonObj:
    """The EndpointSlice of ``service`` for the ``pods`` of its namespace (see the module docstring)."""
    service_meta = meta(service)
    spec = service.get("spec") or {}
    selector = spec.get("selector") or {}
    members = [
        p
        for p in pods
        if _selected(selector, p)
        and (p.get("status") or {}).get("podIP")
        and (p.get("status") or {}).get("phase") not in ("Succeeded", "Failed")
    ]
    ports: list[JsonObj] = []
    endpoints: list[JsonObj] = []
    for pod in sorted(members, key=lambda p: meta(p)["name"]):
        resolved = [_target_port(port, pod) for port in spec.get("ports") or []]
        if any(r is None for r in resolved):
            continue
        if not ports:
            for port, number in zip(spec.get("ports") or [], resolved, strict=True):
                entry: JsonObj = {"name": port.get("name", ""), "port": number, "protocol": port.get("protocol", "TCP")}
                if port.get("appProtocol"):
                    entry["appProtocol"] = port["appProtocol"]
                ports.append(entry)
        terminating = bool(meta(pod).get("deletionTimestamp"))
        ready = _ready(pod) and not terminating
        endpoint: JsonObj = {
            "addresses": [pod["status"]["podIP"]],
            "conditions": {"ready": ready, "serving": _ready(pod), "terminating": terminating},
            "targetRef": {
                "kind": "Pod",
                "namespace": meta(pod)["namespace"],
                "name": meta(pod)["name"],
                "uid": meta(pod)["uid"],
            },
        }
        node = (pod.get("spec") or {}).get("nodeName")
        if node:
            endpoint["nodeName"] = node
        endpoints.append(endpoint)
    return {
        "apiVersion": "discovery.k8s.io/v1",
        "kind": "EndpointSlice",
        "metadata": {
            "generateName": f"{service_meta['name']}-",
            "namespace": service_meta["namespace"],
            "labels": {SERVICE_NAME: service_meta["name"], MANAGED_BY: CONTROLLER},
            "ownerReferences": [
                {
                    "apiVersion": "v1",
                    "kind": "Service",
                    "name": service_meta["name"],
                    "uid": service_meta["uid"],
                    "controller": True,
                    "blockOwnerDeletion": True,
                }
            ],
        },
        "addressType": "IPv4",
        "endpoints": endpoints,
        "ports": ports,
    }


class EndpointSliceController:
    """Start it after the server (or use it as a context manager); see the module docstring."""

    def __init__(self, server: KubeServer) -> None:
        self.store = server.store
        self.pods = kind_named(server.kinds, "Pod")
        self.services = kind_named(server.kinds, "Service")
        self.slices = kind_named(server.kinds, "EndpointSlice")
        self._lock = threading.RLock()
        self._stopped = threading.Event()
        self._threads: list[threading.Thread] = []
        self._watchers: dict[Kind, Watcher] = {}

    def start(self) -> EndpointSliceController:
        for kind in (self.pods, self.services):
            thread = threading.Thread(
                target=self._follow, args=(kind,), name=f"endpointslices-{kind.plural}", daemon=True
            )
            self._threads.append(thread)
        with self._lock:
            namespaces = {ns for kind in (self.pods, self.services) for ns in self._watch(kind)}
            for namespace in sorted(namespaces):
                self.reconcile(namespace)
        for thread in self._threads:
            thread.start()
        return self

    def stop(self) -> None:
        self._stopped.set()
        with self._lock:
            for watcher in self._watchers.values():
                self.store.unwatch(watcher)
                watcher.events.put(None)
        for thread in self._threads:
            thread.join(timeout=5)

    def __enter__(self) -> EndpointSliceController:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _watch(self, kind: Kind) -> set[str]:
        """Watch ``kind`` in the store; returns the namespaces of the objects it has now."""
        watcher, first = self.store.watch(kind, None, lambda _obj: True, None, False, False)
        self._watchers[kind] = watcher
        return {meta(obj).get("namespace", "") for _type, obj in first}

    def _follow(self, kind: Kind) -> None:
        """Reconcile the namespace of every event of ``kind``; when the server ends the store's watches (an
        outage), watch again and reconcile everything."""
        while not self._stopped.is_set():
            item = self._watchers[kind].events.get()
            if item is None:
                with self._lock:
                    if self._stopped.is_set():
                        return
                    namespaces = self._watch(kind)
            else:
                namespaces = {meta(item[1]).get("namespace", "")}
            for namespace in sorted(namespaces):
                with contextlib.suppress(ApiError), self._lock:
                    self.reconcile(namespace)

    def reconcile(self, namespace: str) -> None:
        """Bring the slices of ``namespace`` in line with its Services and Pods."""
        pods = self.store.select(self.pods, namespace, lambda _obj: True)
        services = {meta(s)["name"]: s for s in self.store.select(self.services, namespace, lambda _obj: True)}
        slices = self.store.select(
            self.slices, namespace, lambda o: (meta(o).get("labels") or {}).get(MANAGED_BY) == CONTROLLER
        )
        by_service: dict[str, JsonObj] = {}
        for found in slices:
            owner = (meta(found).get("labels") or {}).get(SERVICE_NAME, "")
            service = services.get(owner)
            if service is None or not (service.get("spec") or {}).get("selector") or owner in by_service:
                self.store.delete(self.slices, namespace, meta(found)["name"], {})
            else:
                by_service[owner] = found
        for name, service in services.items():
            if not (service.get("spec") or {}).get("selector"):
                continue
            wanted = desired_slice(service, pods)
            current = by_service.get(name)
            if current is None:
                self.store.create(self.slices, namespace, wanted)
            elif (current.get("endpoints"), current.get("ports")) != (wanted["endpoints"], wanted["ports"]):
                self.store.update(self.slices, namespace, meta(current)["name"], _with_endpoints(wanted))


def _with_endpoints(wanted: JsonObj) -> Any:
    def change(current: JsonObj) -> JsonObj:
        updated = copy.deepcopy(current)
        updated["endpoints"], updated["ports"] = wanted["endpoints"], wanted["ports"]
        return updated

    return change
