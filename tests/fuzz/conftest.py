"""The fuzz targets' summary: how many inputs each target tried, and the hits of known findings."""

from __future__ import annotations

from typing import Any

from tests.fuzz.harness import CORPUS_INPUTS, INPUTS, KNOWN, KNOWN_HITS


def pytest_terminal_summary(terminalreporter: Any) -> None:
    targets = sorted(set(INPUTS) | set(CORPUS_INPUTS))
    if not targets:
        return
    terminalreporter.section("fuzz inputs per target")
    for target in targets:
        terminalreporter.write_line(
            f"{target:<24} {INPUTS[target]:>7} generated  {CORPUS_INPUTS[target]:>5} from the seed corpus"
        )
    for finding in KNOWN:
        if KNOWN_HITS[finding.id]:
            terminalreporter.write_line(
                f"known finding {finding.id}: {KNOWN_HITS[finding.id]} generated input(s) crashed as it does"
            )
