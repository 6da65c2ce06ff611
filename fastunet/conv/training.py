"""Fast mode's training convolution, forward and backward: runs what fastunet.conv.policy picks for the layer
(upcast, then train_conv: Winograd, im2col GEMMs, ATen's conv with shifted-GEMM backward, or ATen's conv)."""

import torch

from .. import ops
from . import aten, gemm, policy, winograd


def forward(x, w):
    """``conv2d(x, w, padding=1)`` (3x3, or the sub-pixel 2x2), no bias; the output in x's layout and dtype,
    computed in float32 where policy.upcast says so."""
    layer = policy.Layer.of(x, w, train=True)
    if policy.upcast(layer).algorithm:
        return forward(x.float(), w.float()).to(x.dtype)
    algorithm = policy.train_conv(layer).algorithm
    if algorithm == "winograd":
        return winograd.conv3x3(x, winograd.weights(w))
    if algorithm == "gemm":
        return gemm.forward(x, w)
    return aten.forward(x, w)


def backward(dz, x, w, output_mask):
    """(dx, dw) of ``forward``, each None where ``output_mask`` says so, by the same choice. Where the forward ran in
    float32, so does this; dx comes back in x's dtype, dw in float32."""
    layer = policy.Layer.of(x, w, train=True)
    if policy.upcast(layer).algorithm:
        dx, dw = backward(dz.float(), x.float(), w.float(), output_mask)
        return (None if dx is None else dx.to(x.dtype)), dw
    algorithm = policy.train_conv(layer).algorithm
    if algorithm == "winograd":
        dx = None
        if output_mask[0]:
            dx = torch.empty(x.shape, dtype=x.dtype, device=x.device, memory_format=ops.memory_format_of(x))
            winograd.conv3x3_input_grad(dz, w, dx)
        dw = winograd.conv3x3_weight_grad(x, dz, torch.empty_like(w)) if output_mask[1] else None
        return dx, dw
    if algorithm == "shifted_gemm":
        return gemm.shifted_backward(dz, x, w, output_mask)
    if algorithm == "gemm":
        return gemm.backward(dz, x, w, output_mask)
    return aten.backward(dz, x, w, output_mask)
