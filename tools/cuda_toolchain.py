"""The CUDA toolchain settings of fastunet's build, in one place: setup.py builds with them and
tests/test_cuda_codegen.py compiles csrc/ops_cuda.cu to PTX with them. Plain Python, importable without torch."""

import glob
import os
import shutil
import sys

# -O3; --fmad=false: no FMA contraction in the CUDA kernels (BN's z*scale + shift rounds twice, as PyTorch's).
NVCC_FLAGS = ["-O3", "--expt-relaxed-constexpr", "-lineinfo", "--fmad=false"]


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
