"""The injection tests that run the real ``kubectl`` are deselected, with the reason in pytest's header, where
kubectl is not installed (the same mechanism as tests/registry/kube/conftest.py)."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

KUBECTL = shutil.which("kubectl")

KUBECTL_TESTS = "test_inject_admission.py"


def _needs_kubectl(item: pytest.Item) -> bool:
    return Path(str(item.path)).name == KUBECTL_TESTS and "kubectl" in getattr(item, "fixturenames", ())


def pytest_report_header(config: pytest.Config) -> str | None:
    if KUBECTL is None:
        return f"kubectl: not on the PATH; the kubectl tests of tests/inject/{KUBECTL_TESTS} are deselected"
    return None


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if KUBECTL is not None:
        return
    mine = [i for i in items if _needs_kubectl(i)]
    if mine:
        config.hook.pytest_deselected(items=mine)
        items[:] = [i for i in items if i not in mine]
