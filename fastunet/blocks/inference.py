"""CPU inference of the fused blocks (eval BN, nothing for autograd to record): the Functions are skipped for
oneDNN's convs with the BN folded in, im2col GEMMs, Winograd, or the folded sub-pixel up-conv, as
fastunet.conv.policy picks; under lower-precision autocast, float32 GEMMs for the blocks whose weights outweigh
their pixels. A layer comes as an ``InferenceConv``: a model's derives its folded forms at every call
(``InferenceConv.of``: nothing is kept between calls), an inference snapshot's (fastunet.optimize_for_inference)
holds them prepacked."""

from typing import NamedTuple, Optional

import torch

from ..conv import aten as conv_aten
from ..conv import gemm, policy, subpixel, winograd
from .bn import BatchNormArgs, _eval_bn_vectors
from .casts import _autocast_dtype
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


def _autocast_gemm_inference(x, params, bns, layers):
    """Autocast's dtype where a block runs CPU inference as float32 GEMMs under lower-precision autocast, else None:
    every conv of it picks them (policy.autocast_inference_conv of the policy.Layer facts ``layers()`` makes, asked
    only past the other checks: the blocks' every call comes here), the parameters ``params`` float32, every BN in
    eval, nothing for autograd to record, eager."""
    dtype = _autocast_dtype("cpu")
    if (dtype is None or x.device.type != "cpu" or x.dtype not in (torch.float32, dtype)
            or any(t is not None and t.dtype != torch.float32 for t in params) or any(bn.training for bn in bns)
            or (torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (x, *params)))
            or torch.compiler.is_compiling()):
        return None
    return dtype if all(policy.autocast_inference_conv(layer).algorithm == "gemm" for layer in layers()) else None


class InferenceConv(NamedTuple):
    """One conv3x3 + eval BN + ReLU as CPU inference runs it: ``relu(conv3x3(x, weight) * scale + shift)``.

    weight ``[Cout, Cin, 3, 3]``; scale, shift ``[Cout]`` float32: the BN (the conv bias in the shift). The forms
    below are None where they are made at the call from weight and scale: folded: ``weight * scale`` (channels_last,
    for oneDNN's conv and the sub-pixel phases); winograd: Winograd's U of it; subpixel: the folded sub-pixel phase
    weights ``[4*Cout, Cin, 2, 2]`` (an up block's); packed: a oneDNN-packed folded weight (mkldnn layout) that
    runs every conv of the layer (a bfloat16 snapshot's; ``subpixel`` then packed too where set). seed: the
    layer's ``((weight, bias), BatchNormArgs)`` for the seed's unfolded ops, None in a snapshot (its BN is folded).
    """

    weight: torch.Tensor
    scale: torch.Tensor
    shift: torch.Tensor
    folded: Optional[torch.Tensor] = None
    winograd: Optional[torch.Tensor] = None
    subpixel: Optional[torch.Tensor] = None
    packed: Optional[torch.Tensor] = None
    seed: Optional[tuple] = None

    @classmethod
    def of(cls, conv, bn: BatchNormArgs):
        """A model's layer: ``conv`` ``(weight, bias)`` and its eval BN; every folded form made at the call."""
        weight, bias = conv
        _, _, scale, shift = _eval_bn_vectors(bn, bias, weight.dtype)
        return cls(weight, scale, shift, seed=(conv, bn))

    def folded_weight(self):
        """``weight * scale``: the prepacked one, else made now (conv_aten.folded_weight)."""
        return self.folded if self.folded is not None else conv_aten.folded_weight(self.weight, self.scale)

    def winograd_weights(self):
        """Winograd's U of the folded weight: the prepacked one, else made now in this thread's workspace."""
        return self.winograd if self.winograd is not None else winograd.weights(self.weight, self.scale)

    def subpixel_weights(self):
        """The folded sub-pixel phase weights: the prepacked ones, else made now."""
        return self.subpixel if self.subpixel is not None else subpixel.phase_weights(self.folded_weight())


def _unfolded_conv_bn_relu(x, layer):
    """``relu(BN(conv3x3(x)))`` of an eval-mode BN as the seed computes it (_reference_layer), the ReLU in place
    (no fresh activation-sized buffer to fault in)."""
    conv, bn = layer.seed
    return _reference_layer(x, *conv, bn, x.dtype, inplace_relu=True)


def _gemm_conv_bn_relu(x, layer):
    """``relu(BN(conv3x3(x)))`` of an eval-mode BN as im2col and one GEMM over the batch (gemm.conv_scale_shift_relu),
    the BN as a scale and shift of the product; the output in x's layout."""
    return gemm.conv_scale_shift_relu(x, layer.weight, layer.scale, layer.shift)


def _winograd_conv_bn_relu(x, layer, out=None):
    """``relu(BN(conv3x3(x)))`` of an eval-mode BN by Winograd F(2x2, 3x3) (fastunet.conv.winograd): BN's scale folded
    into the transformed weights, its shift (the conv bias included) as the bias, the ReLU in the output transform;
    written into ``out`` if given, else a new tensor in x's layout."""
    return winograd.conv3x3(x, layer.winograd_weights(), layer.shift, True, out)


def _conv_bn_relu_inference(x, layer, exact, out=None, nan_safe=True):
    """``relu(BN(conv3x3(x)))`` of the InferenceConv ``layer``: by its packed weight where it has one, else by what
    policy.inference_conv picks: the seed's ops (unfolded; folded in a snapshot, which has no BN), Winograd, the
    GEMMs, or oneDNN's conv with the BN folded in (conv_aten.conv_relu, ``nan_safe`` as there). Written into ``out``
    if given (the Winograd conv writes there directly), else a new tensor."""
    if layer.packed is not None:
        y = conv_aten.conv_relu(x, layer.packed, layer.shift, nan_safe)
        return y if out is None else out.copy_(y)
    choice = _inference_conv_choice(x, layer.weight, exact, kept=layer.winograd is not None).algorithm
    if choice == "winograd":
        return _winograd_conv_bn_relu(x, layer, out)
    if choice == "gemm":
        y = _gemm_conv_bn_relu(x, layer)
    elif choice == "folded" or layer.seed is None:
        y = conv_aten.conv_relu(x, layer.folded_weight(), layer.shift, nan_safe)
    else:
        y = _unfolded_conv_bn_relu(x, layer)
    return y if out is None else out.copy_(y)


def _inference_conv_choice(x, weight, exact, kept=False):
    """policy.inference_conv's Choice for the conv of ``x`` by ``weight`` in CPU inference (``kept``: Winograd's
    weights prepacked, in a snapshot)."""
    return policy.inference_conv(policy.Layer.of(x, weight, train=False, exact=exact), kept=kept)


def _double_block_inference(x, layer1, layer2, cat_channels, pool, exact, nan_safe=True):
    """double_conv_bn_relu's result by two _conv_bn_relu_inference and ATen's max-pool."""
    y = _conv_bn_relu_inference(_conv_bn_relu_inference(x, layer1, exact, nan_safe=nan_safe), layer2, exact,
                                nan_safe=nan_safe)
    return _pooled_and_buffer(y, cat_channels, pool)


def _double_block_autocast_gemm(x, layer1, layer2, cat_channels, pool, dtype):
    """double_conv_bn_relu's result under autocast (_autocast_gemm_inference) by two _gemm_conv_bn_relu on x upcast,
    the block's output rounded once to autocast's ``dtype``, as the Function returns it."""
    y = _gemm_conv_bn_relu(_gemm_conv_bn_relu(x.float(), layer1), layer2).to(dtype)
    return _pooled_and_buffer(y, cat_channels, pool)


def _pooled_and_buffer(y, cat_channels, pool):
    """A double block's ``(buf, pooled)`` from its output ``y``: ATen's max-pool of y if ``pool``, y in a concat
    buffer with ``cat_channels`` more channels if asked."""
    pooled = _aten.max_pool2d(y, [2, 2], [2, 2]) if pool else None
    if not cat_channels:
        return y, pooled
    buf, out, _ = _block_outputs(y, cat_channels, False)
    out.copy_(y)
    return buf, pooled


def _up_block_inference(d, buf, layer, exact, nan_safe=True):
    """upsample_conv_cat's result, into the buffer: the folded sub-pixel conv on ``d`` (subpixel.conv_relu_into)
    where _subpixel_inference says so, else _conv_bn_relu_inference on ATen's nearest upsample of ``d``."""
    cout = layer.shift.shape[0]
    out = concat_parts(buf, buf.shape[1] - cout)[1]
    if not _subpixel_inference(d, layer, exact):
        _conv_bn_relu_inference(_aten.upsample_nearest2d.vec(d, None, [2.0, 2.0]), layer, exact, out, nan_safe)
        return buf
    subpixel.conv_relu_into(d, layer.subpixel_weights(), layer.shift, out, nan_safe)
    return buf


def _up_block_autocast_gemm(d, buf, layer):
    """upsample_conv_cat's result under autocast (_autocast_gemm_inference), into the buffer of autocast's dtype:
    _gemm_conv_bn_relu on the nearest upsample of d upcast, rounded once as it is written."""
    out = concat_parts(buf, buf.shape[1] - layer.shift.shape[0])[1]
    out.copy_(_gemm_conv_bn_relu(_aten.upsample_nearest2d.vec(d.float(), None, [2.0, 2.0]), layer))
    return buf


def _subpixel_inference(d, layer, exact):
    """Whether _up_block_inference runs the sub-pixel conv on ``d``: a packed layer has one form (packed 3x3
    weights, or packed sub-pixel ones); otherwise policy.up_conv picks."""
    if layer.packed is not None or (layer.subpixel is not None and layer.subpixel.is_mkldnn):
        return layer.packed is None
    return policy.up_conv(policy.Layer.of(d, layer.weight, train=False, exact=exact)).algorithm == "subpixel"
