#!/usr/bin/env bash
# The whole test suite on a fresh machine: set up, then lint and formatting (ruff), types (mypy --strict), layer
# contracts (import-linter), and every test (pytest, including the real-Envoy end-to-end tests). Extra arguments
# go to pytest, e.g. `tests/run.sh -k vault`.
set -euo pipefail
cd "$(dirname "$0")/.."
.ci/setup
echo "== ruff"
.venv/bin/ruff check mesh_identity providers xds_sds plugins tests bench
.venv/bin/ruff format --check mesh_identity providers xds_sds plugins tests bench
echo "== mypy --strict"
.venv/bin/mypy
echo "== import-linter"
.venv/bin/lint-imports
echo "== pytest"
.venv/bin/python -m pytest "$@"
