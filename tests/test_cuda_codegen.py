"""The CUDA kernels' generated code, checked without a GPU: csrc/ops_cuda.cu compiled to sm_90 PTX here.

Runs of channels move as one 16-byte access per thread on channels_last tensors (csrc/fastunet_math.h), the
per-cell arrays stay in registers (no local memory), and BN's z*scale + shift is never contracted into an FMA.
Skipped where there is no nvcc.
"""

import os
import re
import subprocess
import sys

import pytest
import torch
import torch.utils.cpp_extension as cpp_extension
from helpers import REPO

sys.path.insert(0, os.path.join(REPO, "tools"))
import cuda_toolchain  # noqa: E402  (the build's toolchain settings: setup.py uses them too)

CUDA_HOME = cuda_toolchain.find_cuda_home()
pytestmark = pytest.mark.skipif(CUDA_HOME is None or torch.version.cuda is None,
                                reason="needs nvcc and a CUDA build of torch")


@pytest.fixture(scope="module")
def ptx(tmp_path_factory):
    """{kernel entry name: its PTX} of csrc/ops_cuda.cu for sm_90, with the build's nvcc flags."""
    includes = cpp_extension.include_paths(device_type="cpu") + cuda_toolchain.nvidia_wheel_includes()
    out = tmp_path_factory.mktemp("ptx") / "ops_cuda.ptx"
    command = [os.path.join(CUDA_HOME, "bin", "nvcc"), "-std=c++20", "-arch=sm_90", "-ptx",
               os.path.join(REPO, "csrc", "ops_cuda.cu"), "-o", str(out), *cuda_toolchain.NVCC_FLAGS,
               *cpp_extension.COMMON_NVCC_FLAGS, "-DTORCH_EXTENSION_NAME=_C", "-DTORCH_API_INCLUDE_EXTENSION_H"]
    command += [f"-I{d}" for d in includes]
    done = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-4000:]
    kernels = {}
    for entry in re.split(r"\n(?=\.(?:visible )?\.?entry )", out.read_text()):
        match = re.match(r"\.(?:visible )?\.?entry (\S+)\(", entry)
        if match:
            kernels[match.group(1)] = entry
    return kernels


def kernels_named(ptx, *parts):
    found = {name: text for name, text in ptx.items() if all(part in name for part in parts)}
    assert found, f"no kernel with {parts} in its name"
    return found


def test_no_kernel_uses_local_memory(ptx):
    # 2 run widths x 4 dtypes x 4 per-cell functors; finish_stats per dtype, finish_sums per float/double
    assert len(ptx) == 2 * 4 * 4 + 4 + 2
    for name, text in ptx.items():
        assert ".local" not in text, name


@pytest.mark.parametrize("dtype, width", [("BFloat16", 8), ("Half", 8), ("ff", 4), ("dd", 2)])
def test_wide_runs_move_as_16_byte_accesses(ptx, dtype, width):
    """cells_kernel<V> for V = 16 bytes of the dtype: z, grad and grad_pooled read as v4 loads, out, pooled and dz
    written as v4 stores, and no narrower access to the activations."""
    for functor, loads, stores in (("BnReluPoolCells", 4, 5), ("ZGradCells", 9, 4)):
        (name, text), = kernels_named(ptx, f"cells_kernelILi{width}E", functor, dtype).items()
        assert len(re.findall(r"ld\.global\.(v4\.|v2\.f64)", text)) == loads, name
        assert len(re.findall(r"st\.global\.v4\.b32", text)) == stores, name
        assert not re.search(r"st\.global\.(u16|b16|f32|u32|f64|v2)", text), name


def test_bn_product_is_not_contracted_into_an_fma(ptx):
    for name, text in ptx.items():
        assert "fma.rn" not in text, name
