#!/usr/bin/env bash
# The GPU session in few, full calls (each well under 10 minutes on an H100), writing logs and JSON to $OUT
# (default bench_out/gpu). Run from the repository root with the machine's python3 (torch, Triton, pytest,
# pytest-benchmark installed there):
#
#   benchmarks/run_gpu.sh build-test   build for this GPU only, then the CUDA and Triton tests
#   benchmarks/run_gpu.sh bf16|fp32|bf16-512
#                                      python -m fastunet.bench for one row group of the target table:
#                                      16x3x256x256 bf16 channels_last, 16x3x256x256 fp32, 4x3x512x512 bf16
#   benchmarks/run_gpu.sh conv         fast mode with the Triton second conv, forced and picked per shape
#   benchmarks/run_gpu.sh cuda-kernels exact and fast mode with the fused ops in the compiled CUDA kernels instead of
#                                      Triton (bf16 channels_last), to pick the default backend
#   benchmarks/run_gpu.sh ops          pytest-benchmark suites (blocks, model) and the per-op roofline (CUDA and
#                                      Triton kernels side by side)
#   benchmarks/run_gpu.sh train        python -m fastunet.train --compare on the GPU (speed and parity)
#   benchmarks/run_gpu.sh wheel        tools/build_wheel.sh there: the wheel installs and runs on the GPU
#
# Every stage rebuilds if needed (a fresh machine holds no build).
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-bench_out/gpu}
mkdir -p "$OUT"
PY=${PYTHON:-python3}
export PYTHONUNBUFFERED=1

arch=$("$PY" -c "import torch; print('%d.%d' % torch.cuda.get_device_capability())")
if ! "$PY" -c "import fastunet._C" 2>/dev/null; then
  TORCH_CUDA_ARCH_LIST=$arch FASTUNET_FORCE_CUDA=1 MAX_JOBS=$(nproc) \
    "$PY" -m pip install -q --no-build-isolation --no-deps -e . 2>&1 | tail -3
fi
"$PY" -c "import fastunet; fastunet.info()" | tee "$OUT/info.txt"
nvidia-smi --query-gpu=name,driver_version,clocks.max.sm,memory.total --format=csv | tee -a "$OUT/info.txt"

case "${1:-}" in
  build-test)
    "$PY" -m pytest tests/test_cuda.py tests/test_triton_kernels.py tests/test_model.py tests/test_distributed.py \
      -q -p no:cacheprovider 2>&1 | tee "$OUT/tests.log" | tail -30
    ;;
  bf16|fp32|bf16-512)
    case "$1" in
      bf16) args="--dtype bfloat16 --channels-last" ;;
      fp32) args="--dtype float32" ;;
      bf16-512) args="--dtype bfloat16 --channels-last --batch 4 --size 512" ;;
    esac
    "$PY" -m fastunet.bench $args --out "$OUT/bench_$1" 2>&1 | tee "$OUT/bench_$1.log" | tail -16
    ;;
  conv)
    for conv in triton auto; do
      "$PY" -m fastunet.bench --dtype bfloat16 --channels-last --no-compile --conv $conv --out "$OUT/bench_conv_$conv" \
        2>&1 | tee "$OUT/bench_conv_$conv.log" | tail -12
    done
    ;;
  cuda-kernels)
    "$PY" -m fastunet.bench --dtype bfloat16 --channels-last --ops-backend cuda \
      --configs fastunet_exact,fastunet_fast --out "$OUT/bench_cuda_kernels" 2>&1 |
      tee "$OUT/bench_cuda_kernels.log" | tail -12
    ;;
  ops)
    "$PY" -m pytest benchmarks/ --benchmark-only -q -p no:cacheprovider --benchmark-json "$OUT/pytest_benchmark.json" \
      2>&1 | tail -5
    "$PY" benchmarks/roofline.py --json "$OUT/roofline.json" | tee "$OUT/roofline.md" | tail -8
    ;;
  train)
    "$PY" -m fastunet.train --compare --amp bf16 --channels-last --no-progress --out "$OUT/train" 2>&1 |
      tee "$OUT/train.log" | tail -8
    ;;
  wheel)
    PYTHON=$(command -v "$PY") TORCH_CUDA_ARCH_LIST=$arch DIST="$OUT" bash tools/build_wheel.sh 2>&1 |
      tee "$OUT/wheel.log" | tail -12
    ;;
  *)
    echo "usage: $0 build-test|bf16|fp32|bf16-512|conv|cuda-kernels|ops|train|wheel" >&2
    exit 2
    ;;
esac
