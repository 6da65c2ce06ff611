"""Synchronized BatchNorm for fastunet models: nn.SyncBatchNorm's semantics on every device and backend.

``nn.SyncBatchNorm`` runs on GPUs only (and DDP refuses it in a CPU module); ``fastunet.SyncBatchNorm`` is an
``nn.BatchNorm2d`` (same parameters, buffers and state_dict keys) that synchronizes its training statistics over
a process group wherever torch.distributed runs: it calls nn.SyncBatchNorm's own function on CUDA (so the
results are bit for bit nn.SyncBatchNorm's) and a pure-PyTorch twin of it on the CPU (gloo). fastunet's fused
blocks recognize it (and nn.SyncBatchNorm) and synchronize their own fast-mode statistics the same way.
"""

import torch
import torch.distributed as dist
import torch.nn as nn
from torch.nn.modules._functions import SyncBatchNorm as _TorchSyncBatchNormFunction

from .ops import bn_backward_dz

# torch 2.14 renamed all_gather_into_tensor (now deprecated) to all_gather_single.
_all_gather_single = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor



def unbiased(var, count):
    """Bessel's correction of a biased variance over ``count`` values (an int or a tensor; 1 value: as is)."""
    if isinstance(count, torch.Tensor):
        return var * (count / (count - 1).clamp_min(1))
    return var * (count / max(count - 1, 1))


def update_running_stats(running_mean, running_var, mean, unbiased_var, factor):
    """nn.BatchNorm2d's running-stats update with momentum ``factor``."""
    with torch.no_grad():
        running_mean.mul_(1.0 - factor).add_(mean.to(running_mean.dtype), alpha=factor)
        running_var.mul_(1.0 - factor).add_(unbiased_var.to(running_var.dtype), alpha=factor)

def sync_batch_stats(mean, var, count, group):
    """nn.SyncBatchNorm's statistics: every rank's per-channel (mean, biased variance, count) all-gathered and
    merged (Chan et al.'s pairwise formula, in float64).

    mean, var: ``[C]`` float32/float64; count: this rank's values per channel. Returns the global
    ``(mean, var)`` in the input dtypes and the global count, a 0-dim float64 tensor (no host sync).
    """
    c = mean.numel()
    local = torch.cat([mean.double(), var.double(), mean.new_full((1,), count, dtype=torch.float64)])
    gathered = local.new_empty(dist.get_world_size(group) * local.numel())
    _all_gather_single(gathered, local, group=group)
    gathered = gathered.view(-1, 2 * c + 1)
    means, variances, counts = gathered[:, :c], gathered[:, c:2 * c], gathered[:, 2 * c:]
    total = counts.sum()
    global_mean = (means * counts).sum(0) / total
    sum_sq_dev = (variances * counts).sum(0) + ((means - global_mean).square() * counts).sum(0)
    return global_mean.to(mean.dtype), (sum_sq_dev / total).to(var.dtype), total


def all_reduce_sums(sum_dy, sum_dy_xmu, group):
    """The backward of synchronized BN: both per-channel sums added over the group."""
    sums = torch.cat([sum_dy, sum_dy_xmu])
    dist.all_reduce(sums, group=group)
    return sums.chunk(2)


def _channel(v):
    return v.view(1, -1, 1, 1)


class _SyncBatchNormFunction(torch.autograd.Function):
    """Synchronized training-mode BN in pure PyTorch: nn.SyncBatchNorm's math where its CUDA kernels do not run."""

    @staticmethod
    def forward(ctx, x, weight, bias, running_mean, running_var, eps, factor, group):
        acc = torch.float64 if x.dtype == torch.float64 else torch.float32
        xf = x.to(acc)
        var, mean = torch.var_mean(xf, dim=(0, 2, 3), correction=0)
        mean, var, total = sync_batch_stats(mean, var, x.numel() // x.shape[1], group)
        if running_mean is not None:
            with torch.no_grad():
                update_running_stats(running_mean, running_var, mean, unbiased(var, total), factor)
        invstd = torch.rsqrt(var + eps)
        scale = invstd if weight is None else invstd * weight.to(acc)
        y = (xf - _channel(mean)) * _channel(scale)
        if bias is not None:
            y = y + _channel(bias.to(acc))
        ctx.save_for_backward(x, weight, mean, invstd, total)
        ctx.group = group
        return y.to(x.dtype)

    @staticmethod
    def backward(ctx, dy):
        x, weight, mean, invstd, total = ctx.saved_tensors
        xmu = x.to(mean.dtype) - _channel(mean)
        dyf = dy.to(mean.dtype)
        sum_dy, sum_dy_xmu = dyf.sum((0, 2, 3)), (dyf * xmu).sum((0, 2, 3))
        dweight = None if weight is None else (sum_dy_xmu * invstd).to(weight.dtype)
        dbias = None if weight is None else sum_dy.to(weight.dtype)
        all_dy, all_dy_xmu = all_reduce_sums(sum_dy, sum_dy_xmu, ctx.group)
        scale = invstd if weight is None else invstd * weight.to(mean.dtype)
        dx = bn_backward_dz(dyf, xmu, scale, invstd, all_dy, all_dy_xmu, total)
        return dx.to(x.dtype), dweight, dbias, None, None, None, None, None


class SyncBatchNorm(nn.BatchNorm2d):
    """``nn.BatchNorm2d`` whose training statistics are synchronized over ``process_group`` (default: the world),
    with nn.SyncBatchNorm's semantics, on CUDA and on the CPU. Input ``[N, C, H, W]``.

    Synchronizes in training when torch.distributed is initialized with more than one rank; otherwise it is
    nn.BatchNorm2d. Made by ``fastunet.convert_sync_batchnorm(model)``.
    """

    def __init__(self, num_features, eps=1e-5, momentum=0.1, affine=True, track_running_stats=True,
                 process_group=None, device=None, dtype=None):
        super().__init__(num_features, eps, momentum, affine, track_running_stats, device=device, dtype=dtype)
        self.process_group = process_group

    def forward(self, x):
        group = sync_group(self)
        if group is None:
            return super().forward(x)
        self._check_input_dim(x)
        return synchronized_batch_norm(self, x, group, self.weight, self.bias)


def synchronized_batch_norm(bn, x, group, weight, bias):
    """Training-mode BN module ``bn`` on ``x`` ``[N, C, H, W]`` with statistics over the ranks of ``group``, as
    nn.SyncBatchNorm computes it (its own function on CUDA, the pure-PyTorch twin elsewhere), counting the batch
    and moving ``bn``'s running stats; ``weight`` and ``bias`` are what the call uses of ``bn.weight`` and
    ``bn.bias``."""
    factor = 0.0 if bn.momentum is None else bn.momentum
    if bn.track_running_stats:
        bn.num_batches_tracked.add_(1)
        if bn.momentum is None:
            factor = 1.0 / float(bn.num_batches_tracked)
    running_mean = bn.running_mean if bn.track_running_stats else None
    running_var = bn.running_var if bn.track_running_stats else None
    if x.device.type == "cpu":
        return _SyncBatchNormFunction.apply(x, weight, bias, running_mean, running_var, bn.eps, factor, group)
    return _TorchSyncBatchNormFunction.apply(x, weight, bias, running_mean, running_var, bn.eps, factor, group,
                                             dist.get_world_size(group))


def sync_group(bn):
    """The process group a synchronized BN (fastunet.SyncBatchNorm or nn.SyncBatchNorm) synchronizes over in
    this call, or None (any other layer; eval; torch.distributed not initialized; one rank), as nn.SyncBatchNorm
    decides."""
    if not (isinstance(bn, (SyncBatchNorm, nn.SyncBatchNorm)) and bn.training and dist.is_available()
            and dist.is_initialized()):
        return None
    group = bn.process_group or dist.group.WORLD
    return group if dist.get_world_size(group) > 1 else None


def convert_sync_batchnorm(module, process_group=None):
    """Returns ``module`` with every 2-D BatchNorm (``nn.BatchNorm2d``, ``nn.SyncBatchNorm``) replaced by
    ``fastunet.SyncBatchNorm`` sharing its parameters and buffers (state_dict keys unchanged), as
    ``nn.SyncBatchNorm.convert_sync_batchnorm`` does.

    Under DDP (gloo on the CPU, NCCL on CUDA) a converted fastunet.U_Net then trains with batch statistics over
    all ranks: the fast mode's fused blocks all-gather each BN's per-channel (mean, variance, count) and
    all-reduce the backward sums; exact mode runs the SyncBatchNorm modules, which on CUDA are bit for bit
    ``nn.SyncBatchNorm``. ``nn.SyncBatchNorm.convert_sync_batchnorm`` works on fastunet models too, on GPUs.
    """
    converted = module
    if isinstance(module, (nn.BatchNorm2d, nn.SyncBatchNorm)) and not isinstance(module, SyncBatchNorm):
        converted = SyncBatchNorm(module.num_features, module.eps, module.momentum, module.affine,
                                  module.track_running_stats, process_group)
        if module.affine:
            with torch.no_grad():
                converted.weight, converted.bias = module.weight, module.bias
        converted.running_mean, converted.running_var = module.running_mean, module.running_var
        converted.num_batches_tracked = module.num_batches_tracked
        converted.training = module.training
        if hasattr(module, "qconfig"):
            converted.qconfig = module.qconfig
    for name, child in module.named_children():
        converted.add_module(name, convert_sync_batchnorm(child, process_group))
    return converted
