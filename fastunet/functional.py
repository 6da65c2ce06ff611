"""The two fused U-Net blocks as autograd Functions over the fastunet ops and ATen convolutions.

double_conv_bn_relu: (conv3x3 + BN + ReLU) x 2, optionally writing its output straight into the first
    channels of a concat buffer and taking the 2x2 max-pool in the same pass (encoder levels).
upsample_conv_cat:   nearest upsample x2 + conv3x3 + BN + ReLU written into the channels after the skip
    in that concat buffer (no upsampled tensor in fast mode, no torch.cat copy in either mode).

Two modes:
  exact=True   the same ATen calls as torch.nn's modules (convolution, _batch_norm_impl_index,
               upsample_nearest2d and their backwards), so every rounding is the reference's; fused are
               only the steps that round nothing: ReLU, max-pool, the concat write, their backward masks.
  exact=False  own BN (Welford statistics, BN-apply+ReLU(+pool) in one pass, BN+ReLU backward in two
               passes recomputing the activations from the pre-BN conv output instead of storing them),
               the up-conv as a 2x2 convolution on the low-resolution input with 4x output channels
               (sub-pixel form: no upsampled tensor, 2.25x fewer FLOPs), BN folded into the conv weights
               for inference. A conv bias in front of a training-mode BN cancels exactly, so it is not
               added and its gradient is exactly zero; it still shifts the running mean.
Batch statistics come back to the caller (fast mode), which updates the running buffers; exact mode
lets ATen update them, as nn.BatchNorm2d does.
"""

import torch

from . import ops

_aten = torch.ops.aten
_CONV_ARGS = ([1, 1], [1, 1], [1, 1], False, [0, 0], 1)  # stride, padding, dilation, transposed, out_pad, groups

# Sub-pixel decomposition: for output phase a (row parity), kernel row k of the 2x2 conv sums these 3x3 rows.
_PHASE_TAPS = ((((1, 0, 0), (0, 1, 1)), ((1, 1, 0), (0, 0, 1))))


def _phase_matrix(device):
    return torch.tensor(_PHASE_TAPS, dtype=torch.float32, device=device)  # [phase, k, tap]


def phase_weights(w):
    """3x3 weights ``[O, I, 3, 3]`` -> sub-pixel 2x2 weights ``[4*O, I, 2, 2]`` (channel = (2a+b)*O + o).

    conv2d(x, phase_weights(w), padding=1) holds, for phase (a, b), upsample2x(x) conv w at output pixel
    (2i+a, 2j+b) in its element [:, (2a+b)*O + o, i+a, j+b]. Computed in float32.
    """
    p = _phase_matrix(w.device)
    o, i = w.shape[:2]
    w4 = torch.einsum("ayd,bxe,oide->aboiyx", p, p, w.float())
    return w4.reshape(4 * o, i, 2, 2)


def phase_weights_backward(dw4, o):
    """Gradient of phase_weights: ``[4*O, I, 2, 2]`` -> ``[O, I, 3, 3]`` (float32)."""
    p = _phase_matrix(dw4.device)
    d6 = dw4.float().reshape(2, 2, o, dw4.shape[1], 2, 2)
    return torch.einsum("ayd,bxe,aboiyx->oide", p, p, d6)


def _autocast_dtype(device_type):
    """The dtype autocast gives a conv on ``device_type`` now, or None when autocast is off."""
    if device_type in ("cuda", "cpu") and torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    return None


def _cast(t, dtype):
    """Autocast's cast of a conv argument: floating tensors other than float64 go to ``dtype``."""
    if t is None or dtype is None or not t.is_floating_point() or t.dtype in (dtype, torch.float64):
        return t
    return t.to(dtype)


def _grad_as(g, like):
    """A gradient in the dtype of the tensor it belongs to (autocast's cast backward)."""
    return None if g is None else g.to(like.dtype)


def _empty_like_format(shape, like):
    return torch.empty(shape, dtype=like.dtype, device=like.device, memory_format=ops._memory_format(like))


def _bn_scale_shift(gamma, beta, mean, invstd):
    scale = gamma.to(mean.dtype) * invstd
    return scale, beta.to(mean.dtype) - mean * scale


def _eval_stats(running_mean, running_var, conv_bias, eps, acc):
    """Eval-mode BN of a bias-free conv output: mean and invstd that fold the conv bias in."""
    mean = running_mean.to(acc)
    if conv_bias is not None:
        mean = mean - conv_bias.to(acc)
    return mean, torch.rsqrt(running_var.to(acc) + eps)


class _FastLayer:
    """Forward state of one fast-mode conv + BN layer."""

    @staticmethod
    def bn(z, gamma, beta, conv_bias, running_mean, running_var, eps, training, upscale):
        acc = ops.acc_dtype(z.dtype)
        if training:
            mean, var = ops.bn_stats(z, upscale)
            invstd = torch.rsqrt(var + eps)
        else:
            mean, invstd = _eval_stats(running_mean, running_var, conv_bias, eps, acc)
            var = None
        scale, shift = _bn_scale_shift(gamma, beta, mean, invstd)
        return mean, var, invstd, scale, shift

    @staticmethod
    def backward(grad, grad_pooled, z, mean, invstd, scale, shift, conv_bias, training, upscale):
        """dz, dgamma, dbeta, dconv_bias of one BN+ReLU(+pool) layer."""
        sum_dy, sum_dy_xmu = ops.bn_relu_backward_reduce(grad, grad_pooled, z, scale, shift, mean, upscale)
        if training:
            dz = ops.bn_relu_backward_apply(grad, grad_pooled, z, scale, shift, mean, invstd, sum_dy, sum_dy_xmu, upscale)
            dbias = None if conv_bias is None else torch.zeros_like(conv_bias)
        else:
            zero = torch.zeros_like(sum_dy)
            dz = ops.bn_relu_backward_apply(grad, grad_pooled, z, scale, shift, mean, invstd, zero, zero, upscale)
            dbias = None if conv_bias is None else (scale * sum_dy).to(conv_bias.dtype)
        return dz, sum_dy_xmu * invstd, sum_dy, dbias


def _exact_bn(z, gamma, beta, running_mean, running_var, training, momentum, eps):
    """ATen's own BN call (the one F.batch_norm makes): output and what its backward needs."""
    t, save_mean, save_invstd, reserve, impl = _aten._batch_norm_impl_index(
        z, gamma, beta, running_mean, running_var, training, momentum, eps, torch.backends.cudnn.enabled
    )
    return t, (save_mean, save_invstd, reserve, impl)


def _exact_bn_backward(dy, z, gamma, running_mean, running_var, saved, training, eps, mask):
    save_mean, save_invstd, reserve, impl = saved
    if training:
        return _aten._batch_norm_impl_index_backward(
            impl, z, dy, gamma, running_mean, running_var, save_mean, save_invstd, True, eps, mask, reserve
        )
    return _aten.native_batch_norm_backward(dy, z, gamma, running_mean, running_var, save_mean, save_invstd, False, eps, mask)


def _identity_affine(c, like):
    acc = ops.acc_dtype(like.dtype)
    return torch.ones(c, dtype=acc, device=like.device), torch.zeros(c, dtype=acc, device=like.device)


class DoubleConvBNReLU(torch.autograd.Function):
    """(conv3x3 + BN + ReLU) x 2; see double_conv_bn_relu."""

    @staticmethod
    def forward(ctx, x, w1, b1, g1, be1, w2, b2, g2, be2, rm1, rv1, rm2, rv2,
                momentum1, momentum2, eps1, eps2, training, exact, fold, cat_channels, pool):
        device_type = x.device.type
        cast = _autocast_dtype(device_type)
        with torch.autocast(device_type, enabled=False):
            xc, w1c, w2c = _cast(x, cast), _cast(w1, cast), _cast(w2, cast)
            c2 = w2.shape[0]
            ctx.cfg = (training, exact, cat_channels, pool, eps1, eps2)
            if exact:
                b1c, b2c = _cast(b1, cast), _cast(b2, cast)
                z1 = _aten.convolution(xc, w1c, b1c, *_CONV_ARGS)
                t1, bn1 = _exact_bn(z1, g1, be1, rm1, rv1, training, momentum1, eps1)
                one, zero = _identity_affine(t1.shape[1], t1)
                a1 = torch.empty_like(t1)
                ops.bn_relu_pool(t1, one, zero, 1, a1, None)
                del t1
                z2 = _aten.convolution(a1, w2c, b2c, *_CONV_ARGS)
                t2, bn2 = _exact_bn(z2, g2, be2, rm2, rv2, training, momentum2, eps2)
                buf, out, pooled = _block_outputs(t2, cat_channels, pool)
                ops.bn_relu_pool(t2, one[:c2] if c2 <= one.numel() else _identity_affine(c2, t2)[0],
                                 _identity_affine(c2, t2)[1], 1, out, pooled)
                ctx.save_for_backward(x, xc, w1, w1c, b1, z1, a1, g1, rm1, rv1, w2, w2c, b2, z2, t2, g2, rm2, rv2,
                                      *bn1[:3], *bn2[:3])
                ctx.impl = (bn1[3], bn2[3])
                stats = ()
            else:
                z1 = _aten.convolution(xc, w1c, None, *_CONV_ARGS)
                if fold:
                    return _folded_forward(z1, x, xc, w1c, b1, g1, be1, rm1, rv1, eps1, w2c, b2, g2, be2, rm2, rv2,
                                           eps2, cat_channels, pool)
                m1, v1, i1, s1, h1 = _FastLayer.bn(z1, g1, be1, b1, rm1, rv1, eps1, training, 1)
                a1 = torch.empty_like(z1)
                ops.bn_relu_pool(z1, s1, h1, 1, a1, None)
                z2 = _aten.convolution(a1, w2c, None, *_CONV_ARGS)
                del a1  # recomputed from z1 in backward
                m2, v2, i2, s2, h2 = _FastLayer.bn(z2, g2, be2, b2, rm2, rv2, eps2, training, 1)
                buf, out, pooled = _block_outputs(z2, cat_channels, pool)
                ops.bn_relu_pool(z2, s2, h2, 1, out, pooled)
                ctx.save_for_backward(x, xc, w1, w1c, b1, z1, w2, w2c, b2, z2, m1, i1, s1, h1, m2, i2, s2, h2)
                stats = _running_stats_update(training, m1, v1, b1, m2, v2, b2)
        ctx.mark_non_differentiable(*stats)
        if pooled is None:
            return (buf, *stats)
        return (buf, pooled, *stats)

    @staticmethod
    def backward(ctx, grad_buf, *grads):
        training, exact, cat_channels, pool, eps1, eps2 = ctx.cfg
        grad_pooled = grads[0] if pool else None
        saved = ctx.saved_tensors
        need = ctx.needs_input_grad
        with torch.autocast(grad_buf.device.type, enabled=False):
            if exact:
                (x, xc, w1, w1c, b1, z1, a1, g1, rm1, rv1, w2, w2c, b2, z2, t2, g2, rm2, rv2,
                 sm1, si1, r1, sm2, si2, r2) = saved
                c2 = z2.shape[1]
                grad_out = grad_buf.narrow(1, 0, c2)
                one, zero = _identity_affine(c2, t2)
                dy2 = ops.relu_pool_backward(grad_out, grad_pooled, t2, one, zero, 1)
                dz2, dg2, dbe2 = _exact_bn_backward(dy2, z2, g2, rm2, rv2, (sm2, si2, r2, ctx.impl[1]), training, eps2,
                                                    [True, need[7], need[8]])
                da1, dw2, db2 = _aten.convolution_backward(dz2, a1, w2c, [c2], *_CONV_ARGS, [True, need[5], need[6]])
                one1, zero1 = _identity_affine(a1.shape[1], a1)
                dy1 = ops.relu_pool_backward(da1, None, a1, one1, zero1, 1)
                dz1, dg1, dbe1 = _exact_bn_backward(dy1, z1, g1, rm1, rv1, (sm1, si1, r1, ctx.impl[0]), training, eps1,
                                                    [True, need[3], need[4]])
                dx, dw1, db1 = _aten.convolution_backward(dz1, xc, w1c, [w1.shape[0]], *_CONV_ARGS,
                                                          [need[0], need[1], need[2]])
            else:
                x, xc, w1, w1c, b1, z1, w2, w2c, b2, z2, m1, i1, s1, h1, m2, i2, s2, h2 = saved
                c2 = z2.shape[1]
                grad_out = grad_buf.narrow(1, 0, c2)
                dz2, dg2, dbe2, db2 = _FastLayer.backward(grad_out, grad_pooled, z2, m2, i2, s2, h2, b2, training, 1)
                a1 = torch.empty_like(z1)
                ops.bn_relu_pool(z1, s1, h1, 1, a1, None)
                da1, dw2, _ = _aten.convolution_backward(dz2, a1, w2c, None, *_CONV_ARGS, [True, need[5], False])
                del a1
                dz1, dg1, dbe1, db1 = _FastLayer.backward(da1, None, z1, m1, i1, s1, h1, b1, training, 1)
                dx, dw1, _ = _aten.convolution_backward(dz1, xc, w1c, None, *_CONV_ARGS, [need[0], need[1], False])
        return (_grad_as(dx, x), _grad_as(dw1, w1), _grad_as(db1, b1), dg1, dbe1,
                _grad_as(dw2, w2), _grad_as(db2, b2), dg2, dbe2) + (None,) * 13


def _block_outputs(z, cat_channels, pool):
    """The block's output buffer (with room for the up block's channels), its written slice, the pool."""
    n, c, h, w = z.shape
    buf = _empty_like_format((n, c + cat_channels, h, w), z)
    out = buf.narrow(1, 0, c) if cat_channels else buf
    pooled = _empty_like_format((n, c, h // 2, w // 2), z) if pool else None
    return buf, out, pooled


def _running_stats_update(training, m1, v1, b1, m2, v2, b2):
    """Batch mean (of the biased conv output) and biased variance of both layers, for the running stats."""
    if not training:
        return ()
    shift = lambda m, b: m if b is None else m + b.to(m.dtype)  # noqa: E731
    return shift(m1, b1), v1, shift(m2, b2), v2


def _fold(w, b, gamma, beta, rm, rv, eps):
    """Eval BN folded into a conv: (weight scale per output channel, bias), float32."""
    scale = gamma.float() * torch.rsqrt(rv.float() + eps)
    bias = beta.float() + ((b.float() if b is not None else 0.0) - rm.float()) * scale
    return scale, bias


def _folded_forward(z1_unused, x, xc, w1c, b1, g1, be1, rm1, rv1, eps1, w2c, b2, g2, be2, rm2, rv2, eps2,
                    cat_channels, pool):
    """Inference: both BNs folded into their convs; bias + ReLU (+pool, concat write) in one pass each."""
    del z1_unused
    s1, t1 = _fold(w1c, b1, g1, be1, rm1, rv1, eps1)
    z1 = _aten.convolution(xc, (w1c.float() * s1.view(-1, 1, 1, 1)).to(w1c.dtype), None, *_CONV_ARGS)
    one = torch.ones_like(t1, dtype=ops.acc_dtype(z1.dtype))
    a1 = torch.empty_like(z1)
    ops.bn_relu_pool(z1, one, t1.to(one.dtype), 1, a1, None)
    s2, t2 = _fold(w2c, b2, g2, be2, rm2, rv2, eps2)
    z2 = _aten.convolution(a1, (w2c.float() * s2.view(-1, 1, 1, 1)).to(w2c.dtype), None, *_CONV_ARGS)
    buf, out, pooled = _block_outputs(z2, cat_channels, pool)
    ops.bn_relu_pool(z2, torch.ones_like(t2, dtype=one.dtype), t2.to(one.dtype), 1, out, pooled)
    return buf if pooled is None else (buf, pooled)
