"""CPU inference of the fused blocks (float32, eval BN, nothing for autograd to record): the Functions are
skipped for oneDNN's convs with the BN folded in, im2col GEMMs, Winograd with kept weights, or the folded
sub-pixel up-conv, as fastunet.conv.policy picks."""


import torch

from .. import weight_cache
from ..conv import aten as conv_aten
from ..conv import gemm, policy, winograd
from ..conv.subpixel import conv_relu_into
from .bn import (
    _eval_bn_vectors,
)
from .concat import _block_outputs, concat_parts
from .recompute import _reference_layer

_aten = torch.ops.aten


# Where torch has oneDNN (benchmarks/cpu_inference.py switches it off to time the Functions' path).
_CPU_INFERENCE = torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_convolution_pointwise")


def _cpu_inference(x, tensors, bns):
    """Whether a block runs as CPU inference (_double_block_inference, _up_block_inference): float32 on the CPU,
    every BN in eval, nothing for autograd to record (the Function would not be recorded either), no autocast,
    eager. Exact mode runs the seed's own ATen ops there (its bits by construction), without the fused ops."""
    return (_CPU_INFERENCE and x.device.type == "cpu" and x.dtype == torch.float32
            and all(t is None or t.dtype == torch.float32 for t in tensors) and not any(bn.training for bn in bns)
            and not (torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors))
            and not torch.is_autocast_enabled("cpu") and not torch.compiler.is_compiling())



def _folded(conv, bn):
    """(weight, bias) of the conv followed by an eval-mode BN: BN's scale folded into the weights, its shift (the
    conv bias included) as the bias; made at every call (conv_aten.folded_weight)."""
    weight, bias = conv
    _, _, scale, shift = _eval_bn_vectors(bn, bias, weight.dtype)
    return conv_aten.folded_weight(weight, scale), shift


def _unfolded_conv_bn_relu(x, conv, bn):
    """``relu(BN(conv3x3(x)))`` of an eval-mode BN as the seed computes it (_reference_layer), the ReLU in place
    (no fresh activation-sized buffer to fault in)."""
    return _reference_layer(x, *conv, bn, x.dtype, inplace_relu=True)


def _gemm_conv_bn_relu(x, conv, bn):
    """``relu(BN(conv3x3(x)))`` of an eval-mode BN as im2col and one GEMM per image (gemm.conv_scale_shift_relu),
    the BN as a scale and shift of the product; the output in x's layout."""
    weight, bias = conv
    _, _, scale, shift = _eval_bn_vectors(bn, bias, weight.dtype)
    return gemm.conv_scale_shift_relu(x, weight, scale, shift)


def _winograd_conv_bn_relu(x, conv, bn, out=None):
    """``relu(BN(conv3x3(x)))`` of an eval-mode BN by Winograd F(2x2, 3x3) (fastunet.conv.winograd): BN's scale folded
    into the transformed weights (kept between calls by fastunet.weight_cache), its shift (the conv bias included)
    as the bias, the ReLU in the output transform; written into ``out`` if given, else a new tensor in x's layout."""
    weight, bias = conv
    _, _, scale, shift = _eval_bn_vectors(bn, bias, weight.dtype)
    u = weight_cache.lookup("winograd", (weight, scale), winograd.kept_weights)
    return winograd.conv3x3(x, winograd.weights(weight, scale) if u is None else u, shift, True, out)


def _conv_bn_relu_inference(x, conv, bn, exact, out=None):
    """``relu(BN(conv3x3(x)))`` of an eval-mode BN by what policy.inference_conv picks: the seed's ops (unfolded),
    Winograd (with kept weights unless fastunet.weight_cache is off), the GEMMs, or oneDNN's conv with the BN folded
    in (conv_aten.conv_relu). Written into ``out`` if given (the Winograd conv writes there directly), else a new
    tensor."""
    choice = _inference_conv_choice(x, conv[0], exact).algorithm
    if choice == "winograd":
        return _winograd_conv_bn_relu(x, conv, bn, out)
    if choice == "gemm":
        y = _gemm_conv_bn_relu(x, conv, bn)
    elif choice == "folded":
        y = conv_aten.conv_relu(x, *_folded(conv, bn))
    else:
        y = _unfolded_conv_bn_relu(x, conv, bn)
    return y if out is None else out.copy_(y)


def _inference_conv_choice(x, weight, exact):
    """policy.inference_conv's Choice for the conv of ``x`` by ``weight`` in CPU inference."""
    return policy.inference_conv(policy.Layer.of(x, weight, train=False, exact=exact), kept=weight_cache.enabled)


def _forget_kept_weights(*weights):
    """fastunet.weight_cache.forget of the weights a block runs outside CPU inference (eager only: Dynamo need not
    trace a lock)."""
    if not torch.compiler.is_compiling():
        weight_cache.forget(*weights)


def _double_block_inference(x, conv1, bn1, conv2, bn2, cat_channels, pool, exact):
    """double_conv_bn_relu's result by two _conv_bn_relu_inference and ATen's max-pool."""
    y = _conv_bn_relu_inference(_conv_bn_relu_inference(x, conv1, bn1, exact), conv2, bn2, exact)
    pooled = _aten.max_pool2d(y, [2, 2], [2, 2]) if pool else None
    if not cat_channels:
        return y, pooled
    buf, out, _ = _block_outputs(y, cat_channels, False)
    out.copy_(y)
    return buf, pooled


def _up_block_inference(d, buf, conv, bn, exact):
    """upsample_conv_cat's result, into the buffer: where policy.up_conv picks the sub-pixel conv, its folded form on
    ``d`` (subpixel.conv_relu_into); else _conv_bn_relu_inference on ATen's nearest upsample of ``d``."""
    cout = conv[0].shape[0]
    out = concat_parts(buf, buf.shape[1] - cout)[1]
    if not _subpixel_inference(d, conv[0], exact):
        _conv_bn_relu_inference(_aten.upsample_nearest2d.vec(d, None, [2.0, 2.0]), conv, bn, exact, out)
        return buf
    conv_relu_into(d, *_folded(conv, bn), out)
    return buf


def _subpixel_inference(d, weight, exact):
    """Whether _up_block_inference runs the folded sub-pixel conv on ``d`` (policy.up_conv)."""
    return policy.up_conv(policy.Layer.of(d, weight, train=False, exact=exact)).algorithm == "subpixel"
