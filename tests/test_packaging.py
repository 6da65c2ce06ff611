"""The compiled library's checks against the running torch, CUDA and GPU, the fallbacks they lead to, and
``fastunet.info()``. (The wheel itself is built, installed outside the checkout and smoke-tested by
tools/build_wheel.sh, which CI runs.)"""

import subprocess
import sys
import textwrap
import warnings

import pytest
import torch

import fastunet
from fastunet import _ext, ops

DEFAULT_ARCHS = "8.0;8.6;8.9;9.0+PTX"


@pytest.mark.parametrize(
    "archs, capability, runs",
    [
        (DEFAULT_ARCHS, (8, 0), True),
        (DEFAULT_ARCHS, (8, 7), True),  # sm_86 machine code runs on sm_87
        (DEFAULT_ARCHS, (9, 0), True),
        (DEFAULT_ARCHS, (10, 0), True),  # PTX of 9.0, compiled by the driver
        (DEFAULT_ARCHS, (12, 0), True),
        (DEFAULT_ARCHS, (7, 5), False),
        ("8.0;8.6", (9, 0), False),  # no PTX: nothing for a newer major
        ("8.6", (8, 0), False),  # machine code does not run on an older minor
        ("9.0a", (9, 0), True),
        ("9.0a", (10, 0), False),  # arch-specific code runs on its own arch only
        ("sm_80 sm_90", (8, 9), True),
        ("8.0 9.0+PTX", (7, 0), False),
    ],
)
def test_cuda_arch_problem(archs, capability, runs):
    problem = _ext.cuda_arch_problem(capability, archs)
    assert (problem is None) == runs, problem
    if not runs:
        wanted = f"{capability[0]}.{capability[1]}"
        assert archs in problem and f"sm_{capability[0]}{capability[1]}" in problem and wanted in problem


def test_cuda_arch_problem_of_a_cpu_only_build():
    assert "CPU-only" in _ext.cuda_arch_problem((9, 0), "")


def test_wheel_tag_names_the_running_torch_and_cuda():
    minor = ".".join(torch.__version__.split("+")[0].split(".")[:2])
    flavour = "cu" + torch.version.cuda.replace(".", "") if torch.version.cuda else "cpu"
    assert _ext.wheel_tag_for_running_torch() == f"+{flavour}torch{minor}"


@pytest.mark.parametrize(
    "error, says",
    [
        ("/x/_C.so: undefined symbol: _ZN3c104impl8GPUTrace", "compiled against another torch"),
        ("libc10_cuda.so: cannot open shared object file: No such file or directory", "has no CUDA libraries"),
        ("No module named 'fastunet._C'", "could not be loaded"),
    ],
)
def test_import_errors_are_explained(error, says):
    message = _ext._explain_import_error(ImportError(error))
    assert says in message and error in message and torch.__version__ in message
    assert _ext.wheel_tag_for_running_torch() in message


class _FakeLibrary:
    built_cuda_archs = DEFAULT_ARCHS

    def __init__(self, torch_version, cuda_version):
        self.built_torch_version, self.built_cuda_version = torch_version, cuda_version


@pytest.mark.parametrize(
    "torch_version, cuda_version, refused_because",
    [
        ("2.3.1", "12.1", "built against torch 2.3.1"),
        (torch.__version__.split("+")[0], "99.0", "built for CUDA 99.0"),
        (torch.__version__.split("+")[0], "", None),
    ],
)
def test_mismatched_library_is_refused(monkeypatch, torch_version, cuda_version, refused_because):
    if cuda_version == "99.0" and torch.version.cuda is None:
        pytest.skip("the CUDA check needs a CUDA build of torch")
    monkeypatch.setattr(fastunet, "_C", _FakeLibrary(torch_version, cuda_version), raising=False)
    monkeypatch.setattr(_ext, "_C", None)
    monkeypatch.setattr(_ext, "load_error", None)
    _ext._load()
    if refused_because is None:
        assert _ext.available() and _ext.load_error is None
    else:
        assert not _ext.available()
        assert refused_because in _ext.load_error and torch.__version__ in _ext.load_error
        assert _ext.wheel_tag_for_running_torch() in _ext.load_error


@pytest.fixture
def fake_gpu(monkeypatch):
    """Pretends cuda:0 is a GPU of the given compute capability, with the Triton kernels serving CUDA."""
    monkeypatch.setattr(_ext, "_warned", set())
    previous = ops._cuda_kernels
    ops.select_cuda_kernels("triton")  # also forgets the per-GPU decisions: the real GPU's, and the fake's

    def make(capability):
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda index=None: capability)
        monkeypatch.setattr(torch.cuda, "get_device_name", lambda index=None: "Fake GPU")

    yield make
    ops.select_cuda_kernels(previous)


def _backend_and_warnings(times=2):
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        backends = {ops.backend_for("cuda:0") for _ in range(times)}
    assert len(backends) == 1
    return backends.pop(), [str(w.message) for w in seen if issubclass(w.category, RuntimeWarning)]


@pytest.mark.skipif(not ops._triton_installed(), reason="needs triton")
def test_gpu_below_sm80_runs_pure_pytorch_with_one_warning(fake_gpu):
    fake_gpu((7, 5))
    backend, seen = _backend_and_warnings()
    assert backend == "reference"
    assert len(seen) == 1 and "8.0 or newer" in seen[0] and "Fake GPU (sm_75)" in seen[0]


@pytest.mark.skipif(not ops._triton_installed(), reason="needs triton")
def test_gpu_of_sm80_or_newer_runs_the_triton_kernels(fake_gpu):
    fake_gpu((9, 0))
    assert _backend_and_warnings() == ("triton", [])


def test_info_reports_build_runtime_and_backends(capsys):
    result = fastunet.info()
    printed = capsys.readouterr().out
    assert result["running"]["torch"] == torch.__version__ and torch.__version__ in printed
    assert result["devices"]["cpu"]["ops"]["bn_stats"] == ops.backend_for("cpu")
    assert set(result["devices"]["cpu"]["ops"]) == set(ops.FUSED_OPS)
    if _ext.available():
        assert f"built against torch {result['built']['torch']}" in printed
    else:
        assert "not loaded" in printed


def test_without_the_compiled_library_fastunet_warns_once_and_still_trains():
    """A pure-source checkout (no fastunet._C): one warning at import, the pure-PyTorch ops on the CPU, and a
    training step whose output matches the reference model's."""
    script = textwrap.dedent(
        """
        import sys, warnings
        sys.modules["fastunet._C"] = None  # the import of the compiled library fails, as in a bare checkout
        with warnings.catch_warnings(record=True) as seen:
            warnings.simplefilter("always")
            import torch, fastunet
            from fastunet.reference import U_Net as Reference
            torch.manual_seed(0)
            reference = Reference(3, 1)
            model = fastunet.U_Net(3, 1, exact=True)
            model.load_state_dict(reference.state_dict())
            x = torch.randn(2, 3, 32, 32)
            out = model(x)
            out.square().mean().backward()
        messages = [str(w.message) for w in seen if issubclass(w.category, RuntimeWarning)]
        assert len(messages) == 1 and "could not be loaded" in messages[0], messages
        assert fastunet.ops.backend_for("cpu") == "reference"
        assert torch.equal(out, reference(x))
        print("ok")
        """
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr
