"""Winograd F(2x2, 3x3) on the CPU (fastunet.conv.winograd): the compiled ops give their references' bits (layouts, odd
sizes, chunks of tiles, unwritten elements poisoned), the references are the convolution and its input gradient
(float64), bad arguments get errors naming them, and fast-mode CPU inference through them stays within 2x of the
seed's error against float64."""

import pytest
import torch
import torch.nn.functional as F
from helpers import assert_within_twice_reference_error, eval_models, ran_under_avx2_kernels, relative_error, train_step
from test_model import well_conditioned_fast_pair

from fastunet import ops
from fastunet.conv import policy, winograd

pytestmark = pytest.mark.skipif(ops.backend_for("cpu") != "compiled", reason="needs the compiled CPU ops")


def laid_out(x, layout):
    """x in NCHW, channels_last, or as a channel slice of a wider channels_last tensor (neither stride 1 nor
    dense)."""
    if layout == "nchw":
        return x.contiguous()
    if layout == "channels_last":
        return x.contiguous(memory_format=torch.channels_last)
    n, c, h, w = x.shape
    wide = torch.randn(n, c + 5, h, w).contiguous(memory_format=torch.channels_last)
    wide[:, 2:2 + c] = x
    return wide[:, 2:2 + c]


@pytest.mark.parametrize("transposed", [False, True])
@pytest.mark.parametrize("scaled", [False, True])
@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
def test_weights_are_the_reference_bits(transposed, scaled, layout):
    weight = laid_out(torch.randn(37, 21, 3, 3), layout)  # 37: blocks of 16 output columns and a partial one
    scale = torch.rand(37) + 0.5 if scaled else None
    u = winograd.weights(weight, scale, transposed)
    want = torch.full(u.shape, float("nan"))
    winograd.winograd_weights_ref(weight, scale, transposed, want)
    assert u.shape == ((16, 37, 21) if transposed else (16, 21, 37))
    assert torch.equal(u, want)


@pytest.mark.parametrize("layout", ["nchw", "channels_last", "slice"])
@pytest.mark.parametrize("shape", [(2, 19, 12, 10), (1, 8, 7, 9), (3, 5, 2, 3)])
def test_input_and_output_transforms_are_the_reference_bits(layout, shape):
    x = laid_out(torch.randn(shape), layout)
    tiles = winograd._tiles(x)
    first, count = 1, tiles - 2  # an inner range: the tiles before and after must stay unwritten
    v = torch.full((16, count, shape[1]), float("nan"))
    want = v.clone()
    torch.ops.fastunet.winograd_input(x, first, v)
    winograd.winograd_input_ref(x, first, want)
    assert torch.equal(v, want)
    cout = 13
    m = torch.randn(16, count, cout)
    m[0, 0, 4] = float("nan")  # reaches output (0, 0) of the range's first tile, inside every image
    bias = torch.randn(cout)
    for relu, b in ((True, bias), (False, None)):
        out = laid_out(torch.full((shape[0], cout, shape[2], shape[3]), 1e30), layout)
        expected = out.clone()
        torch.ops.fastunet.winograd_output(m, b, relu, first, out)
        winograd.winograd_output_ref(m, b, relu, first, expected)
        assert torch.equal(out.isnan(), expected.isnan()) and out.isnan().any()
        assert torch.equal(out.nan_to_num(), expected.nan_to_num())
        assert (out == 1e30).any()  # the pixels of the tiles outside the range kept their poison


@pytest.mark.parametrize("shape", [(2, 6, 9, 7), (1, 4, 8, 8), (1, 3, 1, 5)])
def test_references_are_the_convolution_and_its_input_gradient(shape):
    x = torch.randn(shape, dtype=torch.float64)
    weight, bias, scale = torch.randn(5, shape[1], 3, 3, dtype=torch.float64), torch.randn(5), torch.rand(5) + 0.5
    bias, scale = bias.double(), scale.double()
    tiles, n, _, h, w = winograd._tiles(x), *shape
    u = torch.empty(16, shape[1], 5, dtype=torch.float64)
    winograd.winograd_weights_ref(weight, scale, False, u)
    v = torch.empty(16, tiles, shape[1], dtype=torch.float64)
    winograd.winograd_input_ref(x, 0, v)
    out = torch.empty(n, 5, h, w, dtype=torch.float64)
    winograd.winograd_output_ref(torch.bmm(v, u), bias, True, 0, out)
    want = F.conv2d(x, weight * scale.view(-1, 1, 1, 1), bias, padding=1).relu()
    torch.testing.assert_close(out, want, rtol=1e-12, atol=1e-12)

    grad = torch.randn(n, 5, h, w, dtype=torch.float64)
    x.requires_grad_()
    F.conv2d(x, weight, padding=1).backward(grad)
    ut = torch.empty(16, 5, shape[1], dtype=torch.float64)
    winograd.winograd_weights_ref(weight, None, True, ut)
    vg = torch.empty(16, tiles, 5, dtype=torch.float64)
    winograd.winograd_input_ref(grad, 0, vg)
    dx = torch.empty(shape, dtype=torch.float64)
    winograd.winograd_output_ref(torch.bmm(vg, ut), None, False, 0, dx)
    torch.testing.assert_close(dx, x.grad, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("layout", ["nchw", "channels_last", "slice"])
def test_conv_in_chunks_is_the_reference_conv(layout):
    """winograd_conv3x3 in one chunk (every thread on each step) and in chunks (a thread each), odd sizes included:
    the reference's result up to the GEMM's order of summation, which may differ with the number of rows."""
    x = laid_out(torch.randn(2, 24, 15, 18), layout)  # 2 x 8 x 9 = 144 tiles
    weight, bias = torch.randn(40, 24, 3, 3), torch.randn(40)
    u = winograd.weights(weight).clone()
    want = laid_out(torch.full((2, 40, 15, 18), float("nan")), layout)
    winograd.winograd_conv3x3_ref(x, u, bias, True, 1, want)
    exact = F.conv2d(x.double(), weight.double(), bias.double(), padding=1).relu()
    # A sum's rounding scales with its terms, not its result (which cancels to near 0 in places): 1e-5 of the sum of
    # the terms' magnitudes, 170 units of float32 rounding, covers any order of 216 products on any CPU.
    magnitude = F.conv2d(x.abs().double(), weight.abs().double(), bias.abs().double(), padding=1)
    for chunk in (144, 7, 1):
        out = laid_out(torch.full((2, 40, 15, 18), float("nan")), layout)
        torch.ops.fastunet.winograd_conv3x3(x, u, bias, True, chunk, out)
        assert ((out.double() - want.double()).abs() <= 1e-5 * magnitude).all()
        assert relative_error(out, exact) <= 2 * relative_error(F.conv2d(x, weight, bias, padding=1).relu(), exact)


@pytest.mark.parametrize("layout", ["nchw", "channels_last", "slice"])
@pytest.mark.parametrize("shape", [(2, 6, 9, 7), (1, 24, 8, 10)])
def test_weight_gradient_is_the_convolution_s(layout, shape):
    """winograd_weight_grad in one chunk and in chunks (one accumulator per thread), odd sizes included, and its
    reference: the weight gradient of conv2d, within 2x of oneDNN's error against float64; the output poisoned."""
    x = laid_out(torch.randn(shape), layout)
    grad = laid_out(torch.randn(shape[0], 11, *shape[2:]), layout)
    weight = torch.zeros(11, shape[1], 3, 3, dtype=torch.float64, requires_grad=True)
    F.conv2d(x.double(), weight, padding=1).backward(grad.double())
    exact = weight.grad
    reference = torch.full((11, shape[1], 3, 3), float("nan"), dtype=torch.float64)
    winograd.winograd_weight_grad_ref(x.double(), grad.double(), 1, reference)
    torch.testing.assert_close(reference, exact, rtol=1e-12, atol=1e-12)
    weight32 = torch.zeros(11, shape[1], 3, 3, requires_grad=True)
    F.conv2d(x, weight32, padding=1).backward(grad)
    for chunk in (winograd._tiles(x), 5, 1):
        out = torch.full((11, shape[1], 3, 3), float("nan")).contiguous(memory_format=torch.channels_last)
        torch.ops.fastunet.winograd_weight_grad(x, grad, chunk, out)
        assert relative_error(out, exact) <= 2 * relative_error(weight32.grad, exact)


def test_bad_arguments_get_errors_naming_them():
    x, weight = torch.randn(1, 4, 6, 6), torch.randn(5, 4, 3, 3)
    with pytest.raises(RuntimeError, match="3x3 kernel"):
        winograd.weights(torch.randn(5, 4, 2, 2))
    with pytest.raises(RuntimeError, match="float32"):
        winograd.conv3x3(x.double(), winograd.weights(weight))
    with pytest.raises(RuntimeError, match="scale must be a float32 CPU vector of 5"):
        winograd.weights(weight, torch.ones(4))
    with pytest.raises(RuntimeError, match="outside the 9 tiles"):
        torch.ops.fastunet.winograd_input(x, 5, torch.empty(16, 6, 4))
    with pytest.raises(RuntimeError, match=r"m must be a contiguous float32 CPU tensor \[16, tiles, 5\]"):
        torch.ops.fastunet.winograd_output(torch.empty(16, 9, 4), None, False, 0, torch.empty(1, 5, 6, 6))
    with pytest.raises(RuntimeError, match="chunk_tiles must be positive"):
        torch.ops.fastunet.winograd_conv3x3(x, winograd.weights(weight), None, False, 0, torch.empty(1, 5, 6, 6))
    with pytest.raises(RuntimeError, match=r"grad_weight must be \[5, 4, 3, 3\]"):
        torch.ops.fastunet.winograd_weight_grad(x, torch.randn(1, 5, 6, 6), 3, torch.empty(4, 5, 3, 3))
    with pytest.raises(RuntimeError, match="does not match x"):
        torch.ops.fastunet.winograd_weight_grad(x, torch.randn(1, 5, 6, 5), 3, torch.empty(5, 4, 3, 3))
    with pytest.raises(RuntimeError, match=r"u must be float32 \[16, 4, 5\]"):
        torch.ops.fastunet.winograd_conv3x3(x, torch.empty(16, 5, 4), None, False, 3, torch.empty(1, 5, 6, 6))


@pytest.mark.parametrize("op", ["weights", "input", "output", "conv3x3", "weight_grad"])
def test_opcheck(op):
    x, weight = torch.randn(2, 6, 5, 4), torch.randn(3, 6, 3, 3)
    tiles = winograd._tiles(x)
    args = {
        "conv3x3": (x, winograd.weights(weight).clone(), torch.randn(3), True, 5, torch.empty(2, 3, 5, 4)),
        "weight_grad": (x, torch.randn(2, 3, 5, 4), 5, torch.empty(3, 6, 3, 3)),
        "weights": (weight, torch.rand(3), False, torch.empty(16, 6, 3)),
        "input": (x, 1, torch.empty(16, tiles - 1, 6)),
        "output": (torch.randn(16, tiles - 2, 3), torch.randn(3), True, 2, torch.randn(2, 3, 5, 4)),
    }[op]
    torch.library.opcheck(getattr(torch.ops.fastunet, f"winograd_{op}"), args)


def counted(calls, function):
    """``function``, appending its first argument's shape to ``calls`` at each call."""
    def call(x, *args, **kwargs):
        calls.append(x.shape)
        return function(x, *args, **kwargs)
    return call


def force_winograd(conv_policy):
    """Winograd for every fast-mode CPU 3x3 conv in inference, and in training for those above the GEMM path's
    pixels (where the policy's winograd_train allows it)."""
    conv_policy(winograd_min_channels=1, winograd_max_channels=1 << 20, winograd_min_pixels=1, winograd_inference=True)


@pytest.mark.parametrize("memory_format", [torch.contiguous_format, torch.channels_last])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_inference_through_winograd_is_within_twice_the_reference_error(monkeypatch, memory_format, seed, conv_policy):
    force_winograd(conv_policy)
    calls = []
    monkeypatch.setattr(winograd, "conv3x3", counted(calls, winograd.conv3x3))
    torch.manual_seed(seed)
    ref, fast, ref64 = eval_models()
    for model in (ref, fast):
        model.to(memory_format=memory_format)
    x = torch.randn(2, 3, 64, 48).contiguous(memory_format=memory_format)
    with torch.no_grad():
        out, want, exact = fast(x), ref(x), ref64(x.double())
    # Every 3x3 conv (Winograd comes before the GEMMs of few pixels in inference) but Up2's sub-pixel one (2 x 32 x
    # 24 low-resolution pixels in).
    assert len(calls) == 21
    assert out.stride() == want.stride()
    assert relative_error(out, exact) <= 2 * relative_error(want, exact) + 1e-7


@pytest.mark.parametrize("memory_format", [torch.contiguous_format, torch.channels_last])
@pytest.mark.parametrize("seed", [0, 1])
def test_training_through_winograd_is_within_twice_the_reference_error(monkeypatch, memory_format, seed, conv_policy,
                                                                      request):
    """Fast-mode training with every 3x3 conv above the GEMM bound as Winograd, forward and both gradients: the
    policy's choice with AVX2-class oneDNN kernels, judged there (ran_under_avx2_kernels)."""
    if ran_under_avx2_kernels(request):
        return
    conv_policy(winograd_train=True, gemm_train_max_pixels=policy.GEMM_TRAIN_MAX_PIXELS_AVX2)
    force_winograd(conv_policy)
    calls = []
    for name in ("conv3x3", "conv3x3_weight_grad"):
        monkeypatch.setattr(winograd, name, counted(calls, getattr(winograd, name)))
    torch.manual_seed(seed)
    ref, fast, ref64 = well_conditioned_fast_pair()
    for model in (ref, fast):
        model.to(memory_format=memory_format)
    x = torch.randn(2, 3, 64, 32).contiguous(memory_format=memory_format)
    g = torch.randn(2, 2, 64, 32)
    exact = train_step(ref64, x.double(), g.double())
    assert_within_twice_reference_error(train_step(fast, x, g), train_step(ref, x, g), exact)
    # Levels 1-3 (above 64 pixels per image; fewer run as GEMMs): six block convs in the encoder and six in the
    # decoder, and the 3x3 up-convs of Up4 and Up3 on their upsampled inputs (Up2's 1024 low-resolution pixels
    # take the sub-pixel 2x2 conv), each forward, as the input gradient (train_step's image requires grad) and as
    # the weight gradient.
    assert len(calls) == 3 * 14
