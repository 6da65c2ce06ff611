"""ATen's (oneDNN's on the CPU) convolutions as fast mode runs them: 3x3 (or the sub-pixel 2x2) with padding 1, in
the layout fastunet.conv.policy.conv_layout picks, and oneDNN's conv + ReLU for CPU inference with an eval BN folded
into its weights."""

import torch

from .. import ops

_aten = torch.ops.aten
CONV_ARGS = ([1, 1], [1, 1], [1, 1], False, [0, 0], 1)  # stride, padding, dilation, transposed, out_pad, groups


def conv(x, w, b):
    """ATen's ``conv2d(x, w, b, padding=1)``: the call torch.nn's Conv2d makes."""
    return _aten.convolution(x, w, b, *CONV_ARGS)


def moved_to(t, memory_format):
    """``t`` ``[N, C, H, W]`` in ``memory_format`` with that format's own strides. Where a size-1 dim makes ``t``
    both layouts (a ``[N, C, 1, 1]`` bottleneck, which ops.memory_format_of calls NCHW), ``contiguous`` keeps
    channels_last strides, and ATen, which reads the layout from the strides, then ran its conv in channels_last,
    laying NCHW weights out anew at every call (and its weight gradient came back channels_last)."""
    t = t.contiguous(memory_format=memory_format)
    _, c, h, w = t.shape
    strides = (c * h * w, h * w, w, 1) if memory_format == torch.contiguous_format else (h * w * c, 1, w * c, c)
    return t if t.stride() == strides else t.as_strided(t.shape, strides)


def forward(x, w, moved):
    """``conv2d(x, w, padding=1)`` (no bias) with the activations in memory format ``moved`` (policy.conv_layout's
    choice; None: as they lie), the output then in x's."""
    if moved is None and torch.compiler.is_compiling():  # as the backward, which Dynamo cannot read layouts in
        return conv(x, w, None)
    layout = ops.memory_format_of(x)
    z = conv(moved_to(x, moved or layout), w, None)
    return z if moved is None else z.contiguous(memory_format=layout)


def backward(dz, x, w, output_mask, moved):
    """(dx, dw) of ``forward`` by ATen's convolution_backward, in the same layout ``moved``, dx then in x's."""
    if moved is None and torch.compiler.is_compiling():  # Dynamo cannot speculate a layout test in a backward
        return _aten.convolution_backward(dz, x, w, None, *CONV_ARGS, [*output_mask, False])[:2]
    layout = ops.memory_format_of(x)
    dx, dw = _aten.convolution_backward(moved_to(dz, moved or layout), moved_to(x, moved or layout), w, None,
                                        *CONV_ARGS, [*output_mask, False])[:2]
    return (dx if dx is None or moved is None else dx.contiguous(memory_format=layout)), dw


def folded_weight(weight, scale):
    """A conv's weight with an eval BN's ``scale`` folded in, made at every call, in channels_last (oneDNN lays those
    out for its convs in about a quarter of the time NCHW ones take)."""
    folded = torch.empty_like(weight, memory_format=torch.channels_last)
    return torch.mul(weight, scale.view(-1, 1, 1, 1), out=folded)


def conv_relu(x, weight, bias, nan_safe=True):
    """``relu(conv2d(x, weight, bias, padding=1))``: oneDNN's convolution, then ATen's ReLU in place; oneDNN's fused
    ReLU where not ``nan_safe`` (one pass less, but it turns a NaN into 0, where the seed keeps it: for inputs and
    weights known to be finite)."""
    if not nan_safe:
        return torch.ops.mkldnn._convolution_pointwise(x, weight, bias, [1, 1], [1, 1], [1, 1], 1, "relu", [], "")
    return torch.ops.mkldnn._convolution_pointwise(x, weight, bias, [1, 1], [1, 1], [1, 1], 1, "none", [], "").relu_()


def conv1x1(x, weight, bias):
    """``conv2d(x, weight, bias)`` of a 1x1 conv: the call torch.nn's Conv2d makes."""
    return torch.nn.functional.conv2d(x, weight, bias)


def packed(weight, input_shape):
    """``weight`` ``[Cout, Cin, k, k]`` (float32) rounded once to bfloat16 and packed by oneDNN in its own layout for
    the conv (padding 1) of an input of ``input_shape``: what conv_relu takes in place of a dense weight (oneDNN
    re-lays it out for convs of other shapes where its kernels want another layout)."""
    dense = weight.to(torch.bfloat16).contiguous().to_mkldnn()
    return torch._C._nn.mkldnn_reorder_conv2d_weight(dense, [1, 1], [1, 1], [1, 1], 1, list(input_shape))
