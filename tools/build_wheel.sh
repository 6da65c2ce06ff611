#!/usr/bin/env bash
# Builds the fastunet wheel for the torch and CUDA of the current environment, installs it into an empty
# folder outside the checkout and runs tools/smoke_test.py against that install (import, ops registered for
# CPU and CUDA, one forward and backward per device). The wheel lands in $DIST (default dist/), named e.g.
# fastunet-0.1.0+cu130torch2.14-cp311-cp311-linux_x86_64.whl.
#
#   tools/build_wheel.sh            the wheel (CUDA kernels when torch is a CUDA build and nvcc is found)
#   tools/build_wheel.sh --sdist    also the source distribution, checked by building a CPU-only wheel from it
#
# PYTHON (default .venv/bin/python when present, else python3) is the interpreter whose torch the wheel is
# built against; setup.py's switches apply (FASTUNET_FORCE_CUDA, FASTUNET_SKIP_CUDA, TORCH_CUDA_ARCH_LIST,
# MAX_JOBS, CUDA_HOME). The build needs setuptools, wheel and ninja next to torch (no build isolation).
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
if [ -z "${PYTHON:-}" ]; then
  if [ -x .venv/bin/python ]; then PYTHON=$ROOT/.venv/bin/python; else PYTHON=$(command -v python3); fi
fi
DIST=$(mkdir -p "${DIST:-dist}" && cd "${DIST:-dist}" && pwd)
WORK=$(mktemp -d "${TMPDIR:-/tmp}/fastunet-wheel.XXXXXX")
trap 'rm -rf "$WORK"' EXIT

echo "== building the wheel with $("$PYTHON" -c 'import sys, torch; print(sys.executable, "torch", torch.__version__)')"
"$PYTHON" -m pip wheel --no-build-isolation --no-deps --wheel-dir "$WORK/wheel" "$ROOT"
wheel=$(ls "$WORK"/wheel/fastunet-*.whl)
cp "$wheel" "$DIST/"
wheel=$DIST/$(basename "$wheel")
echo "== built $wheel"

expect_cuda=()
case "$(basename "$wheel")" in *+cu[0-9]*) expect_cuda=(--expect-cuda) ;; esac
echo "== installing it into the empty folder $WORK/site and smoke-testing it there"
"$PYTHON" -m pip install --quiet --no-deps --no-index --target "$WORK/site" "$wheel"
(cd "$WORK" && PYTHONPATH="$WORK/site" "$PYTHON" "$ROOT/tools/smoke_test.py" --expect-location "$WORK/site" \
  "${expect_cuda[@]}")

if [ "${1:-}" = "--sdist" ]; then
  echo "== building the sdist"
  "$PYTHON" -c "import sys; from setuptools import build_meta; sys.exit(not build_meta.build_sdist(sys.argv[1]))" \
    "$DIST"
  sdist=$(ls -t "$DIST"/fastunet-*.tar.gz | head -1)
  echo "== built $sdist; checking it builds (CPU-only) and passes the smoke test"
  tar -xzf "$sdist" -C "$WORK"
  FASTUNET_SKIP_CUDA=1 FASTUNET_FORCE_CUDA=0 "$PYTHON" -m pip wheel --no-build-isolation --no-deps \
    --wheel-dir "$WORK/sdist-wheel" "$WORK"/fastunet-*/
  "$PYTHON" -m pip install --quiet --no-deps --no-index --target "$WORK/sdist-site" "$WORK"/sdist-wheel/*.whl
  (cd "$WORK" && PYTHONPATH="$WORK/sdist-site" "$PYTHON" "$ROOT/tools/smoke_test.py" --expect-location \
    "$WORK/sdist-site")
fi
