"""Test setup. Without a GPU, Triton kernels run on the CPU through its interpreter: TRITON_INTERPRET
must be set before triton (or any fastunet kernel) is imported, hence here, at the top."""

import contextlib
import ctypes
import gc
import os
import subprocess
import sys
import tempfile
import warnings
import zlib


def _has_cuda_gpu():
    # Asked in a subprocess, so that this process initialises no CUDA context before the env is set.
    code = "import torch,sys; sys.exit(0 if torch.cuda.is_available() else 1)"
    return subprocess.run([sys.executable, "-c", code], capture_output=True).returncode == 0


HAS_GPU = _has_cuda_gpu()
if not HAS_GPU:
    os.environ.setdefault("TRITON_INTERPRET", "1")
# Exact mode on the CPU runs the seed's modules for users; the suite runs the fused path's exact twins there (the
# CUDA path's logic), in spawned processes too. Tests of the modules path set model._EXACT_CPU_RUNS_MODULES.
os.environ["FASTUNET_CPU_EXACT"] = "fused"
# Plans that fastunet.tune stored on this machine would change what the tests run: the suite (and the processes it
# spawns) reads and writes plans in a folder of its own.
os.environ["FASTUNET_PLAN_DIR"] = os.path.join(tempfile.mkdtemp(prefix="fastunet-plans-"))

import pytest  # noqa: E402
import torch  # noqa: E402

from fastunet import _ext  # noqa: E402
from fastunet.conv import policy  # noqa: E402

requires_cuda = pytest.mark.skipif(not HAS_GPU, reason="needs a CUDA GPU")


@pytest.fixture(autouse=True)
def _fresh_seed(request):
    """Each test draws fresh random inputs, reproducibly from its own name."""
    torch.manual_seed(zlib.crc32(request.node.nodeid.encode()))
    yield


def _malloc_trim():
    """glibc's malloc_trim(0), where there is one: hands the heap's free pages back to the system."""
    try:
        return ctypes.CDLL(None).malloc_trim
    except (AttributeError, OSError):
        return lambda pad: 0


_MALLOC_TRIM = _malloc_trim()


@pytest.fixture(autouse=True)
def _collect_cycles():
    """Frees, after each test, what reference cycles hold: a failed assertion's traceback holds the frames of the
    check that failed (models, their float64 twins, gradients: about 1 GB at 32 x 32), and Python's collector,
    counting objects rather than bytes, may not run for many tests. Then the freed heap goes back to the system,
    so that one test's peak does not sit on what earlier tests left in glibc's free lists."""
    yield
    gc.collect()
    _MALLOC_TRIM(0)


@pytest.fixture
def conv_policy():
    """``conv_policy(name=value, ...)``: forces choices of fastunet.conv.policy until the test ends."""
    with contextlib.ExitStack() as stack:
        yield lambda **choices: stack.enter_context(policy.override(**choices))


@pytest.fixture
def fresh_warnings(monkeypatch):
    """Forgets the warnings already given, and records fastunet's RuntimeWarnings given from here on."""
    monkeypatch.setattr(_ext, "_warned", set())
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        yield lambda: [str(w.message) for w in seen
                       if issubclass(w.category, RuntimeWarning) and str(w.message).startswith("fastunet")]


@pytest.fixture(scope="session")
def ddp_sync_bn_training(tmp_path_factory):
    """``fastunet.train --compare --sync-bn`` under torchrun on 2 processes (2 steps of batch 2 at 32 x 32, exact
    mode), run once for the tests that train otherwise split and compare with it: (history, fastunet's
    checkpoint, what it printed) and its output folder."""
    from helpers import SMALL_TRAINING, scratch_dir, torchrun

    with scratch_dir(tmp_path_factory, "ddp_sync_bn") as out:
        args = [*SMALL_TRAINING, "--batch", "2", "--sync-bn", "--compare"]
        yield torchrun(2, args, out, checkpoint="checkpoint_fastunet.pt"), out


def pytest_terminal_summary(terminalreporter):
    """The pytest process's peak resident memory (CI's log shows it; the suite is to stay under 4 GB)."""
    import resource

    peak_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    terminalreporter.write_line(f"peak RSS of the pytest process: {peak_mib:.0f} MiB")
