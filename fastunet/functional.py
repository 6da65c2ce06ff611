"""The two fused U-Net blocks as autograd Functions over the fastunet ops and ATen convolutions.

double_conv_bn_relu: (conv3x3 + BN + ReLU) x 2, optionally writing its output straight into the first
    channels of a concat buffer and taking the 2x2 max-pool in the same pass (encoder levels).
upsample_conv_cat:   nearest upsample x2 + conv3x3 + BN + ReLU, written into that concat buffer after
    the skip's channels (no torch.cat copy in either mode; no upsampled tensor in fast mode).

Two modes:
  exact=True   the same ATen calls as torch.nn's modules (convolution, _batch_norm_impl_index,
               upsample_nearest2d and their backwards), so every rounding is the reference's. Fused are
               only steps that round nothing: ReLU, max-pool, the concat write and their backward masks.
  exact=False  own BN (statistics from shifted sums, reduced in a fixed order; BN-apply+ReLU(+pool) in
               one pass; backward in two passes that recompute the activations from the pre-BN conv
               output instead of storing them); the up-conv as one 2x2 conv on the low-resolution input
               with 4x output channels (sub-pixel form, 2.25x fewer FLOPs). In eval the BN scale and shift
               (running stats and conv bias folded in) are per-channel vectors made at every call and applied
               by the BN+ReLU pass, so every write to a weight or a running stat, ``.data`` writes included,
               is seen. A conv bias in front of a training-mode BN cancels exactly: it is not added, its
               gradient is exactly zero, and it still enters the running mean. CPU inference (float32, eval
               BN, nothing for autograd to record) skips the Functions: oneDNN's convs with the BN folded
               into their weights and bias at the call where that pays, im2col GEMMs for the convs of few
               pixels, the sub-pixel up-conv where that pays, Winograd for the wide convs with their
               transformed weights kept between calls and checked bit for bit against the live weights and BN
               at every call by fastunet.weight_cache (all in _cpu_inference); a plain U-Net runs it in
               channels_last whatever the input's layout.
In both modes the Functions own the BN running-stats update (``BatchNormArgs.factor``), as nn.BatchNorm2d's
own call does. The Functions are in the ``forward`` + ``setup_context`` form, so torch.func.grad, vjp and
jacrev run them; where autograd records their backward (double backward, torch.func), the backward is the
seed's pure-PyTorch block differentiated by autograd, so its result is itself differentiable.
Synchronized BN (nn.SyncBatchNorm's semantics, fast mode): where a BatchNormArgs carries a process group, each
rank's per-channel (mean, variance, count) is all-gathered and merged, and in backward the per-channel
sum(dy) and sum(dy * (z - mean)) are all-reduced; BN's own weight and bias gradients stay per rank (DDP
reduces them), as in nn.SyncBatchNorm.
Under autocast the convolutions get autocast's casts (done here explicitly, as autocast would), BN
statistics stay in float32.
"""

from typing import NamedTuple, Optional

import torch
import torch.nn.functional as F

from . import ops, weight_cache
from .conv import aten as conv_aten
from .conv import gemm, policy, training, winograd
from .conv.subpixel import conv_relu_into, phase_weights, phase_weights_backward  # noqa: F401  (public names)
from .sync_batchnorm import all_reduce_sums, sync_batch_stats, unbiased, update_running_stats

_aten = torch.ops.aten
_CONV_ARGS = conv_aten.CONV_ARGS



class BatchNormArgs(NamedTuple):
    """One BatchNorm layer as a fused block takes it for one call.

    weight, bias, running_mean, running_var: the layer's ``[C]`` tensors. factor: the running-stats momentum
    of this call (``momentum``, or ``1/num_batches_tracked`` for ``momentum=None``), None to leave the running
    stats alone (eval, or a checkpointing recomputation). training: normalize with the batch statistics (True)
    or the running ones. group: the process group the training statistics are synchronized over, or None.
    """

    weight: torch.Tensor
    bias: torch.Tensor
    running_mean: torch.Tensor
    running_var: torch.Tensor
    eps: float = 1e-5
    factor: Optional[float] = None
    training: bool = True
    group: object = None

    def tensors(self):
        return self.weight, self.bias, self.running_mean, self.running_var

    def settings(self):
        return BatchNormSettings(self.eps, self.factor, self.training, self.group)


class BatchNormSettings(NamedTuple):
    """The non-tensor part of a BatchNormArgs, as the Functions take it."""

    eps: float
    factor: Optional[float]
    training: bool
    group: object



# ----------------------------------------------------------------------------------------------------
# Helpers shared by both blocks
# ----------------------------------------------------------------------------------------------------


def _autocast_dtype(device_type):
    """The dtype autocast gives a conv on ``device_type`` now, or None when autocast is off."""
    if torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    return None


def _cast_dtype(t, dtype):
    """The dtype autocast gives conv argument ``t`` (floating tensors other than float64 go to ``dtype``)."""
    if dtype is None or t.dtype == torch.float64 or not t.is_floating_point():
        return t.dtype
    return dtype


def _cast(t, dtype):
    """Autocast's cast of a conv argument (see _cast_dtype); None stays None."""
    if t is None or t.dtype == _cast_dtype(t, dtype):
        return t
    return t.to(_cast_dtype(t, dtype))


def _cast_copy(t, dtype):
    """_cast(t, dtype) where it makes a new tensor, else None (what a Function returns to be saved)."""
    cast = _cast(t, dtype)
    return None if cast is t else cast


def _grad_as(g, like):
    """A gradient in the dtype of the tensor (or dtype) it belongs to (the backward of autocast's cast)."""
    if g is None or like is None:
        return None
    return g.to(like if isinstance(like, torch.dtype) else like.dtype)


def _empty(shape, like):
    return torch.empty(shape, dtype=like.dtype, device=like.device, memory_format=ops.memory_format_of(like))


def _vec(value, c, like):
    return torch.full((c,), value, dtype=ops.acc_dtype(like.dtype), device=like.device)



def _subpixel_train(d, w):
    """Whether fast-mode training's up block runs the sub-pixel conv on ``d`` with 3x3 weights ``w`` (else the 3x3
    conv on the upsampled ``d``): policy.up_conv."""
    return policy.up_conv(policy.Layer.of(d, w, train=True)).algorithm == "subpixel"



def _apply(function, *args):
    """function.apply(*args), or its forward alone when autograd has nothing to record."""
    if torch.is_grad_enabled() and any(isinstance(a, torch.Tensor) and a.requires_grad for a in args):
        return function.apply(*args)
    return function.forward(*args)


def _second_conv(z1, scale1, shift1, w2, stats):
    """Layer 2's conv of ``relu(z1*scale1 + shift1)`` and, if ``stats``, its batch (mean, var) (else None),
    by ops.conv3x3_backend's pick: Triton forms the activation in its input load (never written) and gathers
    the statistics in its epilogue; otherwise a BN+ReLU pass, ATen's conv, and the statistics pass."""
    if ops.conv3x3_backend(z1, w2, stats) == "triton":
        from . import kernels

        z2, mean, var = kernels.conv3x3_bn_relu_stats(z1, scale1, shift1, w2, stats)
        return z2, ((mean, var) if stats else None)
    a1 = torch.empty_like(z1)
    ops.bn_relu_pool(z1, scale1, shift1, 1, a1, None)
    return training.forward(a1, w2), None


def _check_no_exact_sync(exact, *bns):
    if exact and any(bn.group is not None for bn in bns):
        raise ValueError("fastunet: synchronized BatchNorm runs in fast mode only; in exact mode use the modules "
                         "themselves (nn.SyncBatchNorm), as fastunet.U_Net(exact=True) does")


def _fast_bn(z, bn, conv_bias, upscale, stats=None):
    """Fast-mode BN of a bias-free conv output: (mean, invstd, scale, shift) float32 vectors and the number of
    values per channel the statistics cover (all ranks' when synchronized); in training it updates the
    running stats by ``bn.factor``. ``stats``: z's batch (mean, var) where the conv already gathered them.

    In eval the conv bias is folded into the mean, so that z*scale + shift is BN(z + bias).
    """
    n, _, h, w = ops.logical_shape(z, upscale)
    count = n * h * w
    if bn.training:
        mean, var = ops.bn_stats(z, upscale) if stats is None else stats
        if bn.group is not None:
            mean, var, count = sync_batch_stats(mean, var, count, bn.group)
        if bn.factor is not None:
            batch_mean = mean if conv_bias is None else mean + conv_bias.to(mean.dtype)
            update_running_stats(bn.running_mean, bn.running_var, batch_mean, unbiased(var, count), bn.factor)
    else:
        return (*_eval_bn_vectors(bn, conv_bias, ops.acc_dtype(z.dtype)), count)
    invstd = torch.rsqrt(var + bn.eps)
    scale = bn.weight.to(mean.dtype) * invstd
    return mean, invstd, scale, bn.bias.to(mean.dtype) - mean * scale, count


def _eval_bn_vectors(bn, conv_bias, dtype):
    """(mean, invstd, scale, shift) ``dtype`` vectors of an eval-mode BN, the conv bias folded into the mean, so
    that z*scale + shift is BN(z + bias)."""
    mean, var = bn.running_mean.to(dtype), bn.running_var.to(dtype)
    if conv_bias is not None:
        mean = mean - conv_bias.to(dtype)
    invstd = torch.rsqrt(var + bn.eps)
    scale = bn.weight.to(dtype) * invstd
    return mean, invstd, scale, bn.bias.to(dtype) - mean * scale


def _sync_sums(sum_dy, sum_dy_xmu, z, upscale, sync):
    """Backward of synchronized BN: the all-reduced sums, scaled by this rank's share of the values so that
    bn_relu_backward_apply's division by the local count divides by the global one."""
    group, total = sync
    n, _, h, w = ops.logical_shape(z, upscale)
    share = ((n * h * w) / total).to(sum_dy.dtype)
    all_dy, all_dy_xmu = all_reduce_sums(sum_dy, sum_dy_xmu, group)
    return all_dy * share, all_dy_xmu * share


def _fast_bn_backward(grad, grad_pooled, z, mean, invstd, scale, shift, conv_bias, training, upscale, sync=None):
    """(dz, dgamma, dbeta, dconv_bias) of one fast-mode BN + ReLU (+ max-pool) layer; ``sync`` is
    ``(group, global count)`` for synchronized BN."""
    sum_dy, sum_dy_xmu = ops.bn_relu_backward_reduce(grad, grad_pooled, z, scale, shift, mean, upscale)
    if training:
        all_dy, all_dy_xmu = (sum_dy, sum_dy_xmu) if sync is None else _sync_sums(sum_dy, sum_dy_xmu, z, upscale, sync)
        dz = ops.bn_relu_backward_apply(grad, grad_pooled, z, scale, shift, mean, invstd, all_dy, all_dy_xmu, upscale)
        dbias = None if conv_bias is None else torch.zeros_like(conv_bias)
    else:
        zero = torch.zeros_like(sum_dy)
        dz = ops.bn_relu_backward_apply(grad, grad_pooled, z, scale, shift, mean, invstd, zero, zero, upscale)
        dbias = None if conv_bias is None else scale * sum_dy
    return dz, sum_dy_xmu * invstd, sum_dy, dbias


def _sync_of(bn, count):
    """``(group, global count)`` for _fast_bn_backward where ``bn`` is synchronized, else None."""
    return None if bn.group is None or not bn.training else (bn.group, count)


def _exact_running_stats(bn):
    """The running stats ATen's BN call reads (eval) or updates (training with a factor), else None."""
    if bn.training and bn.factor is None:
        return None, None
    return bn.running_mean, bn.running_var


def _exact_bn(z, bn):
    """ATen's own BN call (the one F.batch_norm makes): output, what its backward needs, and the impl index."""
    running_mean, running_var = _exact_running_stats(bn)
    return _aten._batch_norm_impl_index(z, bn.weight, bn.bias, running_mean, running_var, bn.training,
                                        bn.factor or 0.0, bn.eps, torch.backends.cudnn.enabled)


def _exact_bn_backward(dy, z, bn, save_mean, save_invstd, reserve, impl, mask):
    """The backward autograd runs for _batch_norm_impl_index: (dz, dgamma, dbeta). In training it reads the
    saved batch statistics, not the running stats (which later forwards may update before this backward)."""
    if bn.training:
        return _aten._batch_norm_impl_index_backward(impl, z, dy, bn.weight, None, None, save_mean, save_invstd, True,
                                                     bn.eps, mask, reserve)
    return _aten.native_batch_norm_backward(dy, z, bn.weight, bn.running_mean, bn.running_var, save_mean, save_invstd,
                                            False, bn.eps, mask)


def _relu_pool_exact(t, out, pooled=None):
    """ReLU (+ max-pool) of ATen's BN output, written into ``out``: the fused op with scale 1, shift 0."""
    c = t.shape[1]
    ops.bn_relu_pool(t, _vec(1.0, c, t), _vec(0.0, c, t), 1, out, pooled)


def _relu_pool_exact_backward(grad, grad_pooled, t):
    c = t.shape[1]
    return ops.relu_pool_backward(grad, grad_pooled, t, _vec(1.0, c, t), _vec(0.0, c, t), 1)


def concat_parts(buf, skip_channels):
    """The two parts of a concat buffer ``buf`` ``[N, skip_channels + C_up, H, W]`` = torch.cat((skip, up), 1), as
    views (skip, up): the contract of the buffer between the two blocks, kept here. The encoder's double block
    writes the skip part (``cat_channels`` = C_up), the up block the up part; in backward the up block hands the
    whole buffer's gradient on as the skip's, and the double block reads only its skip part of it (the up part's
    gradient is the up block's own)."""
    channels = buf.shape[1]
    torch._check(0 <= skip_channels <= channels,
                 lambda: f"a concat buffer of {channels} channels has no skip part of {skip_channels} channels")
    return buf.narrow(1, 0, skip_channels), buf.narrow(1, skip_channels, channels - skip_channels)


def _block_outputs(z, cat_channels, pool):
    """A block's output buffer (with room for the up block's channels), its written part, the pool."""
    n, c, h, w = z.shape
    buf = _empty((n, c + cat_channels, h, w), z)
    pooled = _empty((n, c, h // 2, w // 2), z) if pool else None
    return buf, concat_parts(buf, c)[0], pooled


def _eval_running_stats(running_mean, running_var, settings):
    """What backward reads of a BN's running stats: both in eval (so an in-place change before backward is
    caught, as for nn.BatchNorm2d), none in training."""
    return (None, None) if settings.training else (running_mean, running_var)


def _conv_dtype(x, x_cast):
    """The dtype a block's convs ran in: autocast's where it cast the input, else the input's."""
    return x.dtype if x_cast is None else x_cast.dtype


def _reference_layer(x, w, b, bn, conv_dtype, inplace_relu=False):
    """One conv3x3 + BN + ReLU layer with the seed's pure-PyTorch ops, convs in ``conv_dtype`` (autocast's
    casts), leaving the running stats alone; the ReLU in place (the seed's ``nn.ReLU(inplace=True)``) if asked."""
    z = F.conv2d(x.to(conv_dtype), w.to(conv_dtype), None if b is None else b.to(conv_dtype), padding=1)
    running_mean, running_var = (None, None) if bn.training else (bn.running_mean, bn.running_var)
    y = F.batch_norm(z, running_mean, running_var, bn.weight, bn.bias, bn.training, 0.0, bn.eps)
    return torch.relu_(y) if inplace_relu else torch.relu(y)


def _differentiable_backward(ctx, reference, inputs, grad_outputs):
    """The Function's input gradients as ``reference(*inputs)``'s vector-Jacobian product, recorded by autograd:
    the backward of a fused block when autograd records the backward itself (double backward, torch.func). The
    seed's pure-PyTorch ops run again and autograd (torch.func.vjp, which nests in transforms) differentiates
    them, so the gradients are differentiable in turn. Fast mode on the CPU runs them in NCHW whatever the layout
    (the model's channels_last inside included): the seed's double backward in channels_last had 3-4x the error
    of its NCHW one against float64 (oneDNN's convs). Returns one entry per Function input."""
    need = [i for i, t in enumerate(inputs) if isinstance(t, torch.Tensor) and ctx.needs_input_grad[i]]
    grads = [None] * len(ctx.needs_input_grad)
    if not need:
        return grads
    nchw = not ctx.exact and ctx.device_type == "cpu"

    def run(*primals):
        args = list(inputs)
        for i, primal in zip(need, primals):
            args[i] = primal
        if nchw:
            args = [a.contiguous() if isinstance(a, torch.Tensor) and a.dim() == 4 else a for a in args]
        return reference(*args)

    outputs, vjp = torch.func.vjp(run, *(inputs[i] for i in need))
    cotangents = tuple(torch.zeros_like(o) if g is None else g.to(o.dtype) for o, g in zip(outputs, grad_outputs))
    for i, g in zip(need, vjp(cotangents)):
        grads[i] = g
    return grads


def _check_double_backward_unsynchronized(*bns):
    if any(bn.group is not None and bn.training for bn in bns):
        raise NotImplementedError("fastunet: double backward (create_graph=True) and torch.func transforms are not "
                                  "supported through synchronized BatchNorm (nor are they by nn.SyncBatchNorm)")


# ----------------------------------------------------------------------------------------------------
# Double block
# ----------------------------------------------------------------------------------------------------


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


def _head(flat, kind):
    """The first values of ``flat`` (a Function's outputs) as NamedTuple ``kind``, the rest left."""
    return kind._make(flat[:len(kind._fields)])


def _decode(flat, *kinds):
    """``flat`` (a Function's positional inputs, outputs or saved tensors) decoded once into one NamedTuple of each
    of ``kinds`` in turn, by their fields; all of it must be used."""
    parts, start = [], 0
    for kind in kinds:
        end = start + len(kind._fields)
        parts.append(kind._make(flat[start:end]))
        start = end
    if start != len(flat):
        raise ValueError(f"fastunet: {len(flat)} values decoded as {start}")
    return parts


class DoubleConvBNReLU(torch.autograd.Function):
    """(conv3x3 + BN + ReLU) x 2; see double_conv_bn_relu. Inputs: DoubleInputs, then DoubleSettings. Outputs:
    DoubleOutputs, then what backward needs (returned, as torch.func asks, rather than stashed on a ctx):
    DoubleCasts, each layer's ExactLayerSaved or FastLayerSaved, and LayerExtras."""

    @staticmethod
    def forward(x, w1, b1, gamma1, beta1, running_mean1, running_var1,
                w2, b2, gamma2, beta2, running_mean2, running_var2, settings1, settings2, exact, cat_channels, pool):
        bn1 = BatchNormArgs(gamma1, beta1, running_mean1, running_var1, *settings1)
        bn2 = BatchNormArgs(gamma2, beta2, running_mean2, running_var2, *settings2)
        _check_no_exact_sync(exact, bn1, bn2)
        cast = _autocast_dtype(x.device.type)
        with torch.autocast(x.device.type, enabled=False):
            casts = DoubleCasts(_cast_copy(x, cast), _cast_copy(w1, cast), _cast_copy(w2, cast))
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
            z1 = training.forward(xc, w1c)
            mean1, invstd1, scale1, shift1, count1 = _fast_bn(z1, bn1, b1, 1)
            # Layer 1's activation is not kept: backward recomputes it from z1.
            z2, stats2 = _second_conv(z1, scale1, shift1, w2c, bn2.training)
            mean2, invstd2, scale2, shift2, count2 = _fast_bn(z2, bn2, b2, 1, stats2)
            buf, out, pooled = _block_outputs(z2, cat_channels, pool)
            ops.bn_relu_pool(z2, scale2, shift2, 1, out, pooled)
            return (buf, pooled, *casts, *FastLayerSaved(z1, mean1, invstd1, scale1, shift1),
                    *FastLayerSaved(z2, mean2, invstd2, scale2, shift2), *LayerExtras(count1, count2))

    @staticmethod
    def setup_context(ctx, inputs, output):
        args, settings = _decode(inputs, DoubleInputs, DoubleSettings)
        saved_kind = ExactLayerSaved if settings.exact else FastLayerSaved
        _, casts, layer1, layer2, extras = _decode(output, DoubleOutputs, DoubleCasts, saved_kind, saved_kind,
                                                   LayerExtras)
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
            backward = _exact_double_block_backward if ctx.exact else _fast_double_block_backward
            grads = backward(grad_out, grad_pooled, ctx.extra, layers, need)
        return tuple(_grad_as(g, t) for g, t in zip(grads, inputs)) + others


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


def _fast_double_block_backward(grad_out, grad_pooled, counts, layers, need):
    """Fast mode's backward: the DoubleInputs of gradients (None for the running stats). Layer 1's activation is
    recomputed from its pre-BN output; each activation-sized tensor is dropped once used."""
    (xc, w1c, b1, bn1, layer1), (w2c, b2, bn2, layer2) = layers
    dz2, dgamma2, dbeta2, db2 = _fast_bn_backward(grad_out, grad_pooled, layer2.z, layer2.mean, layer2.invstd,
                                                  layer2.scale, layer2.shift, b2, bn2.training, 1,
                                                  _sync_of(bn2, counts.layer2))
    a1 = torch.empty_like(layer1.z)
    ops.bn_relu_pool(layer1.z, layer1.scale, layer1.shift, 1, a1, None)
    da1, dw2 = training.backward(dz2, a1, w2c, [True, need.w2])
    del a1, dz2
    dz1, dgamma1, dbeta1, db1 = _fast_bn_backward(da1, None, layer1.z, layer1.mean, layer1.invstd, layer1.scale,
                                                  layer1.shift, b1, bn1.training, 1, _sync_of(bn1, counts.layer1))
    del da1
    dx, dw1 = training.backward(dz1, xc, w1c, [need.x, need.w1])
    return DoubleInputs(dx, dw1, db1, dgamma1, dbeta1, None, None, dw2, db2, dgamma2, dbeta2, None, None)


# ----------------------------------------------------------------------------------------------------
# CPU inference
# ----------------------------------------------------------------------------------------------------

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


def double_conv_bn_relu(x, conv1, bn1, conv2, bn2, *, exact=False, cat_channels=0, pool=False):
    """(conv3x3 + BN + ReLU) x 2 over ``x`` ``[N, Cin, H, W]`` (float32/bfloat16/float16, NCHW or NHWC).

    conv1/conv2 are ``(weight [Cout, C, 3, 3], bias [Cout] or None)`` pairs, bn1/bn2 BatchNormArgs (their
    running stats are updated here in training, by their ``factor``; with a process group, fast mode, the
    training statistics are synchronized over it). Returns ``(buf, pooled)``: ``buf`` is ``[N, Cout +
    cat_channels, H, W]`` in x's layout whose first Cout channels hold the block output (the rest is for
    upsample_conv_cat to fill), ``pooled`` its 2x2 max-pool ``[N, Cout, H/2, W/2]`` or None.
    """
    if _cpu_inference(x, (x, *conv1, *bn1.tensors(), *conv2, *bn2.tensors()), (bn1, bn2)):
        return _double_block_inference(x, conv1, bn1, conv2, bn2, cat_channels, pool, exact)
    _forget_kept_weights(conv1[0], conv2[0])
    outputs = _apply(DoubleConvBNReLU, x, *conv1, *bn1.tensors(), *conv2, *bn2.tensors(), bn1.settings(),
                     bn2.settings(), exact, cat_channels, pool)
    return tuple(_head(outputs, DoubleOutputs))


# ----------------------------------------------------------------------------------------------------
# Up block
# ----------------------------------------------------------------------------------------------------


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


class UpsampleConvCat(torch.autograd.Function):
    """Nearest upsample x2 + conv3x3 + BN + ReLU into a concat buffer; see upsample_conv_cat. Inputs: UpInputs, then
    UpSettings. Outputs: UpOutputs (buf, written in place), then what backward needs: UpCasts, ExactUpSaved or
    FastUpSaved, UpExtra."""

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
                z4 = training.forward(dc, w4)
            else:  # the conv on the upsampled input, which backward recomputes; z4: the conv's output as it lies.
                # No w4: an input returned as an output and saved is an error under torch.func.
                w4, z4 = None, training.forward(_aten.upsample_nearest2d.vec(dc, None, [2.0, 2.0]), wc)
            mean, invstd, scale, shift, count = _fast_bn(z4, bn, b, upscale)
            ops.bn_relu_pool(z4, scale, shift, upscale, out, None)
            return (buf, *casts, *FastUpSaved(w4, z4, mean, invstd, scale, shift), *UpExtra(count))

    @staticmethod
    def setup_context(ctx, inputs, output):
        args, settings = _decode(inputs, UpInputs, UpSettings)
        saved_kind = ExactUpSaved if settings.exact else FastUpSaved
        _, casts, saved, extra = _decode(output, UpOutputs, UpCasts, saved_kind, UpExtra)
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
                subpixel = _subpixel_train(dc, wc)
                dz4, dgamma, dbeta, db = _fast_bn_backward(grad_out, None, saved.z4, saved.mean, saved.invstd,
                                                           saved.scale, saved.shift, inputs.b, bn.training,
                                                           2 if subpixel else 1, _sync_of(bn, ctx.extra))
                if subpixel:
                    dd, dw4 = training.backward(dz4, dc, saved.w4, [need.d, need.w])
                    dw = None if dw4 is None else phase_weights_backward(dw4, cout)
                else:
                    u = _aten.upsample_nearest2d.vec(dc, None, [2.0, 2.0])
                    du, dw = training.backward(dz4, u, wc, [need.d, need.w])
                    dd = None if du is None else _aten.upsample_nearest2d_backward(du, list(u.shape[2:]),
                                                                                   list(dc.shape), 2.0, 2.0)
                del dz4
        # The whole buffer's gradient goes on as the skip's: its producer reads only the skip part (concat_parts).
        grads = UpInputs(_grad_as(dd, inputs.d), grad_buf, _grad_as(dw, inputs.w), _grad_as(db, inputs.b),
                         _grad_as(dgamma, inputs.gamma), _grad_as(dbeta, inputs.beta), None, None)
        return (*grads, *others)


def upsample_conv_cat(d, buf, conv, bn, *, exact=False):
    """Up block: writes ``relu(BN(conv3x3(upsample2x(d))))`` into ``buf[:, Cskip:]`` in place and returns ``buf``.

    d: ``[N, Cin, h, w]``; buf: ``[N, Cskip + Cout, 2h, 2w]`` of the block's activation dtype whose
    first Cskip channels hold the skip (written by double_conv_bn_relu with cat_channels=Cout); conv is
    ``(weight [Cout, Cin, 3, 3], bias)``, bn a BatchNormArgs (its running stats are updated here in training;
    a process group synchronizes the fast-mode training statistics over it).
    """
    if _cpu_inference(d, (d, buf, *conv, *bn.tensors()), (bn,)):
        return _up_block_inference(d, buf, conv, bn, exact)
    _forget_kept_weights(conv[0])
    return _head(_apply(UpsampleConvCat, d, buf, *conv, *bn.tensors(), bn.settings(), exact), UpOutputs).buf
