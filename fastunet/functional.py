"""The two fused U-Net blocks as autograd Functions over the fastunet ops and ATen convolutions.

double_conv_bn_relu: (conv3x3 + BN + ReLU) x 2, optionally writing its output straight into the first
    channels of a concat buffer and taking the 2x2 max-pool in the same pass (encoder levels).
upsample_conv_cat:   nearest upsample x2 + conv3x3 + BN + ReLU, written into that concat buffer after
    the skip's channels (no torch.cat copy in either mode; no upsampled tensor in fast mode).

Two modes:
  exact=True   the same ATen calls as torch.nn's modules (convolution, _batch_norm_impl_index,
               upsample_nearest2d and their backwards), so every rounding is the reference's. Fused are
               only steps that round nothing: ReLU, max-pool, the concat write and their backward masks.
               ATen updates the running stats, as in nn.BatchNorm2d.
  exact=False  own BN (statistics from shifted sums, reduced in a fixed order; BN-apply+ReLU(+pool) in
               one pass; backward in two passes that recompute the activations from the pre-BN conv
               output instead of storing them); the up-conv as one 2x2 conv on the low-resolution input
               with 4x output channels (sub-pixel form, 2.25x fewer FLOPs); BN folded into the conv
               weights for inference (``fold``, kept from call to call while the weights are unchanged). A
               conv bias in front of a training-mode BN cancels exactly: it is not added, its gradient
               is exactly zero, and it still enters the running mean. The Functions return the batch
               mean and unbiased variance; the caller updates the running stats.
Synchronized BN (nn.SyncBatchNorm's semantics, fast mode): where a BN tuple carries a process group, each
rank's per-channel (mean, variance, count) is all-gathered and merged, and in backward the per-channel
sum(dy) and sum(dy * (z - mean)) are all-reduced; BN's own weight and bias gradients stay per rank (DDP
reduces them), as in nn.SyncBatchNorm.
Under autocast the convolutions get autocast's casts (done here explicitly, as autocast would), BN
statistics stay in float32.
"""

import torch
from torch.utils.weak import WeakIdKeyDictionary

from . import ops
from .sync_batchnorm import all_reduce_sums, sync_batch_stats, unbiased

_aten = torch.ops.aten
_CONV_ARGS = ([1, 1], [1, 1], [1, 1], False, [0, 0], 1)  # stride, padding, dilation, transposed, out_pad, groups

def _fold_taps(w, dim):
    """Sub-pixel decomposition of upsample2x + conv3x3 along ``dim`` (3 taps r0, r1, r2): output phase 0 (even
    rows) sees the 2-tap kernel (r0, r1 + r2), phase 1 (odd rows) (r0 + r1, r2). Returns both, stacked in a new
    leading phase dimension, with ``dim`` of size 2. Plain tensor arithmetic: no constant to copy to the GPU."""
    r0, r1, r2 = w.unbind(dim)
    return torch.stack((torch.stack((r0, r1 + r2), dim), torch.stack((r0 + r1, r2), dim)))


def _unfold_taps(g, dim):
    """The adjoint of _fold_taps: ``[2 phases, ..., 2 taps at dim, ...]`` -> ``[..., 3 taps at dim, ...]``."""
    even, odd = g.unbind(0)
    e0, e1 = even.unbind(dim)
    o0, o1 = odd.unbind(dim)
    return torch.stack((e0 + o0, e1 + o0, e1 + o1), dim)


def phase_weights(w):
    """3x3 weights ``[O, I, 3, 3]`` -> sub-pixel 2x2 weights ``[4*O, I, 2, 2]``, float32 (float64 stays), in w's
    memory format (a channels_last model's convs then take them without a layout copy).

    ``conv2d(x, phase_weights(w), padding=1)[:, (2a+b)*O + o, i+a, j+b]`` equals
    ``conv2d(upsample2x(x), w, padding=1)[:, o, 2i+a, 2j+b]`` for a, b in {0, 1}.
    """
    o, i = w.shape[:2]
    rows = _fold_taps(w.to(ops.acc_dtype(w.dtype)), 2)  # [a, O, I, 2, 3]
    w4 = _fold_taps(rows, 4).transpose(0, 1).reshape(4 * o, i, 2, 2)  # [b, a, ...] -> [a, b, ...]
    return w4.contiguous(memory_format=ops.memory_format_of(w))


def phase_weights_backward(dw4, out_channels):
    """Gradient through phase_weights: ``[4*O, I, 2, 2]`` -> ``[O, I, 3, 3]``, float32 (float64 stays)."""
    d6 = dw4.to(ops.acc_dtype(dw4.dtype)).reshape(2, 2, out_channels, dw4.shape[1], 2, 2)
    return _unfold_taps(_unfold_taps(d6.transpose(0, 1), 4), 2)


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


def _grad_as(g, like):
    """A gradient in the dtype of the tensor (or dtype) it belongs to (the backward of autocast's cast)."""
    if g is None or like is None:
        return None
    return g.to(like if isinstance(like, torch.dtype) else like.dtype)


def _empty(shape, like):
    return torch.empty(shape, dtype=like.dtype, device=like.device, memory_format=ops.memory_format_of(like))


def _vec(value, c, like):
    return torch.full((c,), value, dtype=ops.acc_dtype(like.dtype), device=like.device)


def _conv(x, w, b):
    return _aten.convolution(x, w, b, *_CONV_ARGS)


class _InferenceCtx:
    """Stands in for an autograd ctx where no gradient is needed: the Functions' forward runs as is."""

    needs_input_grad = ()

    def save_for_backward(self, *tensors):
        pass

    def mark_dirty(self, *tensors):
        pass

    def mark_non_differentiable(self, *tensors):
        pass


def _apply(function, *args):
    """function.apply(*args), or its forward alone when autograd has nothing to record."""
    if torch.is_grad_enabled() and any(isinstance(a, torch.Tensor) and a.requires_grad for a in args):
        return function.apply(*args)
    return function.forward(_InferenceCtx(), *args)


class _BN:
    """One BatchNorm layer's tensors and settings, as passed by the module; ``group`` is the process group
    its statistics are synchronized over (None: this process's batch alone)."""

    __slots__ = ("gamma", "beta", "running_mean", "running_var", "momentum", "eps", "group")

    def __init__(self, gamma, beta, running_mean, running_var, momentum, eps, group=None):
        self.gamma, self.beta = gamma, beta
        self.running_mean, self.running_var = running_mean, running_var
        self.momentum, self.eps, self.group = momentum, eps, group


def _group(bn):
    """The process group of a BN tuple ``(gamma, beta, running_mean, running_var, momentum, eps[, group])``."""
    return bn[6] if len(bn) > 6 else None


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
    return _conv(a1, w2, None), None


def _check_no_exact_sync(exact, *bns):
    if exact and any(bn.group is not None for bn in bns):
        raise ValueError("fastunet: synchronized BatchNorm runs in fast mode only; in exact mode use the modules "
                         "themselves (nn.SyncBatchNorm), as fastunet.U_Net(exact=True) does")


def _fast_bn(z, bn, conv_bias, training, upscale, stats=None):
    """Fast-mode BN of a bias-free conv output: (mean, var, invstd, scale, shift) float32 vectors, and the
    number of values per channel the statistics cover (all ranks' when synchronized). ``stats``: z's batch
    (mean, var) where the conv already gathered them.

    In eval the conv bias is folded into the mean, so that z*scale + shift is BN(z + bias).
    """
    n, _, h, w = ops.logical_shape(z, upscale)
    count = n * h * w
    if training:
        mean, var = ops.bn_stats(z, upscale) if stats is None else stats
        if bn.group is not None:
            mean, var, count = sync_batch_stats(mean, var, count, bn.group)
    else:
        acc = ops.acc_dtype(z.dtype)
        mean, var = bn.running_mean.to(acc), bn.running_var.to(acc)
        if conv_bias is not None:
            mean = mean - conv_bias.to(acc)
    invstd = torch.rsqrt(var + bn.eps)
    scale = bn.gamma.to(mean.dtype) * invstd
    return mean, var, invstd, scale, bn.beta.to(mean.dtype) - mean * scale, count


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


def _batch_stats(mean, var, conv_bias, count):
    """Mean of the biased conv output and unbiased variance, for the caller's running-stats update."""
    return (mean if conv_bias is None else mean + conv_bias.to(mean.dtype)), unbiased(var, count).to(var.dtype)


def _fold_bn(conv_bias, bn):
    """Eval BN folded into the conv before it: per-channel (weight scale, bias), float32."""
    scale = bn.gamma.float() * torch.rsqrt(bn.running_var.float() + bn.eps)
    bias = 0.0 if conv_bias is None else conv_bias.float()
    return scale, bn.beta.float() + (bias - bn.running_mean.float()) * scale


_FOLDED = WeakIdKeyDictionary()  # first tensor read -> (key, BN-folded inference weights)


def _memoised_fold(tensors, extra, compute):
    """``compute()``, the BN-folded inference weights of a block, memoised while ``tensors`` (every weight, bias,
    BN parameter and buffer it reads) are the same tensors at the same versions and ``extra`` (eps, dtypes) is
    the same: an optimizer step, load_state_dict or any in-place change bumps a version and recomputes it. One
    copy per block, freed with its weights. Computed afresh under torch.compile (which traces it) and for
    inference-mode tensors (they have no version counter)."""
    present = [t for t in tensors if t is not None]
    if torch.compiler.is_compiling() or any(t.is_inference() for t in present):
        return compute()
    key = tuple(None if t is None else (t.data_ptr(), t._version, t.dtype, t.device, t.shape) for t in tensors)
    key += tuple(extra)
    hit = _FOLDED.get(present[0])
    if hit is not None and hit[0] == key:
        return hit[1]
    value = compute()
    _FOLDED[present[0]] = (key, value)
    return value


def _fold_double_block(w1, b1, bn1, dtype1, w2, b2, bn2, dtype2):
    """Inference weights of a double block: (conv1 weight * BN1 scale, BN1 shift, ones, the same for layer 2)."""
    scale1, shift1 = _fold_bn(b1, bn1)
    scale2, shift2 = _fold_bn(b2, bn2)
    return ((w1.float() * scale1.view(-1, 1, 1, 1)).to(dtype1), shift1, torch.ones_like(shift1),
            (w2.float() * scale2.view(-1, 1, 1, 1)).to(dtype2), shift2, torch.ones_like(shift2))


def _fold_up_block(w, b, bn, dtype):
    """Inference weights of an up block: (sub-pixel weights * BN scale, BN shift, ones)."""
    scale, shift = _fold_bn(b, bn)
    return (phase_weights(w) * scale.repeat(4).view(-1, 1, 1, 1)).to(dtype), shift, torch.ones_like(shift)


def _exact_bn(z, bn, training):
    """ATen's own BN call (the one F.batch_norm makes): output and what its backward needs."""
    t, save_mean, save_invstd, reserve, impl = _aten._batch_norm_impl_index(
        z, bn.gamma, bn.beta, bn.running_mean, bn.running_var, training, bn.momentum, bn.eps,
        torch.backends.cudnn.enabled,
    )
    return t, (save_mean, save_invstd, reserve), impl


def _exact_bn_backward(dy, z, gamma, running_mean, running_var, saved, impl, training, eps, mask):
    """The backward autograd runs for _batch_norm_impl_index: (dz, dgamma, dbeta)."""
    save_mean, save_invstd, reserve = saved
    if training:
        return _aten._batch_norm_impl_index_backward(
            impl, z, dy, gamma, running_mean, running_var, save_mean, save_invstd, True, eps, mask, reserve
        )
    return _aten.native_batch_norm_backward(dy, z, gamma, running_mean, running_var, save_mean, save_invstd, False, eps, mask)


def _relu_pool_exact(t, out, pooled=None):
    """ReLU (+ max-pool) of ATen's BN output, written into ``out``: the fused op with scale 1, shift 0."""
    c = t.shape[1]
    ops.bn_relu_pool(t, _vec(1.0, c, t), _vec(0.0, c, t), 1, out, pooled)


def _relu_pool_exact_backward(grad, grad_pooled, t):
    c = t.shape[1]
    return ops.relu_pool_backward(grad, grad_pooled, t, _vec(1.0, c, t), _vec(0.0, c, t), 1)


def _block_outputs(z, cat_channels, pool):
    """A block's output buffer (with room for the up block's channels), its written slice, the pool."""
    n, c, h, w = z.shape
    buf = _empty((n, c + cat_channels, h, w), z)
    out = buf.narrow(1, 0, c) if cat_channels else buf
    pooled = _empty((n, c, h // 2, w // 2), z) if pool else None
    return buf, out, pooled


# ----------------------------------------------------------------------------------------------------
# Double block
# ----------------------------------------------------------------------------------------------------


class DoubleConvBNReLU(torch.autograd.Function):
    """(conv3x3 + BN + ReLU) x 2; see double_conv_bn_relu."""

    @staticmethod
    def forward(ctx, x, w1, b1, g1, be1, w2, b2, g2, be2, rm1, rv1, rm2, rv2,
                momentum1, momentum2, eps1, eps2, group1, group2, training, exact, fold, cat_channels, pool):
        bn1 = _BN(g1, be1, rm1, rv1, momentum1, eps1, group1 if training else None)
        bn2 = _BN(g2, be2, rm2, rv2, momentum2, eps2, group2 if training else None)
        _check_no_exact_sync(exact, bn1, bn2)
        cast = _autocast_dtype(x.device.type)
        ctx.cfg = (training, exact, pool, eps1, eps2)
        ctx.bn_dtypes = (g1.dtype, g2.dtype)
        with torch.autocast(x.device.type, enabled=False):
            xc = _cast(x, cast)
            if not fold or exact:  # the fold path reads its weights, cast, from _memoised_fold
                w1c, w2c = _cast(w1, cast), _cast(w2, cast)
            if exact:
                z1 = _conv(xc, w1c, _cast(b1, cast))
                t1, saved1, impl1 = _exact_bn(z1, bn1, training)
                a1 = torch.empty_like(t1)
                _relu_pool_exact(t1, a1)
                del t1
                z2 = _conv(a1, w2c, _cast(b2, cast))
                t2, saved2, impl2 = _exact_bn(z2, bn2, training)
                buf, out, pooled = _block_outputs(z2, cat_channels, pool)
                _relu_pool_exact(t2, out, pooled)
                ctx.impl = (impl1, impl2)
                ctx.save_for_backward(x, xc, w1, w1c, b1, z1, a1, g1, rm1, rv1, *saved1,
                                      w2, w2c, b2, z2, t2, g2, rm2, rv2, *saved2)
                stats = ()
            elif fold:
                w1f, shift1, ones1, w2f, shift2, ones2 = _memoised_fold(
                    (w1, b1, g1, be1, rm1, rv1, w2, b2, g2, be2, rm2, rv2), (eps1, eps2, cast),
                    lambda: _fold_double_block(w1, b1, bn1, _cast_dtype(w1, cast), w2, b2, bn2, _cast_dtype(w2, cast)))
                z1 = _conv(xc, w1f, None)
                z2, _ = _second_conv(z1, ones1, shift1, w2f, False)
                buf, out, pooled = _block_outputs(z2, cat_channels, pool)
                ops.bn_relu_pool(z2, ones2, shift2, 1, out, pooled)
                stats = ()
            else:
                z1 = _conv(xc, w1c, None)
                m1, v1, i1, s1, h1, n1 = _fast_bn(z1, bn1, b1, training, 1)
                z2, stats2 = _second_conv(z1, s1, h1, w2c, training)  # layer 1's activation: recomputed in backward
                m2, v2, i2, s2, h2, n2 = _fast_bn(z2, bn2, b2, training, 1, stats2)
                buf, out, pooled = _block_outputs(z2, cat_channels, pool)
                ops.bn_relu_pool(z2, s2, h2, 1, out, pooled)
                ctx.save_for_backward(x, xc, w1, w1c, b1, z1, m1, i1, s1, h1, w2, w2c, b2, z2, m2, i2, s2, h2)
                ctx.sync = (None if bn1.group is None else (bn1.group, n1), None if bn2.group is None else (bn2.group, n2))
                stats = (*_batch_stats(m1, v1, b1, n1), *_batch_stats(m2, v2, b2, n2)) if training else ()
        ctx.mark_non_differentiable(*stats)
        return (buf, pooled, *stats) if pool else (buf, *stats)

    @staticmethod
    def backward(ctx, grad_buf, *more):
        training, exact, pool, eps1, eps2 = ctx.cfg
        grad_pooled = more[0] if pool else None
        need = ctx.needs_input_grad
        with torch.autocast(grad_buf.device.type, enabled=False):
            if exact:
                (x, xc, w1, w1c, b1, z1, a1, g1, rm1, rv1, sm1, si1, r1,
                 w2, w2c, b2, z2, t2, g2, rm2, rv2, sm2, si2, r2) = ctx.saved_tensors
                grad_out = grad_buf.narrow(1, 0, z2.shape[1])
                # Each activation-sized gradient is dropped once used, as the autograd engine would.
                dy2 = _relu_pool_exact_backward(grad_out, grad_pooled, t2)
                dz2, dg2, dbe2 = _exact_bn_backward(dy2, z2, g2, rm2, rv2, (sm2, si2, r2), ctx.impl[1], training, eps2,
                                                    [True, need[7], need[8]])
                del dy2
                da1, dw2, db2 = _aten.convolution_backward(dz2, a1, w2c, [w2.shape[0]], *_CONV_ARGS,
                                                           [True, need[5], need[6]])
                del dz2
                dy1 = _relu_pool_exact_backward(da1, None, a1)
                del da1
                dz1, dg1, dbe1 = _exact_bn_backward(dy1, z1, g1, rm1, rv1, (sm1, si1, r1), ctx.impl[0], training, eps1,
                                                    [True, need[3], need[4]])
                del dy1
                dx, dw1, db1 = _aten.convolution_backward(dz1, xc, w1c, [w1.shape[0]], *_CONV_ARGS,
                                                          [need[0], need[1], need[2]])
            else:
                x, xc, w1, w1c, b1, z1, m1, i1, s1, h1, w2, w2c, b2, z2, m2, i2, s2, h2 = ctx.saved_tensors
                grad_out = grad_buf.narrow(1, 0, z2.shape[1])
                sync1, sync2 = ctx.sync
                dz2, dg2, dbe2, db2 = _fast_bn_backward(grad_out, grad_pooled, z2, m2, i2, s2, h2, b2, training, 1, sync2)
                a1 = torch.empty_like(z1)
                ops.bn_relu_pool(z1, s1, h1, 1, a1, None)
                da1, dw2, _ = _aten.convolution_backward(dz2, a1, w2c, None, *_CONV_ARGS, [True, need[5], False])
                del a1, dz2  # activation-sized: dropped once used, as the autograd engine would
                dz1, dg1, dbe1, db1 = _fast_bn_backward(da1, None, z1, m1, i1, s1, h1, b1, training, 1, sync1)
                del da1
                dx, dw1, _ = _aten.convolution_backward(dz1, xc, w1c, None, *_CONV_ARGS, [need[0], need[1], False])
        bn1_dtype, bn2_dtype = ctx.bn_dtypes
        return (_grad_as(dx, x), _grad_as(dw1, w1), _grad_as(db1, b1), _grad_as(dg1, bn1_dtype), _grad_as(dbe1, bn1_dtype),
                _grad_as(dw2, w2), _grad_as(db2, b2), _grad_as(dg2, bn2_dtype), _grad_as(dbe2, bn2_dtype)) + (None,) * 15


def double_conv_bn_relu(x, conv1, bn1, conv2, bn2, *, training, exact=False, fold=False, cat_channels=0,
                        pool=False):
    """(conv3x3 + BN + ReLU) x 2 over ``x`` ``[N, Cin, H, W]`` (float32/bfloat16/float16, NCHW or NHWC).

    conv1/conv2 are ``(weight, bias)`` pairs, bn1/bn2 ``_BN``-like tuples ``(gamma, beta, running_mean,
    running_var, momentum, eps[, process_group])``; with a process group (fast mode, training) the BN
    statistics are synchronized over it. Returns ``(buf, pooled, batch_stats)``: ``buf`` is ``[N, Cout +
    cat_channels, H, W]`` whose first Cout channels hold the block output (the rest is for
    upsample_conv_cat to fill), ``pooled`` its 2x2 max-pool ``[N, Cout, H/2, W/2]`` or None, and
    ``batch_stats`` the fast-mode training ``(mean1, unbiased var1, mean2, unbiased var2)`` (empty otherwise).
    """
    outs = _apply(DoubleConvBNReLU, x, *conv1, *bn1[:2], *conv2, *bn2[:2], *bn1[2:4], *bn2[2:4],
                  bn1[4], bn2[4], bn1[5], bn2[5], _group(bn1), _group(bn2), training, exact, fold, cat_channels, pool)
    if pool:
        return outs[0], outs[1], outs[2:]
    return outs[0], None, outs[1:]


# ----------------------------------------------------------------------------------------------------
# Up block
# ----------------------------------------------------------------------------------------------------


class UpsampleConvCat(torch.autograd.Function):
    """Nearest upsample x2 + conv3x3 + BN + ReLU into a concat buffer; see upsample_conv_cat."""

    @staticmethod
    def forward(ctx, d, buf, w, b, g, be, rm, rv, momentum, eps, group, training, exact, fold):
        bn = _BN(g, be, rm, rv, momentum, eps, group if training else None)
        _check_no_exact_sync(exact, bn)
        cast = _autocast_dtype(d.device.type)
        cout = w.shape[0]
        cskip = buf.shape[1] - cout
        out = buf.narrow(1, cskip, cout)
        ctx.cfg = (training, exact, eps, cskip)
        ctx.bn_dtype = g.dtype
        with torch.autocast(d.device.type, enabled=False):
            dc = _cast(d, cast)
            if not fold or exact:  # the fold path reads its weights, cast, from _memoised_fold
                wc = _cast(w, cast)
            if exact:
                u = _aten.upsample_nearest2d.vec(dc, None, [2.0, 2.0])
                z = _conv(u, wc, _cast(b, cast))
                del u  # recomputed in backward: an exact copy
                t, saved, ctx.impl = _exact_bn(z, bn, training)
                _relu_pool_exact(t, out)
                ctx.save_for_backward(d, dc, w, wc, b, z, t, g, rm, rv, *saved)
                stats = ()
            elif fold:
                w4f, shift, ones = _memoised_fold((w, b, g, be, rm, rv), (eps, cast),
                                                  lambda: _fold_up_block(w, b, bn, _cast_dtype(w, cast)))
                z4 = _conv(dc, w4f, None)
                ops.bn_relu_pool(z4, ones, shift, 2, out, None)
                stats = ()
            else:
                w4 = phase_weights(w).to(wc.dtype)
                z4 = _conv(dc, w4, None)
                m, v, i, s, h, count = _fast_bn(z4, bn, b, training, 2)
                ops.bn_relu_pool(z4, s, h, 2, out, None)
                ctx.save_for_backward(d, dc, w, w4, b, z4, m, i, s, h)
                ctx.sync = None if bn.group is None else (bn.group, count)
                stats = _batch_stats(m, v, b, count) if training else ()
        ctx.mark_dirty(buf)
        ctx.mark_non_differentiable(*stats)
        return (buf, *stats)

    @staticmethod
    def backward(ctx, grad_buf, *unused_stat_grads):
        training, exact, eps, cskip = ctx.cfg
        need = ctx.needs_input_grad
        with torch.autocast(grad_buf.device.type, enabled=False):
            if exact:
                d, dc, w, wc, b, z, t, g, rm, rv, *saved = ctx.saved_tensors
                grad_out = grad_buf.narrow(1, cskip, w.shape[0])
                dy = _relu_pool_exact_backward(grad_out, None, t)
                dz, dg, dbe = _exact_bn_backward(dy, z, g, rm, rv, saved, ctx.impl, training, eps, [True, need[4], need[5]])
                del dy  # activation-sized gradients and the recomputed upsample: dropped once used
                u = _aten.upsample_nearest2d.vec(dc, None, [2.0, 2.0])
                du, dw, db = _aten.convolution_backward(dz, u, wc, [w.shape[0]], *_CONV_ARGS, [need[0], need[2], need[3]])
                size = list(u.shape[2:])
                del dz, u
                dd = None
                if du is not None:
                    dd = _aten.upsample_nearest2d_backward(du, size, list(dc.shape), 2.0, 2.0)
            else:
                d, dc, w, w4, b, z4, m, i, s, h = ctx.saved_tensors
                cout = w.shape[0]
                grad_out = grad_buf.narrow(1, cskip, cout)
                dz4, dg, dbe, db = _fast_bn_backward(grad_out, None, z4, m, i, s, h, b, training, 2, ctx.sync)
                dd, dw4, _ = _aten.convolution_backward(dz4, dc, w4, None, *_CONV_ARGS, [need[0], need[2], False])
                del dz4
                dw = None if dw4 is None else phase_weights_backward(dw4, cout)
        # The skip channels pass their gradient through; the overwritten channels' entries of grad_buf are
        # not read by the buffer's producer (double_conv_bn_relu reads only its own channels).
        return (_grad_as(dd, d), grad_buf, _grad_as(dw, w), _grad_as(db, b), _grad_as(dg, ctx.bn_dtype), _grad_as(dbe, ctx.bn_dtype),
                None, None, None, None, None, None, None, None)


def upsample_conv_cat(d, buf, conv, bn, *, training, exact=False, fold=False):
    """Up block: writes ``relu(BN(conv3x3(upsample2x(d))))`` into ``buf[:, Cskip:]`` in place.

    d: ``[N, Cin, h, w]``; buf: ``[N, Cskip + Cout, 2h, 2w]`` of the block's activation dtype whose
    first Cskip channels hold the skip (written by double_conv_bn_relu with cat_channels=Cout); conv is
    ``(weight [Cout, Cin, 3, 3], bias)``, bn ``(gamma, beta, running_mean, running_var, momentum, eps[,
    process_group])`` (a process group synchronizes the fast-mode training statistics over it).
    Returns ``(buf, batch_stats)`` with ``batch_stats`` = fast-mode training ``(mean, unbiased var)`` or empty.
    """
    outs = _apply(UpsampleConvCat, d, buf, *conv, *bn[:6], _group(bn), training, exact, fold)
    return outs[0], outs[1:]
