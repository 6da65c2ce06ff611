"""tools/build_settings.json is the one place of the default GPU archs and the compiler flags: setup.py (through
tools/cuda_toolchain.py) and CMakeLists.txt read it and restate none of it."""

import json
import os
import subprocess
import sys

import pytest
from helpers import REPO

with open(os.path.join(REPO, "tools", "build_settings.json")) as file:
    SETTINGS = json.load(file)
DEFAULT_ARCHS = SETTINGS["cuda_arch_list"]["default"]
CXX_FLAGS = [entry["flag"] for entry in SETTINGS["cxx_flags"]]
NVCC_FLAGS = [entry["flag"] for entry in SETTINGS["nvcc_flags"]]
# What no build file may restate: the arch list, and each flag without its leading dashes (so that -fmad=false
# counts as --fmad=false) but the -O levels, too common a sight.
RESTATEMENTS = [DEFAULT_ARCHS] + [flag.lstrip("-") for flag in CXX_FLAGS + NVCC_FLAGS if not flag.startswith("-O")]

# Runs setup.py with setuptools.setup replaced, and prints what setup.py would build with.
SETUP_PY_SETTINGS = """
import json, os, runpy, setuptools, sys
captured = {}
setuptools.setup = lambda **kwargs: captured.update(kwargs)
sys.argv = ["setup.py", "--version"]
runpy.run_path("setup.py", run_name="__main__")
(extension,) = captured["ext_modules"]
print(json.dumps({"compile_args": extension.extra_compile_args, "archs": os.environ.get("TORCH_CUDA_ARCH_LIST")}))
"""


@pytest.mark.parametrize("path", ["setup.py", "CMakeLists.txt", "tools/cuda_toolchain.py"])
def test_settings_are_not_restated(path):
    with open(os.path.join(REPO, path)) as file:
        text = file.read()
    restated = [value for value in RESTATEMENTS if value in text]
    assert not restated, f"{path} restates {restated}: read them from tools/build_settings.json"


def test_cmake_reads_the_settings():
    with open(os.path.join(REPO, "CMakeLists.txt")) as file:
        assert "tools/build_settings.json" in file.read()


def test_setup_py_builds_with_the_settings():
    sys.path.insert(0, os.path.join(REPO, "tools"))
    import cuda_toolchain

    assert (cuda_toolchain.DEFAULT_CUDA_ARCHS, cuda_toolchain.CXX_FLAGS, cuda_toolchain.NVCC_FLAGS) == (
        DEFAULT_ARCHS, CXX_FLAGS, NVCC_FLAGS)
    env = {key: value for key, value in os.environ.items() if key != "TORCH_CUDA_ARCH_LIST"}
    done = subprocess.run([sys.executable, "-c", SETUP_PY_SETTINGS], cwd=REPO, env={**env, "MAX_JOBS": "1"},
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-4000:]
    built = json.loads(done.stdout.splitlines()[-1])
    assert [flag for flag in built["compile_args"]["cxx"] if flag != "-fopenmp"] == CXX_FLAGS
    if "nvcc" in built["compile_args"]:  # a CUDA build: torch is a CUDA build and nvcc is there
        assert built["compile_args"]["nvcc"] == NVCC_FLAGS
        assert built["archs"] == DEFAULT_ARCHS
