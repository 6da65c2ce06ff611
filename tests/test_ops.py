"""The compiled ops (torch.ops.fastunet.*) against their pure-PyTorch specifications, and gradcheck of the
two fused blocks, on the CPU (CUDA twins: tests/test_cuda.py)."""

import contextlib

import pytest
import torch
import torch.nn.functional as F
from helpers import backward_case, case, random, slice_of_buffer
from torch.utils._python_dispatch import TorchDispatchMode

from fastunet import _ext, functional, ops
from fastunet.conv import gemm, policy, training

pytestmark = pytest.mark.skipif(not _ext.available(), reason=f"compiled ops not built: {_ext.load_error}")
LIB = torch.ops.fastunet


def quantised(*shape, dtype=torch.float32, memory_format=torch.contiguous_format):
    """Random values on a coarse grid, so max-pool windows hold ties; a few NaNs included."""
    t = torch.randint(-4, 5, shape).to(dtype) / 2
    t.view(-1)[torch.randint(0, t.numel(), (max(1, t.numel() // 97),))] = float("nan")
    return t.contiguous(memory_format=memory_format)


FORMATS = [torch.contiguous_format, torch.channels_last]
# 3 channels: runs of one channel; 16: 16-byte runs of channels (csrc/fastunet_math.h) where the layout allows.
CHANNELS = [3, 16]


@pytest.mark.parametrize("upscale", [1, 2])
@pytest.mark.parametrize("memory_format", FORMATS)
@pytest.mark.parametrize("pool", [False, True])
@pytest.mark.parametrize("values", [random, quantised])
@pytest.mark.parametrize("c", CHANNELS)
def test_bn_relu_pool_matches_reference_bitwise(upscale, memory_format, pool, values, c):
    z, scale, shift = case(upscale, c=c, memory_format=memory_format, values=values)
    shape = ops.logical_shape(z, upscale)
    buf, out = slice_of_buffer(*shape, torch.float32, memory_format)
    pooled = torch.full((shape[0], shape[1], shape[2] // 2, shape[3] // 2), -7.0).contiguous(
        memory_format=memory_format) if pool else None
    LIB.bn_relu_pool(z, scale, shift, upscale, out, pooled)
    want = torch.empty(shape)
    want_pool = torch.empty_like(pooled) if pool else None
    ops.bn_relu_pool_ref(z, scale, shift, upscale, want, want_pool)
    assert torch.equal(out.nan_to_num(123.0), want.nan_to_num(123.0))
    extra = (buf.shape[1] - c) // 2
    assert torch.isnan(buf[:, :extra]).all() and torch.isnan(buf[:, -extra:]).all(), "wrote outside its channel slice"
    if pool:
        assert torch.equal(pooled.nan_to_num(123.0), want_pool.nan_to_num(123.0))


@pytest.mark.parametrize("upscale", [1, 2])
@pytest.mark.parametrize("memory_format", FORMATS)
@pytest.mark.parametrize("c", CHANNELS)
def test_bn_stats_matches_reference(upscale, memory_format, c):
    z, _, _ = case(upscale, n=3, c=c, h=6, w=5, memory_format=memory_format)
    z = z + 40.0  # a mean large next to the spread: a naive sum-of-squares variance loses digits here
    mean, var = LIB.bn_stats(z, upscale)
    z64 = ops.to_logical(z, upscale).double()
    torch.testing.assert_close(mean.double(), z64.mean((0, 2, 3)), rtol=1e-6, atol=0)
    torch.testing.assert_close(var.double(), z64.var((0, 2, 3), unbiased=False), rtol=1e-4, atol=0)


@pytest.mark.parametrize("upscale", [1, 2])
@pytest.mark.parametrize("where", ["first", "later"])
def test_bn_stats_keep_a_nan(upscale, where):
    """A NaN in a channel makes its mean and variance NaN, as in nn.BatchNorm2d (the variance's clamp at 0 must
    not turn it into 0); the other channels keep their statistics."""
    z, _, _ = case(upscale, n=2, c=3, h=4, w=5)
    z[1 if where == "later" else 0, upscale * upscale * 3 - 2 if upscale == 1 else 1, 2 if where == "later" else 0,
      3 if where == "later" else 0] = float("nan")
    mean, var = LIB.bn_stats(z, upscale)
    want_mean, want_var = ops.bn_stats_ref(z, upscale)
    assert want_var.isnan().sum() == 1
    assert torch.equal(var.isnan(), want_var.isnan()) and torch.equal(mean.isnan(), want_mean.isnan())
    torch.testing.assert_close(var, want_var, rtol=1e-5, atol=0, equal_nan=True)


@pytest.mark.parametrize("upscale", [1, 2])
@pytest.mark.parametrize("memory_format", FORMATS)
@pytest.mark.parametrize("pool", [False, True])
@pytest.mark.parametrize("values", [random, quantised])
@pytest.mark.parametrize("c", CHANNELS)
def test_relu_pool_backward_matches_reference_bitwise(upscale, memory_format, pool, values, c):
    args = backward_case(upscale, pool, memory_format, values, c=c)
    got = LIB.relu_pool_backward(*args, upscale)
    want = ops.relu_pool_backward_ref(*args, upscale)
    assert got.shape == want.shape and got.stride() == want.stride()
    assert torch.equal(got, want)


@pytest.mark.parametrize("upscale", [1, 2])
@pytest.mark.parametrize("memory_format", FORMATS)
@pytest.mark.parametrize("pool", [False, True])
@pytest.mark.parametrize("c", CHANNELS)
def test_bn_relu_backward_matches_reference(upscale, memory_format, pool, c):
    grad, grad_pooled, z, scale, shift = backward_case(upscale, pool, memory_format, c=c)
    c = scale.numel()
    mean, invstd = torch.randn(c), torch.rand(c) + 0.5
    sums = LIB.bn_relu_backward_reduce(grad, grad_pooled, z, scale, shift, mean, upscale)
    want_sums = ops.bn_relu_backward_reduce_ref(grad, grad_pooled, z, scale, shift, mean, upscale)
    for got, want in zip(sums, want_sums):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    dz = LIB.bn_relu_backward_apply(grad, grad_pooled, z, scale, shift, mean, invstd, *want_sums, upscale)
    want = ops.bn_relu_backward_apply_ref(grad, grad_pooled, z, scale, shift, mean, invstd, *want_sums, upscale)
    assert dz.stride() == want.stride()
    torch.testing.assert_close(dz, want, rtol=1e-5, atol=1e-6)
    if upscale == 2:  # border entries of the sub-pixel conv output that no pixel reads: exactly zero
        z6 = dz.reshape(dz.shape[0], 2, 2, -1, dz.shape[2], dz.shape[3])
        assert (z6[:, 0, :, :, -1] == 0).all() and (z6[:, 1, :, :, 0] == 0).all()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float64])
@pytest.mark.parametrize("c", CHANNELS)
def test_other_dtypes_match_reference(dtype, c):
    grad, grad_pooled, z, scale, shift = backward_case(2, False, torch.channels_last, dtype=dtype, c=c)
    assert torch.equal(LIB.relu_pool_backward(grad, None, z, scale, shift, 2),
                       ops.relu_pool_backward_ref(grad, None, z, scale, shift, 2))
    out, want = torch.empty_like(grad), torch.empty_like(grad)
    LIB.bn_relu_pool(z, scale, shift, 2, out, None)
    ops.bn_relu_pool_ref(z, scale, shift, 2, want, None)
    assert torch.equal(out, want)
    mean, var = LIB.bn_stats(z, 2)
    assert mean.dtype == ops.acc_dtype(dtype)
    torch.testing.assert_close(mean, ops.bn_stats_ref(z, 2)[0], rtol=1e-5, atol=1e-5)


def opcheck_cases():
    grad, grad_pooled, z, scale, shift = backward_case(1, True, torch.channels_last)
    c = scale.numel()
    mean, invstd = torch.randn(c), torch.rand(c) + 0.5
    n, _, h, w = grad.shape
    return [
        (LIB.bn_stats.default, (z, 1)),
        (LIB.bn_relu_pool.default, (z, scale, shift, 1, torch.empty_like(grad), torch.empty(n, c, h // 2, w // 2))),
        (LIB.relu_pool_backward.default, (grad, grad_pooled, z, scale, shift, 1)),
        (LIB.bn_relu_backward_reduce.default, (grad, grad_pooled, z, scale, shift, mean, 1)),
        (LIB.bn_relu_backward_apply.default, (grad, None, z, scale, shift, mean, invstd, mean, invstd, 1)),
    ]


@pytest.mark.parametrize("index", range(5))
def test_opcheck(index):
    op, args = opcheck_cases()[index]
    torch.library.opcheck(op, args)


def test_bad_arguments_name_the_problem():
    z, scale, shift = case(1)
    with pytest.raises(RuntimeError, match="scale must have shape"):
        LIB.bn_relu_pool(z, scale[:2], shift, 1, torch.empty_like(z), None)
    with pytest.raises(RuntimeError, match="upscale must be 1 or 2"):
        LIB.bn_stats(z, 3)
    with pytest.raises(RuntimeError, match="scale must be Double for Double activations"):
        LIB.bn_relu_pool(z.double(), scale, shift, 1, torch.empty_like(z.double()), None)
    with pytest.raises(RuntimeError, match="out must have shape"):
        LIB.bn_relu_pool(z, scale, shift, 1, torch.empty(1, 1, 1, 1), None)


# ---------------------------------------------------------------------------------------------------
# gradcheck of the fused blocks in float64 (the compiled kernels run in double)
# ---------------------------------------------------------------------------------------------------


def block_params(cin, cout, *, bias=True):
    def p(*s):
        return torch.randn(*s, dtype=torch.float64, requires_grad=True)

    return (p(cout, cin, 3, 3) * 0.5, p(cout) if bias else None, p(cout) + 1.5, p(cout))


def bn_state(c):
    return torch.randn(c, dtype=torch.float64), torch.rand(c, dtype=torch.float64) + 0.5


def double_block_function(training, exact, pool, rm, rv):
    """The fused double block as a function of its input and parameters, for gradcheck/gradgradcheck."""

    def f(x, w1, b1, g1, be1, w2, b2, g2, be2):
        # Running stats are copied per call: training updates them in place.
        bn1 = functional.BatchNormArgs(g1, be1, rm.clone(), rv.clone(), 1e-5, 0.1 if training else None, training)
        bn2 = functional.BatchNormArgs(g2, be2, rm.clone(), rv.clone(), 1e-5, 0.1 if training else None, training)
        buf, pooled = functional.double_conv_bn_relu(x, (w1, b1), bn1, (w2, b2), bn2, exact=exact, cat_channels=2,
                                                     pool=pool)
        return (buf[:, :3], pooled) if pool else buf[:, :3]

    return f


def up_block_function(training, exact, rm, rv):
    """The fused up block as a function of its input, skip and parameters, for gradcheck/gradgradcheck."""

    def f(d, skip, w, b, g, be):
        buf = torch.cat((skip, torch.empty(2, 2, 6, 4, dtype=torch.float64)), dim=1)
        bn = functional.BatchNormArgs(g, be, rm.clone(), rv.clone(), 1e-5, 0.1 if training else None, training)
        return functional.upsample_conv_cat(d, buf, (w, b), bn, exact=exact)

    return f


def double_block_inputs():
    x = torch.randn(2, 2, 4, 4, dtype=torch.float64, requires_grad=True)
    layer1 = (t.detach().requires_grad_() for t in block_params(2, 3))
    layer2 = (t.detach().requires_grad_() for t in block_params(3, 3))
    return (x, *layer1, *layer2), bn_state(3)


def up_block_inputs():
    d = torch.randn(2, 3, 3, 2, dtype=torch.float64, requires_grad=True)
    skip = torch.randn(2, 2, 6, 4, dtype=torch.float64, requires_grad=True)
    return (d, skip, *(t.detach().requires_grad_() for t in block_params(3, 2))), bn_state(2)


@pytest.mark.parametrize("exact", [False, True])
@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("pool", [False, True])
def test_gradcheck_double_conv_bn_relu(exact, training, pool):
    inputs, (rm, rv) = double_block_inputs()
    f = double_block_function(training, exact, pool, rm, rv)
    torch.autograd.gradcheck(f, inputs, eps=1e-6, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("exact", [False, True])
@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("subpixel", [True, False])
def test_gradcheck_upsample_conv_cat(exact, training, subpixel, conv_policy):
    """Both of fast mode's up-conv paths (the sub-pixel conv, the conv on the upsampled input) and exact mode's."""
    inputs, (rm, rv) = up_block_inputs()
    pixels = inputs[0].shape[0] * inputs[0].shape[2] * inputs[0].shape[3]
    conv_policy(subpixel_train_min_pixels=pixels if subpixel else pixels + 1)
    assert functional._subpixel_train(inputs[0], inputs[2]) == subpixel
    torch.autograd.gradcheck(up_block_function(training, exact, rm, rv), inputs, eps=1e-6, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("exact", [False, True])
def test_the_concat_buffer_contract(exact):
    """The up block hands the whole concat buffer's gradient on as the skip's: the double block that wrote the skip
    part must read only that part of it (concat_parts). A NaN-poisoned up part changes none of its gradients, and a
    skip part larger than the buffer is refused."""
    inputs, (rm, rv) = double_block_inputs()
    inputs = [t.detach().float().requires_grad_() for t in inputs]

    def gradients(up_part_fill):
        x, w1, b1, g1, be1, w2, b2, g2, be2 = inputs
        bn = [functional.BatchNormArgs(g, be, rm.float().clone(), rv.float().clone(), 1e-5, 0.1, True)
              for g, be in ((g1, be1), (g2, be2))]
        buf, _ = functional.double_conv_bn_relu(x, (w1, b1), bn[0], (w2, b2), bn[1], exact=exact, cat_channels=2)
        grad_buf = torch.randn(buf.shape, generator=torch.Generator().manual_seed(0))
        functional.concat_parts(grad_buf, 3)[1].fill_(up_part_fill)
        return torch.autograd.grad(buf, inputs, grad_buf)

    for got, want in zip(gradients(float("nan")), gradients(0.0)):
        assert torch.equal(got, want)
    with pytest.raises(RuntimeError, match="no skip part of 6 channels"):
        functional.concat_parts(torch.empty(1, 5, 2, 2), 6)


@pytest.mark.parametrize("exact", [False, True])
@pytest.mark.parametrize("training", [True, False])
def test_gradgradcheck_both_blocks(exact, training):
    """Double backward: where autograd records the backward (create_graph=True), the fused blocks' gradients are
    differentiable and right (float64 finite differences of the first derivative)."""
    inputs, (rm, rv) = double_block_inputs()
    torch.autograd.gradgradcheck(double_block_function(training, exact, True, rm, rv), inputs, eps=1e-6, atol=1e-4,
                                 rtol=1e-3)
    inputs, (rm, rv) = up_block_inputs()
    torch.autograd.gradgradcheck(up_block_function(training, exact, rm, rv), inputs, eps=1e-6, atol=1e-4, rtol=1e-3)


def test_sub_pixel_weights_equal_upsample_then_conv():
    x = torch.randn(2, 5, 4, 3, dtype=torch.float64)
    w = torch.randn(4, 5, 3, 3, dtype=torch.float64)
    want = torch.nn.functional.conv2d(torch.nn.functional.interpolate(x, scale_factor=2), w, padding=1)
    z4 = torch.nn.functional.conv2d(x, functional.phase_weights(w).double(), padding=1)
    torch.testing.assert_close(ops.to_logical(z4, 2), want, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("layout", [torch.contiguous_format, torch.channels_last, "taps outermost"])
def test_sub_pixel_weight_gradient_is_the_adjoint_of_phase_weights(layout):
    """phase_weights_backward is autograd's vector-Jacobian product of phase_weights, whatever dw4's strides."""
    o, i = 5, 3
    w = torch.randn(o, i, 3, 3, dtype=torch.float64, requires_grad=True)
    dw4 = torch.randn(2, 2, 4 * o, i, dtype=torch.float64).permute(2, 3, 0, 1)  # taps outermost
    if layout != "taps outermost":
        dw4 = dw4.contiguous(memory_format=layout)
    want, = torch.autograd.grad(functional.phase_weights(w), w, dw4)
    got = functional.phase_weights_backward(dw4, o)
    assert got.is_contiguous()
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


def train_choice(x, weight):
    """The algorithm policy.train_conv picks for fast mode's training conv of ``x`` by ``weight``."""
    return policy.train_conv(policy.Layer.of(x, weight, train=True)).algorithm


@pytest.mark.parametrize("shape", [(2, 24, 16, 8, 10), (1, 8, 40, 9, 13), (3, 16, 16, 16, 5)])
def test_shifted_gemm_sub_pixel_backward_matches_aten(shape, conv_policy):
    """The channels_last sub-pixel conv's backward by shifted GEMMs (conv.gemm.shifted_backward) against
    ATen's in float64, both gradients and each alone, odd sizes included; dx in channels_last. (One image of few
    values would run the im2col GEMMs where ATen's own conv is im2col: that choice is held off here.)"""
    conv_policy(gemm_train_where_aten_im2col=False)
    n, cin, cout, h, w = shape
    x = torch.randn(n, cin, h, w).contiguous(memory_format=torch.channels_last)
    weight = torch.randn(cout, cin, 2, 2)
    dz = torch.randn(n, cout, h + 1, w + 1).contiguous(memory_format=torch.channels_last)
    assert train_choice(x, weight) == "shifted_gemm"
    assert train_choice(x.contiguous(), weight) == "aten"
    x64, w64 = x.double().requires_grad_(), weight.double().requires_grad_()
    dx64, dw64 = torch.autograd.grad(F.conv2d(x64, w64, padding=1), (x64, w64), dz.double())
    dx, dw = training.backward(dz, x, weight, [True, True])
    assert dx.is_contiguous(memory_format=torch.channels_last) and dx.dtype == dw.dtype == torch.float32
    torch.testing.assert_close(dx.double(), dx64, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(dw.double(), dw64, rtol=1e-5, atol=1e-4)
    only_dx, none = gemm.shifted_backward(dz, x, weight, [True, False])
    none_, only_dw = gemm.shifted_backward(dz, x, weight, [False, True])
    assert none is None and none_ is None
    assert torch.equal(only_dx, dx) and torch.equal(only_dw, dw)


@pytest.mark.parametrize("memory_format", FORMATS)
@pytest.mark.parametrize("c", CHANNELS)
def test_reductions_over_many_chunks_do_not_depend_on_the_thread_count(memory_format, c):
    """Enough cell rows for every chunk of the CPU reductions (and uneven ones); bitwise the same results
    with one thread and with several, since the chunks are fixed and summed in order."""
    grad, grad_pooled, z, scale, shift = backward_case(1, True, memory_format, c=c, h=154, w=10)
    mean = torch.randn(scale.numel())
    threads = torch.get_num_threads()
    results = []
    try:
        for n in (1, max(2, threads)):
            torch.set_num_threads(n)
            sums = LIB.bn_relu_backward_reduce(grad, grad_pooled, z, scale, shift, mean, 1)
            results.append((LIB.bn_stats(z, 1), sums))
    finally:
        torch.set_num_threads(threads)
    (stats, sums), (stats2, sums2) = results
    for got, want in zip(stats + sums, stats2 + sums2):
        assert torch.equal(got, want)
    z64 = z.double()
    torch.testing.assert_close(stats[0].double(), z64.mean((0, 2, 3)), rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(stats[1].double(), z64.var((0, 2, 3), unbiased=False), rtol=1e-5, atol=0)
    want_sums = ops.bn_relu_backward_reduce_ref(grad, grad_pooled, z, scale, shift, mean, 1)
    for got, want in zip(sums, want_sums):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-4)


def laid_out(t, layout):
    """``t`` in one of the layouts the CPU kernels tell apart (csrc/cpu_lines.h): "nchw" (unit width stride: lines
    along the width), "channels_last" (unit channel stride: lines along the channels) and "strided" (neither: the
    per-cell loops)."""
    if layout == "strided":
        return t.transpose(2, 3).contiguous().transpose(2, 3)
    return t.contiguous(memory_format=torch.channels_last if layout == "channels_last" else torch.contiguous_format)


LINE_ISAS = ["portable", "avx2", "avx512"]
# Every dtype under each of the line loops' instruction sets (csrc/cpu_lines.h): the portable loops; the backward
# lines in AVX2 intrinsics, float16 chunks converted with F16C in AVX2 or in AVX-512 vectors.
DTYPE_ISAS = [pytest.param(dtype, isa, id=f"{str(dtype)[6:]}-{isa}")
              for dtype in (torch.float32, torch.bfloat16, torch.float16) for isa in LINE_ISAS]


@contextlib.contextmanager
def line_isa(name):
    """The CPU line loops' instruction set set to ``name`` inside the block; skips the test where this CPU lacks
    it."""
    if name not in _ext._C.supported_line_isas():
        pytest.skip(f"this CPU cannot run the {name} line loops")
    previous = _ext._C.set_line_isa(name)
    try:
        yield
    finally:
        _ext._C.set_line_isa(previous)


def test_line_isas_are_named_and_checked():
    """Unknown names are an error naming the choices; the portable loops run on every CPU."""
    assert "portable" in _ext._C.supported_line_isas()
    with pytest.raises(ValueError, match="portable, avx2 or avx512"):
        _ext._C.set_line_isa("sse")


@pytest.mark.parametrize("dtype, isa", DTYPE_ISAS)
@pytest.mark.parametrize("layout", ["nchw", "channels_last", "strided"])
@pytest.mark.parametrize("upscale", [1, 2])
@pytest.mark.parametrize("hw", [(8, 38), (7, 37)])
@pytest.mark.parametrize("values", [random, quantised])
def test_long_lines_and_border_cells_match_reference(dtype, isa, layout, upscale, hw, values):
    """Lines long enough for the vector loops' bodies and remainders (19 channels; 18-37 cells a row), next to
    the per-cell code on the cells of an odd size's last row and column and the up block's border; every op
    against its specification (elementwise ops bitwise), outputs poisoned so that unwritten elements show. In
    bfloat16 and float16 the lines widen to float32 and round once on store: the elementwise results equal the
    specification's and, bit for bit, the per-cell code's (the "strided" layout) on the same values."""
    with line_isa(isa):
        check_lines_against_reference(dtype, layout, upscale, 2, 19, *hw, values)


@pytest.mark.parametrize("dtype, isa", DTYPE_ISAS)
@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
def test_lines_longer_than_a_chunk_match_reference(dtype, isa, layout):
    """Lines of 16-bit tensors go through float32 buffers a chunk (256 elements) at a time: lines of 300 channels
    (channels_last) or 265 cells (a row of 530 pixels), so that a chunk boundary falls inside every line."""
    c, w = (300, 4) if layout == "channels_last" else (3, 530)
    with line_isa(isa):
        for upscale in (1, 2):
            check_lines_against_reference(dtype, layout, upscale, 2, c, 2, w, random)


@pytest.mark.parametrize("dtype, isa", DTYPE_ISAS)
@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
@pytest.mark.parametrize("upscale", [1, 2])
@pytest.mark.parametrize("hw", [(8, 38), (7, 37)])
def test_relu_pool_backward_of_unit_vectors_matches_reference(dtype, isa, layout, upscale, hw):
    """Scale 1 and shift 0 in every channel (exact mode: the ReLU and max-pool of ATen's BN output) take lines that
    do not recompute BN+ReLU (csrc/cpu_lines.h, line_activation): bitwise the specification and the per-cell code,
    on windows with ties, NaNs, negative zeros and no positive value; with one channel's shift off 0 the general
    lines give the same bits too."""
    n, c, (h, w) = 2, 19, hw
    z = quantised(n, upscale * upscale * c, h + upscale - 1, w + upscale - 1, dtype=dtype)
    z[z == 0] = torch.where(torch.rand(int((z == 0).sum())) < 0.5, -0.0, 0.0).to(dtype)
    z[:, ::c] = -z[:, ::c].abs() - 0.5  # channel 0 (with upscale 2 its 4 phases, c apart): no positive value
    z = laid_out(z, layout)
    _, _, out_h, out_w = ops.logical_shape(z, upscale)
    grad = laid_out(torch.randn(n, c, out_h, out_w, dtype=dtype), layout)
    pool = out_h % 2 == 0
    grad_pooled = laid_out(torch.randn(n, c, out_h // 2, out_w // 2, dtype=dtype), layout) if pool else None
    for shift_of_last in (0.0, 2.0**-30):
        scale, shift = torch.ones(c), torch.zeros(c)
        shift[-1] = shift_of_last
        with line_isa(isa):
            got = LIB.relu_pool_backward(grad, grad_pooled, z, scale, shift, upscale)
            per_cell = LIB.relu_pool_backward(*(None if t is None else laid_out(t, "strided")
                                                for t in (grad, grad_pooled, z)), scale, shift, upscale)
        want = ops.relu_pool_backward_ref(grad, grad_pooled, z, scale, shift, upscale)
        assert torch.equal(got.isnan(), want.isnan()) and torch.equal(got.nan_to_num(7.0), want.nan_to_num(7.0))
        assert torch.equal(bits(got), bits(per_cell))


def bits(t):
    """The bit patterns of t's elements, in logical order."""
    return t.contiguous().view({2: torch.int16, 4: torch.int32}[t.element_size()])


def check_lines_against_reference(dtype, layout, upscale, n, c, h, w, values):
    """Every op on n x c x h x w (logical output) in ``layout`` against its specification: the body of the two
    tests above."""
    pool = h % 2 == 0 or upscale == 2
    z = laid_out(values(n, upscale * upscale * c, h + upscale - 1, w + upscale - 1, dtype=dtype), layout)
    scale, shift = torch.randn(c), torch.randn(c)
    shape = ops.logical_shape(z, upscale)
    extra = 5
    buf = laid_out(torch.full((n, c + 2 * extra, *shape[2:]), float("nan"), dtype=dtype), layout)
    out = buf.narrow(1, extra, c)
    pooled_shape = (n, c, shape[2] // 2, shape[3] // 2)
    pooled = laid_out(torch.full(pooled_shape, float("nan"), dtype=dtype), layout) if pool else None
    LIB.bn_relu_pool(z, scale, shift, upscale, out, pooled)
    want = torch.empty(shape, dtype=dtype)
    want_pool = torch.empty(pooled_shape, dtype=dtype) if pool else None
    ops.bn_relu_pool_ref(z, scale, shift, upscale, want, want_pool)
    assert torch.equal(out.nan_to_num(123.0), want.nan_to_num(123.0))
    assert buf.narrow(1, 0, extra).isnan().all() and buf.narrow(1, extra + c, extra).isnan().all()
    if pool:
        assert torch.equal(pooled.nan_to_num(123.0), want_pool.nan_to_num(123.0))

    grad = laid_out(torch.randn(shape, dtype=dtype), layout)
    grad_pooled = laid_out(torch.randn(pooled_shape, dtype=dtype), layout) if pool else None
    args = (grad, grad_pooled, z, scale, shift)
    got = LIB.relu_pool_backward(*args, upscale)
    assert torch.equal(got, ops.relu_pool_backward_ref(*args, upscale))

    z_finite = z.nan_to_num(0.5)
    mean, var = LIB.bn_stats(z_finite, upscale)
    z64 = ops.to_logical(z_finite, upscale).double()
    torch.testing.assert_close(mean.double(), z64.mean((0, 2, 3)), rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(var.double(), z64.var((0, 2, 3), unbiased=False), rtol=1e-5, atol=1e-7)
    args = (grad, grad_pooled, z_finite, scale, shift)
    mean, invstd = torch.randn(c), torch.rand(c) + 0.5
    sums = LIB.bn_relu_backward_reduce(*args, mean, upscale)
    want_sums = ops.bn_relu_backward_reduce_ref(*args, mean, upscale)
    for got, want in zip(sums, want_sums):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-4)
    dz = LIB.bn_relu_backward_apply(*args, mean, invstd, *want_sums, upscale)
    tolerance = {torch.float32: 1e-5, torch.bfloat16: 1e-2, torch.float16: 1e-3}[dtype]
    torch.testing.assert_close(dz, ops.bn_relu_backward_apply_ref(*args, mean, invstd, *want_sums, upscale),
                               rtol=tolerance, atol=1e-4 if dtype == torch.bfloat16 else 1e-6)
    if layout != "strided":
        per_cell = [laid_out(t, "strided") if t is not None and t.dim() == 4 else t for t in args]
        assert torch.equal(dz, LIB.bn_relu_backward_apply(*per_cell, mean, invstd, *want_sums, upscale))


@pytest.mark.parametrize("dtype, isa", DTYPE_ISAS[3:])
@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
def test_16_bit_lines_convert_every_value_as_aten(dtype, isa, layout):
    """The lines' own 16-bit conversions (csrc/cpu_lines.h) on every bit pattern: each of 6 channels holds all 65536
    values of z and of the output's gradient (NaNs, infinities, subnormals included), scaled by factors whose products
    round to subnormals, overflow and land on ties; bn_relu_pool and relu_pool_backward equal the specification, which
    converts with ATen, bit for bit (NaNs compared as NaNs), and the per-cell code, which converts with c10, in every
    bit (NaNs as c10's: 0x7fc0 in bfloat16, 0x7e00 in float16, with the sign)."""
    with line_isa(isa):
        check_every_value(dtype, layout)


def check_every_value(dtype, layout):
    """The body of test_16_bit_lines_convert_every_value_as_aten."""
    c = 6
    every = torch.arange(-(2**15), 2**15, dtype=torch.int32).to(torch.int16).view(dtype)
    z = laid_out(torch.stack([every[torch.randperm(every.numel())] for _ in range(c)]).view(1, c, 256, 256), layout)
    scale = torch.tensor([1.0, -1.0, 3.0, 2.0**-9, 1.0 + 2.0**-9, 0.1]) * torch.where(torch.rand(c) < 0.5, 1.0, 1.5)
    shift = torch.tensor([0.0, 0.0, 0.0, 0.0, 2.0**-20, -0.25])
    out = laid_out(torch.full((1, c, 256, 256), float("nan"), dtype=dtype), layout)
    pooled = laid_out(torch.full((1, c, 128, 128), float("nan"), dtype=dtype), layout)
    LIB.bn_relu_pool(z, scale, shift, 1, out, pooled)
    want, want_pool = torch.empty_like(out), torch.empty_like(pooled)
    ops.bn_relu_pool_ref(z, scale, shift, 1, want, want_pool)
    for got, expected in ((out, want), (pooled, want_pool)):
        assert torch.equal(got.isnan(), expected.isnan()) and torch.equal(got.nan_to_num(0), expected.nan_to_num(0))
    per_cell, per_cell_pool = laid_out(torch.empty_like(out), "strided"), laid_out(torch.empty_like(pooled), "strided")
    LIB.bn_relu_pool(laid_out(z, "strided"), scale, shift, 1, per_cell, per_cell_pool)
    for got, expected in ((out, per_cell), (pooled, per_cell_pool)):
        assert torch.equal(got.view(torch.int16), expected.view(torch.int16))
    grad = laid_out(every[torch.randperm(every.numel())].view(1, 1, 256, 256).expand(1, c, 256, 256), layout)
    grad_pooled = laid_out(torch.randn(1, c, 128, 128, dtype=dtype), layout)
    got = LIB.relu_pool_backward(grad, grad_pooled, z, scale, shift, 1)
    want = ops.relu_pool_backward_ref(grad, grad_pooled, z, scale, shift, 1)
    assert torch.equal(got.isnan(), want.isnan()) and torch.equal(got.nan_to_num(0), want.nan_to_num(0))
    per_cell = LIB.relu_pool_backward(*(laid_out(t, "strided") for t in (grad, grad_pooled, z)), scale, shift, 1)
    assert torch.equal(got.view(torch.int16), per_cell.view(torch.int16))


class Copies(TorchDispatchMode):
    """Records the copies (clone, copy_, _to_copy) made of ``tensor``'s memory while it is active."""

    def __init__(self, tensor):
        super().__init__()
        self.data_ptr, self.copies = tensor.untyped_storage().data_ptr(), []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        source = {torch.ops.aten.clone.default: 0, torch.ops.aten._to_copy.default: 0, torch.ops.aten.copy_.default: 1}
        if func in source and args[source[func]].untyped_storage().data_ptr() == self.data_ptr:
            self.copies.append(func)
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("k", [3, 2])
@pytest.mark.parametrize("weight_format", FORMATS)
@pytest.mark.parametrize("memory_format", FORMATS)
def test_gemm_training_convs_match_aten(k, memory_format, weight_format, conv_policy):
    """Fast mode's few-pixel training convs (im2col and GEMMs, forced on through the policy on any CPU) against
    ATen's convolution in float64: the output and both gradients, in the input's and weights' layouts, in every
    pairing of the two; the weights are read as they lie and their gradient made in their layout, never copied."""
    n, cin, cout, h, w = 2, 40, 24, 8, 6
    conv_policy(gemm_train_max_pixels=h * w)
    assert train_choice(torch.empty(n, cin, h, w), torch.empty(cout, cin, k, k)) == "gemm"
    assert train_choice(torch.empty(n, cin, h, w + 1), torch.empty(cout, cin, k, k)) != "gemm"
    x = torch.randn(n, cin, h, w).contiguous(memory_format=memory_format)
    weight = torch.randn(cout, cin, k, k).contiguous(memory_format=weight_format)
    dz = torch.randn(n, cout, h + 3 - k, w + 3 - k)
    x64, w64 = x.double().requires_grad_(), weight.double().requires_grad_()
    z64 = F.conv2d(x64, w64, padding=1)
    dx64, dw64 = torch.autograd.grad(z64, (x64, w64), dz.double())
    with Copies(weight) as recorded:
        z = training.forward(x, weight)
        dx, dw = training.backward(dz.contiguous(memory_format=memory_format), x, weight, [True, True])
    assert recorded.copies == []
    for got, want, layout in ((z, z64, memory_format), (dx, dx64, memory_format), (dw, dw64, weight_format)):
        assert got.dtype == torch.float32 and got.is_contiguous(memory_format=layout)
        torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-4)
    assert training.backward(dz, x, weight, [False, True])[0] is None


class ConvLayouts(TorchDispatchMode):
    """Records the memory format and the strides of the input of each ATen convolution and convolution backward."""

    def __init__(self):
        super().__init__()
        self.layouts, self.strides = [], []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        convs = {torch.ops.aten.convolution.default: 0, torch.ops.aten.convolution_backward.default: 1}
        if func in convs:
            self.layouts.append(ops.memory_format_of(args[convs[func]]))
            self.strides.append(args[convs[func]].stride())
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("size, moved", [(16, True), (20, False)])
@pytest.mark.parametrize("weight_format", FORMATS)
@pytest.mark.parametrize("memory_format", FORMATS)
def test_aten_training_convs_run_in_the_weights_layout_where_they_outnumber_the_activations(
        size, moved, memory_format, weight_format, conv_policy):
    """Fast mode's ATen training conv (neither GEMMs nor Winograd) of 64 -> 64 channels: at 16 x 16 pixels the
    weights outnumber the activations in and out, and where the two layouts differ the conv and its backward run in
    the weights' (policy.conv_layout), the output and input gradient then moved to x's layout, the weight
    gradient in the weights'; at 20 x 20 they run as the activations lie. Either way the output and both gradients
    match ATen's in float64. (At one image of 16 x 16 ATen's own conv is im2col, whose GEMMs are held off here.)"""
    conv_policy(winograd_train=False, gemm_train_where_aten_im2col=False)
    x = torch.randn(1, 64, size, size).contiguous(memory_format=memory_format)
    weight = torch.randn(64, 64, 3, 3).contiguous(memory_format=weight_format)
    dz = torch.randn(1, 64, size, size).contiguous(memory_format=memory_format)
    assert train_choice(x, weight) == "aten"
    x64, w64 = x.double().requires_grad_(), weight.double().requires_grad_()
    z64 = F.conv2d(x64, w64, padding=1)
    dx64, dw64 = torch.autograd.grad(z64, (x64, w64), dz.double())
    with ConvLayouts() as recorded:
        z = training.forward(x, weight)
        dx, dw = training.backward(dz, x, weight, [True, True])
    ran_in = weight_format if moved else memory_format
    assert recorded.layouts == [ran_in, ran_in]
    for got, want, layout in ((z, z64, memory_format), (dx, dx64, memory_format), (dw, dw64, weight_format)):
        assert got.dtype == torch.float32 and (not moved or got.is_contiguous(memory_format=layout))
        torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-4)
    assert training.backward(dz, x, weight, [False, True])[0] is None


@pytest.mark.parametrize("moved", [True, False])
def test_aten_training_convs_of_one_pixel_run_in_the_weights_nchw(moved, conv_policy):
    """A [N, C, 1, 1] activation (the bottleneck of a 16 x 16 input) is both layouts; made channels_last, its
    strides say so to ATen, which then ran the conv in channels_last and laid NCHW weights out anew at every call.
    Fast mode's ATen training conv hands ATen NCHW strides, moved to the weights' layout or not (its layout is NCHW
    for ops.memory_format_of): the conv and its backward see them, the weight gradient comes back NCHW, and the
    results match ATen's in float64."""
    conv_policy(winograd_train=False, gemm_train_where_aten_im2col=False, aten_conv_in_weights_layout=moved)
    x = torch.empty(2, 64, 1, 1, memory_format=torch.channels_last).copy_(torch.randn(2, 64, 1, 1))
    dz = torch.empty(2, 64, 1, 1, memory_format=torch.channels_last).copy_(torch.randn(2, 64, 1, 1))
    weight = torch.randn(64, 64, 3, 3)
    assert x.stride() == (64, 1, 64, 64) and train_choice(x, weight) == "aten"
    with ConvLayouts() as recorded:
        z = training.forward(x, weight)
        dx, dw = training.backward(dz, x, weight, [True, True])
    assert recorded.strides == [(64, 1, 1, 1), (64, 1, 1, 1)] and dw.is_contiguous()
    x64, w64 = x.double().requires_grad_(), weight.double().requires_grad_()
    z64 = F.conv2d(x64, w64, padding=1)
    dx64, dw64 = torch.autograd.grad(z64, (x64, w64), dz.double())
    for got, want in ((z, z64), (dx, dx64), (dw, dw64)):
        torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("n", [1, 2])
def test_reference_scatter_of_the_phases_in_channels_last(n):
    """ops.from_logical (the references' scatter back to the sub-pixel phases' layout) in channels_last gives the
    NCHW result's values, one image included (its 6-D view of a channels_last tensor once aliased the output)."""
    c, h, w = 3, 3, 5
    y = torch.randn(n, c, 2 * h, 2 * w)
    z = torch.randn(n, 4 * c, h + 1, w + 1)
    want = ops.from_logical(y, z, 2)
    got = ops.from_logical(y, z.contiguous(memory_format=torch.channels_last), 2)
    assert got.is_contiguous(memory_format=torch.channels_last) and torch.equal(got, want)
    assert torch.equal(want[:, :c, :h, :w], y[:, :, 0::2, 0::2]) and torch.equal(want[:, 3 * c:, 1:, 1:],
                                                                                  y[:, :, 1::2, 1::2])
