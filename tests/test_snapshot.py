"""fastunet.optimize_for_inference: an inference-only snapshot of a U-Net's weights, prepacked for the CPU. float32:
the model's bits wherever both pick the same algorithm, within 2x of the seed's error where the prepacked Winograd
weights change the pick; bfloat16: within 2x of the seed's error under bfloat16 autocast. A snapshot of the
weights at the call, safe to call from several threads at once, never trained, and clear errors for what it cannot
stand in for."""


import pytest
import torch
from helpers import eval_models, pair, relative_error, served_from_threads

import fastunet
from fastunet.conv import policy, winograd


def same_choices():
    """Winograd picked at the same pixel counts with weights prepacked as without (the snapshot's one difference)."""
    return policy.override(winograd_kept_min_pixels=policy.value("winograd_min_pixels"), winograd_inference=True)


@pytest.mark.parametrize("memory_format", [torch.contiguous_format, torch.channels_last])
@pytest.mark.parametrize("shape", [(2, 64, 64), (1, 48, 80)])
def test_float32_snapshot_has_the_models_bits_where_both_pick_alike(memory_format, shape):
    _, fast, _ = eval_models()
    batch, h, w = shape
    x = torch.randn(batch, 3, h, w).contiguous(memory_format=memory_format)
    with same_choices():
        snapshot = fastunet.optimize_for_inference(fast, torch.randn(2, 3, 64, 64))
        with torch.no_grad():
            want = fast(x)
        got = snapshot(x)
    assert got.stride() == want.stride() and torch.equal(got, want)


def test_float32_snapshot_runs_prepacked_winograd_within_twice_the_seed_error(monkeypatch):
    """At its example size the snapshot transforms no weight at the call (each Winograd layer's U is prepacked,
    at more layers than the model's: 2 x 64 x 64 puts level 3's and 4's 256-512 channels at 128-512 pixels)."""
    ref, fast, ref64 = eval_models()
    x = torch.randn(2, 3, 64, 64)
    snapshot = fastunet.optimize_for_inference(fast, x)
    prepacked = sum(layer.winograd is not None for level in snapshot.encoder + snapshot.decoder for layer in level)
    transforms, convs, conv3x3 = [], [], winograd.conv3x3
    monkeypatch.setattr(winograd, "weights", lambda *args: transforms.append(args))
    monkeypatch.setattr(winograd, "conv3x3", lambda *args: convs.append(args) or conv3x3(*args))
    with torch.no_grad():
        got, want, exact = snapshot(x), ref(x), ref64(x.double())
    assert prepacked >= 6 and len(convs) == prepacked and not transforms
    assert relative_error(got, exact) <= 2 * relative_error(want, exact) + 4 * 2.0 ** -24


@pytest.mark.parametrize("subpixel", [True, False])
@pytest.mark.parametrize("draw", range(2))
def test_bfloat16_snapshot_is_within_twice_the_seed_error_under_autocast(subpixel, draw):
    """Both forms of the up-conv (sub-pixel phases, or the 3x3 conv on the upsampled input), packed by oneDNN;
    float32 and bfloat16 input, bfloat16 output in the input's layout."""
    ref, fast, ref64 = eval_models()
    x = torch.randn(2, 3, 64, 64)
    with policy.override(subpixel_min_pixels_bfloat16=0 if subpixel else 10**9):
        snapshot = fastunet.optimize_for_inference(fast, x, dtype=torch.bfloat16)
    forms = [level.up.subpixel is not None for level in snapshot.decoder]
    with torch.no_grad(), torch.autocast("cpu", torch.bfloat16):
        want = ref(x)
    got = snapshot(x)
    exact = ref64(x.double())
    assert forms == [subpixel] * 4 and got.dtype == torch.bfloat16 and got.is_contiguous()
    assert relative_error(got, exact) <= 2 * relative_error(want, exact)
    assert torch.equal(snapshot(x.bfloat16()), snapshot(x.bfloat16().contiguous(memory_format=torch.channels_last)))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_snapshot_keeps_nans_where_the_seed_does(dtype):
    """A NaN in the input, or in a weight at the snapshot, runs each ReLU apart from its conv, which keeps NaNs as
    the seed does (oneDNN's fused ReLU, taken for finite inputs and weights, would make them 0)."""
    ref, fast, _ = eval_models()
    x = torch.randn(1, 3, 64, 64)
    x[0, 1, 5, 7] = float("nan")
    with torch.no_grad():
        want = ref(x)
    got = fastunet.optimize_for_inference(fast, x, dtype=dtype)(x)
    assert want.isnan().any() and torch.equal(got.isnan(), want.isnan())
    x = torch.randn(1, 3, 64, 64)
    for model in (ref, fast):
        model.Conv4.conv[3].weight.data[3, 2, 1, 1] = float("nan")
    with torch.no_grad():
        want = ref(x)
    got = fastunet.optimize_for_inference(fast, x, dtype=dtype)(x)
    assert want.isnan().any() and torch.equal(got.isnan(), want.isnan())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_snapshot_holds_the_weights_of_its_call(dtype):
    """Writes to the model's parameters and buffers after the snapshot do not reach it."""
    _, fast, _ = eval_models()
    x = torch.randn(1, 3, 32, 32)
    snapshot = fastunet.optimize_for_inference(fast, x, dtype=dtype)
    before = snapshot(x)
    with torch.no_grad():
        for t in (*fast.parameters(), *fast.buffers()):
            if t.is_floating_point():
                t.mul_(1 + torch.rand_like(t))
        changed = fast(x)
    assert torch.equal(snapshot(x), before)
    assert not torch.equal(fastunet.optimize_for_inference(fast, x, dtype=dtype)(x), before)
    assert relative_error(changed, before.float()) > 1e-2


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_snapshot_serves_several_threads_at_once(dtype):
    """Four threads calling one snapshot at once, two calls each, get the bits of calls made one at a time."""
    _, fast, _ = eval_models()
    snapshot = fastunet.optimize_for_inference(fast, torch.randn(1, 3, 64, 64), dtype=dtype)
    inputs = [torch.randn(1 + i % 2, 3, 64, 32 * (1 + i % 3)) for i in range(8)]
    got = served_from_threads(snapshot, inputs)
    assert all(torch.equal(out, snapshot(x)) for out, x in zip(got, inputs))


def test_snapshot_cannot_be_trained_moved_or_differentiated():
    _, fast, _ = eval_models()
    snapshot = fastunet.optimize_for_inference(fast)
    assert list(snapshot.parameters()) == [] and snapshot.state_dict() == {} and not snapshot.training
    with pytest.raises(RuntimeError, match="cannot be trained"):
        snapshot.train()
    with pytest.raises(RuntimeError, match="cannot be moved or cast"):
        snapshot.double()
    with pytest.raises(ValueError, match="empty parameter list"):
        torch.optim.SGD(snapshot.parameters(), lr=0.1)
    with pytest.raises(RuntimeError, match="computes no gradients"):
        snapshot(torch.randn(1, 3, 32, 32, requires_grad=True))
    assert snapshot.eval() is snapshot


def test_snapshot_input_errors_name_the_problem():
    _, fast, _ = eval_models()
    snapshot = fastunet.optimize_for_inference(fast)
    for x, message in [(torch.randn(3, 32, 32), "4-D input"), (torch.randn(1, 4, 32, 32), "img_ch=3"),
                       (torch.randn(1, 3, 30, 32), "multiples of 16"), (torch.randn(1, 3, 32, 32).double(),
                                                                         "takes torch.float32 input")]:
        with pytest.raises((ValueError, RuntimeError), match=message):
            snapshot(x)


def test_snapshot_pads_where_its_model_pads():
    ref, _, _ = eval_models()
    fast = fastunet.U_Net(3, 2, pad_to_multiple=True)
    fast.load_state_dict(ref.state_dict())
    x = torch.randn(1, 3, 40, 56)
    with same_choices():
        got = fastunet.optimize_for_inference(fast.eval(), x)(x)
        with torch.no_grad():
            assert got.shape == (1, 2, 40, 56) and torch.equal(got, fast(x))


def test_snapshot_refuses_what_it_cannot_stand_in_for():
    ref, fast, _ = eval_models()
    cases = {
        "training mode": (lambda m: m.train(), RuntimeError, "model.eval"),
        "exact": (lambda m: setattr(m, "exact", True), ValueError, "exact=True"),
        "hook": (lambda m: m.Conv3.register_forward_hook(lambda *a: None), RuntimeError, "Conv3 has hooks"),
        "swapped layer": (lambda m: m.Up4.up.__setitem__(3, torch.nn.GELU()), RuntimeError, r"Up4's up\[3\]"),
        "double": (lambda m: m.double(), RuntimeError, "float32 model on the CPU"),
    }
    for change, error, message in cases.values():
        model = pair(exact=False)[1]
        model.load_state_dict(fast.state_dict())
        change(model.eval())
        with pytest.raises(error, match=message):
            fastunet.optimize_for_inference(model)
    with pytest.raises(TypeError, match="fastunet.U_Net"):
        fastunet.optimize_for_inference(ref)
    with pytest.raises(ValueError, match="dtype"):
        fastunet.optimize_for_inference(fast, dtype=torch.float16)
