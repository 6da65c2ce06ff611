# `make bench`: the main job (reference vs fastunet table on this machine's device).
# `make test`: the test suite (unit, model, Triton-interpreter and C++ ctest beside them: tools/run_tests.sh).
# `make lint`: ruff's lint (pyproject.toml) over the Python, clang-format (.clang-format) over the C++/CUDA.
# `make wheel`: the wheel for this environment's torch/CUDA and the sdist in dist/, each installed outside the
# checkout and smoke-tested (tools/build_wheel.sh).
# Both set up .venv/ first (torch, tools, and the fastunet build) when it is missing or out of date.
PY := .venv/bin/python
BUILD_INPUTS := setup.py pyproject.toml $(wildcard csrc/*)

.PHONY: setup bench test lint wheel
setup: .venv/.fastunet-built

.venv/.fastunet-built: $(BUILD_INPUTS) tools/setup_env.sh
	bash tools/setup_env.sh
	touch $@

bench: setup
	$(PY) -m fastunet.bench $(ARGS)

test: setup
	bash tools/run_tests.sh

lint: setup
	.venv/bin/ruff check .
	.venv/bin/clang-format --dry-run --Werror csrc/* tests/cpp/*.cpp

wheel: setup
	PYTHON=$(abspath $(PY)) bash tools/build_wheel.sh --sdist
