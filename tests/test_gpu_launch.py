"""What the first GPU run would otherwise find, checked on the CPU: every Triton launch (and the conv timing) runs
on the tensors' CUDA device, the CLI and the pipeline builder make the named device current, the Triton conv's
float32 products follow torch's TF32 switch for convolutions, the roofline times the compiled CUDA kernels in its
"cuda" rows, and the bench's float32 peak is measured under the convs' TF32 setting.

The launch-device tests run the launchers on fake tensors on cuda:1 (FakeTensorMode: no GPU needed) with
``torch.cuda.device`` replaced by a recorder, and check that each launch sees cuda:1 entered. Triton takes its
device and stream as torch.cuda.current_device() and that device's current stream, so entering the tensors'
device is what puts a launch on their device and on its current stream.
"""

import contextlib
import os

import pytest
import torch
from helpers import REPO
from torch._subclasses.fake_tensor import FakeTensorMode

from fastunet import bench, ops

pytest.importorskip("triton")

from fastunet import kernels  # noqa: E402
from fastunet.kernels import conv3x3_bn_relu  # noqa: E402

GPU1 = torch.device("cuda", 1)


class CurrentDevice:
    """Stands in for ``torch.cuda.device``: remembers the device entered (``current``, None outside)."""

    def __init__(self):
        self.current = None

    @contextlib.contextmanager
    def __call__(self, device):
        previous, self.current = self.current, torch.device(device)
        try:
            yield
        finally:
            self.current = previous


@pytest.fixture
def current_device(monkeypatch):
    recorder = CurrentDevice()
    monkeypatch.setattr(torch.cuda, "device", recorder)
    return recorder


@pytest.fixture
def conv_launches(monkeypatch, current_device):
    """Replaces the Triton conv's launches with records (kernel name, device entered at the launch)."""
    launches = []

    class Launcher:
        def __init__(self, kernel):
            self.name = kernel.fn.__name__

        def __getitem__(self, grid):
            return lambda *args, **kwargs: launches.append((self.name, current_device.current))

    monkeypatch.setattr(conv3x3_bn_relu, "wrap_triton", Launcher)
    return launches


@pytest.fixture
def precision_settings():
    """torch's TF32 settings, put back as they were after the test (monkeypatch cannot undo these)."""
    cudnn, matmul = torch.backends.cudnn, torch.backends.cuda.matmul
    settings = [(torch.backends, "fp32_precision"), (cudnn, "fp32_precision"), (cudnn.conv, "fp32_precision"),
                (matmul, "fp32_precision")]
    before = [getattr(obj, name) for obj, name in settings]
    yield
    for (obj, name), value in zip(settings, before):
        setattr(obj, name, value)
    assert [getattr(obj, name) for obj, name in settings] == before


def test_fused_ops_launch_triton_on_the_tensors_device(current_device, monkeypatch):
    """The CUDA kernel registered with the Triton kernels (``_triton_kernel``) calls each op's launcher inside
    its tensors' device, for every fused op."""
    seen = {}
    monkeypatch.setattr(ops, "_gpu_runs_triton", lambda index: True)
    for name in ops.FUSED_OPS:
        monkeypatch.setattr(kernels, name, lambda *args, name=name: seen.setdefault(name, current_device.current))
    with FakeTensorMode():
        z = torch.empty(2, 4, 6, 6, device=GPU1)
        for op in ops.FUSED_OPS.values():
            ops._triton_kernel(op)(z, None)
    assert seen == {name: GPU1 for name in ops.FUSED_OPS}
    assert current_device.current is None


def test_the_triton_conv_launches_on_the_tensors_device(conv_launches):
    """Both the conv kernel and every launch of the statistics' merge run inside x's device."""
    with FakeTensorMode():
        x = torch.empty(16, 8, 64, 64, device=GPU1).contiguous(memory_format=torch.channels_last)
        scale, shift = torch.empty(8, device=GPU1), torch.empty(8, device=GPU1)
        conv3x3_bn_relu.conv3x3_bn_relu_stats(x, scale, shift, torch.empty(8, 8, 3, 3, device=GPU1), True)
    assert conv_launches == [("_conv_kernel", GPU1)] + [("_merge_stats_kernel", GPU1)] * 2  # 512 tiles: 8, then 1


def test_the_conv_timing_runs_on_the_tensors_device(current_device, conv_launches, monkeypatch):
    """``FASTUNET_CONV=auto``'s timing records its CUDA events on x's device (its current stream)."""
    recorded = []

    class Event:
        def __init__(self, **kwargs):
            pass

        def record(self):
            recorded.append(current_device.current)

        def elapsed_time(self, end):
            return 1.0

    monkeypatch.setattr(torch.cuda, "Event", Event)
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: None)
    with FakeTensorMode():
        x = torch.empty(2, 8, 16, 16, device=GPU1).contiguous(memory_format=torch.channels_last)
        assert ops._time_conv3x3(x, torch.empty(8, 8, 3, 3, device=GPU1), True, reps=2) in ("aten", "triton")
    assert len(recorded) == 8 and set(recorded) == {GPU1}
    assert len(conv_launches) == 6 and {device for _, device in conv_launches} == {GPU1}


def test_the_train_cli_makes_the_named_gpu_current(monkeypatch):
    from fastunet import train

    made_current = []
    monkeypatch.setattr(torch.cuda, "set_device", made_current.append)
    monkeypatch.delenv("LOCAL_RANK", raising=False)
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert train.setup_distributed("cuda:1") == (GPU1, 0, 1)
    assert made_current == [GPU1]


def test_build_pipeline_makes_its_device_current(monkeypatch):
    """It sets the device before anything else touches it (here stopped right there: no process group)."""
    from fastunet import U_Net, parallel

    class MadeCurrent(Exception):
        pass

    def set_device(device):
        raise MadeCurrent(device)

    monkeypatch.setattr(torch.cuda, "set_device", set_device)
    with torch.device("meta"):
        model = U_Net(3, 1)
    with pytest.raises(MadeCurrent) as made:
        parallel.build_pipeline(model, 2, lambda out, target: out.sum(), device="cuda:1")
    assert made.value.args == (GPU1,)


@pytest.mark.parametrize("setting, want", [
    ({"allow_tf32": False}, "ieee"),
    ({"allow_tf32": True}, "tf32"),
    ({"conv.fp32_precision": "ieee"}, "ieee"),
    ({"conv.fp32_precision": "tf32"}, "tf32"),
], ids=str)
def test_the_triton_conv_multiplies_float32_as_aten_convs_do(setting, want, monkeypatch, precision_settings):
    """tl.dot on float32 is TF32 on a GPU unless told otherwise: the conv passes input_precision from torch's
    switch for cuDNN convs (the interpreter runs it; it multiplies in float32 either way)."""
    (name, value), = setting.items()
    target = torch.backends.cudnn.conv if name.startswith("conv.") else torch.backends.cudnn
    setattr(target, name.removeprefix("conv."), value)
    assert ops.cudnn_conv_tf32() == (want == "tf32")
    precisions = []
    real_wrap = conv3x3_bn_relu.wrap_triton

    class Recording:
        def __init__(self, kernel):
            self.kernel = kernel

        def __getitem__(self, grid):
            def launch(*args, **kwargs):
                precisions.append(kwargs.get("INPUT_PRECISION"))
                return real_wrap(self.kernel)[grid](*args, **kwargs)
            return launch

    monkeypatch.setattr(conv3x3_bn_relu, "wrap_triton", Recording)
    x = torch.randn(1, 4, 5, 6)
    for dtype in (torch.float32, torch.float16):
        kernels.conv3x3_bn_relu_stats(x.to(dtype), torch.rand(4) + 0.5, torch.randn(4),
                                      torch.randn(3, 4, 3, 3).to(dtype), False)
    assert precisions == [want, "tf32"]  # half precision: exact products either way


@pytest.mark.parametrize("conv_precision", ["tf32", "ieee"])
def test_the_float32_peak_is_measured_as_the_convs_multiply(conv_precision, monkeypatch, precision_settings):
    """On CUDA in float32 the matmul peak runs in TF32 exactly where the convs do (else "of peak" can pass 100%),
    the setting restored after; the table says which."""
    torch.backends.cudnn.conv.fp32_precision = conv_precision
    before = torch.backends.cuda.matmul.fp32_precision
    seen = []
    monkeypatch.setattr(bench.timing, "timed_matmul_tflops",
                        lambda device, dtype: seen.append(torch.backends.cuda.matmul.fp32_precision) or 100.0)
    assert bench.matmul_peak_tflops(torch.device("cuda"), torch.float32) == 100.0
    assert bench.matmul_peak_tflops(torch.device("cuda"), torch.bfloat16) == 100.0
    assert seen == [conv_precision, "ieee"]
    assert torch.backends.cuda.matmul.fp32_precision == before
    assert bench.peak_in_tf32(torch.device("cuda"), torch.float32) == (conv_precision == "tf32")
    legend = " ".join(bench.table_legend(dict(train_gflop=1.0, dtype="float32", matmul_peak_tflops=100.0,
                                              matmul_tf32=conv_precision == "tf32", memory_method="m", configs=[])))
    assert ("in TF32 as the convs" if conv_precision == "tf32" else "in true float32 as the convs") in legend


def test_the_roofline_times_each_cuda_backend_with_its_own_kernels_registered(monkeypatch):
    """The "cuda" rows run the compiled CUDA kernels (select_cuda_kernels("compiled") while they are timed), the
    "triton" rows the Triton ones, and the choice made before is back after."""
    monkeypatch.syspath_prepend(os.path.join(REPO, "benchmarks"))
    import roofline

    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    monkeypatch.setattr(ops._ext, "has_cuda_kernels", lambda: True)
    monkeypatch.setattr(ops._ext, "cuda_arch_problem", lambda capability: None)
    monkeypatch.setattr(ops, "_triton_usable", lambda: True)
    impls = roofline.implementations(torch.device("cuda"))
    assert list(impls) == ["cuda", "triton"]
    registered = []
    monkeypatch.setattr(roofline, "timed_ms", lambda fn, device, reps: registered.append(ops._cuda_kernels) or 1.0)
    before = ops._cuda_kernels
    rows = roofline.fused_op_rows("Conv1.2", impls, 1, 4, 4, 4, 1, True, torch.float32, torch.device("cpu"), 1, 1.0)
    assert registered == ["compiled"] * 4 + ["triton"] * 4
    assert ops._cuda_kernels == before
    assert all(set(row["ms_by_backend"]) == {"cuda", "triton"} for row in rows)
