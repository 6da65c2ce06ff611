"""Builds fastunet and its compiled ops library fastunet._C.

The CUDA kernels are built whenever torch is a CUDA build and nvcc is found; otherwise the build is
CPU-only, and says so. Environment switches:

  FASTUNET_FORCE_CUDA=1   a CPU-only build is an error
  FASTUNET_SKIP_CUDA=1    build the CPU ops only, even where CUDA is available
  TORCH_CUDA_ARCH_LIST    GPU archs (default: cuda_arch_list in tools/build_settings.json)
  MAX_JOBS                parallel compile jobs (default: as many as cores and RAM allow, 4 GiB each)
  CUDA_HOME               the CUDA toolkit (default: the folder of `nvcc` on PATH, else /usr/local/cuda)

The wheel's local version names what it was built against: 0.1.0+cu130torch2.14, or 0.1.0+cputorch2.14
(the sdist is plain 0.1.0). The compiler flags and the default archs are in tools/build_settings.json, shared with
CMakeLists.txt.
"""

import os
import sys

from setuptools import setup

BASE_VERSION = "0.1.0"
ROOT = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(ROOT, "tools"))
import cuda_toolchain  # noqa: E402  (tools/cuda_toolchain.py: tools/build_settings.json, the CUDA toolkit)


def _flag(name):
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on")


CUDA_HOME = cuda_toolchain.find_cuda_home()
if CUDA_HOME:
    # torch.utils.cpp_extension reads CUDA_HOME when it is imported.
    os.environ["CUDA_HOME"] = CUDA_HOME

import torch  # noqa: E402
from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension  # noqa: E402


def _max_jobs():
    if os.environ.get("MAX_JOBS"):
        return os.environ["MAX_JOBS"]
    try:
        mem_gib = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    except (ValueError, OSError):
        mem_gib = 8
    return str(max(1, min(os.cpu_count() or 1, int(mem_gib // 4))))


def _decide_cuda():
    if _flag("FASTUNET_SKIP_CUDA"):
        return False, "FASTUNET_SKIP_CUDA is set"
    if torch.version.cuda is None:
        return False, f"torch {torch.__version__} is not a CUDA build"
    if CUDA_HOME is None or not os.path.exists(os.path.join(CUDA_HOME, "bin", "nvcc")):
        return False, "nvcc was not found (set CUDA_HOME or put nvcc on PATH)"
    return True, f"torch {torch.__version__} (CUDA {torch.version.cuda}), nvcc in {CUDA_HOME}"


def _version(with_cuda):
    if "sdist" in sys.argv[1:]:
        return BASE_VERSION  # a source distribution is not tied to a torch or CUDA
    torch_tag = "torch" + ".".join(torch.__version__.split("+")[0].split(".")[:2])
    if with_cuda:
        return f"{BASE_VERSION}+cu{torch.version.cuda.replace('.', '')}{torch_tag}"
    return f"{BASE_VERSION}+cpu{torch_tag}"


def _extension(with_cuda):
    sources = [os.path.join("csrc", f) for f in ("ops.cpp", "winograd.cpp", "python_module.cpp")]
    # OpenMP: at::parallel_for is inline, and without -fopenmp the CPU kernels would run on one thread. The
    # runtime is torch's own libgomp.so.1 (already loaded, same soname). CMake links OpenMP its own way, hence
    # not in tools/build_settings.json.
    cxx = [*cuda_toolchain.CXX_FLAGS, "-fopenmp"]
    link = ["-fopenmp"]
    macros = []
    if not with_cuda:
        return CppExtension("fastunet._C", sources, extra_compile_args={"cxx": cxx}, extra_link_args=link,
                            define_macros=macros)
    archs = os.environ["TORCH_CUDA_ARCH_LIST"]
    macros += [
        ("FASTUNET_CUDA_VERSION", f'"{torch.version.cuda}"'),
        ("FASTUNET_CUDA_ARCHS", f'"{archs}"'),
    ]
    return CUDAExtension(
        "fastunet._C",
        sources + [os.path.join("csrc", "ops_cuda.cu")],
        include_dirs=cuda_toolchain.nvidia_wheel_includes(),
        define_macros=macros,
        extra_compile_args={"cxx": cxx, "nvcc": cuda_toolchain.NVCC_FLAGS},
        extra_link_args=link,
    )


class BuildExtensionKeepingObjects(BuildExtension.with_options(use_ninja=True)):
    """Keeps the compiled objects in build/obj-<python>-<torch>-<cuda|cpu>/ (setuptools' editable installs
    use a throw-away folder), so an editable install and a wheel built after it share ninja's objects and
    only what changed is recompiled."""

    def finalize_options(self):
        super().finalize_options()
        flavour = f"cu{torch.version.cuda}" if with_cuda else "cpu"
        tag = f"py{sys.version_info[0]}{sys.version_info[1]}-torch{torch.__version__.split('+')[0]}-{flavour}"
        self.build_temp = os.path.join(ROOT, "build", f"obj-{tag}")


with_cuda, why = _decide_cuda()
if not with_cuda and _flag("FASTUNET_FORCE_CUDA"):
    sys.exit(f"fastunet: FASTUNET_FORCE_CUDA=1 but the CUDA kernels cannot be built: {why}")
os.environ.setdefault("MAX_JOBS", _max_jobs())
if with_cuda:
    os.environ.setdefault("TORCH_CUDA_ARCH_LIST", cuda_toolchain.DEFAULT_CUDA_ARCHS)
print(
    f"fastunet: building the {'CUDA + CPU' if with_cuda else 'CPU-only'} ops library ({why}); "
    f"archs={os.environ.get('TORCH_CUDA_ARCH_LIST', '-') if with_cuda else '-'}, MAX_JOBS={os.environ['MAX_JOBS']}",
    flush=True,
)

setup(
    version=_version(with_cuda),
    packages=["fastunet", "fastunet.bench", "fastunet.blocks", "fastunet.conv", "fastunet.kernels", "fastunet.train"],
    package_dir={"fastunet": "fastunet", "fastunet.kernels": "kernels"},
    ext_modules=[_extension(with_cuda)],
    cmdclass={"build_ext": BuildExtensionKeepingObjects},
)
