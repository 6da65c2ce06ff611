#!/usr/bin/env bash
# The GPU session in few, full calls (each well under 10 minutes on an H100), writing logs and JSON to $OUT
# (default bench_out/gpu), each result as soon as it exists. Run from the repository root with the machine's python3
# (torch, Triton, pytest, pytest-benchmark installed there), or PYTHON=...:
#
#   benchmarks/run_gpu.sh all          on a bare GPU machine, everything below in one go: build (this GPU's arch
#                                      only), selftest, cuda-tests, bf16, fp32, bf16-512, roofline, train; a stage that
#                                      fails is reported and the next one runs (exit status 1 at the end)
#   benchmarks/run_gpu.sh selftest     python -m fastunet.selftest (every op against its specification, the model
#                                      against the seed U-Net): run first on a new GPU
#   benchmarks/run_gpu.sh cuda-tests   the CUDA tests (tests/test_cuda.py, the launch-device and Triton tests)
#   benchmarks/run_gpu.sh build-test   the CUDA, Triton, model and distributed tests
#   benchmarks/run_gpu.sh bf16|fp32|bf16-512
#                                      python -m fastunet.bench for one row group of the target table:
#                                      16x3x256x256 bf16 channels_last, 16x3x256x256 fp32, 4x3x512x512 bf16
#   benchmarks/run_gpu.sh conv         fast mode with the Triton second conv, forced and picked per shape
#   benchmarks/run_gpu.sh cuda-kernels exact and fast mode with the fused ops in the compiled CUDA kernels instead of
#                                      Triton (bf16 channels_last), to pick the default backend
#   benchmarks/run_gpu.sh roofline     the per-op roofline, the compiled CUDA and Triton kernels side by side
#   benchmarks/run_gpu.sh ops          pytest-benchmark suites (blocks, model), then the roofline
#   benchmarks/run_gpu.sh train        python -m fastunet.train --compare on the GPU (speed and parity)
#   benchmarks/run_gpu.sh wheel        tools/build_wheel.sh there: the wheel installs and runs on the GPU
#
# --dry-run (after the stage) rehearses it on the CPU at tiny sizes, without building or asking for a GPU, so that
# nothing but the GPU can fail on the GPU: CI runs `benchmarks/run_gpu.sh all --dry-run` (about a minute on 2 cores;
# the self-test there checks the ops alone: CI runs the whole self-test on its own).
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-bench_out/gpu}
mkdir -p "$OUT"
PY=${PYTHON:-python3}
export PYTHONUNBUFFERED=1
stage=${1:-}
dry=0
[[ "${2:-}" == "--dry-run" ]] && dry=1

if ((dry)); then
  device=(--device cpu)
  bench_size=(--batch 1 --size 32 --quick --no-compile --reps 1 --no-memory
              --configs reference_eager,fastunet_fast)
  bench_512=("${bench_size[@]}")
  roofline_size=(--batch 1 --size 32 --reps 2)
  train_size=(--size 32 --batch 2 --epochs 1 --steps-per-epoch 2 --val-samples 2)
  selftest_args=(--ops-only)
  cuda_tests=(tests/test_cuda.py)
else
  device=()
  bench_size=()
  bench_512=(--batch 4 --size 512)
  roofline_size=()
  train_size=()
  selftest_args=()
  cuda_tests=(tests/test_cuda.py tests/test_gpu_launch.py tests/test_triton_kernels.py)
fi

build() {
  if ((dry)); then
    "$PY" -c "import fastunet; fastunet.info()" | tee "$OUT/info.txt"
    return
  fi
  local arch
  arch=$("$PY" -c "import torch; print('%d.%d' % torch.cuda.get_device_capability())")
  if ! "$PY" -c "import fastunet._C" 2>/dev/null; then
    TORCH_CUDA_ARCH_LIST=$arch FASTUNET_FORCE_CUDA=1 MAX_JOBS=$(nproc) \
      "$PY" -m pip install -q --no-build-isolation --no-deps -e . 2>&1 | tail -3
  fi
  "$PY" -c "import fastunet; fastunet.info()" | tee "$OUT/info.txt"
  nvidia-smi --query-gpu=name,driver_version,clocks.max.sm,memory.total --format=csv | tee -a "$OUT/info.txt"
}

selftest() {
  "$PY" -m fastunet.selftest "${device[@]}" "${selftest_args[@]}" 2>&1 | tee "$OUT/selftest.log" | tail -8
}

cuda_tests() {
  "$PY" -m pytest "${cuda_tests[@]}" -q -p no:cacheprovider 2>&1 | tee "$OUT/cuda_tests.log" | tail -15
}

build_test() {
  "$PY" -m pytest tests/test_cuda.py tests/test_triton_kernels.py tests/test_model.py tests/test_distributed.py \
    -q -p no:cacheprovider 2>&1 | tee "$OUT/tests.log" | tail -30
}

bench() {  # bf16 | fp32 | bf16-512
  local args
  case "$1" in
    bf16) args=(--dtype bfloat16 --channels-last "${bench_size[@]}") ;;
    fp32) args=(--dtype float32 "${bench_size[@]}") ;;
    bf16-512) args=(--dtype bfloat16 --channels-last "${bench_512[@]}") ;;
  esac
  "$PY" -m fastunet.bench "${device[@]}" "${args[@]}" --out "$OUT/bench_$1" 2>&1 | tee "$OUT/bench_$1.log" | tail -16
}

roofline() {
  "$PY" benchmarks/roofline.py "${device[@]}" "${roofline_size[@]}" --json "$OUT/roofline.json" |
    tee "$OUT/roofline.md" | tail -8
}

train() {
  "$PY" -m fastunet.train --compare --amp bf16 --channels-last --no-progress "${device[@]}" "${train_size[@]}" \
    --out "$OUT/train" 2>&1 | tee "$OUT/train.log" | tail -8
}

all() {
  local failed=() step
  for step in build selftest cuda_tests "bench bf16" "bench fp32" "bench bf16-512" roofline train; do
    echo "=== run_gpu.sh: $step$( ((dry)) && echo ' (dry run)')" | tee -a "$OUT/stages.log"
    local start=$SECONDS
    if $step; then
      echo "=== $step: done in $((SECONDS - start)) s" | tee -a "$OUT/stages.log"
    else
      echo "=== $step: FAILED after $((SECONDS - start)) s" | tee -a "$OUT/stages.log"
      failed+=("$step")
    fi
  done
  if ((${#failed[@]})); then
    echo "run_gpu.sh all: failed: ${failed[*]}" | tee -a "$OUT/stages.log"
    return 1
  fi
}

case "$stage" in
  all) all ;;
  selftest|cuda-tests|build-test|roofline|train)
    build
    ${stage//-/_}
    ;;
  bf16|fp32|bf16-512)
    build
    bench "$stage"
    ;;
  conv)
    build
    for conv in triton auto; do
      "$PY" -m fastunet.bench --dtype bfloat16 --channels-last --no-compile --conv $conv --out "$OUT/bench_conv_$conv" \
        2>&1 | tee "$OUT/bench_conv_$conv.log" | tail -12
    done
    ;;
  cuda-kernels)
    build
    "$PY" -m fastunet.bench --dtype bfloat16 --channels-last --ops-backend cuda \
      --configs fastunet_exact,fastunet_fast --out "$OUT/bench_cuda_kernels" 2>&1 |
      tee "$OUT/bench_cuda_kernels.log" | tail -12
    ;;
  ops)
    build
    "$PY" -m pytest benchmarks/ --benchmark-only -q -p no:cacheprovider --benchmark-json "$OUT/pytest_benchmark.json" \
      2>&1 | tail -5
    roofline
    ;;
  wheel)
    build
    arch=$("$PY" -c "import torch; print('%d.%d' % torch.cuda.get_device_capability())")
    PYTHON=$(command -v "$PY") TORCH_CUDA_ARCH_LIST=$arch DIST="$OUT" bash tools/build_wheel.sh 2>&1 |
      tee "$OUT/wheel.log" | tail -12
    ;;
  *)
    echo "usage: $0 all|selftest|cuda-tests|build-test|bf16|fp32|bf16-512|conv|cuda-kernels|roofline|ops|train|wheel" \
      "[--dry-run]" >&2
    exit 2
    ;;
esac
