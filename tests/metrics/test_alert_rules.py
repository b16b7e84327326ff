"""``promtool test rules`` on tests/metrics/alerts_test.yml: every alert of examples/alerts.yaml fires where it
should and stays quiet where it should not, in the real promtool."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import yaml

from tests.observability.promserver import PROMTOOL

HERE = Path(__file__).resolve().parent
ALERTS = HERE.parents[1] / "examples" / "alerts.yaml"
UNIT_TESTS = HERE / "alerts_test.yml"


def promtool(*args: str, cwd: Path = HERE) -> subprocess.CompletedProcess[str]:
    return subprocess.run([PROMTOOL, *args], cwd=cwd, capture_output=True, text=True, check=False)


def alert_names() -> set[str]:
    document = yaml.safe_load(ALERTS.read_text())
    return {rule["alert"] for group in document["groups"] for rule in group["rules"]}


def test_the_rules_check_and_their_unit_tests_pass() -> None:
    checked = promtool("check", "rules", str(ALERTS))
    assert checked.returncode == 0, checked.stdout + checked.stderr
    tested = promtool("test", "rules", UNIT_TESTS.name)
    assert tested.returncode == 0, tested.stdout + tested.stderr


def test_every_alert_is_tested_firing_and_quiet() -> None:
    document = yaml.safe_load(UNIT_TESTS.read_text())
    firing, quiet = set(), set()
    for group in document["tests"]:
        for case in group["alert_rule_test"]:
            (firing if case["exp_alerts"] else quiet).add(case["alertname"])
    assert firing == alert_names()
    assert quiet == alert_names()


def test_a_changed_threshold_fails_the_unit_tests(tmp_path: Path) -> None:
    """The unit tests can fail: the stale-certificate alert without its grace fires too early for them."""
    examples = tmp_path / "examples"
    examples.mkdir()
    text = ALERTS.read_text()
    changed = text.replace("> on(job, instance) group_left mesh_identity_sidecar_reload_grace_seconds", "> 0")
    assert changed != text
    (examples / "alerts.yaml").write_text(changed)
    tests = tmp_path / "tests" / "metrics"
    tests.mkdir(parents=True)
    shutil.copy(UNIT_TESTS, tests / UNIT_TESTS.name)
    tested = promtool("test", "rules", UNIT_TESTS.name, cwd=tests)
    assert tested.returncode == 1
    assert "MeshIdentitySidecarStaleCertificate" in tested.stdout + tested.stderr
