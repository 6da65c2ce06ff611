"""The CUDA kernels' generated code, checked without a GPU: the PTX that the built fastunet._C carries (the
build's "+PTX" target, compute_90 by default), read out of the library with cuobjdump.

Runs of channels move as one 16-byte access per thread on channels_last tensors (csrc/fastunet_math.h), the
per-cell arrays stay in registers (no local memory), and BN's z*scale + shift is never contracted into an FMA.
Skipped where the library has no CUDA kernels or no PTX, or no cuobjdump is found (the CUDA toolkit's, else the
copy Triton ships).
"""

import glob
import importlib.util
import os
import re
import subprocess
import sys

import pytest
from helpers import REPO

sys.path.insert(0, os.path.join(REPO, "tools"))
import cuda_toolchain  # noqa: E402  (the build's toolchain settings: setup.py uses them too)

from fastunet import _ext  # noqa: E402


def _cuobjdump():
    """The CUDA toolkit's cuobjdump, else the one in Triton's NVIDIA backend; None if neither is there."""
    home = cuda_toolchain.find_cuda_home()
    candidates = [os.path.join(home, "bin", "cuobjdump")] if home else []
    triton = importlib.util.find_spec("triton")
    if triton is not None and triton.submodule_search_locations:
        for root in triton.submodule_search_locations:
            candidates += glob.glob(os.path.join(root, "backends", "nvidia", "bin", "cuobjdump"))
    return next((c for c in candidates if os.access(c, os.X_OK)), None)


CUOBJDUMP = _cuobjdump()
pytestmark = pytest.mark.skipif(CUOBJDUMP is None or not _ext.has_cuda_kernels(),
                                reason="needs fastunet._C built with its CUDA kernels, and cuobjdump")


def ptx_sections(library):
    """{arch: PTX text} of the PTX that ``library`` (a shared object) embeds, read with cuobjdump."""
    done = subprocess.run([CUOBJDUMP, "-ptx", library], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-4000:]
    sections = {}
    for section in done.stdout.split("Fatbin ptx code:")[1:]:
        arch = re.search(r"^arch = (sm_\d+)", section, re.MULTILINE)
        sections[arch.group(1)] = section.split("Fatbin elf code:")[0]
    return sections


@pytest.fixture(scope="module")
def ptx():
    """{kernel entry name: its PTX} of the newest PTX target in the built library (compute_90 by default)."""
    sections = ptx_sections(_ext._C.__file__)
    if not sections:
        pytest.skip(f"fastunet._C holds no PTX (built for {_ext.built_info()['archs']}; the default list ends in +PTX)")
    text = sections[max(sections, key=lambda arch: int(arch[3:]))]
    kernels = {}
    for entry in re.split(r"\n(?=\.(?:visible )?\.?entry )", text):
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
