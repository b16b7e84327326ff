"""The real ``kubectl``, pointed at a Kubernetes API test server: the one runner every kubectl test uses."""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Callable
from pathlib import Path

from tests.fakes.kube.server import KubeServer

KUBECTL = shutil.which("kubectl")

Kubectl = Callable[..., "subprocess.CompletedProcess[str]"]


def kubectl_runner(environ: dict[str, str], timeout: float = 120.0) -> Kubectl:
    """``run(*args, check=True, stdin=None)``: the real kubectl with ``environ`` (an AssertionError with its
    stderr when it fails and ``check``)."""
    assert KUBECTL is not None, "kubectl is not on the PATH"
    binary = KUBECTL

    def run(*args: str, check: bool = True, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
        done = subprocess.run(
            [binary, *args], env=dict(environ), input=stdin, capture_output=True, text=True, timeout=timeout
        )
        if check and done.returncode != 0:
            raise AssertionError(f"kubectl {' '.join(args)} exited {done.returncode}: {done.stderr}")
        return done

    return run


def kubectl_for(server: KubeServer, directory: Path, token: str | None = None) -> Kubectl:
    """:func:`kubectl_runner` against ``server``, its kubeconfig (``token``'s user) and HOME in ``directory``."""
    directory.mkdir(parents=True, exist_ok=True)
    kubeconfig = server.write_kubeconfig(directory / "kubeconfig", token=token)
    return kubectl_runner({"PATH": os.environ.get("PATH", ""), "KUBECONFIG": str(kubeconfig), "HOME": str(directory)})
