"""fastunet.explain: one line per conv layer, and each line's algorithm, input shape, layout and dtype are those of
the conv that a real training step or inference forward of the same model and input runs (recorded at the
dispatcher), in NCHW and channels_last, with the policy's choices forced either way, with a hooked or swapped layer
(whose block runs its own modules) and in exact mode."""

from collections import Counter

import pytest
import torch
import torch.nn as nn
from torch.utils._python_dispatch import TorchDispatchMode

import fastunet
from fastunet.conv import policy
from fastunet.explain import GEMM, WINOGRAD

_ATEN_CONVS = {"aten.convolution.default", "mkldnn._convolution_pointwise.default"}
_WINOGRAD_CONV = "fastunet.winograd_conv3x3.default"
_LAYOUT = {True: "channels_last", False: "NCHW"}


class _ConvRecorder(TorchDispatchMode):
    """Records each forward conv the dispatcher runs: (kind, input shape, layout, dtype)."""

    def __init__(self):
        super().__init__()
        self.calls = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = str(func)
        if name in _ATEN_CONVS or name == _WINOGRAD_CONV:
            x = args[0]
            kind = "winograd" if name == _WINOGRAD_CONV else "aten"
            layout = _LAYOUT[x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous()]
            self.calls[(kind, tuple(x.shape), layout, str(x.dtype).removeprefix("torch."))] += 1
        return func(*args, **(kwargs or {}))


def _kind(algorithm):
    """The recorder's kind of a line's algorithm (None for the GEMMs, which run no conv op)."""
    if algorithm.startswith(WINOGRAD):
        return "winograd"
    if algorithm.startswith(GEMM) or GEMM in algorithm:
        return None
    return "aten"


def _expected(lines):
    return Counter((_kind(line.algorithm), line.shape, line.layout, line.dtype) for line in lines
                   if line.layer != "(input)" and _kind(line.algorithm) is not None)


def _run(model, x, train):
    """The forward convs of a real training step (train; its backward runs the same algorithms by the same choices,
    and Winograd's backward calls its conv op again) or of a no-grad eval forward, recorded."""
    model.train(train)
    with _ConvRecorder() as recorder, torch.set_grad_enabled(train):
        model(x)
    return recorder.calls


def _model(channels_last=False, exact=False):
    torch.manual_seed(0)
    model = fastunet.U_Net(3, 2, exact=exact)
    return model.to(memory_format=torch.channels_last) if channels_last else model


def _input(channels_last=False):
    x = torch.randn(2, 3, 32, 32)
    return x.contiguous(memory_format=torch.channels_last) if channels_last else x


def _check_agrees(model, x, train):
    """explain's lines against what runs; returns the lines."""
    model.train(not train)
    lines = fastunet.explain(model, x, train=train)
    assert model.training == (not train), "explain puts the model's train/eval flag back"
    assert _run(model, x, train) == _expected(lines), str(lines)
    return lines


def _convs(model):
    return sum(isinstance(m, nn.Conv2d) for m in model.modules())


@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("train", [True, False])
def test_plain_model_lines_agree_with_what_runs(train, channels_last):
    model = _model(channels_last)
    lines = _check_agrees(model, _input(channels_last), train)
    assert len(lines) == 1 + _convs(model)  # the input's line, then one per conv
    assert [line.layer for line in lines[1:4]] == ["Conv1.conv.0", "Conv1.conv.3", "Conv2.conv.0"]
    assert lines[-1].layer == "Conv_1x1" and "Up4.up.1" in {line.layer for line in lines}
    assert all(line.rule for line in lines)
    assert "Conv1.conv.0" in str(lines) and "rule" in str(lines).splitlines()[0]


@pytest.mark.parametrize("choices", [
    dict(winograd_train=True, gemm_train_max_pixels=64, channels_last_train=True),
    dict(winograd_train=False, gemm_train_max_pixels=0, channels_last_train=False),
])
def test_forced_policy_changes_the_lines_and_they_agree(choices):
    """Each branch of the training choices, forced: explain follows it, and so does the real step."""
    model = _model()
    with policy.override(**choices):
        lines = _check_agrees(model, _input(), True)
    algorithms = {line.layer: line.algorithm for line in lines}
    assert (algorithms["Conv1.conv.3"] == WINOGRAD) == choices["winograd_train"]
    assert (algorithms["Conv5.conv.0"] == GEMM) == (choices["gemm_train_max_pixels"] >= 4)
    assert lines[0].layout == ("channels_last" if choices["channels_last_train"] else "NCHW")
    rules = " ".join(line.rule for line in lines)
    assert f"policy winograd_train={choices['winograd_train']}" in rules
    assert f"gemm_train_max_pixels={choices['gemm_train_max_pixels']}" in rules


@pytest.mark.parametrize("channels_last", [False, True])
def test_autocast_inference_lines_show_the_float32_gemms(channels_last):
    """Under bfloat16 autocast in eval the bottleneck's convs and Up5's run as float32 GEMMs (policy
    autocast_inference_conv): explain says so, with the rule, and agrees with what runs."""
    model = _model(channels_last)
    with torch.autocast("cpu", torch.bfloat16):
        lines = _check_agrees(model, _input(channels_last), False)
    gemms = {line.layer: line for line in lines if line.algorithm == GEMM}
    assert sorted(gemms) == ["Conv5.conv.0", "Conv5.conv.3", "Up5.up.1"]
    assert all(line.dtype == "float32" and "autocast_gemm_max_pixels" in line.rule for line in gemms.values())
    with torch.autocast("cpu", torch.bfloat16), policy.override(autocast_gemm_max_pixels=0):
        assert not any(line.algorithm == GEMM for line in _check_agrees(model, _input(channels_last), False))


@pytest.mark.parametrize("channels_last", [False, True])
def test_autocast_training_lines_show_the_float32_weights(channels_last):
    """Under bfloat16 autocast in training a double block's convs of few pixels run on their float32 weights (policy
    autocast_train_conv): at 1 x 3 x 64^2 the bottleneck's, as the im2col GEMMs; forced on every double block at
    2 x 3 x 32^2, oneDNN's float32 convs, which the recorded step shows; forced off, none. explain says so, with the
    rule, and agrees with what runs."""
    model = _model(channels_last)
    layout = torch.channels_last if channels_last else torch.contiguous_format
    x = torch.randn(1, 3, 64, 64).contiguous(memory_format=layout)
    with torch.autocast("cpu", torch.bfloat16):
        lines = _check_agrees(model, x, True)
    kept = {line.layer: line for line in lines if "autocast_train_float32_max_pixels" in line.rule}
    assert sorted(kept) == ["Conv5.conv.0", "Conv5.conv.3"]
    assert all(line.dtype == "float32" and line.algorithm == GEMM for line in kept.values())
    with torch.autocast("cpu", torch.bfloat16), policy.override(autocast_train_float32_max_pixels=1 << 30,
                                                                autocast_train_float32_min_weights=0):
        lines = _check_agrees(model, _input(channels_last), True)
    double_convs = [line for line in lines if ".conv." in line.layer]
    assert len(double_convs) == 18 and all(line.dtype == "float32" for line in double_convs)
    up_dtype = "bfloat16" if policy.native_dot(torch.bfloat16) else "float32"  # policy.upcast without bf16 dots
    assert all(line.dtype == up_dtype for line in lines if ".up." in line.layer)
    with torch.autocast("cpu", torch.bfloat16), policy.override(autocast_train_float32_max_pixels=0):
        lines = _check_agrees(model, x, True)
    assert not any("autocast_train_float32" in line.rule for line in lines)


@pytest.mark.parametrize("change", ["hook", "swap"])
def test_a_hooked_or_swapped_layer_shows_its_blocks_refusal(change):
    model = _model()
    if change == "hook":
        model.Conv3.conv[0].register_forward_hook(lambda module, inputs, output: None)
        reason = "conv[0] has hooks"
    else:
        model.Up3.up[3] = nn.LeakyReLU()
        reason = "up[3] is a LeakyReLU"
    for train in (True, False):
        lines = _check_agrees(model, _input(), train)
        block = "Conv3" if change == "hook" else "Up3"
        refused = [line for line in lines if line.layer.startswith(block + ".")]
        assert refused and all(reason in line.rule and "runs its own modules" in line.rule for line in refused)
        assert not any(reason in line.rule for line in lines if not line.layer.startswith(block + "."))


@pytest.mark.parametrize("train", [True, False])
def test_exact_mode_lines_agree(train):
    model = _model(exact=True)
    lines = _check_agrees(model, _input(), train)
    assert all(line.algorithm == "aten (oneDNN)" and "exact mode" in line.rule for line in lines[1:-1])


def test_blocks_alone_and_refusals_of_other_models():
    torch.manual_seed(0)
    block = fastunet.conv_block(8, 16)
    lines = _check_agrees(block, torch.randn(2, 8, 16, 16), True)
    assert [line.layer for line in lines] == ["conv.0", "conv.3"]
    up = fastunet.up_conv(16, 8)
    assert [line.layer for line in fastunet.explain(up, torch.randn(2, 16, 8, 8))] == ["up.1"]
    with pytest.raises(TypeError, match="fastunet.U_Net, conv_block or up_conv"):
        fastunet.explain(fastunet.reference.U_Net(3, 2), _input())
    with pytest.raises(ValueError, match="multiples of 16"):
        fastunet.explain(_model(), torch.randn(2, 3, 30, 30))


def test_bench_explain_prints_both_tables(capsys):
    from fastunet import bench

    assert bench.parse_args(["--explain"]).explain and not bench.parse_args([]).explain
    torch.manual_seed(0)
    state = fastunet.reference.U_Net(bench.IMG_CH, bench.OUTPUT_CH).state_dict()
    args = bench.parse_args(["--explain"])
    bench.print_explanations(state, _input(), torch.device("cpu"), args)
    out = capsys.readouterr().out
    assert "(training step)" in out and "(inference)" in out and out.count("Up_conv2.conv.3") == 2


def test_a_plan_entry_changes_what_runs_and_explain_follows():
    """policy.use_plan: a tuned plan's entry for one layer's key comes before the rules; the forward runs it (same
    result up to rounding) and explain prints it with the rule "plan"; the other layer keeps the rules' choice. An
    entry the layer cannot run, or an algorithm no decision has, is an error."""
    torch.manual_seed(0)
    block = fastunet.conv_block(8, 16)
    x = torch.randn(2, 8, 16, 16)
    key = policy.Layer.of(x, block.conv[0].weight, train=True).key()
    with policy.override(gemm_train_max_pixels=0, winograd_train=False):
        default = _check_agrees(block, x, True)
        want = block(x)
        with policy.use_plan({("train_conv", key): "gemm"}):
            planned = _check_agrees(block, x, True)
            calls = _run(block, x, True)
            got = block(x)
    assert default[0].algorithm == "aten (oneDNN)" and planned[0].algorithm == GEMM and planned[0].rule == "plan"
    assert planned[1] == default[1]
    assert ("aten", (2, 8, 16, 16), "NCHW", "float32") not in calls and sum(calls.values()) == 1
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="not one this layer can run"):
        with policy.use_plan({("train_conv", key): "shifted_gemm"}):
            block(x)
    with pytest.raises(ValueError, match="for decision 'train_conv'"):
        with policy.use_plan({("train_conv", key): "fft"}):
            pass
