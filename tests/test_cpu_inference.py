"""Inference on the CPU (blocks.inference._cpu_inference). Fast mode: oneDNN's convs with each eval BN folded in where
that pays, GEMMs for convs of few pixels, the sub-pixel up-conv where that pays, within 2x of the float32
reference's error against float64 in both layouts, a NaN where the seed puts it. Exact mode: the seed's ATen ops,
its bits. Taken only where nothing needs the Functions (no autograd, no autocast, eval BN, float32); under
autocast, float32 GEMMs for the blocks whose weights outweigh their pixels."""

import gc

import pytest
import torch
from helpers import SIZE, eval_models, pair, relative_error, served_from_threads

import fastunet
from fastunet.blocks import inference
from fastunet.conv import aten as conv_aten
from fastunet.conv import policy

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


@pytest.mark.parametrize("memory_format", [torch.contiguous_format, torch.channels_last])
@pytest.mark.parametrize("shape", [(2, 64, 64), (1, 48, 64)])
def test_cpu_inference_is_within_twice_the_reference_error(conv_calls, memory_format, shape):
    ref, fast, ref64 = eval_models()
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
    # Up to gemm_max_pixels pixels per batch the convs are GEMMs (Winograd pays there only with prepacked weights,
    # in a snapshot): at 2 x 64 x 64 level 4's five and level 5's two, at 1 x 48 x 64 also level 3's five (192
    # pixels).
    assert [as_gemm for *_, as_gemm in conv_calls.pixels] == [
        pixels <= policy.value("gemm_max_pixels") for pixels, _, _ in conv_calls.pixels]
    assert sum(as_gemm for *_, as_gemm in conv_calls.pixels) == (7 if batch == 2 else 12)
    assert out.shape == want.shape and out.stride() == want.stride()
    assert relative_error(out, exact) <= 2 * relative_error(want, exact) + 1e-7
    assert relative_error(fast(x).detach(), exact) <= 2 * relative_error(want, exact) + 1e-7  # the Functions' path


@pytest.mark.parametrize("case", ["grad", "training", "autocast", "float64"])
def test_cpu_inference_only_where_nothing_needs_the_functions(conv_calls, conv_policy, case):
    conv_policy(autocast_gemm_max_pixels=0)  # autocast's GEMM blocks: the tests below
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


# Under autocast at 2 x 32 x 32 the bottleneck's convs (512 -> 1024 -> 1024 at 2 x 2 x 2 pixels) and Up5's
# (1024 -> 512 at 2 x 4 x 4 upsampled) are the ones the policy's defaults give float32 GEMMs; "all" forces every conv.
AUTOCAST_GEMMS = {"defaults": [(512, 1024, 3, 3), (1024, 512, 3, 3), (1024, 1024, 3, 3)], "all": CONVS_3X3}


@pytest.mark.parametrize("memory_format", [torch.contiguous_format, torch.channels_last])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("gemms", ["defaults", "all"])
def test_autocast_gemm_blocks_are_within_twice_the_autocast_error(conv_calls, conv_policy, memory_format, dtype,
                                                                   gemms):
    """Under CPU autocast in eval the blocks whose weights outweigh their pixels run float32 GEMMs on the float32
    weights (policy.autocast_inference_conv): the seed's dtype and strides, its NaN-free output within 2x of the
    seed's autocast error against float64, over several seeds (near-ties flip with the seed)."""
    if gemms == "all":
        conv_policy(autocast_gemm_max_pixels=1 << 30, autocast_gemm_min_weights=0)
    for seed in range(3):
        torch.manual_seed(seed)
        ref, fast, ref64 = eval_models()
        for model in (ref, fast):
            model.to(memory_format=memory_format)
        x = torch.randn(2, 3, SIZE, SIZE).contiguous(memory_format=memory_format)
        conv_calls.clear()
        with torch.no_grad(), torch.autocast("cpu", dtype):
            out, want = fast(x), ref(x)
        exact = ref64(x.double())
        want_gemms = AUTOCAST_GEMMS[gemms]
        assert sorted(conv_calls) == want_gemms if gemms == "defaults" else len(conv_calls) == want_gemms
        assert all(as_gemm for *_, as_gemm in conv_calls.pixels)
        assert out.dtype == want.dtype and out.shape == want.shape and out.stride() == want.stride()
        assert relative_error(out, exact) <= 2 * relative_error(want, exact)


@pytest.mark.parametrize("memory_format", [torch.contiguous_format, torch.channels_last])
def test_autocast_gemm_blocks_return_what_the_functions_return(conv_calls, memory_format):
    """A double block (with its pool and concat buffer) and the up block writing into that buffer, under autocast by
    float32 GEMMs: the Functions' dtypes, shapes and strides, values within bfloat16 rounding of theirs, the skip
    part of the buffer the double block's."""
    torch.manual_seed(0)
    double, up = fastunet.model.conv_block(16, 32).eval(), fastunet.model.up_conv(32, 32).eval()
    with torch.no_grad():
        for bn in (double.conv[1], double.conv[4], up.up[2]):
            bn.running_mean.uniform_(-0.5, 0.5), bn.running_var.uniform_(0.5, 2.0), bn.bias.uniform_(0.1, 0.5)
    x = torch.randn(2, 16, 8, 8).contiguous(memory_format=memory_format)
    d = torch.randn(2, 32, 4, 4).to(torch.bfloat16).contiguous(memory_format=memory_format)
    results = {}
    for gemm_pixels in (0, 1 << 30):
        conv_calls.clear()
        with (torch.no_grad(), torch.autocast("cpu", torch.bfloat16),
              policy.override(autocast_gemm_max_pixels=gemm_pixels, autocast_gemm_min_weights=0)):
            buf, pooled = double(x, cat_channels=32, pool=True)
            skip = buf[:, :32].clone()
            results[gemm_pixels] = (up(d, buf), pooled, skip)
        assert len(conv_calls) == (3 if gemm_pixels else 0)
    for got, want in zip(results[1 << 30], results[0]):
        assert got.dtype == want.dtype == torch.bfloat16 and got.shape == want.shape and got.stride() == want.stride()
        assert relative_error(got, want) < 1e-2
    buf, _, skip = results[1 << 30]
    assert torch.equal(buf[:, :32], skip)


@pytest.mark.parametrize("case", ["grad", "training", "exact"])
def test_autocast_gemm_blocks_only_in_inference(conv_calls, conv_policy, case):
    """Where autograd records the blocks, a BN is in training or exact mode keeps the seed's ops, autocast runs the
    Functions (or the seed's modules) whatever the policy's GEMM bounds."""
    conv_policy(autocast_gemm_max_pixels=1 << 30, autocast_gemm_min_weights=0)
    ref, fast, _ = eval_models()
    fast.exact = case == "exact"
    if case == "training":
        ref.train(), fast.train()
    x = torch.randn(2, 3, SIZE, SIZE)
    with torch.set_grad_enabled(case == "grad"), torch.autocast("cpu", torch.bfloat16):
        out, want = fast(x), ref(x)
    assert not conv_calls
    assert relative_error(out, want) < 3e-2


@pytest.mark.parametrize("winograd_inference", [False, True])
def test_winograd_inference_follows_its_policy_entry(monkeypatch, conv_policy, winograd_inference):
    """Each branch of policy winograd_inference (off where oneDNN's kernels are AVX-512), forced: Winograd runs the
    convs where it pays only where the entry is on, and either way the output keeps the 2x error rule."""
    conv_policy(winograd_inference=winograd_inference)
    ran = []
    winograd = inference._winograd_conv_bn_relu
    monkeypatch.setattr(inference, "_winograd_conv_bn_relu", lambda x, layer, out=None: ran.append(x.shape) or
                        winograd(x, layer, out))
    ref, fast, ref64 = eval_models()
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        out, want, exact = fast(x), ref(x), ref64(x.double())
    assert bool(ran) == winograd_inference
    assert relative_error(out, exact) <= 2 * relative_error(want, exact) + 1e-7


@pytest.mark.parametrize("case", ["float32", "autocast", "autocast_gemms"])
def test_one_model_serves_several_threads_at_once(case):
    """Four threads calling one fast-mode model in eval at once (float32 CPU inference; under bfloat16 autocast,
    which each thread enters for itself, the Functions and the float32 GEMM blocks, or those in every block), two
    calls each on inputs of other shapes, get the bits of calls made one at a time: nothing of a call is kept where
    another sees it."""
    _, fast, _ = eval_models()
    inputs = [torch.randn(1 + i % 2, 3, 32 * (1 + i % 2), 32 * (1 + i % 3)) for i in range(8)]
    gemms = dict(autocast_gemm_max_pixels=1 << 30, autocast_gemm_min_weights=0) if case == "autocast_gemms" else {}

    def call(x):
        with (torch.no_grad(), torch.autocast("cpu", torch.bfloat16, enabled=case != "float32"),
              policy.override(**gemms)):
            return fast(x)

    got = served_from_threads(call, inputs)
    assert all(torch.equal(out, call(x)) for out, x in zip(got, inputs))


@pytest.mark.parametrize("memory_format", [torch.contiguous_format, torch.channels_last])
def test_cpu_inference_keeps_a_nan_where_the_seed_does(conv_calls, memory_format):
    ref, fast, _ = eval_models()
    for model in (ref, fast):
        model.to(memory_format=memory_format)
    x = torch.randn(2, 3, 64, 64)
    x[1, 0, 5, 7] = float("nan")
    x = x.contiguous(memory_format=memory_format)
    for autocast in (False, True):
        conv_calls.clear()
        with torch.no_grad(), torch.autocast("cpu", torch.bfloat16, enabled=autocast):
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
    ref, fast, _ = eval_models()
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
    """A new fastunet U-Net with model's state in fresh tensors."""
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
def test_inference_sees_every_write(write):
    """Fast CPU inference derives its weights (BN folded, Winograd's U) at every call, so after any write (through
    ``.data``, an optimizer, a swapped parameter, a BN buffer, a sign of zero, a new layout) the output is bit for
    bit a fresh model's."""
    _, fast, _ = eval_models()
    for p in fast.parameters():
        p.grad = torch.randn_like(p)
    if write == "negative zero":
        with torch.no_grad():
            fast.Conv2.conv[3].weight.view(-1)[::7] = 0.0
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        first = fast(x)
        assert torch.equal(fast(x), first)
        WRITES[write](fast)
        out = fast(x)
        assert torch.equal(out, fresh_copy(fast)(x))
        assert write in ("negative zero", "relaid out") or not torch.equal(out, first)


def test_writes_between_inference_mode_and_no_grad_calls_are_seen():
    """A write under torch.no_grad() after calls under torch.inference_mode() is seen by the next call, and the
    other way round."""
    _, fast, _ = eval_models()
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


def live_tensors():
    gc.collect()
    return {id(t) for t in gc.get_objects() if type(t) in (torch.Tensor, torch.nn.Parameter)}


def test_inference_keeps_nothing_between_calls(conv_calls):
    """No tensor outlives an inference call (no derived weights, no workspace), and the convs of 128-256 pixels are
    GEMMs (Winograd there pays only with prepacked weights, fastunet.optimize_for_inference): at 2 x 64 x 64 level
    4's five and level 5's two."""
    ref, fast, _ = eval_models()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        want = ref(x)
        before = live_tensors()
        out = fast(x)
        again = fast(x)
        assert live_tensors() - before == {id(out), id(again)}
    assert torch.equal(again, out) and relative_error(out, want) < 1e-4
    assert sum(as_gemm for *_, as_gemm in conv_calls.pixels) == 2 * 7


