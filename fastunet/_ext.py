"""Loads the compiled ops library fastunet._C and checks it against the running torch, CUDA and GPU.

A library built against another torch (its C++ ABI changes between minor releases) or another CUDA major
version is refused with a message naming what was built, what is running and which wheel to install,
instead of an undefined-symbol traceback; fastunet then runs its Triton kernels on CUDA and pure PyTorch
elsewhere, and says so once. Whether the library holds code for the GPU at hand is checked at the first
use of a CUDA device (asking at import would initialise CUDA), by ``cuda_arch_problem``.
"""

import re
import warnings

import torch

_C = None
load_error = None
_warned = set()


def warn_once(key, message):
    """``warnings.warn(message)`` the first time ``key`` is seen in this process."""
    if key not in _warned:
        _warned.add(key)
        warnings.warn(message, RuntimeWarning, stacklevel=3)


def _minor(version):
    return ".".join(version.split("+")[0].split(".")[:2])


def installed_version():
    """The installed distribution's version, e.g. ``0.1.0+cu130torch2.14`` (None in a bare source tree)."""
    try:
        from importlib.metadata import PackageNotFoundError, version
    except ImportError:
        return None
    try:
        return version("fastunet")
    except PackageNotFoundError:
        return None


def wheel_tag_for_running_torch():
    """The local version tag of the fastunet wheel that matches the running torch, e.g. ``+cu130torch2.14``."""
    flavour = f"cu{torch.version.cuda.replace('.', '')}" if torch.version.cuda else "cpu"
    return f"+{flavour}torch{_minor(torch.__version__)}"


def _running():
    cuda = f"CUDA {torch.version.cuda}" if torch.version.cuda else "no CUDA"
    return f"torch {torch.__version__} ({cuda})"


def _fix():
    return (f"install the fastunet wheel tagged {wheel_tag_for_running_torch()}, or rebuild from source against "
            "this torch (pip install --no-build-isolation .)")


def _explain_import_error(e):
    built = installed_version()
    built = f"fastunet {built}" if built else "this fastunet build"
    text = str(e)
    if "undefined symbol" in text:
        why = f"{built} was compiled against another torch than the running {_running()} ({text})"
    elif re.search(r"lib(c10_cuda|torch_cuda|cudart)[^ ]*: cannot open", text):
        why = f"{built} holds CUDA kernels but the running {_running()} has no CUDA libraries ({text})"
    else:
        why = f"fastunet._C could not be loaded ({text}); running {_running()}"
    return f"{why}; {_fix()}"


def _load():
    global _C, load_error
    try:
        from . import _C as lib
    except ImportError as e:
        load_error = _explain_import_error(e)
        return
    built_cuda = lib.built_cuda_version
    if _minor(lib.built_torch_version) != _minor(torch.__version__):
        load_error = (f"fastunet._C was built against torch {lib.built_torch_version} but {_running()} is running; "
                      f"{_fix()}")
    elif built_cuda and torch.version.cuda and built_cuda.split(".")[0] != torch.version.cuda.split(".")[0]:
        load_error = f"fastunet._C was built for CUDA {built_cuda} but {_running()} is running; {_fix()}"
    else:
        _C = lib


_load()
if load_error is not None:
    warn_once("load", f"{load_error}. fastunet falls back to its Triton kernels on CUDA and to pure PyTorch "
                      "elsewhere.")


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


def _parse_arch(entry):
    """``"8.6"`` -> (8, 6, False, False); ``"9.0+PTX"`` -> (9, 0, True, False); ``"9.0a"`` -> (9, 0, False, True)."""
    m = re.fullmatch(r"(?:sm_|compute_)?(\d+)\.?(\d)([af]?)(\+PTX)?", entry.strip(), re.IGNORECASE)
    if m is None:
        return None
    return int(m.group(1)), int(m.group(2)), m.group(4) is not None, bool(m.group(3))


def cuda_arch_problem(capability, archs=None):
    """None when a library built for ``archs`` (TORCH_CUDA_ARCH_LIST form; default: this build's) runs on a
    GPU of compute capability ``(major, minor)``, else a sentence saying why not.

    Machine code for sm_XY runs on sm_XZ with Z >= Y (same major); arch-specific code (``9.0a``) only on its
    own arch; PTX for sm_XY is compiled by the driver for any newer GPU.
    """
    archs = built_info()["archs"] if archs is None else archs
    if not archs:
        return "fastunet._C has no CUDA kernels (a CPU-only build)"
    entries = [e for e in re.split(r"[;\s]+", archs) if e]
    parsed = [_parse_arch(e) for e in entries]
    if any(p is None for p in parsed):
        return None  # named archs ("Ampere", ...): nothing to check against
    major, minor = capability
    for a_major, a_minor, ptx, specific in parsed:
        if (a_major, a_minor) == (major, minor):
            return None
        if not specific and a_major == major and a_minor <= minor:
            return None
        if ptx and (a_major, a_minor) <= (major, minor):
            return None
    return (f"fastunet._C was built for GPU archs {archs} and holds no code for this GPU (sm_{major}{minor}); "
            f"install a fastunet wheel built with sm_{major}{minor} (or PTX of an older arch) in "
            f"TORCH_CUDA_ARCH_LIST, or rebuild from source with TORCH_CUDA_ARCH_LIST=\"{major}.{minor}\"")
