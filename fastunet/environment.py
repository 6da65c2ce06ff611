"""``fastunet.info()``: what was built, what is running, and which backend each op uses here."""

import os
import platform
import sys

import torch

from . import _ext, ops


def _devices():
    devices = [torch.device("cpu")]
    if torch.cuda.is_available():
        devices += [torch.device("cuda", i) for i in range(torch.cuda.device_count())]
    return devices


def _describe(device):
    if device.type == "cuda":
        major, minor = torch.cuda.get_device_capability(device)
        return f"{torch.cuda.get_device_name(device)} (sm_{major}{minor})"
    return platform.processor() or platform.machine()


def _triton_version():
    """The installed Triton's version, or None."""
    try:
        import triton

        return triton.__version__
    except ImportError:
        return None


def _gather():
    """The dict info() returns: version, path, build, running versions, environment, devices and their backends."""
    triton_version = _triton_version()
    built = _ext.built_info()
    result = {
        "fastunet": _ext.installed_version(),
        "path": os.path.dirname(os.path.abspath(__file__)),
        "built": built,
        "running": {
            "python": platform.python_version(),
            "torch": torch.__version__,
            "cuda": torch.version.cuda,
            "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
            "triton": triton_version,
        },
        "environment": {k: os.environ[k] for k in ("FASTUNET_BACKEND", "FASTUNET_CUDA_BACKEND") if k in os.environ},
        "devices": {},
    }
    for device in _devices():
        result["devices"][str(device)] = {
            "name": _describe(device),
            "ops": {op: ops.backend_for(device) for op in ops.FUSED_OPS},
            "second_conv": ops.conv3x3_mode(),
        }
    return result


def _print_info(result, out):
    """Prints ``result`` of _gather to ``out``, one line per topic and per device."""
    built, run = result["built"], result["running"]
    print(f"fastunet {result['fastunet'] or '(not installed: source tree)'} at {result['path']}", file=out)
    if built["error"]:
        print(f"  compiled ops: not loaded: {built['error']}", file=out)
    else:
        cuda = f"CUDA {built['cuda']}, archs {built['archs']}" if built["cuda"] else "CPU only"
        print(f"  compiled ops: built against torch {built['torch']}, {cuda}", file=out)
    print(f"  running: Python {run['python']}, torch {run['torch']} (CUDA {run['cuda']}, cuDNN {run['cudnn']}), "
          f"triton {run['triton']}", file=out)
    if result["environment"]:
        print("  environment: " + ", ".join(f"{k}={v}" for k, v in result["environment"].items()), file=out)
    for name, device in result["devices"].items():
        backends = sorted(set(device["ops"].values()))
        where = backends[0] if len(backends) == 1 else ", ".join(f"{op}: {b}" for op, b in device["ops"].items())
        print(f"  {name} ({device['name']}): fused ops {', '.join(device['ops'])} -> {where}; double blocks' "
              f"second conv: {device['second_conv']} (FASTUNET_CONV)", file=out)


def info(file=None):
    """Prints (to ``file``, default stdout) and returns a dict of: the fastunet version and install path, what
    ``fastunet._C`` was built against (or why it did not load), the running Python/torch/CUDA/cuDNN/Triton,
    each device, and the backend ("compiled", "triton" or "reference") each fused op uses on it."""
    result = _gather()
    _print_info(result, file if file is not None else sys.stdout)
    return result
