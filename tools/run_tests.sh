#!/usr/bin/env bash
# `make test`: the pytest suite (tests/) and the C++ ctest (tools/run_ctest.sh), with one exit status.
#
# The ctest's CMake build compiles the CPU ops a second time. It runs beside pytest as an idle-priority job
# (SCHED_IDLE through chrt, else nice 19), in the cycles pytest leaves idle: much of the suite is single-threaded
# Python on a 2-core CI machine. Its log is printed after pytest's. Arguments go to pytest (none: pyproject.toml's
# testpaths, tests/); PYTHON as in tools/run_ctest.sh.
set -uo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-$PWD/.venv/bin/python}"
mkdir -p build
ctest_log=build/ctest.log
if chrt --idle 0 true 2>/dev/null; then idle=(chrt --idle 0); else idle=(nice -n 19); fi
PYTHON="$PYTHON" "${idle[@]}" bash tools/run_ctest.sh > "$ctest_log" 2>&1 &
ctest_pid=$!
trap 'kill "$ctest_pid" 2>/dev/null || true' EXIT

"$PYTHON" -m pytest -q --durations=15 "$@"
pytest_status=$?
wait "$ctest_pid"
ctest_status=$?
echo "== tools/run_ctest.sh (run beside pytest), exit status $ctest_status:"
cat "$ctest_log"
exit $((pytest_status != 0 || ctest_status != 0))
