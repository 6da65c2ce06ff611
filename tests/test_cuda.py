"""The CUDA side: compiled CUDA kernels and Triton kernels against the specifications on the GPU, exact mode bit
for bit with the reference on the GPU, fast mode within the 2x-error rule in float32 and bfloat16.
Skipped without a GPU."""

import copy

import pytest
import torch
from conftest import HAS_GPU
from helpers import (
    SIZE,
    assert_deterministic_run_to_run,
    assert_results_bitwise,
    assert_within_twice_reference_error,
    backward_case,
    pair,
    relative_error,
    slice_of_buffer,
    well_conditioned,
)

from fastunet import _ext, ops

pytestmark = pytest.mark.skipif(not HAS_GPU, reason="needs a CUDA GPU")

BACKENDS = ["cuda", "triton"]


@pytest.fixture(params=BACKENDS)
def cuda_backend(request):
    if request.param == "cuda" and not _ext.has_cuda_kernels():
        pytest.skip("the compiled library has no CUDA kernels")
    previous = ops.backend_for("cuda")
    ops.select_cuda_kernels(request.param)
    assert ops.backend_for("cuda") == ("compiled" if request.param == "cuda" else "triton")
    yield request.param
    ops.select_cuda_kernels(previous)


@pytest.fixture
def deterministic_cudnn():
    """What exact mode's bit-identity on CUDA needs (README, "exact=True"): cuDNN's deterministic engines, picked by
    its heuristics (no benchmarking), for both models; the settings as they were after the test."""
    before = torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark
    torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = True, False
    yield
    torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = before


def on_gpu(*tensors):
    return [t.cuda() if isinstance(t, torch.Tensor) else t for t in tensors]


@pytest.mark.parametrize("upscale", [1, 2])
@pytest.mark.parametrize("memory_format", [torch.contiguous_format, torch.channels_last])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_ops_match_specification_on_gpu(cuda_backend, upscale, memory_format, dtype):
    grad, grad_pooled, z, scale, shift = on_gpu(*backward_case(upscale, True, memory_format, dtype=dtype))
    n, c, h, w = grad.shape
    buf = slice_of_buffer(n, c, h, w, dtype, memory_format)[0].cuda()
    extra = (buf.shape[1] - c) // 2  # the channels on each side of the slice
    out = buf.narrow(1, extra, c)
    pooled = torch.full((n, c, h // 2, w // 2), float("nan"), dtype=dtype, device="cuda")
    ops.bn_relu_pool(z, scale, shift, upscale, out, pooled)
    want, want_pool = torch.empty_like(out), torch.empty_like(pooled)
    ops.bn_relu_pool_ref(z, scale, shift, upscale, want, want_pool)
    assert torch.equal(out.nan_to_num(123.0), want.nan_to_num(123.0))
    assert torch.equal(pooled.nan_to_num(123.0), want_pool.nan_to_num(123.0))
    assert torch.isnan(buf[:, :extra]).all() and torch.isnan(buf[:, -extra:]).all()
    # The tolerances of the same ops in tests/test_ops.py and tests/test_triton_kernels.py: sums in float32 (the
    # accumulation dtype of both float32 and bfloat16) to 1e-5, the BN backward formula to its output dtype's rounding.
    mean, var = ops.bn_stats(z, upscale)
    want_mean, want_var = ops.bn_stats_ref(z, upscale)
    torch.testing.assert_close(mean, want_mean, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(var, want_var, rtol=1e-5, atol=1e-5)
    invstd = torch.rsqrt(var + 1e-5)
    sums = ops.bn_relu_backward_reduce(grad, grad_pooled, z, scale, shift, mean, upscale)
    want_sums = ops.bn_relu_backward_reduce_ref(grad, grad_pooled, z, scale, shift, mean, upscale)
    for a, b in zip(sums, want_sums):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    assert torch.equal(ops.relu_pool_backward(grad, grad_pooled, z, scale, shift, upscale),
                       ops.relu_pool_backward_ref(grad, grad_pooled, z, scale, shift, upscale))
    apply_tol = {"rtol": 1e-5, "atol": 1e-5} if dtype == torch.float32 else {"rtol": 1e-2, "atol": 1e-2}
    torch.testing.assert_close(
        ops.bn_relu_backward_apply(grad, grad_pooled, z, scale, shift, mean, invstd, *want_sums, upscale),
        ops.bn_relu_backward_apply_ref(grad, grad_pooled, z, scale, shift, mean, invstd, *want_sums, upscale),
        **apply_tol)


@pytest.mark.parametrize("upscale", [1, 2])
@pytest.mark.parametrize("memory_format", [torch.contiguous_format, torch.channels_last])
def test_reductions_over_many_blocks_on_gpu(cuda_backend, upscale, memory_format):
    """Shapes with many chunks of cell rows and a partial channel tile: the reductions against float64, and
    bitwise the same on a second call (no atomics)."""
    grad, grad_pooled, z, scale, shift = on_gpu(*backward_case(upscale, upscale == 1, memory_format, n=3, c=40,
                                                              h=70, w=66))
    z = z + 30.0  # a mean large next to the spread
    mean = torch.randn(40, device="cuda")
    first = [ops.bn_stats(z, upscale), ops.bn_relu_backward_reduce(grad, grad_pooled, z, scale, shift, mean, upscale)]
    second = [ops.bn_stats(z, upscale), ops.bn_relu_backward_reduce(grad, grad_pooled, z, scale, shift, mean, upscale)]
    for got, again in zip(sum(map(list, first), []), sum(map(list, second), [])):
        assert torch.equal(got, again)
    z64 = ops.to_logical(z, upscale).double()
    torch.testing.assert_close(first[0][0].double(), z64.mean((0, 2, 3)), rtol=1e-6, atol=0)
    torch.testing.assert_close(first[0][1].double(), z64.var((0, 2, 3), unbiased=False), rtol=1e-4, atol=0)
    want = ops.bn_relu_backward_reduce_ref(*(t.double() if t is not None else None for t in
                                             (grad, grad_pooled, z, scale, shift, mean)), upscale)
    for got, w in zip(first[1], want):
        torch.testing.assert_close(got.double(), w, rtol=1e-4, atol=1e-3)


def cuda_step(model, x, grad_out, autocast=None):
    model.zero_grad(set_to_none=True)
    x = x.clone().requires_grad_()
    with torch.autocast("cuda", dtype=autocast, enabled=autocast is not None):
        out = model(x)
    (out.to(grad_out.dtype) * grad_out).sum().backward()
    return (out.detach(), x.grad, {n: p.grad.clone() for n, p in model.named_parameters()},
            {n: b.clone() for n, b in model.named_buffers()})


@pytest.mark.parametrize("memory_format", [torch.contiguous_format, torch.channels_last])
@pytest.mark.parametrize("autocast", [None, torch.bfloat16])
def test_exact_mode_is_bitwise_the_reference_on_gpu(cuda_backend, deterministic_cudnn, memory_format, autocast):
    ref, fast = (m.cuda().to(memory_format=memory_format) for m in pair(exact=True))
    x = torch.randn(2, 3, SIZE, SIZE, device="cuda").contiguous(memory_format=memory_format)
    g = torch.randn(2, 2, SIZE, SIZE, device="cuda")
    assert_results_bitwise(cuda_step(fast, x, g, autocast), cuda_step(ref, x, g, autocast))


@pytest.mark.parametrize("memory_format", [torch.contiguous_format, torch.channels_last])
def test_fast_mode_within_twice_the_reference_error_on_gpu(cuda_backend, memory_format):
    ref, fast = pair(exact=False)
    well_conditioned(ref, fast)
    ref64 = copy.deepcopy(ref).double().cuda()
    ref, fast = (m.cuda().to(memory_format=memory_format) for m in (ref, fast))
    x = torch.randn(4, 3, 64, 64, device="cuda").contiguous(memory_format=memory_format)
    g = torch.randn(4, 2, 64, 64, device="cuda")
    exact = cuda_step(ref64, x.double(), g.double())
    assert_within_twice_reference_error(cuda_step(fast, x, g), cuda_step(ref, x, g), exact)
    got, want = cuda_step(fast, x, g, torch.bfloat16), cuda_step(ref, x, g, torch.bfloat16)
    for i in (0, 1):
        assert relative_error(got[i], exact[i]) <= 2 * relative_error(want[i], exact[i]) + 4e-3


def test_fast_mode_inference_on_gpu_is_close_to_float64(cuda_backend):
    ref, fast = pair(exact=False)
    well_conditioned(ref, fast)
    ref64 = copy.deepcopy(ref).double().cuda().eval()
    ref, fast = ref.cuda().eval(), fast.cuda().eval()
    x = torch.randn(2, 3, 64, 64, device="cuda").contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        want = ref64(x.double())
        assert relative_error(fast(x), want) <= 2 * relative_error(ref(x), want) + 1e-6
        with torch.autocast("cuda", dtype=torch.bfloat16):
            assert relative_error(fast(x), want) <= 2 * relative_error(ref(x), want) + 4e-3


def test_64bit_indexing_at_the_top_level_of_batch_16_at_1024(cuda_backend):
    """Batch 16 x 1024^2 makes a [16, 128, 1024, 1024] concat buffer: 2.1e9 elements, past 2^31. The BN+ReLU
    +pool pass writes its first 64 channels (offsets past 2^31 from the 9th sample on), the backward reads
    them back; checked against the specification on the last samples, where a 32-bit offset would wrap."""
    n, c, side = 16, 64, 1024
    dtype = torch.bfloat16
    z = torch.randn(n, c, side, side, dtype=dtype, device="cuda")
    scale, shift = torch.rand(c, device="cuda") + 0.5, torch.randn(c, device="cuda")
    buf = torch.full((n, 2 * c, side, side), float("nan"), dtype=dtype, device="cuda")
    assert buf.numel() > 2**31
    out = buf.narrow(1, 0, c)
    pooled = torch.empty(n, c, side // 2, side // 2, dtype=dtype, device="cuda")
    ops.bn_relu_pool(z, scale, shift, 1, out, pooled)
    tail = slice(n - 2, n)
    want, want_pool = torch.empty_like(out[tail]), torch.empty_like(pooled[tail])
    ops.bn_relu_pool_ref(z[tail], scale, shift, 1, want, want_pool)
    torch.testing.assert_close(out[tail], want, rtol=0, atol=0)
    torch.testing.assert_close(pooled[tail], want_pool, rtol=0, atol=0)
    assert torch.isnan(buf[tail, c:]).all()
    mean, var = ops.bn_stats(z, 1)
    want_mean, want_var = ops.bn_stats_ref(z, 1)
    torch.testing.assert_close(mean, want_mean, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(var, want_var, rtol=1e-3, atol=1e-4)
    del pooled, want, want_pool
    grad = torch.randn(n, 2 * c, side, side, dtype=dtype, device="cuda").narrow(1, 0, c)
    dy = ops.relu_pool_backward(grad, None, z, scale, shift, 1)
    torch.testing.assert_close(dy[tail], ops.relu_pool_backward_ref(grad[tail], None, z[tail], scale, shift, 1),
                               rtol=0, atol=0)


@pytest.mark.parametrize("exact", [False, True])
def test_deterministic_run_to_run_on_cuda(cuda_backend, deterministic_cudnn, exact):
    _, model = pair(exact=exact)
    x, g = torch.randn(4, 3, 64, 64, device="cuda"), torch.randn(4, 2, 64, 64, device="cuda")
    assert_deterministic_run_to_run(model.cuda(), x, g)


def test_export_on_cuda_records_standard_operators():
    _, model = pair(exact=False)
    model.cuda().eval()
    x = torch.randn(2, 3, 64, 64, device="cuda")
    program = torch.export.export(model, (x,))
    assert not [n for n in program.graph.nodes if n.op == "call_function" and "fastunet" in str(n.target)]
    with torch.no_grad():
        torch.testing.assert_close(program.module()(x), model(x), rtol=1e-3, atol=1e-3)


def test_inference_is_cuda_graph_safe(cuda_backend):
    """Eval forward: no host sync and no data-dependent allocation, so it captures into a CUDA graph whose
    replays on new inputs give the eager outputs; torch.compile(mode="reduce-overhead") works too."""
    _, model = pair(exact=False)
    model.cuda().eval().to(memory_format=torch.channels_last)
    static_x = torch.randn(2, 3, 64, 64, device="cuda").contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(2):  # warm-up (Triton compiles and autotunes outside the capture)
                model(static_x)
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            static_out = model(static_x)
        for _ in range(2):
            x = torch.randn_like(static_x)
            static_x.copy_(x)
            graph.replay()
            torch.testing.assert_close(static_out, model(x), rtol=0, atol=0)
        compiled = torch.compile(model, mode="reduce-overhead")
        for _ in range(3):
            x = torch.randn_like(static_x)
            torch.testing.assert_close(compiled(x), model(x), rtol=1e-4, atol=1e-4)
