"""Pod start to its first successful captured mesh request, in the tests' pod runner: p50 and p99 over N pods.

    .venv/bin/python bench/inject_pod_start.py              # 20 injected pods, 20 plain ones (needs root)
    .venv/bin/python bench/inject_pod_start.py --pods 5 --json

The world of the injection e2e (``tests/e2e/injectshop.py``): the control plane with ``inject`` (built-in CA),
the Kubernetes API test server calling its webhook, the tests' kubelet running pods in network namespaces of
their own, and the service ``b`` (one injected pod, its ClusterIP programmed as kube-proxy does). Then, one at a
time:

* **injected**: a pod of the caller ``a`` (a TrafficTarget lets it call ``b``) is created through the API (the
  webhook injects it), and the clock starts when the kubelet is told to run it: its network namespace, volumes
  (the projected token from the API server, the bundle ConfigMap), the init container's iptables rules, Envoy,
  the agent and the app. The app's container then calls ``http://<b's ClusterIP>/`` in plain HTTP (a new
  process per try, ``kubectl exec``-like, as soon as the last one ended) until one answers 200 through the
  capture listener, mTLS and b's sidecar: the clock stops. The pod is stopped and deleted before the next;
* **plain** (the reference, in the same run): a pod opted out of injection (``mesh-identity.io/inject:
  "false"``) is run the same way and calls a plain HTTP server on the bridge until it answers: what a pod start
  and a try cost without any sidecar.

Reported: p50, p99 and max of each, and the ratio injected / plain (p50, p99). Goal: none is set by the issue;
it asks for the figures.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.e2e.injectshop import CLUSTER_IP, NS, Shop, pod_manifest, running_shop  # noqa: E402

DEADLINE = 120.0  # a bound for one pod, not a goal


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    index = min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))
    return ordered[index]


def figures(samples: list[float]) -> dict[str, float]:
    return {
        "p50": statistics.median(samples),
        "p99": _percentile(samples, 0.99),
        "max": max(samples),
        "min": min(samples),
    }


def one_pod(shop: Shop, name: str, manifest: dict[str, Any], url: str) -> tuple[float, int]:
    """Seconds from run_pod to the first 200 from ``url`` in the pod's app container, and the tries it took."""
    shop.cluster.core.create_namespaced_pod(NS, manifest)
    started = time.perf_counter()
    shop.pods[name] = shop.kubelet.run_pod(NS, name)
    tries = 0
    try:
        while True:
            tries += 1
            status, _ = shop.get(name, url, timeout=2.0)
            if status == 200:
                return time.perf_counter() - started, tries
            if time.perf_counter() - started > DEADLINE:
                raise RuntimeError(f"{name}: no 200 from {url} within {DEADLINE} s ({tries} tries)")
    finally:
        shop.kubelet.stop_pod(NS, name)
        shop.cluster.delete_pod(NS, name)
        del shop.pods[name]


def run(pods: int) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="inject-pod-start-") as workdir:
        manifests = {"b-0": pod_manifest("b-0", "b", {"app": "b"})}
        with running_shop(Path(workdir), "10.99.78.0/24", manifests) as shop:
            mesh_url = f"http://{CLUSTER_IP}/"
            # b is up: wait until its sidecar answers a caller at all (the first caller's cost is not b's start)
            one_pod(shop, "a-warm", pod_manifest("a-warm", "a", {"app": "a"}), mesh_url)
            injected, plain, tries = [], [], []
            for index in range(pods):
                seconds, count = one_pod(shop, f"a-{index}", pod_manifest(f"a-{index}", "a", {"app": "a"}), mesh_url)
                injected.append(seconds)
                tries.append(count)
                opted_out = pod_manifest(f"p-{index}", "d", {"app": "p"}, {"mesh-identity.io/inject": "false"})
                plain.append(one_pod(shop, f"p-{index}", opted_out, shop.outside.url)[0])
    result: dict[str, Any] = {"pods": pods, "injected": figures(injected), "plain": figures(plain)}
    result["ratio_p50"] = result["injected"]["p50"] / result["plain"]["p50"]
    result["ratio_p99"] = result["injected"]["p99"] / result["plain"]["p99"]
    result["tries_median"] = statistics.median(tries)
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--pods", type=int, default=20)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    if args.pods < 1:
        parser.error("--pods must be at least 1")
    result = run(args.pods)
    print(f"pod start to the first successful request, {args.pods} pods of each, seconds:")
    print(f"  {'':34} {'p50':>7} {'p99':>7} {'max':>7}")
    for label, key in (("injected: captured mesh request", "injected"), ("plain (opted out): plain request", "plain")):
        found = result[key]
        print(f"  {label:34} {found['p50']:7.2f} {found['p99']:7.2f} {found['max']:7.2f}")
    print(f"  injected / plain: x{result['ratio_p50']:.2f} (p50), x{result['ratio_p99']:.2f} (p99); "
          f"tries per injected pod (median) {result['tries_median']:.0f}")  # fmt: skip
    if args.json:
        print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
