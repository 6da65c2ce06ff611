"""The fused blocks' BatchNorm arithmetic: the per-call BN arguments, fast mode's own BN (statistics,
synchronized sums, backward) and exact mode's ATen BN calls with the fused ReLU (+ max-pool)."""

from typing import NamedTuple, Optional

import torch

from .. import ops
from ..sync_batchnorm import all_reduce_sums, sync_batch_stats, unbiased, update_running_stats

_aten = torch.ops.aten


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


def _vec(value, c, like):
    return torch.full((c,), value, dtype=ops.acc_dtype(like.dtype), device=like.device)


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


def _eval_running_stats(running_mean, running_var, settings):
    """What backward reads of a BN's running stats: both in eval (so an in-place change before backward is
    caught, as for nn.BatchNorm2d), none in training."""
    return (None, None) if settings.training else (running_mean, running_var)
