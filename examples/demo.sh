#!/usr/bin/env bash
# The main job on the embedded default: set up, then run the demo mesh on the built-in CA.
# Arguments go to `mesh-identity demo` (e.g. --duration 60 to stop after a minute).
set -euo pipefail
cd "$(dirname "$0")/.."
.ci/setup
exec .venv/bin/mesh-identity demo "$@"
