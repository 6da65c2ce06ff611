"""Inference on the CPU (blocks.inference._cpu_inference). Fast mode: oneDNN's convs with each eval BN folded in where
that pays, GEMMs for convs of few pixels, the sub-pixel up-conv where that pays, within 2x of the float32
reference's error against float64 in both layouts, a NaN where the seed puts it. Exact mode: the seed's ATen ops,
its bits. Taken only where nothing needs the Functions (no autograd, no autocast, eval BN, float32)."""

import copy
import gc

import pytest
import torch
from helpers import SIZE, pair, relative_error, well_conditioned

import fastunet
from fastunet import weight_cache
from fastunet.blocks import inference
from fastunet.conv import aten as conv_aten
from fastunet.conv import policy, winograd

CONVS_3X3 = 22  # ten in the encoder's blocks, eight in the decoder's, four up-convs


@pytest.fixture
def conv_calls(monkeypatch):
    """The weight shapes of the convs of CPU inference: folded (conv.aten.conv_relu), unfolded, as a GEMM and by
    Winograd; in
    ``conv_calls.pixels``, for each 3x3 conv, (pixels per batch of its input, the fewer of its input and output
    channels, whether it ran as a GEMM)."""
    calls = Calls()
    folded, unfolded, gemm = conv_aten.conv_relu, inference._unfolded_conv_bn_relu, inference._gemm_conv_bn_relu
    winograd = inference._winograd_conv_bn_relu

    def counted(run, as_gemm):
        def call(x, conv, *args):
            weight = conv if isinstance(conv, torch.Tensor) else conv[0]
            calls.append(tuple(weight.shape))
            if weight.shape[2:] == (3, 3):
                calls.pixels.append((x.shape[0] * x.shape[2] * x.shape[3], min(weight.shape[:2]), as_gemm))
            return run(x, conv, *args)
        return call

    monkeypatch.setattr(conv_aten, "conv_relu", counted(folded, False))
    monkeypatch.setattr(inference, "_unfolded_conv_bn_relu", counted(unfolded, False))
    monkeypatch.setattr(inference, "_gemm_conv_bn_relu", counted(gemm, True))
    monkeypatch.setattr(inference, "_winograd_conv_bn_relu", counted(winograd, False))
    return calls


class Calls(list):
    """conv_calls' list of weight shapes, with ``pixels``."""

    def __init__(self):
        super().__init__()
        self.pixels = []


def trained_state_models():
    """(seed U-Net, fastunet, float64 seed U-Net) in eval, well conditioned, with running stats away from (0, 1)."""
    ref, fast = pair(exact=False)
    well_conditioned(ref, fast)
    with torch.no_grad():
        for bn in (b for b in ref.modules() if isinstance(b, torch.nn.BatchNorm2d)):
            bn.running_mean.copy_(torch.randn(bn.num_features) * 0.2)
            bn.running_var.copy_(torch.rand(bn.num_features) + 0.5)
    fast.load_state_dict(ref.state_dict())
    return ref.eval(), fast.eval(), copy.deepcopy(ref).double().eval()


@pytest.mark.parametrize("memory_format", [torch.contiguous_format, torch.channels_last])
@pytest.mark.parametrize("shape", [(2, 64, 64), (1, 48, 64)])
def test_cpu_inference_is_within_twice_the_reference_error(conv_calls, memory_format, shape):
    ref, fast, ref64 = trained_state_models()
    for model in (ref, fast):
        model.to(memory_format=memory_format)
    batch, h, w = shape
    x = torch.randn(batch, 3, h, w).contiguous(memory_format=memory_format)
    with torch.no_grad():
        out, want, exact = fast(x), ref(x), ref64(x.double())
    assert len(conv_calls) == CONVS_3X3
    # Up2's input has 2 x 32 x 32 pixels at 64 x 64: its up-conv is the sub-pixel one; the others' the 3x3 one.
    subpixel = [call for call in conv_calls if call[2:] == (2, 2)]
    assert subpixel == ([(4 * 64, 128, 2, 2)] if batch * (h // 2) * (w // 2) >= policy.value("subpixel_min_pixels")
                        else [])
    # Up to gemm_max_pixels pixels per batch the convs are GEMMs, except where Winograd with kept weights pays: at
    # 2 x 64 x 64 level 5's two, at 1 x 48 x 64 level 5's two, level 4's five (48 pixels) and Conv3's first (192
    # pixels, 128 input channels).
    kept_pixels, kept_channels = policy.value("winograd_kept_min_pixels"), policy.value("winograd_kept_min_channels")
    assert [as_gemm for *_, as_gemm in conv_calls.pixels] == [
        pixels <= policy.value("gemm_max_pixels") and not (pixels >= kept_pixels and channels >= kept_channels)
        for pixels, channels, _ in conv_calls.pixels]
    assert sum(as_gemm for *_, as_gemm in conv_calls.pixels) == (2 if batch == 2 else 8)
    assert out.shape == want.shape and out.stride() == want.stride()
    assert relative_error(out, exact) <= 2 * relative_error(want, exact) + 1e-7
    assert relative_error(fast(x).detach(), exact) <= 2 * relative_error(want, exact) + 1e-7  # the Functions' path


@pytest.mark.parametrize("case", ["grad", "training", "autocast", "float64"])
def test_cpu_inference_only_where_nothing_needs_the_functions(conv_calls, case):
    ref, fast = pair(exact=False)
    if case != "training":
        ref.eval(), fast.eval()
    x = torch.randn(2, 3, SIZE, SIZE)
    if case == "float64":
        ref, fast, x = ref.double(), fast.double(), x.double()
    with torch.set_grad_enabled(case == "grad"), torch.autocast("cpu", torch.bfloat16, enabled=case == "autocast"):
        out, want = fast(x), ref(x)
    assert not conv_calls
    assert relative_error(out, want) < (3e-2 if case == "autocast" else 1e-4)  # the same model, other paths


@pytest.mark.parametrize("memory_format", [torch.contiguous_format, torch.channels_last])
def test_cpu_inference_keeps_a_nan_where_the_seed_does(conv_calls, memory_format):
    ref, fast, _ = trained_state_models()
    for model in (ref, fast):
        model.to(memory_format=memory_format)
    x = torch.randn(2, 3, 64, 64)
    x[1, 0, 5, 7] = float("nan")
    x = x.contiguous(memory_format=memory_format)
    with torch.no_grad():
        out, want = fast(x), ref(x)
    assert conv_calls and torch.isnan(want[1]).any() and not torch.isnan(want[0]).any()
    assert torch.equal(torch.isnan(out), torch.isnan(want))


@pytest.mark.parametrize("output_ch", [1, 3])
def test_nchw_input_runs_channels_last_inside(conv_calls, output_ch):
    """A plain fastunet U-Net turns an NCHW input into channels_last for CPU inference and gives its output back
    in NCHW: the same bits as a channels_last input, the seed's strides."""
    ref, fast = pair(exact=False, output_ch=output_ch)
    ref.eval(), fast.eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        out, want = fast(x), ref(x)
        out_cl = fast(x.contiguous(memory_format=torch.channels_last))
    assert conv_calls and out.stride() == want.stride()
    assert torch.equal(out, out_cl)


def test_hooked_layers_see_nchw_as_in_the_seed(conv_calls):
    ref, fast = pair(exact=False)
    ref.eval(), fast.eval()
    seen = {}

    def strides(name):
        def hook(module, args, out):
            seen[name] = (args[0].stride(), out.stride())
        return hook

    for name, model in (("seed", ref), ("fast", fast)):
        model.Conv3.conv[3].register_forward_hook(strides(name))
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        fast(x), ref(x)
    assert seen["fast"] == seen["seed"]


@pytest.mark.parametrize("memory_format", [torch.contiguous_format, torch.channels_last])
@pytest.mark.parametrize("shape", [(2, 64, 64), (1, 48, 64)])
def test_exact_cpu_inference_is_the_seed_bit_for_bit(conv_calls, memory_format, shape):
    ref, fast, _ = trained_state_models()
    fast.exact = True
    for model in (ref, fast):
        model.to(memory_format=memory_format)
    batch, h, w = shape
    x = torch.randn(batch, 3, h, w).contiguous(memory_format=memory_format)
    with torch.no_grad():
        out, want = fast(x), ref(x)
    assert len(conv_calls) == CONVS_3X3 and not any(as_gemm for *_, as_gemm in conv_calls.pixels)
    assert out.stride() == want.stride() and torch.equal(out, want)


def fresh_copy(model):
    """A new fastunet U-Net with model's state: tensors no kept derived weight was made from."""
    fresh = fastunet.U_Net(3, 2)
    fresh.load_state_dict(model.state_dict())
    return fresh.eval()


def channels_last_data(tensor):
    tensor.data = tensor.data.contiguous(memory_format=torch.channels_last)


WRITES = {
    "data": lambda m: m.Conv2.conv[3].weight.data.mul_(-0.5),
    "optimizer": lambda m: torch.optim.SGD(m.parameters(), lr=0.1).step(),
    "swapped parameter": lambda m: setattr(m.Conv2.conv[3], "weight", torch.nn.Parameter(torch.randn(128, 128, 3, 3))),
    "running var through data": lambda m: m.Conv3.conv[4].running_var.data.mul_(2),
    "BN weight": lambda m: m.Up_conv4.conv[1].weight.data.add_(1),
    "negative zero": lambda m: m.Conv2.conv[3].weight.data.view(-1)[::7].mul_(-1),
    "relaid out": lambda m: channels_last_data(m.Conv2.conv[3].weight),
}


@pytest.mark.parametrize("write", WRITES)
def test_kept_winograd_weights_follow_every_write(monkeypatch, write):
    """Fast CPU inference keeps Winograd's transformed weights between calls (fastunet.weight_cache): none is made
    again while the weights and BN stay, and after any write (through ``.data``, an optimizer, a swapped
    parameter, a BN buffer, a sign of zero, a new layout) the output is bit for bit a fresh model's."""
    _, fast, _ = trained_state_models()
    transforms = []
    for name in ("weights", "kept_weights"):
        monkeypatch.setattr(winograd, name, counted_calls(transforms, getattr(winograd, name)))
    for p in fast.parameters():
        p.grad = torch.randn_like(p)
    if write == "negative zero":
        with torch.no_grad():
            fast.Conv2.conv[3].weight.view(-1)[::7] = 0.0
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        first, second = fast(x), fast(x)
        made = len(transforms)
        third = fast(x)
        assert made > 0 and len(transforms) == made and torch.equal(second, first) and torch.equal(third, first)
        WRITES[write](fast)
        out = fast(x)
        assert len(transforms) > made
        assert torch.equal(out, fresh_copy(fast)(x))
        assert torch.equal(fast(x), out)


def test_kept_weights_made_under_inference_mode_are_remade_outside_it():
    """Weights kept by calls under torch.inference_mode() are made anew by a call under torch.no_grad() after a
    write, and the other way round (an inference tensor cannot be written outside inference mode)."""
    _, fast, _ = trained_state_models()
    x = torch.randn(2, 3, 64, 64)
    for first, then in ((torch.inference_mode, torch.no_grad), (torch.no_grad, torch.inference_mode)):
        with first():
            fast(x), fast(x)
        with torch.no_grad():
            fast.Conv3.conv[0].weight.mul_(-0.5)
        with then():
            out = fast(x)
        with torch.no_grad():
            assert torch.equal(out, fresh_copy(fast)(x))


def counted_calls(calls, function):
    def call(*args):
        calls.append(function.__name__)
        return function(*args)
    return call


def model_with_kept_weights():
    """(fast model, its input, the entries of fastunet.weight_cache before it): two inference calls made them."""
    gc.collect()  # earlier tests' models gone before counting
    entries = len(weight_cache._entries)
    _, fast, _ = trained_state_models()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        fast(x), fast(x)
    assert len(weight_cache._entries) > entries
    return fast, x, entries


def test_kept_weights_go_with_their_model():
    fast, _, entries = model_with_kept_weights()
    del fast
    gc.collect()
    assert len(weight_cache._entries) == entries


def test_training_frees_kept_weights():
    """A training step frees the entries its layers' weights had from inference (they would be stale after the
    step), and inference after it keeps them again, with the fresh model's bits."""
    fast, x, entries = model_with_kept_weights()
    fast.train()
    fast(x).square().mean().backward()
    torch.optim.SGD(fast.parameters(), lr=0.1).step()
    assert len(weight_cache._entries) == entries
    fast.eval()
    with torch.no_grad():
        fast(x), fast(x)
        assert len(weight_cache._entries) > entries
        assert torch.equal(fast(x), fresh_copy(fast)(x))


def test_weight_cache_compares_bits():
    """lookup: None at a weight's first call, made at the second, kept at the third, made anew after a write that
    torch.equal would not see (0.0 to -0.0), after a scale's write and after a new layout; a kept tensor is never
    written again (another thread may be reading it)."""
    weight = torch.randn(6, 4)
    weight[2, 1] = 0.0
    scale = torch.rand(6)
    made = []

    def make(w, s):
        made.append(w * s.view(-1, 1))
        return made[-1]

    lookup = lambda: weight_cache.lookup("test", (weight, scale), make)  # noqa: E731
    assert lookup() is None and not made
    kept = lookup()
    first = kept.clone()
    assert len(made) == 1 and torch.equal(kept, weight * scale.view(-1, 1))
    assert lookup() is kept and len(made) == 1
    weight.data[2, 1] = -0.0
    assert lookup() is made[-1] and len(made) == 2 and torch.signbit(made[-1][2, 1])
    scale.mul_(2)
    assert lookup() is made[-1] and len(made) == 3 and torch.equal(made[-1], weight * scale.view(-1, 1))
    weight.data = weight.data.t().contiguous().t()
    assert lookup() is made[-1] and len(made) == 4
    assert torch.equal(kept, first) and not torch.signbit(kept[2, 1])
    weight_cache.clear()
    assert lookup() is None


def test_weight_cache_can_be_turned_off(monkeypatch, conv_calls):
    """With fastunet.weight_cache off nothing is kept, and the convs of 128-256 pixels are GEMMs again (Winograd
    there pays only with kept weights): at 2 x 64 x 64 level 4's five and level 5's two."""
    monkeypatch.setattr(weight_cache, "enabled", False)
    entries = len(weight_cache._entries)
    weight = torch.randn(3, 2)
    make = lambda w: w.clone()  # noqa: E731
    assert all(weight_cache.lookup("test", (weight,), make) is None for _ in range(3))
    ref, fast, _ = trained_state_models()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        out, again, want = fast(x), fast(x), ref(x)
    assert len(weight_cache._entries) == entries and torch.equal(again, out)
    assert sum(as_gemm for *_, as_gemm in conv_calls.pixels) == 2 * 7
    assert relative_error(out, want) < 1e-4
