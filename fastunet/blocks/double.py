"""The double block: (conv3x3 + BN + ReLU) x 2 as an autograd Function (DoubleConvBNReLU) and
double_conv_bn_relu, which applies it or runs CPU inference."""

from typing import NamedTuple, Optional

import torch
import torch.nn.functional as F

from .. import ops
from ..conv import aten as conv_aten
from ..conv import policy, training
from .bn import (
    BatchNormArgs,
    _check_no_exact_sync,
    _eval_running_stats,
    _exact_bn,
    _exact_bn_backward,
    _fast_bn,
    _fast_bn_backward,
    _relu_pool_exact,
    _relu_pool_exact_backward,
    _sync_of,
)
from .casts import _autocast_dtype, _cast, _cast_copy, _conv_dtype, _grad_as
from .concat import _block_outputs, concat_parts
from .function_io import _apply, _decode, _head, signature_once
from .inference import (
    InferenceConv,
    _autocast_gemm_inference,
    _cpu_inference,
    _double_block_autocast_gemm,
    _double_block_inference,
)
from .recompute import _check_double_backward_unsynchronized, _differentiable_backward, _reference_layer

_aten = torch.ops.aten
_CONV_ARGS = conv_aten.CONV_ARGS


def _second_conv(z1, scale1, shift1, w2, stats, choice):
    """Layer 2's conv of ``relu(z1*scale1 + shift1)`` and, if ``stats``, its batch (mean, var) (else None),
    by ops.conv3x3_backend's pick: Triton forms the activation in its input load (never written) and gathers
    the statistics in its epilogue; otherwise a BN+ReLU pass and the training conv by ``choice``."""
    if ops.conv3x3_backend(z1, w2, stats) == "triton":
        from .. import kernels

        z2, mean, var = kernels.conv3x3_bn_relu_stats(z1, scale1, shift1, w2, stats)
        return z2, ((mean, var) if stats else None)
    a1 = torch.empty_like(z1)
    ops.bn_relu_pool(z1, scale1, shift1, 1, a1, None)
    return training.forward(a1, w2, choice), None


class DoubleInputs(NamedTuple):
    """The double block Function's tensor inputs in its argument order (its input gradients come in the same)."""

    x: torch.Tensor
    w1: torch.Tensor
    b1: Optional[torch.Tensor]
    gamma1: torch.Tensor
    beta1: torch.Tensor
    running_mean1: Optional[torch.Tensor]
    running_var1: Optional[torch.Tensor]
    w2: torch.Tensor
    b2: Optional[torch.Tensor]
    gamma2: torch.Tensor
    beta2: torch.Tensor
    running_mean2: Optional[torch.Tensor]
    running_var2: Optional[torch.Tensor]


class DoubleSettings(NamedTuple):
    """The double block Function's other inputs, after its tensors."""

    settings1: tuple
    settings2: tuple
    exact: bool
    cat_channels: int
    pool: bool


class DoubleOutputs(NamedTuple):
    """The double block Function's results, before what it returns for backward."""

    buf: torch.Tensor
    pooled: Optional[torch.Tensor]


class DoubleCasts(NamedTuple):
    """Autocast's copies of the input and the weights (the forward returns None where nothing was cast)."""

    x: Optional[torch.Tensor]
    w1: Optional[torch.Tensor]
    w2: Optional[torch.Tensor]


class ExactLayerSaved(NamedTuple):
    """What exact mode keeps of one conv + BN + ReLU layer: its conv output, ``kept`` (layer 1: its activation,
    layer 2's conv input; layer 2: its BN output) and what ATen's BN backward reads."""

    z: torch.Tensor
    kept: torch.Tensor
    save_mean: torch.Tensor
    save_invstd: torch.Tensor
    reserve: torch.Tensor


class FastLayerSaved(NamedTuple):
    """What fast mode keeps of one layer: its pre-BN conv output and BN's per-channel vectors."""

    z: torch.Tensor
    mean: torch.Tensor
    invstd: torch.Tensor
    scale: torch.Tensor
    shift: torch.Tensor


class LayerExtras(NamedTuple):
    """The two layers' values beside their saved tensors: exact mode's ATen BN impl indices, fast mode's counts of
    values per channel."""

    layer1: object
    layer2: object


class ConvChoices(NamedTuple):
    """Fast mode's training.ConvChoice of each conv, made in the forward for the backward."""

    conv1: training.ConvChoice
    conv2: training.ConvChoice


@signature_once
class DoubleConvBNReLU(torch.autograd.Function):
    """(conv3x3 + BN + ReLU) x 2; see double_conv_bn_relu. Inputs: DoubleInputs, then DoubleSettings. Outputs:
    DoubleOutputs, then what backward needs (returned, as torch.func asks, rather than stashed on a ctx):
    DoubleCasts, each layer's ExactLayerSaved or FastLayerSaved, LayerExtras, and in fast mode the two
    training.ConvChoice's fields in turn."""

    @staticmethod
    def forward(x, w1, b1, gamma1, beta1, running_mean1, running_var1,
                w2, b2, gamma2, beta2, running_mean2, running_var2, settings1, settings2, exact, cat_channels, pool):
        bn1 = BatchNormArgs(gamma1, beta1, running_mean1, running_var1, *settings1)
        bn2 = BatchNormArgs(gamma2, beta2, running_mean2, running_var2, *settings2)
        _check_no_exact_sync(exact, bn1, bn2)
        cast = _autocast_dtype(x.device.type)
        with torch.autocast(x.device.type, enabled=False):
            x_cast = _cast_copy(x, cast)
            keep1, keep2 = autocast_float32_weights(x if x_cast is None else x_cast, w1, w2, cast, exact)
            casts = DoubleCasts(x_cast, None if keep1 else _cast_copy(w1, cast),
                                None if keep2 else _cast_copy(w2, cast))
            xc, w1c, w2c = (c if c is not None else t for c, t in zip(casts, (x, w1, w2)))
            if exact:
                z1 = conv_aten.conv(xc, w1c, _cast(b1, cast))
                t1, mean1, invstd1, reserve1, impl1 = _exact_bn(z1, bn1)
                a1 = torch.empty_like(t1)
                _relu_pool_exact(t1, a1)
                del t1
                z2 = conv_aten.conv(a1, w2c, _cast(b2, cast))
                t2, mean2, invstd2, reserve2, impl2 = _exact_bn(z2, bn2)
                buf, out, pooled = _block_outputs(z2, cat_channels, pool)
                _relu_pool_exact(t2, out, pooled)
                return (buf, pooled, *casts, *ExactLayerSaved(z1, a1, mean1, invstd1, reserve1),
                        *ExactLayerSaved(z2, t2, mean2, invstd2, reserve2), *LayerExtras(impl1, impl2))
            choice1 = training.choose(xc, w1c)
            z1 = training.forward(xc, w1c, choice1)
            mean1, invstd1, scale1, shift1, count1 = _fast_bn(z1, bn1, b1, 1)
            # Layer 1's activation is not kept: backward recomputes it from z1 (its shape and layout).
            choice2 = training.choose(z1, w2c)
            z2, stats2 = _second_conv(z1, scale1, shift1, w2c, bn2.training, choice2)
            mean2, invstd2, scale2, shift2, count2 = _fast_bn(z2, bn2, b2, 1, stats2)
            buf, out, pooled = _block_outputs(z2, cat_channels, pool)
            ops.bn_relu_pool(z2, scale2, shift2, 1, out, pooled)
            return (buf, pooled, *casts, *FastLayerSaved(z1, mean1, invstd1, scale1, shift1),
                    *FastLayerSaved(z2, mean2, invstd2, scale2, shift2), *LayerExtras(count1, count2), *choice1,
                    *choice2)

    @staticmethod
    def setup_context(ctx, inputs, output):
        args, settings = _decode(inputs, DoubleInputs, DoubleSettings)
        saved_kind = ExactLayerSaved if settings.exact else FastLayerSaved
        choices = () if settings.exact else (training.ConvChoice, training.ConvChoice)
        _, casts, layer1, layer2, extras, *conv_choices = _decode(output, DoubleOutputs, DoubleCasts, saved_kind,
                                                                  saved_kind, LayerExtras, *choices)
        ctx.conv_choices = ConvChoices(*conv_choices) if conv_choices else None
        ctx.set_materialize_grads(False)  # no zero-filled gradients for the saved tensors returned as outputs
        ctx.exact, ctx.pool, ctx.settings = settings.exact, settings.pool, settings
        ctx.saved_kind, ctx.extra, ctx.device_type = saved_kind, extras, args.x.device.type
        ctx.conv_dtype = _conv_dtype(args.x, casts.x)
        ctx.out_channels = args.w2.shape[0]
        ctx.mark_non_differentiable(*(t for t in (*layer1, *layer2) if isinstance(t, torch.Tensor)))
        mean1, var1 = _eval_running_stats(args.running_mean1, args.running_var1, settings.settings1)
        mean2, var2 = _eval_running_stats(args.running_mean2, args.running_var2, settings.settings2)
        kept = args._replace(running_mean1=mean1, running_var1=var1, running_mean2=mean2, running_var2=var2)
        resolved = DoubleCasts._make(t if c is None else c for c, t in zip(casts, (args.x, args.w1, args.w2)))
        ctx.save_for_backward(*kept, *resolved, *layer1, *layer2)

    @staticmethod
    def backward(ctx, grad_buf, grad_pooled, *unused_saved_grads):
        # unpacked once (activation checkpointing allows no more)
        inputs, casts, layer1, layer2 = _decode(ctx.saved_tensors, DoubleInputs, DoubleCasts, ctx.saved_kind,
                                                ctx.saved_kind)
        bn1, bn2 = _double_bns(inputs, ctx.settings)
        others = (None,) * len(DoubleSettings._fields)
        if grad_buf is None and grad_pooled is None:
            return (None,) * len(DoubleInputs._fields) + others
        grad_out = None if grad_buf is None else concat_parts(grad_buf, ctx.out_channels)[0]
        if torch.is_grad_enabled():
            _check_double_backward_unsynchronized(bn1, bn2)
            return tuple(_differentiable_backward(ctx, _double_block_reference(ctx), inputs, (grad_out, grad_pooled)))
        if grad_out is None:  # only the pooled output reached the loss
            grad_out = torch.zeros_like(layer2.z)
        need, _ = _decode(ctx.needs_input_grad, DoubleInputs, DoubleSettings)
        layers = ((casts.x, casts.w1, inputs.b1, bn1, layer1), (casts.w2, inputs.b2, bn2, layer2))
        with torch.autocast(grad_out.device.type, enabled=False):
            if ctx.exact:
                grads = _exact_double_block_backward(grad_out, grad_pooled, ctx.extra, layers, need)
            else:
                grads = _fast_double_block_backward(grad_out, grad_pooled, ctx.extra, layers, need, ctx.conv_choices)
        return tuple(_grad_as(g, t) for g, t in zip(grads, inputs)) + others


def autocast_float32_weights(xc, w1, w2, cast, exact):
    """(conv 1, conv 2): whether each conv of a double block's Function keeps its float32 weights as they lie under
    autocast to ``cast`` (policy.autocast_train_conv), not autocast's copy of them; ``xc``: the block's input as
    its first conv takes it."""
    if cast is None or exact or xc.device.type != "cpu":
        return False, False
    return tuple(policy.autocast_train_conv(layer).algorithm == "float32"
                 for layer in double_block_layers(xc, w1, w2, exact, train=True))


def _double_bns(t, settings):
    """The two BatchNormArgs of DoubleInputs ``t`` and DoubleSettings ``settings``."""
    return (BatchNormArgs(t.gamma1, t.beta1, t.running_mean1, t.running_var1, *settings.settings1),
            BatchNormArgs(t.gamma2, t.beta2, t.running_mean2, t.running_var2, *settings.settings2))


def _double_block_reference(ctx):
    """The seed's conv_block (and max-pool) over the Function's tensor inputs, for _differentiable_backward."""

    def reference(*tensors):
        t = DoubleInputs(*tensors)
        bn1, bn2 = _double_bns(t, ctx.settings)
        y = _reference_layer(_reference_layer(t.x, t.w1, t.b1, bn1, ctx.conv_dtype), t.w2, t.b2, bn2, ctx.conv_dtype)
        return (y, F.max_pool2d(y, 2, 2)) if ctx.pool else (y,)

    return reference


def _exact_double_block_backward(grad_out, grad_pooled, impls, layers, need):
    """Exact mode's backward, ATen's own backward calls: the DoubleInputs of gradients (None for the running stats).
    Each activation-sized gradient is dropped once used, as the autograd engine would."""
    (xc, w1c, _, bn1, layer1), (w2c, _, bn2, layer2) = layers
    dy2 = _relu_pool_exact_backward(grad_out, grad_pooled, layer2.kept)
    dz2, dgamma2, dbeta2 = _exact_bn_backward(dy2, layer2.z, bn2, layer2.save_mean, layer2.save_invstd,
                                              layer2.reserve, impls.layer2, [True, need.gamma2, need.beta2])
    del dy2
    a1 = layer1.kept
    da1, dw2, db2 = _aten.convolution_backward(dz2, a1, w2c, [w2c.shape[0]], *_CONV_ARGS, [True, need.w2, need.b2])
    del dz2
    dy1 = _relu_pool_exact_backward(da1, None, a1)
    del da1
    dz1, dgamma1, dbeta1 = _exact_bn_backward(dy1, layer1.z, bn1, layer1.save_mean, layer1.save_invstd,
                                              layer1.reserve, impls.layer1, [True, need.gamma1, need.beta1])
    del dy1
    dx, dw1, db1 = _aten.convolution_backward(dz1, xc, w1c, [w1c.shape[0]], *_CONV_ARGS, [need.x, need.w1, need.b1])
    return DoubleInputs(dx, dw1, db1, dgamma1, dbeta1, None, None, dw2, db2, dgamma2, dbeta2, None, None)


def _fast_double_block_backward(grad_out, grad_pooled, counts, layers, need, choices):
    """Fast mode's backward: the DoubleInputs of gradients (None for the running stats), each conv's by its forward's
    ConvChoices. Layer 1's activation is recomputed from its pre-BN output; each activation-sized tensor is dropped
    once used."""
    (xc, w1c, b1, bn1, layer1), (w2c, b2, bn2, layer2) = layers
    dz2, dgamma2, dbeta2, db2 = _fast_bn_backward(grad_out, grad_pooled, layer2.z, layer2.mean, layer2.invstd,
                                                  layer2.scale, layer2.shift, b2, bn2.training, 1,
                                                  _sync_of(bn2, counts.layer2))
    a1 = torch.empty_like(layer1.z)
    ops.bn_relu_pool(layer1.z, layer1.scale, layer1.shift, 1, a1, None)
    da1, dw2 = training.backward(dz2, a1, w2c, [True, need.w2], choices.conv2)
    del a1, dz2
    dz1, dgamma1, dbeta1, db1 = _fast_bn_backward(da1, None, layer1.z, layer1.mean, layer1.invstd, layer1.scale,
                                                  layer1.shift, b1, bn1.training, 1, _sync_of(bn1, counts.layer1))
    del da1
    dx, dw1 = training.backward(dz1, xc, w1c, [need.x, need.w1], choices.conv1)
    return DoubleInputs(dx, dw1, db1, dgamma1, dbeta1, None, None, dw2, db2, dgamma2, dbeta2, None, None)


# ----------------------------------------------------------------------------------------------------
# CPU inference
# ----------------------------------------------------------------------------------------------------


def double_block_layers(x, w1, w2, exact, train=False):
    """The policy.Layer facts of a double block's two convs on ``x`` (inference, or ``train``), by weights ``w1`` and
    ``w2`` (the second conv's input: x's layout and dtype)."""
    layer1 = policy.Layer.of(x, w1, train=train, exact=exact)
    return layer1, layer1._replace(cin=w2.shape[1], cout=w2.shape[0], weight_dtype=w2.dtype,
                                   weight_layout=ops.memory_format_of(w2))


def double_conv_bn_relu(x, conv1, bn1, conv2, bn2, *, exact=False, cat_channels=0, pool=False):
    """(conv3x3 + BN + ReLU) x 2 over ``x`` ``[N, Cin, H, W]`` (float32/bfloat16/float16, NCHW or NHWC).

    conv1/conv2 are ``(weight [Cout, C, 3, 3], bias [Cout] or None)`` pairs, bn1/bn2 BatchNormArgs (their
    running stats are updated here in training, by their ``factor``; with a process group, fast mode, the
    training statistics are synchronized over it). Returns ``(buf, pooled)``: ``buf`` is ``[N, Cout +
    cat_channels, H, W]`` in x's layout whose first Cout channels hold the block output (the rest is for
    upsample_conv_cat to fill), ``pooled`` its 2x2 max-pool ``[N, Cout, H/2, W/2]`` or None.
    """
    params = (*conv1, *bn1.tensors(), *conv2, *bn2.tensors())
    if _cpu_inference(x, (x, *params), (bn1, bn2)):
        return _double_block_inference(x, InferenceConv.of(conv1, bn1), InferenceConv.of(conv2, bn2), cat_channels,
                                       pool, exact)
    dtype = _autocast_gemm_inference(x, params, (bn1, bn2), lambda: double_block_layers(x, conv1[0], conv2[0], exact))
    if dtype is not None:
        return _double_block_autocast_gemm(x, InferenceConv.of(conv1, bn1), InferenceConv.of(conv2, bn2),
                                           cat_channels, pool, dtype)
    outputs = _apply(DoubleConvBNReLU, x, *params, bn1.settings(), bn2.settings(), exact, cat_channels, pool)
    return tuple(_head(outputs, DoubleOutputs))


# ----------------------------------------------------------------------------------------------------
# Up block
# ----------------------------------------------------------------------------------------------------
