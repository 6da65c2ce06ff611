#!/usr/bin/env bash
# Configures, builds and tests the C++ ops library (CMakeLists.txt) against the libtorch of a Python
# environment, in build/cmake: cmake configure, `cmake --build -j`, `ctest --output-on-failure`.
#
#   tools/run_ctest.sh                              # the venv's torch, CPU kernels only (what CI runs)
#   FASTUNET_WITH_CUDA=AUTO tools/run_ctest.sh      # the CUDA kernels too where a CUDA toolkit is found
#
# Environment: PYTHON (default: .venv/bin/python of the repo), FASTUNET_WITH_CUDA (AUTO/ON/OFF, default
# OFF: the CUDA kernels add minutes of nvcc and need a GPU to be tested), BUILD_DIR (default build/cmake),
# BUILD_TYPE (default Release), JOBS (default 2). Exits non-zero if any step fails.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PYTHON="${PYTHON:-$ROOT/.venv/bin/python}"
BUILD_DIR="${BUILD_DIR:-$ROOT/build/cmake}"
start=$SECONDS

if ! TORCH_CMAKE="$("$PYTHON" -c 'import torch; print(torch.utils.cmake_prefix_path)')"; then
  echo "run_ctest.sh: '$PYTHON' cannot import torch (set PYTHON to a python with torch installed)" >&2
  exit 2
fi

# Ninja (on PATH or in the venv) when the build dir is new: it compiles the library and the test at once.
generator=()
if [ -z "${CMAKE_GENERATOR:-}" ] && [ ! -f "$BUILD_DIR/CMakeCache.txt" ]; then
  ninja="$(command -v ninja || true)"
  if [ -z "$ninja" ] && [ -x "$(dirname "$PYTHON")/ninja" ]; then ninja="$(dirname "$PYTHON")/ninja"; fi
  if [ -n "$ninja" ]; then generator=(-G Ninja -DCMAKE_MAKE_PROGRAM="$ninja"); fi
fi

# Torch_DIR is passed too, so that a build dir configured against another environment follows this one.
cmake -S "$ROOT" -B "$BUILD_DIR" "${generator[@]}" \
  -DCMAKE_PREFIX_PATH="$TORCH_CMAKE" -DTorch_DIR="$TORCH_CMAKE/Torch" \
  -DCMAKE_BUILD_TYPE="${BUILD_TYPE:-Release}" \
  -DFASTUNET_WITH_CUDA="${FASTUNET_WITH_CUDA:-OFF}"
cmake --build "$BUILD_DIR" -j "${JOBS:-2}"
(cd "$BUILD_DIR" && ctest --output-on-failure)

echo "run_ctest.sh: configure + build + test passed in $((SECONDS - start)) s"
