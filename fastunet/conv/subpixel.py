"""The sub-pixel form of nearest upsample x2 + conv3x3: one 2x2 conv (padding 1) on the low-resolution input with 4x
the output channels, one per output phase (2.25x fewer multiplies than the 3x3 conv on the upsampled input). Its
phase weights, their backward, and CPU inference's folded form written into a concat buffer."""

import torch

from .. import ops
from . import aten

# The sub-pixel decomposition of upsample2x + conv3x3 along one axis: output phase 0 (even rows) sees the 2-tap
# kernel (r0, r1 + r2) of the 3 taps r0, r1, r2, phase 1 (odd rows) (r0 + r1, r2). [phase][tap] -> the taps summed.
_PHASE_TAPS = (((0,), (1, 2)), ((0, 1), (2,)))


def _tap_sum(t, dim, taps):
    """The sum of ``t``'s ``taps`` along ``dim`` (a view where it is one tap)."""
    first = t.select(dim, taps[0])
    return first if len(taps) == 1 else first + t.select(dim, taps[1])


def _unfold_taps(g):
    """The adjoint of the sub-pixel decomposition along one axis (_PHASE_TAPS): ``[2 phases, 2 taps, ...]`` ->
    ``[3 taps, ...]``, one output allocation."""
    (even0, even1), (odd0, odd1) = (phase.unbind(0) for phase in g.unbind(0))
    out = even0.new_empty((3, *even0.shape))
    for tap, (even, odd) in enumerate(((even0, odd0), (even1, odd0), (even1, odd1))):
        torch.add(even, odd, out=out[tap])
    return out


def phase_weights(w):
    """3x3 weights ``[O, I, 3, 3]`` -> sub-pixel 2x2 weights ``[4*O, I, 2, 2]``, float32 (float64 stays), in w's
    memory format (a channels_last model's convs then take them without a layout copy). Made at every call: one
    output allocation, each tap written once (the rows' tap sums, then the columns' into place).

    ``conv2d(x, phase_weights(w), padding=1)[:, (2a+b)*O + o, i+a, j+b]`` equals
    ``conv2d(upsample2x(x), w, padding=1)[:, o, 2i+a, 2j+b]`` for a, b in {0, 1}.
    """
    o, i = w.shape[:2]
    w = w.to(ops.acc_dtype(w.dtype))
    w4 = torch.empty((4 * o, i, 2, 2), dtype=w.dtype, device=w.device, memory_format=ops.memory_format_of(w))
    phases = w4.unflatten(0, (2, 2, o))  # [a, b, O, I, row tap, column tap]
    for a in range(2):
        for row_tap in range(2):
            rows = _tap_sum(w, 2, _PHASE_TAPS[a][row_tap])  # [O, I, 3 column taps]
            for b in range(2):
                for column_tap in range(2):
                    phases[a, b, :, :, row_tap, column_tap] = _tap_sum(rows, 2, _PHASE_TAPS[b][column_tap])
    return w4


def phase_weights_backward(dw4, out_channels):
    """Gradient through phase_weights: ``[4*O, I, 2, 2]`` (any strides) -> ``[O, I, 3, 3]`` contiguous, float32
    (float64 stays). The tap sums run on whole ``[O, I]`` planes, taps outermost."""
    d6 = dw4.to(ops.acc_dtype(dw4.dtype)).reshape(2, 2, out_channels, dw4.shape[1], 2, 2)  # [a, b, O, I, rt, ct]
    columns = _unfold_taps(d6.permute(1, 5, 4, 0, 2, 3))  # [b, ct, rt, a, O, I] -> [3 columns, rt, a, O, I]
    taps = _unfold_taps(columns.permute(2, 1, 0, 3, 4))  # [a, rt, 3 columns, O, I] -> [3 rows, 3 columns, O, I]
    return taps.permute(2, 3, 0, 1).contiguous()


def conv_relu_into(d, phases, bias, out, nan_safe=True):
    """``relu(conv3x3(upsample2x(d), weight) + bias)`` written into ``out`` ``[N, Cout, 2h, 2w]`` (any strides), from
    ``phases = phase_weights(weight)`` (dense, or packed by oneDNN): the sub-pixel conv by oneDNN (aten.conv_relu,
    ``nan_safe`` as there), its four phases then interleaved into ``out``."""
    n, _, h, w = d.shape
    cout = bias.shape[0]
    outputs = aten.conv_relu(d, phases, bias.repeat(4), nan_safe)  # [N, 4*Cout, h + 1, w + 1]
    for a in range(2):
        for b in range(2):
            k = 2 * a + b
            out[:, :, a::2, b::2].copy_(outputs[:, k * cout:(k + 1) * cout, a:a + h, b:b + w])
    return out
