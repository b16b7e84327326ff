#!/usr/bin/env bash
# Regenerate the Python code and type stubs of the protos in this directory (committed;
# tests/xds_sds/test_protos.py checks that they are current). Needs grpcio-tools and mypy-protobuf (the dev
# extra).
set -euo pipefail
cd "$(dirname "$0")/../.."
PY=${PYTHON:-.venv/bin/python}
BIN=$(dirname "$PY")
"$PY" -m grpc_tools.protoc -I . --plugin=protoc-gen-mypy="$BIN/protoc-gen-mypy" \
  --plugin=protoc-gen-mypy_grpc="$BIN/protoc-gen-mypy_grpc" \
  --python_out=. --mypy_out=. --grpc_python_out=. --mypy_grpc_out=. xds_sds/proto/signing.proto
"$PY" -m grpc_tools.protoc -I . --plugin=protoc-gen-mypy="$BIN/protoc-gen-mypy" \
  --python_out=. --mypy_out=. xds_sds/proto/workload.proto
