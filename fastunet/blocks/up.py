"""The up block: nearest upsample x2 + conv3x3 + BN + ReLU into the concat buffer as an autograd Function
(UpsampleConvCat) and upsample_conv_cat, which applies it or runs CPU inference."""

from typing import NamedTuple, Optional

import torch
import torch.nn.functional as F

from .. import ops
from ..conv import aten as conv_aten
from ..conv import policy, training
from ..conv.subpixel import phase_weights, phase_weights_backward
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
from .concat import concat_parts
from .function_io import _apply, _decode, _head, signature_once
from .inference import (
    InferenceConv,
    _autocast_gemm_inference,
    _cpu_inference,
    _up_block_autocast_gemm,
    _up_block_inference,
)
from .recompute import _check_double_backward_unsynchronized, _differentiable_backward, _reference_layer

_aten = torch.ops.aten
_CONV_ARGS = conv_aten.CONV_ARGS


def _subpixel_train(d, w):
    """Whether fast-mode training's up block runs the sub-pixel conv on ``d`` with 3x3 weights ``w`` (else the 3x3
    conv on the upsampled ``d``): policy.up_conv."""
    return policy.up_conv(policy.Layer.of(d, w, train=True)).algorithm == "subpixel"


class UpInputs(NamedTuple):
    """The up block Function's tensor inputs in its argument order (its input gradients come in the same)."""

    d: torch.Tensor
    buf: torch.Tensor
    w: torch.Tensor
    b: Optional[torch.Tensor]
    gamma: torch.Tensor
    beta: torch.Tensor
    running_mean: Optional[torch.Tensor]
    running_var: Optional[torch.Tensor]


class UpSettings(NamedTuple):
    """The up block Function's other inputs, after its tensors."""

    settings: tuple
    exact: bool


class UpCasts(NamedTuple):
    """Autocast's copies of the input and the weight (the forward returns None where nothing was cast)."""

    d: Optional[torch.Tensor]
    w: Optional[torch.Tensor]


class ExactUpSaved(NamedTuple):
    """What exact mode's up block keeps: its conv output, its BN output and what ATen's BN backward reads (the
    upsampled input is recomputed: an exact copy)."""

    z: torch.Tensor
    t: torch.Tensor
    save_mean: torch.Tensor
    save_invstd: torch.Tensor
    reserve: torch.Tensor


class FastUpSaved(NamedTuple):
    """What fast mode's up block keeps: the sub-pixel weights (None for the conv on the upsampled input, which
    backward recomputes), the conv output as it lies, and BN's per-channel vectors."""

    w4: Optional[torch.Tensor]
    z4: torch.Tensor
    mean: torch.Tensor
    invstd: torch.Tensor
    scale: torch.Tensor
    shift: torch.Tensor


class UpExtra(NamedTuple):
    """Beside the saved tensors: exact mode's ATen BN impl index, fast mode's count of values per channel."""

    value: object


class UpOutputs(NamedTuple):
    """The up block Function's result, before what it returns for backward."""

    buf: torch.Tensor


@signature_once
class UpsampleConvCat(torch.autograd.Function):
    """Nearest upsample x2 + conv3x3 + BN + ReLU into a concat buffer; see upsample_conv_cat. Inputs: UpInputs, then
    UpSettings. Outputs: UpOutputs (buf, written in place), then what backward needs: UpCasts, ExactUpSaved or
    FastUpSaved, UpExtra, and in fast mode the conv's training.ConvChoice fields."""

    @staticmethod
    def forward(d, buf, w, b, gamma, beta, running_mean, running_var, settings, exact):
        bn = BatchNormArgs(gamma, beta, running_mean, running_var, *settings)
        _check_no_exact_sync(exact, bn)
        cast = _autocast_dtype(d.device.type)
        cout = w.shape[0]
        out = concat_parts(buf, buf.shape[1] - cout)[1]
        with torch.autocast(d.device.type, enabled=False):
            casts = UpCasts(_cast_copy(d, cast), _cast_copy(w, cast))
            dc, wc = (c if c is not None else t for c, t in zip(casts, (d, w)))
            if exact:
                u = _aten.upsample_nearest2d.vec(dc, None, [2.0, 2.0])
                z = conv_aten.conv(u, wc, _cast(b, cast))
                del u  # recomputed in backward: an exact copy
                t, save_mean, save_invstd, reserve, impl = _exact_bn(z, bn)
                _relu_pool_exact(t, out)
                return (buf, *casts, *ExactUpSaved(z, t, save_mean, save_invstd, reserve), *UpExtra(impl))
            upscale = 2 if _subpixel_train(dc, wc) else 1
            if upscale == 2:
                w4 = phase_weights(w).to(wc.dtype)
                choice = training.choose(dc, w4)
                z4 = training.forward(dc, w4, choice)
            else:  # the conv on the upsampled input, which backward recomputes; z4: the conv's output as it lies.
                # No w4: an input returned as an output and saved is an error under torch.func.
                u = _aten.upsample_nearest2d.vec(dc, None, [2.0, 2.0])
                choice = training.choose(u, wc)
                w4, z4 = None, training.forward(u, wc, choice)
                del u
            mean, invstd, scale, shift, count = _fast_bn(z4, bn, b, upscale)
            ops.bn_relu_pool(z4, scale, shift, upscale, out, None)
            return (buf, *casts, *FastUpSaved(w4, z4, mean, invstd, scale, shift), *UpExtra(count), *choice)

    @staticmethod
    def setup_context(ctx, inputs, output):
        args, settings = _decode(inputs, UpInputs, UpSettings)
        saved_kind = ExactUpSaved if settings.exact else FastUpSaved
        choice = () if settings.exact else (training.ConvChoice,)
        _, casts, saved, extra, *conv_choice = _decode(output, UpOutputs, UpCasts, saved_kind, UpExtra, *choice)
        ctx.conv_choice = conv_choice[0] if conv_choice else None
        ctx.set_materialize_grads(False)  # no zero-filled gradients for the saved tensors returned as outputs
        ctx.exact, ctx.settings, ctx.saved_kind = settings.exact, settings.settings, saved_kind
        ctx.device_type = args.d.device.type
        ctx.conv_dtype = _conv_dtype(args.d, casts.d)
        ctx.skip_channels = args.buf.shape[1] - args.w.shape[0]
        ctx.extra = extra.value
        ctx.mark_dirty(args.buf)
        ctx.mark_non_differentiable(*(t for t in saved if isinstance(t, torch.Tensor)))
        resolved = UpCasts._make(t if c is None else c for c, t in zip(casts, (args.d, args.w)))
        running_mean, running_var = _eval_running_stats(args.running_mean, args.running_var, settings.settings)
        kept = args._replace(buf=None, running_mean=running_mean, running_var=running_var)
        ctx.save_for_backward(*kept, *resolved, *saved)

    @staticmethod
    def backward(ctx, grad_buf, *unused_saved_grads):
        inputs, casts, saved = _decode(ctx.saved_tensors, UpInputs, UpCasts, ctx.saved_kind)
        bn = BatchNormArgs(inputs.gamma, inputs.beta, inputs.running_mean, inputs.running_var, *ctx.settings)
        others = (None,) * len(UpSettings._fields)
        cout = inputs.w.shape[0]
        if grad_buf is None:
            return (None,) * len(UpInputs._fields) + others
        grad_out = concat_parts(grad_buf, ctx.skip_channels)[1]
        if torch.is_grad_enabled():
            _check_double_backward_unsynchronized(bn)

            def reference(*tensors):
                t = UpInputs(*tensors)
                u = F.interpolate(t.d, scale_factor=2.0, mode="nearest")
                bn = BatchNormArgs(t.gamma, t.beta, t.running_mean, t.running_var, *ctx.settings)
                return (_reference_layer(u, t.w, t.b, bn, ctx.conv_dtype),)

            grads, _ = _decode(_differentiable_backward(ctx, reference, inputs, (grad_out,)), UpInputs, UpSettings)
            return (*grads._replace(buf=grad_buf, running_mean=None, running_var=None), *others)
        need, _ = _decode(ctx.needs_input_grad, UpInputs, UpSettings)
        dc, wc = casts
        with torch.autocast(grad_buf.device.type, enabled=False):
            if ctx.exact:
                dy = _relu_pool_exact_backward(grad_out, None, saved.t)
                dz, dgamma, dbeta = _exact_bn_backward(dy, saved.z, bn, saved.save_mean, saved.save_invstd,
                                                       saved.reserve, ctx.extra, [True, need.gamma, need.beta])
                del dy  # activation-sized gradients and the recomputed upsample: dropped once used
                u = _aten.upsample_nearest2d.vec(dc, None, [2.0, 2.0])
                du, dw, db = _aten.convolution_backward(dz, u, wc, [cout], *_CONV_ARGS, [need.d, need.w, need.b])
                size = list(u.shape[2:])
                del dz, u
                dd = None
                if du is not None:
                    dd = _aten.upsample_nearest2d_backward(du, size, list(dc.shape), 2.0, 2.0)
            else:
                subpixel = saved.w4 is not None  # the forward's choice (policy.up_conv)
                dz4, dgamma, dbeta, db = _fast_bn_backward(grad_out, None, saved.z4, saved.mean, saved.invstd,
                                                           saved.scale, saved.shift, inputs.b, bn.training,
                                                           2 if subpixel else 1, _sync_of(bn, ctx.extra))
                if subpixel:
                    dd, dw4 = training.backward(dz4, dc, saved.w4, [need.d, need.w], ctx.conv_choice)
                    dw = None if dw4 is None else phase_weights_backward(dw4, cout)
                else:
                    u = _aten.upsample_nearest2d.vec(dc, None, [2.0, 2.0])
                    du, dw = training.backward(dz4, u, wc, [need.d, need.w], ctx.conv_choice)
                    dd = None if du is None else _aten.upsample_nearest2d_backward(du, list(u.shape[2:]),
                                                                                   list(dc.shape), 2.0, 2.0)
                del dz4
        # The whole buffer's gradient goes on as the skip's: its producer reads only the skip part (concat_parts).
        grads = UpInputs(_grad_as(dd, inputs.d), grad_buf, _grad_as(dw, inputs.w), _grad_as(db, inputs.b),
                         _grad_as(dgamma, inputs.gamma), _grad_as(dbeta, inputs.beta), None, None)
        return (*grads, *others)


def up_block_layer(d, w, exact):
    """The policy.Layer facts of an up block's inference conv by ``w``: the 3x3 one on the nearest upsample of ``d``."""
    layer = policy.Layer.of(d, w, train=False, exact=exact)
    return layer._replace(h=2 * layer.h, w=2 * layer.w)


def upsample_conv_cat(d, buf, conv, bn, *, exact=False):
    """Up block: writes ``relu(BN(conv3x3(upsample2x(d))))`` into ``buf[:, Cskip:]`` in place and returns ``buf``.

    d: ``[N, Cin, h, w]``; buf: ``[N, Cskip + Cout, 2h, 2w]`` of the block's activation dtype whose
    first Cskip channels hold the skip (written by double_conv_bn_relu with cat_channels=Cout); conv is
    ``(weight [Cout, Cin, 3, 3], bias)``, bn a BatchNormArgs (its running stats are updated here in training;
    a process group synchronizes the fast-mode training statistics over it).
    """
    if _cpu_inference(d, (d, buf, *conv, *bn.tensors()), (bn,)):
        return _up_block_inference(d, buf, InferenceConv.of(conv, bn), exact)
    if _autocast_gemm_inference(d, (*conv, *bn.tensors()), (bn,), lambda: (up_block_layer(d, conv[0], exact),)):
        return _up_block_autocast_gemm(d, buf, InferenceConv.of(conv, bn))
    return _head(_apply(UpsampleConvCat, d, buf, *conv, *bn.tensors(), bn.settings(), exact), UpOutputs).buf
