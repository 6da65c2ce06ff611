"""Loads the compiled ops library fastunet._C and checks it against the running torch.

A library built against another torch (its C++ ABI changes between minor releases) is refused with an
error naming both versions and the wheel to install, instead of an undefined-symbol traceback.
"""

import warnings

import torch

_C = None
load_error = None


def _minor(version):
    return ".".join(version.split("+")[0].split(".")[:2])


def _load():
    global _C, load_error
    try:
        from . import _C as lib
    except ImportError as e:
        load_error = f"fastunet._C could not be loaded ({e})"
        return
    running = torch.__version__
    if _minor(lib.built_torch_version) != _minor(running):
        load_error = (
            f"fastunet._C was built against torch {lib.built_torch_version} but torch {running} is running; "
            f"install the fastunet wheel tagged torch{_minor(running)} or rebuild from source "
            "(pip install --no-build-isolation -e .)"
        )
        return
    _C = lib


_load()
if load_error is not None:
    warnings.warn(
        f"{load_error}. fastunet falls back to its Triton kernels on CUDA and to pure PyTorch elsewhere.",
        RuntimeWarning,
        stacklevel=2,
    )


def available():
    """True when the compiled ops are registered (torch.ops.fastunet.*)."""
    return _C is not None


def has_cuda_kernels():
    """True when the compiled library holds the CUDA kernels."""
    return _C is not None and bool(_C.built_cuda_version)


def built_info():
    """What the compiled library was built against: torch, CUDA (or None) and GPU archs."""
    if _C is None:
        return {"torch": None, "cuda": None, "archs": None, "error": load_error}
    return {
        "torch": _C.built_torch_version,
        "cuda": _C.built_cuda_version or None,
        "archs": _C.built_cuda_archs or None,
        "error": None,
    }
