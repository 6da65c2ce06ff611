#!/usr/bin/env bash
# Creates .venv/ (if missing), installs torch and the test/bench/lint tools, and builds fastunet into it
# (editable, CUDA kernels included where torch is a CUDA build and nvcc is found).
# FASTUNET_TORCH overrides the torch requirement (default: the release this project is tested on).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
.venv/bin/python -m pip install -q "${FASTUNET_TORCH:-torch==2.14.1}" numpy ninja pytest pytest-benchmark \
    matplotlib expecttest hypothesis onnx onnxruntime onnxscript openvino ruff==0.17.6 clang-format==23.1.5
.venv/bin/python -m pip install -q --no-build-isolation --no-deps -e .
.venv/bin/python -c "import fastunet, fastunet._ext as e; print('fastunet built:', e.built_info())"
