"""Fast mode's training convolution, forward and backward: runs what fastunet.conv.policy picks for the layer
(upcast, then train_conv: Winograd, im2col GEMMs, ATen's conv with shifted-GEMM backward, or ATen's conv), chosen
once per conv by ``choose`` in the forward and read again by the backward."""

from typing import NamedTuple, Optional

import torch

from .. import ops
from . import aten, gemm, policy, winograd


class ConvChoice(NamedTuple):
    """The policy's answer for one training conv: ``upcast``, whether it runs in float32 on the upcast inputs
    (policy.upcast); ``algorithm``, policy.train_conv's; ``moved``, the memory format ATen's conv moves the
    activations to (policy.conv_layout; None: as they lie). A block's Function asks once per conv in its forward
    and hands the answer to its backward, which then runs the same algorithm without asking again."""

    upcast: bool
    algorithm: str
    moved: Optional[torch.memory_format]


def choose(x, w):
    """The ConvChoice of ``conv2d(x, w, padding=1)`` in a training step (x, w: the conv's input and weight, or
    tensors of their shapes, dtypes and layouts)."""
    layer = policy.Layer.of(x, w, train=True)
    upcast = bool(policy.upcast(layer).algorithm)
    if upcast:  # what the float32 copies (x.float() keeps x's strides) would be asked
        layer = layer._replace(dtype=torch.float32, weight_dtype=torch.float32)
    algorithm = policy.train_conv(layer).algorithm
    moved = policy.conv_layout(layer).algorithm if algorithm in ("aten", "shifted_gemm") else None
    return ConvChoice(upcast, algorithm, moved)


def forward(x, w, choice=None):
    """``conv2d(x, w, padding=1)`` (3x3, or the sub-pixel 2x2), no bias; the output in x's layout and dtype, by
    ``choice`` (default: ``choose(x, w)``), in float32 where it upcasts."""
    choice = choose(x, w) if choice is None else choice
    if choice.upcast:
        return forward(x.float(), w.float(), choice._replace(upcast=False)).to(x.dtype)
    if choice.algorithm == "winograd":
        return winograd.conv3x3(x, winograd.weights(w))
    if choice.algorithm == "gemm":
        return gemm.forward(x, w)
    return aten.forward(x, w, choice.moved)


def backward(dz, x, w, output_mask, choice=None):
    """(dx, dw) of ``forward``, each None where ``output_mask`` says so, by the same ``choice`` (default:
    ``choose(x, w)``). Where the forward ran in float32, so does this; dx comes back in x's dtype, dw in float32."""
    choice = choose(x, w) if choice is None else choice
    if choice.upcast:
        dx, dw = backward(dz.float(), x.float(), w.float(), output_mask, choice._replace(upcast=False))
        return (None if dx is None else dx.to(x.dtype)), dw
    if choice.algorithm == "winograd":
        dx = None
        if output_mask[0]:
            dx = torch.empty(x.shape, dtype=x.dtype, device=x.device, memory_format=ops.memory_format_of(x))
            winograd.conv3x3_input_grad(dz, w, dx)
        dw = winograd.conv3x3_weight_grad(x, dz, torch.empty_like(w)) if output_mask[1] else None
        return dx, dw
    if choice.algorithm == "shifted_gemm":
        return gemm.shifted_backward(dz, x, w, output_mask)
    if choice.algorithm == "gemm":
        return gemm.backward(dz, x, w, output_mask)
    return aten.backward(dz, x, w, output_mask, choice.moved)
