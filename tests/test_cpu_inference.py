"""Fast-mode inference on the CPU (functional._cpu_inference): ATen's convs with each eval BN folded in where
that pays, the sub-pixel up-conv where that pays. Within 2x of the float32 reference's error against float64, in
both layouts; a NaN stays where the seed puts it; taken only where nothing needs the Functions (no autograd, no
autocast, eval BN, fast mode, float32)."""

import copy

import pytest
import torch
from helpers import SIZE, pair, relative_error, well_conditioned

from fastunet import functional

CONVS_3X3 = 22  # ten in the encoder's blocks, eight in the decoder's, four up-convs


@pytest.fixture
def conv_calls(monkeypatch):
    """The weight shapes of the convs of CPU inference: folded (functional._conv_relu) and unfolded."""
    calls = []
    folded, unfolded = functional._conv_relu, functional._unfolded_conv_bn_relu

    def counted_folded(x, weight, bias):
        calls.append(tuple(weight.shape))
        return folded(x, weight, bias)

    def counted_unfolded(x, conv, bn):
        calls.append(tuple(conv[0].shape))
        return unfolded(x, conv, bn)

    monkeypatch.setattr(functional, "_conv_relu", counted_folded)
    monkeypatch.setattr(functional, "_unfolded_conv_bn_relu", counted_unfolded)
    return calls


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
    assert subpixel == ([(4 * 64, 128, 2, 2)] if batch * (h // 2) * (w // 2) >= 1024 else [])
    assert out.shape == want.shape and out.stride() == want.stride()
    assert relative_error(out, exact) <= 2 * relative_error(want, exact) + 1e-7
    assert relative_error(fast(x).detach(), exact) <= 2 * relative_error(want, exact) + 1e-7  # the Functions' path


@pytest.mark.parametrize("case", ["grad", "training", "exact", "autocast", "float64"])
def test_cpu_inference_only_where_nothing_needs_the_functions(conv_calls, case):
    ref, fast = pair(exact=case == "exact")
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
