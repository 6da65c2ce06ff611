"""fastunet's build settings for Python: the default GPU archs and the compiler flags of tools/build_settings.json
(CMakeLists.txt reads that file too), and where the CUDA toolchain is. setup.py builds with them;
tests/test_cuda_codegen.py finds the toolkit's cuobjdump with it. Plain Python, importable without torch."""

import glob
import json
import os
import shutil
import sys

with open(os.path.join(os.path.dirname(os.path.abspath(__file__)), "build_settings.json")) as _file:
    _SETTINGS = json.load(_file)
DEFAULT_CUDA_ARCHS = _SETTINGS["cuda_arch_list"]["default"]
CXX_FLAGS = [entry["flag"] for entry in _SETTINGS["cxx_flags"]]
NVCC_FLAGS = [entry["flag"] for entry in _SETTINGS["nvcc_flags"]]


def find_cuda_home():
    """The CUDA toolkit: $CUDA_HOME, else the folder of `nvcc` on PATH, else /usr/local/cuda (one holding both nvcc
    and the runtime headers); None if there is none."""
    if os.environ.get("CUDA_HOME"):
        return os.environ["CUDA_HOME"]
    candidates = []
    nvcc = shutil.which("nvcc")
    if nvcc:
        candidates.append(os.path.dirname(os.path.dirname(os.path.realpath(nvcc))))
    candidates.append("/usr/local/cuda")
    for home in candidates:
        if os.path.exists(os.path.join(home, "bin", "nvcc")) and os.path.exists(
            os.path.join(home, "include", "cuda_runtime.h")
        ):
            return home
    return None


def nvidia_wheel_includes():
    """Header folders of the nvidia-* wheels (cuBLAS, cuSPARSE, cuDNN, ... that ATen's CUDA headers include):
    nvidia/cu13/include for CUDA 13, one folder per library (nvidia/cublas/include, ...) for CUDA 12."""
    dirs = []
    for site in sys.path:
        for d in sorted(glob.glob(os.path.join(site, "nvidia", "*", "include"))):
            if os.path.isdir(d) and d not in dirs:
                dirs.append(d)
    return dirs
