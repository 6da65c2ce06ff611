"""``fastunet.explain(model, x, train=False)``: what each conv layer of a fastunet model runs for this input here:
its input shape, algorithm, layout and dtype, and the rule that picked them (or why the block runs its own modules).
Nothing runs: stand-in tensors (fake, no memory) walk the levels, and every choice is asked of what makes it in the
forward: model.fused_refusal, U_Net._channels_last_inside, and fastunet.conv.policy's choosers, whose rules the lines
print."""

import functools
from typing import NamedTuple

import torch
import torch.nn as nn

from . import functional, ops
from . import model as fastunet_model
from .blocks.double import autocast_float32_weights, double_block_layers
from .blocks.inference import _autocast_gemm_inference
from .blocks.up import up_block_layer
from .conv import policy

_LAYOUTS = {torch.channels_last: "channels_last", torch.contiguous_format: "NCHW"}
WINOGRAD = "winograd F(2x2,3x3)"
GEMM = "gemm (im2col)"
SUBPIXEL = "sub-pixel 2x2"


class Line(NamedTuple):
    """One conv layer: its name in the model, its input shape, the algorithm, layout and dtype it runs in, and why."""

    layer: str
    shape: tuple
    algorithm: str
    layout: str
    dtype: str
    rule: str


class Explanation(tuple):
    """The ``Line`` of each conv layer, in the order the forward runs them; ``str()`` is the table."""

    def __str__(self):
        rows = [("layer", "input", "algorithm", "layout", "dtype", "rule")]
        rows += [(line.layer, "x".join(map(str, line.shape)), line.algorithm, line.layout, line.dtype, line.rule)
                 for line in self]
        widths = [max(len(row[i]) for row in rows) for i in range(5)]
        return "\n".join("  ".join(cell.ljust(width) for cell, width in zip(row, widths)) + "  " + row[5]
                         for row in rows)


def explain(model, x, train=False):
    """The Explanation of ``model`` (a fastunet.U_Net, conv_block or up_conv) on input ``x`` (only its shape, dtype,
    device and layout are read): a training step (``train=True``; forward and backward run the same algorithms) or
    an inference forward under torch.no_grad() (``train=False``), under the autocast now in force. The model's
    train/eval flags are put back; nothing else is touched."""
    if not isinstance(model, (fastunet_model.U_Net, fastunet_model.conv_block, fastunet_model.up_conv)):
        raise TypeError(f"fastunet.explain takes a fastunet.U_Net, conv_block or up_conv, got {type(model).__name__}")
    if not isinstance(x, torch.Tensor) or x.dim() != 4:
        raise ValueError("fastunet.explain needs the model's 4-D input tensor [N, C, H, W]")
    modes = [(m, m.training) for m in model.modules()]
    model.train(train)
    try:
        with torch.enable_grad() if train else torch.no_grad():
            if isinstance(model, fastunet_model.U_Net):
                return Explanation(_unet_lines(model, x))
            walk = _double_lines if isinstance(model, fastunet_model.conv_block) else _up_lines
            return Explanation(walk("", model, _like(x)))
    finally:
        for m, mode in modes:
            m.training = mode


@functools.cache
def _fake_mode():
    """The fake-tensor mode of the stand-ins, made at the first explain (importing it imports torch._dynamo: about
    3 s, not paid by ``import fastunet``)."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    return FakeTensorMode()


def _like(t, shape=None, dtype=None, layout=None):
    """A stand-in like ``t``, with the given shape, dtype or layout instead of its own."""
    with _fake_mode():
        return torch.empty(shape or t.shape, dtype=dtype or t.dtype, device=t.device,
                           memory_format=layout or ops.memory_format_of(t))


def _convs(block):
    return [m for m in block.modules() if isinstance(m, nn.Conv2d)]


def _name(prefix, suffix):
    return ".".join(part for part in (prefix, suffix) if part)


def _line(name, x, algorithm, rule, layout=None):
    layout = _LAYOUTS[ops.memory_format_of(x) if layout is None else layout]
    return Line(name, tuple(x.shape), algorithm, layout, str(x.dtype).removeprefix("torch."), rule)


def _aten(x):
    """What ATen's convolution of ``x`` runs on."""
    if x.device.type == "cuda" and torch.backends.cudnn.is_available() and torch.backends.cudnn.enabled:
        return "cudnn"
    onednn = x.device.type == "cpu" and torch.backends.mkldnn.is_available() and x.dtype != torch.float64
    return "aten (oneDNN)" if onednn else "aten"


def _cast(x):
    """A stand-in of ``x`` in the dtype autocast gives a conv of it."""
    return _like(x, dtype=functional._cast_dtype(x, functional._autocast_dtype(x.device.type)))


def _fast_conv_line(name, x, w, rule=""):
    """The Line of conv.training.forward(x, w) (and its backward): the policy's upcast, train_conv and conv_layout."""
    notes = [rule]
    layer = policy.Layer.of(x, w, train=True)
    upcast = policy.upcast(layer)
    if upcast.algorithm:
        x, w = _like(x, dtype=torch.float32), _like(w, dtype=torch.float32)
        layer = policy.Layer.of(x, w, train=True)
    notes.append(upcast.rule if upcast.algorithm else "")
    choice = policy.train_conv(layer)
    notes.append(choice.rule)
    if choice.algorithm == "winograd":
        return _line(name, x, WINOGRAD, _joined(notes))
    if choice.algorithm == "gemm":
        if layer.kernel == 2 and layer.nhwc_dense:
            notes.append("backward by the same GEMMs")
        return _line(name, x, GEMM, _joined(notes))
    layout = policy.conv_layout(layer)
    notes.append(layout.rule)
    algorithm = _aten(x) + ", backward by shifted GEMMs" * (choice.algorithm == "shifted_gemm")
    return _line(name, x, algorithm, _joined(notes), layout.algorithm)


def _joined(notes):
    return "; ".join(note for note in notes if note)


def _inference_line(name, x, weight, exact, rule=""):
    """The Line of functional._conv_bn_relu_inference on ``x`` by ``weight`` (CPU inference): policy.inference_conv."""
    choice = functional._inference_conv_choice(x, weight, exact)
    algorithm = {"winograd": WINOGRAD, "gemm": GEMM, "folded": f"{_aten(x)}, BN folded"}.get(choice.algorithm,
                                                                                            _aten(x))
    return _line(name, x, algorithm, _joined(["CPU inference", rule, choice.rule]))


def _autocast_gemm_line(name, x, layer):
    """The Line of a conv that CPU inference under autocast runs as a float32 GEMM (policy.autocast_inference_conv),
    ``x`` its float32 input."""
    return _line(name, x, GEMM, _joined(["CPU inference under autocast", policy.autocast_inference_conv(layer).rule]))


def _bn_tensors(bn):
    return bn.weight, bn.bias, bn.running_mean, bn.running_var  # as functional._cpu_inference takes them


def _module_lines(name, block, x, reason, rule="block runs its own modules: "):
    """The Lines of a block that runs its own modules: each nn.Conv2d in it, at the block's resolution (doubled after
    an nn.Upsample)."""
    lines, scale = [], 1
    x = _cast(x)
    for sub, m in block.named_modules():
        if isinstance(m, nn.Upsample):
            scale = 2
        elif isinstance(m, nn.Conv2d):
            shape = (x.shape[0], m.in_channels, x.shape[2] * scale, x.shape[3] * scale)
            lines.append(_line(_name(name, sub), _like(x, shape), _aten(x), rule + reason))
    return lines


def _refused_lines(name, block, x, kind):
    """The Lines of ``block`` running its own modules on ``x`` where it is not a fastunet ``kind`` or refuses the
    fused path (fastunet.model.fused_refusal), else None."""
    if not isinstance(block, kind):
        return _module_lines(name, block, x, f"it is a {type(block).__name__}, not a fastunet {kind.__name__}")
    refusal = fastunet_model.fused_refusal(block, x)
    return None if refusal is None else _module_lines(name, block, x, refusal.reason)


def _double_lines(name, block, x):
    """The Lines of a double block (conv_block) on ``x``."""
    refused = _refused_lines(name, block, x, fastunet_model.conv_block)
    if refused is not None:
        return refused
    c1, b1, _, c2, b2, _ = block.conv
    names = _name(name, "conv.0"), _name(name, "conv.3")
    tensors = (x, c1.weight, c1.bias, *_bn_tensors(b1), c2.weight, c2.bias, *_bn_tensors(b2))
    if functional._cpu_inference(x, tensors, (b1, b2)):
        z1 = _like(x, (x.shape[0], c1.out_channels, *x.shape[2:]))
        return [_inference_line(names[0], x, c1.weight, block.exact),
                _inference_line(names[1], z1, c2.weight, block.exact)]
    layers = double_block_layers(x, c1.weight, c2.weight, block.exact)
    if _autocast_gemm_inference(x, tensors[1:], (b1, b2), lambda: layers):
        z1 = _like(x, (x.shape[0], c1.out_channels, *x.shape[2:]), torch.float32)
        return [_autocast_gemm_line(n, t, layer) for n, t, layer in zip(names, (_like(x, dtype=torch.float32), z1),
                                                                         layers)]
    xc = _cast(x)
    z1 = _like(xc, (x.shape[0], c1.out_channels, *x.shape[2:]))
    if block.exact:
        return [_line(n, t, _aten(t), "exact mode: ATen's convolution, as the seed's") for n, t in zip(names, (xc, z1))]
    keep1, keep2 = autocast_float32_weights(xc, c1.weight, c2.weight, functional._autocast_dtype(x.device.type),
                                            block.exact)
    w1, w2 = (c.weight if keep else _cast(c.weight) for c, keep in ((c1, keep1), (c2, keep2)))
    mode = ops.conv3x3_mode()
    if mode == "auto" and x.device.type == "cuda":
        second = _line(names[1], z1, "triton or " + _aten(z1), "FASTUNET_CONV=auto: the faster at the first call")
    else:
        choice = policy.second_conv(policy.Layer.of(z1, w2, train=b2.training), mode, lambda: None)
        second = (_line(names[1], z1, "triton", choice.rule) if choice.algorithm == "triton" else
                  _fast_conv_line(names[1], z1, w2, f"second conv: {choice.rule}"))
    return [_fast_conv_line(names[0], xc, w1), second]


def _up_lines(name, block, d):
    """The Lines of an up block (up_conv) on ``d``: one, its conv."""
    refused = _refused_lines(name, block, d, fastunet_model.up_conv)
    if refused is not None:
        return refused
    _, conv, bn, _ = block.up
    layer = _name(name, "up.1")
    n, cin, h, w = d.shape
    if functional._cpu_inference(d, (d, conv.weight, conv.bias, *_bn_tensors(bn)), (bn,)):
        choice = policy.up_conv(policy.Layer.of(d, conv.weight, train=False, exact=block.exact))
        if choice.algorithm == "subpixel":
            return [_line(layer, d, f"{SUBPIXEL}, {_aten(d)}, BN folded", f"CPU inference; {choice.rule}")]
        return [_inference_line(layer, _like(d, (n, cin, 2 * h, 2 * w)), conv.weight, block.exact, choice.rule)]
    up_layer = up_block_layer(d, conv.weight, block.exact)
    if _autocast_gemm_inference(d, (conv.weight, conv.bias, *_bn_tensors(bn)), (bn,), lambda: (up_layer,)):
        return [_autocast_gemm_line(layer, _like(d, (n, cin, 2 * h, 2 * w), torch.float32), up_layer)]
    dc, wc = _cast(d), _cast(conv.weight)
    upsampled = _like(dc, (n, cin, 2 * h, 2 * w))
    if block.exact:
        return [_line(layer, upsampled, _aten(upsampled), "exact mode: ATen's convolution, as the seed's")]
    choice = policy.up_conv(policy.Layer.of(dc, wc, train=True))
    if choice.algorithm == "upsampled":
        return [_fast_conv_line(layer, upsampled, wc, choice.rule)]
    w4 = _like(wc, (4 * conv.out_channels, cin, 2, 2))
    line = _fast_conv_line(layer, dc, w4, choice.rule)
    return [line._replace(algorithm=f"{SUBPIXEL}, {line.algorithm}")]


def _unet_lines(model, x):
    """The Lines of a U_Net: a first line for the input's layout inside, then each level's convs in forward order."""
    n, _, h, w = x.shape
    if model.pad_to_multiple:
        h, w = -(-h // 16) * 16, -(-w // 16) * 16
    padded = _like(x, (n, x.shape[1], h, w), layout=None if (h, w) == x.shape[2:] else torch.contiguous_format)
    fastunet_model._check_input(padded, model.img_ch, next(model.parameters(), None))
    inside, rule = model._channels_last_inside(padded)
    rule = ("channels_last inside: " if inside else "as it lies: ") + rule
    h_t = _like(padded, layout=torch.channels_last) if inside else padded
    lines, skips = [_line("(input)", h_t, "-", rule)], []
    dtype = functional._cast_dtype(h_t, functional._autocast_dtype(h_t.device.type))
    for level in fastunet_model.LEVELS[:fastunet_model.BOTTLENECK + 1]:
        block = getattr(model, level)
        lines += _double_lines(level, block, h_t)
        out = _like(h_t, (n, _convs(block)[-1].out_channels, *h_t.shape[2:]), dtype)
        skips.append(out)
        h_t = _like(out, (n, out.shape[1], out.shape[2] // 2, out.shape[3] // 2))
    h_t = skips.pop()
    for level in range(fastunet_model.BOTTLENECK + 1, len(fastunet_model.LEVELS)):
        up, decoder = model.decoder_level(level)
        up_name, decoder_name = fastunet_model.level_modules(level)[:2]
        lines += _up_lines(up_name, up, h_t)
        skip = skips.pop()
        cat = _like(skip, (n, skip.shape[1] + _convs(up)[-1].out_channels, *skip.shape[2:]))
        lines += _double_lines(decoder_name, decoder, cat)
        h_t = _like(cat, (n, _convs(decoder)[-1].out_channels, *cat.shape[2:]))
    return lines + _module_lines("Conv_1x1", model.Conv_1x1, h_t, "the seed's 1x1 conv module", "")
