"""One U-Net over several devices by rows of the image (spatial partitioning) on torch.distributed.

Each rank of a process group holds a horizontal stripe of every activation: ``H / R`` rows of the image for R
ranks, a multiple of 16 so that max-pool, upsample and the skip concatenation stay local at every level. Before
each 3x3 convolution a rank exchanges one row with each neighbour (the halo, zeros at the image's top and bottom),
so the convolution sees what it sees in the whole image; BatchNorm's statistics are synchronized over the group
(SyncBatchNorm's semantics); the parameter gradients are summed over the ranks as DistributedDataParallel sums
them (float32 buckets of about 25 MB, each all-reduced asynchronously as soon as backward has made it, waited on at
the end of backward), so every rank ends with the gradient of the sum of the ranks' losses, the whole image's loss.
Autograd-aware functions on point-to-point sends and collectives and torch's own gradient hooks, no engine of its
own.
"""

from typing import NamedTuple

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

from . import functional, ops
from .model import (
    _SEED_MODULE_TYPES,
    U_Net,
    _parametrization_refusal,
    _plain_class,
    _runs_fused,
    _upsample_refusal,
    batch_norm_args,
    global_hooks,
    has_hooks,
    is_plain_maxpool,
)
from .sync_batchnorm import SyncBatchNorm, _all_gather_single, synchronized_batch_norm

BUCKET_CAP_MB = 25  # DistributedDataParallel's default bucket size
ROWS_MULTIPLE = 16  # four 2x2 max-pools: a stripe of 16k rows stays whole down to the bottleneck
# What SpatialUNet runs itself: these classes exactly (a subclass's forward of its own would be skipped), seen
# through torch.nn.utils.parametrize; the BatchNorms' statistics synchronized over its bn_group.
_STRIPE_LAYER_TYPES = (*_SEED_MODULE_TYPES, SyncBatchNorm)


def _rank_world(group):
    return dist.get_rank(group), dist.get_world_size(group)


def split_rows(x, group=None):
    """This rank's stripe of ``x`` ``[N, C, H, W]``: rows ``rank * H / R`` to ``(rank + 1) * H / R`` of the R ranks
    of ``group`` (a contiguous copy). H must split into R stripes of a multiple of 16 rows."""
    rank, world = _rank_world(group)
    if x.dim() != 4 or x.shape[2] % (ROWS_MULTIPLE * world):
        raise ValueError(f"fastunet: split_rows splits an [N, C, H, W] image into {world} stripes of a multiple of "
                         f"{ROWS_MULTIPLE} rows; got shape {tuple(x.shape)} (H must be a multiple of "
                         f"{ROWS_MULTIPLE * world})")
    rows = x.shape[2] // world
    return x.narrow(2, rank * rows, rows).contiguous()


class _GatherRows(torch.autograd.Function):
    """All ranks' stripes stacked along H; backward: each rank takes its own rows of every rank's gradient of the
    whole summed, or (``same_loss``: every rank holds the same gradient) of its own, with no collective."""

    @staticmethod
    def forward(ctx, y, group, same_loss):
        rank, world = _rank_world(group)
        ctx.group, ctx.rank, ctx.same_loss = group, rank, same_loss
        n, c, h, w = y.shape
        parts = y.new_empty((world * n, c, h, w))
        _all_gather_single(parts, y.contiguous(), group=group)
        return parts.view(world, n, c, h, w).permute(1, 2, 0, 3, 4).reshape(n, c, world * h, w)

    @staticmethod
    @once_differentiable  # its exchanges are not recorded: a second derivative through it would be wrong
    def backward(ctx, grad):
        rows = grad.shape[2] // dist.get_world_size(ctx.group)
        if ctx.same_loss:
            return grad.narrow(2, ctx.rank * rows, rows).contiguous(), None, None
        total = grad.clone(memory_format=torch.contiguous_format)
        dist.all_reduce(total, group=ctx.group)
        return total.narrow(2, ctx.rank * rows, rows), None, None


def gather_rows(y, group=None, *, same_loss=False):
    """Every rank's stripe ``[N, C, H / R, W]`` stacked in rank order along H: the whole ``[N, C, H, W]``, on
    every rank, differentiable: each stripe's gradient, summed over the ranks, goes back to its rank (the gradient
    of the sum of the ranks' losses). ``same_loss=True``: every rank computes one and the same loss from the whole
    (the loss of the gathered logits against the whole target), so every rank holds the same gradient of it; each
    rank takes its own rows of it, and the parameter gradients are that loss's."""
    return _GatherRows.apply(y, group, same_loss)


def _post_edge_rows(first, last, rank, world, group):
    """Starts the point-to-point exchange between neighbours: row ``first`` ``[N, C, 1, W]`` goes to rank - 1 and
    ``last`` to rank + 1 (where they exist). Returns the exchange's works, to wait on, and the rows that will have
    come back by then, by the sender's group rank."""
    edges = {peer: row for peer, row in ((rank - 1, first), (rank + 1, last)) if 0 <= peer < world}
    received = {peer: torch.empty_like(row, memory_format=torch.contiguous_format) for peer, row in edges.items()}
    ops = [dist.P2POp(dist.isend, row.contiguous(), group=group, group_peer=peer) for peer, row in edges.items()]
    ops += [dist.P2POp(dist.irecv, buf, group=group, group_peer=peer) for peer, buf in received.items()]
    return (dist.batch_isend_irecv(ops) if ops else []), received


def _wait(works):
    for work in works:
        work.wait()


def _overlaps(h, k):
    """Whether a stripe of ``h`` rows runs its k x k conv on the stripe while its halos travel (then redoes its edge
    rows): where it has interior rows to spend that time on."""
    return h >= 2 * k


class _HaloConv(torch.autograd.Function):
    """``conv2d(x, weight, bias, padding=1)`` on a stripe ``[N, Cin, h, W]`` seeing its neighbours' nearest rows, one
    above and one below (zeros at the image's top and bottom): a 3x3 ``weight`` gives ``[N, Cout, h, W]``, the
    stripe's rows of the whole image's conv; a 2x2 one (the sub-pixel up-conv's phase weights on a low-resolution
    stripe) gives ``[N, Cout, h + 1, W + 1]``, rows ``r .. r + h`` of the whole image's ``h_image + 1`` for the
    stripe starting at row ``r``.

    The exchange overlaps the interior (_overlaps): the halo rows travel while the conv runs on the stripe alone
    with padding 1, whose output rows are then right but for the first and the last, which are redone from the
    halos (a conv of k rows each). A stripe with too few rows waits for its halos and runs the conv on its
    halo-padded rows. Backward splits the conv the same way: the halo rows' parts (each halo row alone through the
    first or last output row's gradient) give the halo rows' gradients, sent first, which travel while the
    stripe's own part (the stripe alone, padding 1) gives its input, weight and bias gradients; they are added to
    the edge rows of the ranks they came from, and the halo parts' weight gradients to the stripe's. Each conv
    keeps padding 1 (oneDNN then picks the algorithm it picks for the whole image; with padding (0, 1) it ran
    another at some shapes, with 6x the rounding error). The stripe and its two halo rows are saved; backward
    makes no padded copy of the stripe or of its gradient."""

    @staticmethod
    def forward(ctx, x, weight, bias, group):
        device = x.device.type
        if torch.is_autocast_enabled(device):  # the casts autocast makes for the conv, made here to save their results
            dtype = torch.get_autocast_dtype(device)
            x, weight, bias = (None if t is None else t.to(dtype) for t in (x, weight, bias))
        rank, world = _rank_world(group)
        k = weight.shape[2]
        works, got = _post_edge_rows(x[:, :, :1], x[:, :, -1:], rank, world, group)
        with torch.autocast(device, enabled=False):
            out = F.conv2d(x, weight, bias, padding=1) if _overlaps(x.shape[2], k) else None
            _wait(works)
            zeros = x.new_zeros((x.shape[0], x.shape[1], 1, x.shape[3]))
            top, bottom = got.get(rank - 1, zeros), got.get(rank + 1, zeros)
            if out is None:
                out = F.conv2d(torch.cat((top, x, bottom), dim=2), weight, bias, padding=1)[:, :, 1:-1]
            else:
                if rank - 1 in got:
                    out[:, :, :1] = F.conv2d(torch.cat((top, x[:, :, :k - 1]), 2), weight, bias, padding=1)[:, :, 1:2]
                if rank + 1 in got:
                    out[:, :, -1:] = F.conv2d(torch.cat((x[:, :, 1 - k:], bottom), 2), weight, bias,
                                              padding=1)[:, :, 1:2]
        ctx.save_for_backward(x, top, bottom, weight)
        ctx.group, ctx.rank, ctx.world, ctx.has_bias = group, rank, world, bias is not None
        return out

    @staticmethod
    @once_differentiable  # its exchanges are not recorded: a second derivative through it would be wrong
    def backward(ctx, grad):
        x, top, bottom, weight = ctx.saved_tensors
        n, c, h, w = grad.shape
        k = weight.shape[2]
        need_x, need_w, need_b = ctx.needs_input_grad[:3]

        def halo_backward(grad_row, rows, mask):  # through the middle output row of the conv of ``rows`` (padding 1)
            grad_full = torch.ops.aten.slice_backward(grad_row, [n, c, 3, w], 2, 1, 2, 1)
            return torch.ops.aten.convolution_backward(grad_full, rows, weight, None, [1, 1], [1, 1], [1, 1], False,
                                                       [0, 0], 1, mask)

        # The conv of the halo-padded stripe is the conv of the stripe alone (padding 1) plus, in its first and
        # last output rows, the conv of each halo row alone: each halo row's part backward on its own (its input
        # gradient goes to the neighbour it came from, its weight gradient adds to the stripe's), no padded copy.
        zeros = x.new_zeros((x.shape[0], x.shape[1], k - 1, x.shape[3]))
        halo_grads, halo_dweights = [None, None], []
        for side, (row, grad_row, rows) in enumerate((
                (ctx.rank > 0, grad[:, :, :1], (top, zeros)),
                (ctx.rank + 1 < ctx.world, grad[:, :, -1:], (zeros, bottom)))):
            if row and (need_x or need_w):
                dhalo, dweight, _ = halo_backward(grad_row, torch.cat(rows, 2), [need_x, need_w, False])
                if need_x:
                    halo_grads[side] = dhalo[:, :, -1:] if side else dhalo[:, :, :1]
                halo_dweights.append(dweight)
        works, got = _post_edge_rows(*halo_grads, ctx.rank, ctx.world, ctx.group) if need_x else ([], {})
        dx, dweight, dbias = torch.ops.aten.convolution_backward(
            grad, x, weight, [c] if ctx.has_bias else None, [1, 1], [1, 1], [1, 1], False, [0, 0], 1,
            [need_x, need_w, need_b and ctx.has_bias])
        if need_w:
            for part in halo_dweights:
                dweight += part
        _wait(works)
        if need_x:
            if ctx.rank - 1 in got:
                dx[:, :, :1] += got[ctx.rank - 1]
            if ctx.rank + 1 in got:
                dx[:, :, -1:] += got[ctx.rank + 1]
        return dx, dweight, dbias, None


class _FusedBNReLU(torch.autograd.Function):
    """Fast mode's BatchNorm + ReLU on a stripe's conv output ``z`` ``[N, C, h, W]`` (contiguous in ``z``'s layout;
    the conv run without its bias, which a training-mode BN cancels: the bias only enters the running mean, and its
    gradient is zero; in eval it is folded into the shift): fastunet's fused ops, the statistics (then one
    BN-apply + ReLU pass; backward: one reduce and one apply pass) synchronized over the BatchNormArgs' group in
    training, as fast mode's synchronized BN does. ``upscale`` 2: ``z`` is the sub-pixel up-conv's phase output
    ``[N, 4C, h + 1, W + 1]`` and the result its ``[N, C, 2h, 2W]`` (fastunet.ops' logical layout). ``pool``: the
    same pass also writes the 2x2 max-pool of the result (ATen's ties), returned second. Inputs: z, the BN's weight
    and bias, the conv bias (or None), the layer's BatchNormArgs, upscale and pool; gradients for the first four."""

    @staticmethod
    def forward(ctx, z, weight, bias, conv_bias, bn, upscale, pool):
        mean, invstd, scale, shift, count = functional._fast_bn(z, bn, conv_bias, upscale)
        n, c, h, w = ops.logical_shape(z, upscale)
        layout = ops.memory_format_of(z)
        out = torch.empty((n, c, h, w), dtype=z.dtype, device=z.device, memory_format=layout)
        pooled = torch.empty((n, c, h // 2, w // 2), dtype=z.dtype, device=z.device, memory_format=layout) if pool \
            else None
        ops.bn_relu_pool(z, scale, shift, upscale, out, pooled)
        ctx.save_for_backward(z, mean, invstd, scale, shift, conv_bias)
        ctx.training, ctx.sync, ctx.upscale = bn.training, functional._sync_of(bn, count), upscale
        return (out, pooled) if pool else out

    @staticmethod
    @once_differentiable  # its exchanges are not recorded: a second derivative through it would be wrong
    def backward(ctx, grad, grad_pooled=None):
        z, mean, invstd, scale, shift, conv_bias = ctx.saved_tensors
        layout = ops.memory_format_of(z)
        grad = grad.contiguous(memory_format=layout)
        grad_pooled = None if grad_pooled is None else grad_pooled.contiguous(memory_format=layout)
        dz, dweight, dbias, dconv_bias = functional._fast_bn_backward(grad, grad_pooled, z, mean, invstd, scale, shift,
                                                                      conv_bias, ctx.training, ctx.upscale, ctx.sync)
        return dz, dweight, dbias, dconv_bias, None, None, None


class _PhaseWeights(torch.autograd.Function):
    """functional.phase_weights (3x3 weights ``[O, I, 3, 3]`` -> the sub-pixel up-conv's ``[4O, I, 2, 2]``) with its
    adjoint, phase_weights_backward, as backward; the gradient comes back in the weight's dtype."""

    @staticmethod
    def forward(ctx, weight):
        ctx.out_channels, ctx.dtype = weight.shape[0], weight.dtype
        return functional.phase_weights(weight)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad):
        return functional.phase_weights_backward(grad, ctx.out_channels).to(ctx.dtype)


class _ParameterUse(torch.autograd.Function):
    """The identity on a parameter as a stripe reads it; its backward counts the gradients that reach the
    parameters through the stripe's graph (_GradBuckets tells a backward that accumulates them into ``.grad`` from
    one that does not, such as torch.autograd.grad)."""

    @staticmethod
    def forward(ctx, p, buckets):
        ctx.buckets = buckets
        return p.view_as(p)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad):
        ctx.buckets.reached += 1
        return grad, None


class _Bucket:
    """Parameters whose gradients are all-reduced as one flat tensor: where each one's gradient lies in it
    (``offsets``), the flat tensor once the first has arrived, which have arrived, and the all-reduce's work."""

    def __init__(self, params):
        self.params = params
        self.offsets = [0]
        for p in params:
            self.offsets.append(self.offsets[-1] + p.numel())
        self.flat, self.arrived, self.work = None, set(), None

    def slot(self, i):
        """Parameter i's gradient in the bucket, laid out as the parameter (a contiguous or channels_last one)."""
        p = self.params[i]
        dense = p.is_contiguous() or (p.dim() == 4 and p.is_contiguous(memory_format=torch.channels_last))
        stride = p.stride() if dense else torch.empty(p.shape, device="meta").stride()
        return self.flat.as_strided(p.shape, stride, self.offsets[i])

    def complete(self):
        return len(self.arrived) == len(self.params)

    def launch(self, group):
        if self.flat is None:  # no gradient arrived (none in this backward on any rank): zeros, as every rank sends
            self.flat = self.params[0].new_zeros(self.offsets[-1])
        self.work = dist.all_reduce(self.flat, group=group, async_op=True)


class _GradBuckets:
    """The parameter gradients of a SpatialUNet summed over ``group`` as DistributedDataParallel sums them: each
    gradient, once backward has accumulated it into ``.grad`` (Tensor.register_post_accumulate_grad_hook), is
    copied into a flat bucket of about ``cap_bytes`` (the parameters in reverse order, about the order backward
    makes their gradients; one dtype per bucket, float32 for a float32 model); a bucket whose gradients have all
    arrived is all-reduced asynchronously (dist.all_reduce, async_op), in bucket order on every rank, while backward
    goes on. At the end of backward (an autograd engine callback, as DDP's) the rest are launched and all are
    waited on. Each ``.grad`` is its slot in its bucket once copied there (reduced in place: one copy of the
    gradients, as DDP's gradient_as_bucket_view), so read it after backward. What a ``.grad`` held before the
    backward (accumulation over several backward calls) is set aside when the backward reaches the stripe's output
    and added back to the sum, so only the new part is summed."""

    def __init__(self, params, group, cap_bytes):
        self.group, self.cap_bytes = group, cap_bytes
        self.params = list(params)
        for p in self.params:
            p.register_post_accumulate_grad_hook(self._accumulated)
        self.task, self.reached = None, 0

    def start(self, grad):
        """Tensor hook on the stripe's output: the first time a backward reaches one, buckets are laid out, the
        ``.grad``s set aside and the end-of-backward callback queued."""
        task = torch._C._current_graph_task_id()
        if task == self.task:
            return
        if self.task is not None:  # a backward that ended in an error: its gradients as they were before it
            self._restore()
        self.task, self.reached = task, 0
        self.buckets, self.where, self.next = [], {}, 0
        size, dtype = 0, None
        for p in reversed(self.params):
            if not p.requires_grad:
                continue
            if not self.buckets or p.dtype != dtype or size + p.nbytes > self.cap_bytes:
                self.buckets.append([])
                size, dtype = 0, p.dtype
            self.buckets[-1].append(p)
            size += p.nbytes
        self.buckets = [_Bucket(params) for params in self.buckets]
        self.where = {p: (b, i) for b in self.buckets for i, p in enumerate(b.params)}
        self.kept = {p: p.grad for p in self.where}
        for p in self.where:
            p.grad = None
        torch.autograd.Variable._execution_engine.queue_callback(self._finish)

    def _accumulated(self, p):
        if self.task is None or torch._C._current_graph_task_id() != self.task or p not in self.where:
            return  # another backward's (the model run whole, another SpatialUNet of it)
        bucket, i = self.where[p]
        if bucket.flat is None:
            bucket.flat = p.new_zeros(bucket.offsets[-1])
        slot = bucket.slot(i)
        slot.copy_(p.grad)
        if self.kept[p] is None:
            p.grad = slot  # reduced in place: the bucket is the gradient, as DDP's gradient_as_bucket_view
        bucket.arrived.add(i)
        while self.next < len(self.buckets) and self.buckets[self.next].complete():
            self.buckets[self.next].launch(self.group)
            self.next += 1

    def _finish(self):
        try:
            for bucket in self.buckets[self.next:]:
                bucket.launch(self.group)
            self.next = len(self.buckets)
            for bucket in self.buckets:
                bucket.work.wait()
                for i in bucket.arrived:
                    p = bucket.params[i]
                    kept = self.kept.pop(p)
                    if kept is not None:
                        p.grad = kept.add_(bucket.slot(i))
                bucket.flat = None  # the gradients hold it now
            if self.reached and not any(b.arrived for b in self.buckets):
                raise RuntimeError(
                    "fastunet.parallel.spatial sums the parameter gradients over the ranks as backward() "
                    "accumulates them into .grad (as DistributedDataParallel does); torch.autograd.grad returns them "
                    "unsummed. Call backward() and read .grad")
        finally:
            self._restore()

    def _restore(self):
        """Puts back the gradients set aside whose parameters this backward did not reach, and ends it."""
        for p, kept in self.kept.items():
            p.grad = kept
        self.kept, self.buckets, self.where, self.task = {}, [], {}, None


def _layer_refusals(model):
    """Why ``model``'s layers cannot run on stripes here (SpatialUNet runs the seed's layers itself), one line each."""
    reasons = ["global module hooks are registered"] if global_hooks() else []
    for name, layer in model.named_modules():
        if ".parametrizations." in f".{name}.":
            continue  # a weight's or bias's parametrization runs as the layer reads it
        checks = [_parametrization_refusal(layer)]
        if layer is not model and _plain_class(layer) not in _STRIPE_LAYER_TYPES:
            checks.append(f"is a {type(layer).__name__}, which runs only whole")
        name = name or "the model"
        if has_hooks(layer) and not global_hooks():
            checks.append("has hooks")
        if isinstance(layer, nn.BatchNorm2d) and not (layer.affine and layer.track_running_stats):
            checks.append("is a BatchNorm without affine parameters or running stats")
        if isinstance(layer, nn.MaxPool2d) and not is_plain_maxpool(layer):
            checks.append("is not the seed's 2x2 max-pool")
        if isinstance(layer, nn.Upsample):
            checks.append(_upsample_refusal(layer))
        if isinstance(layer, nn.Conv2d) and (layer.stride, layer.dilation, layer.groups, layer.padding_mode) != (
                (1, 1), (1, 1), 1, "zeros"):
            checks.append("has a stride, dilation, groups or padding mode of its own")
        reasons += [f"{name} {reason}" for reason in checks if reason]
    return reasons


class SpatialUNet(nn.Module):
    """A fastunet.U_Net run on row stripes over the ranks of ``group`` (see the module docstring). Its submodules
    are the model's own (parameters shared, the same ``state_dict`` keys);
    ``forward(x)`` takes this rank's stripe ``[N, img_ch, H / R, W]`` (split_rows) and returns its stripe of the
    logits ``[N, output_ch, H / R, W]``. In training each BatchNorm normalizes with the whole image's statistics and
    moves its running stats by them (the same on every rank); after backward every rank's parameter gradients are
    those of the sum of the ranks' losses. The convolutions are ATen's on halo-padded stripes in both modes; exact
    mode runs the seed's BatchNorm and ReLU after them (the twin of nn.SyncBatchNorm in training), fast mode, in
    each block the whole model runs fused (fastunet.model.fused_refusal decides for both), fastunet's fused BN +
    ReLU ops (_FusedBNReLU: its statistics synchronized as fast mode's synchronized BN's), and its up blocks the
    sub-pixel conv where the whole model's would (functional._subpixel_train): the 2x2 phase convs on the
    low-resolution stripe and one low-resolution halo row each side, writing the upsampled rows; an encoder block's
    last BN + ReLU writes its max-pool in the same pass. A layer it cannot run on stripes as the whole model runs it
    (hooks, a class of its own, settings other than the seed's) is an error naming it.

    ``whole_images=True``: ``forward`` takes the whole batch ``[N, img_ch, H, W]`` (the same on every rank of the
    group), runs this rank's stripe and returns the whole logits on every rank (gather_rows with ``same_loss``), for
    a training loop that computes one loss from them on every rank, unchanged. ``bn_group``: the ranks BatchNorm's
    statistics are synchronized over (default ``group``; a group holding it, such as the world where the batch is
    also split data-parallel over replicas of ``group``, gives synchronized BatchNorm over the replicas too).
    ``bucket_cap_mb``: the size of a gradient bucket (_GradBuckets). Gradients are summed as ``backward()``
    accumulates them into ``.grad``; torch.autograd.grad for the parameters raises an error (it would return them
    unsummed). ``sum_grads=False``: the gradients are left unsummed, for DistributedDataParallel over data-parallel
    replicas of the group to sum them over the stripes in its own all-reduce (sum_over_stripes_hook); DDP over a
    SpatialUNet that sums them itself would undo one of the two sums.
    """

    def __init__(self, model, group=None, *, whole_images=False, bn_group=None, sum_grads=True,
                 bucket_cap_mb=BUCKET_CAP_MB):
        super().__init__()
        if not bucket_cap_mb > 0:
            raise ValueError(f"fastunet.parallel.spatial: bucket_cap_mb must be positive, got {bucket_cap_mb}")
        if not isinstance(model, U_Net):
            raise TypeError(f"fastunet.parallel.spatial splits a fastunet.U_Net by rows, not a {type(model).__name__}")
        for name, child in model.named_children():
            self.add_module(name, child)
        object.__setattr__(self, "model", model)  # its children are this module's: the same state_dict keys
        object.__setattr__(self, "group", group)  # a ProcessGroup, not a module
        object.__setattr__(self, "bn_group", group if bn_group is None else bn_group)
        object.__setattr__(self, "grad_buckets", None)  # laid out at the first training forward (_GradBuckets)
        self.whole_images, self.sum_grads, self.bucket_cap_mb = whole_images, sum_grads, bucket_cap_mb

    def train(self, mode=True):
        """As nn.Module.train, and the U-Net's own flag too."""
        self.model.training = mode
        return super().train(mode)

    def _param(self, p):
        buckets = self.grad_buckets
        return _ParameterUse.apply(p, buckets) if buckets is not None and p is not None and p.requires_grad else p

    def _prepare_grad_buckets(self):
        """The _GradBuckets summing the gradients over ``group``, made once, where a training forward needs them;
        none where the group is one rank or ``sum_grads`` is off."""
        if (self.grad_buckets is None and self.sum_grads and torch.is_grad_enabled()
                and dist.get_world_size(self.group) > 1):
            buckets = _GradBuckets(self.model.parameters(), self.group, self.bucket_cap_mb * 1e6)
            object.__setattr__(self, "grad_buckets", buckets)

    def _conv(self, conv, x):
        weight, bias = self._param(conv.weight), self._param(conv.bias)
        if conv.kernel_size == (1, 1) and conv.padding == (0, 0):
            return F.conv2d(x, weight, bias)
        if conv.kernel_size != (3, 3) or conv.padding != (1, 1):
            raise ValueError(f"fastunet.parallel.spatial exchanges one-row halos for 3x3 convs with padding 1; "
                             f"a conv has kernel_size={conv.kernel_size}, padding={conv.padding}")
        return _HaloConv.apply(x, weight, bias, self.group)

    def _bn(self, bn, x):
        if bn.training:
            return synchronized_batch_norm(bn, x, self.bn_group, self._param(bn.weight), self._param(bn.bias))
        return F.batch_norm(x, bn.running_mean, bn.running_var, self._param(bn.weight), self._param(bn.bias), False,
                            0.0, bn.eps)

    def _fused_conv_bn_relu(self, conv, bn, x, upscale=1, pool=False):
        """Fast mode's conv (halo exchanged, its bias left to the BN) + BN + ReLU on a stripe (_FusedBNReLU): the
        3x3 conv, or with ``upscale`` 2 the nearest upsample x2 + 3x3 conv as the sub-pixel conv of ``x``; with
        ``pool``, (the result, its 2x2 max-pool)."""
        weight = self._param(conv.weight)
        z = _HaloConv.apply(x, weight if upscale == 1 else _PhaseWeights.apply(weight), None, self.group)
        group = dist.group.WORLD if self.bn_group is None else self.bn_group  # None: no synchronization there
        args = batch_norm_args(bn)._replace(weight=self._param(bn.weight), bias=self._param(bn.bias),
                                            group=group if bn.training else None)
        z = z.contiguous(memory_format=ops.memory_format_of(x))
        return _FusedBNReLU.apply(z, args.weight, args.bias, self._param(conv.bias), args, upscale, pool)

    def _fused(self, block, x):
        """Whether ``block`` (a conv_block or up_conv) runs fused on the stripe ``x``: where the whole model's block
        would (fastunet.model.fused_refusal, the one place that decides; a fallback warns as there), in fast mode
        (the stripes' fused ops are fast mode's; exact mode runs the seed's layers on them)."""
        return not self.model.exact and _runs_fused(block, x)

    def _double_block(self, block, x, pool=False):
        """A conv_block on a stripe; with ``pool``, (its output, the output's 2x2 max-pool), the pool written by the
        last BN + ReLU's pass where the block runs fused."""
        if self._fused(block, x):
            conv1, bn1, _, conv2, bn2, _ = block.conv
            return self._fused_conv_bn_relu(conv2, bn2, self._fused_conv_bn_relu(conv1, bn1, x), pool=pool)
        out = self._layers(block.conv, x)
        return (out, F.max_pool2d(out, 2)) if pool else out

    def _up_block(self, block, x):
        """An up_conv on a stripe; fused, the sub-pixel conv where the whole model's up block runs it."""
        if not self._fused(block, x):
            return self._layers(block.up, x)
        _, conv, bn, _ = block.up
        if functional._subpixel_train(x, conv.weight):
            return self._fused_conv_bn_relu(conv, bn, x, upscale=2)
        return self._fused_conv_bn_relu(conv, bn, F.interpolate(x, scale_factor=2, mode="nearest"))

    def _layers(self, sequence, x):
        """The seed's layers of ``sequence`` one by one on a stripe (a block that does not run fused)."""
        for layer in sequence:
            if isinstance(layer, nn.Conv2d):
                x = self._conv(layer, x)
            elif isinstance(layer, nn.BatchNorm2d):
                x = self._bn(layer, x)
            elif isinstance(layer, nn.ReLU):
                x = F.relu(x)
            elif isinstance(layer, nn.Upsample):
                x = F.interpolate(x, scale_factor=2, mode="nearest")
            else:
                raise TypeError(f"fastunet.parallel.spatial runs the seed's layers on stripes; it cannot run a "
                                f"{type(layer).__name__}")
        return x

    def forward(self, x):
        if self.whole_images:
            return gather_rows(self._stripe(split_rows(x, self.group)), self.group, same_loss=True)
        return self._stripe(x)

    def _stripe(self, x):
        reasons = _layer_refusals(self.model)
        if reasons:
            raise ValueError("fastunet.parallel.spatial runs the seed U-Net's layers itself on row stripes and "
                             "cannot honour: " + "; ".join(reasons) + ". Run the model whole, or remove them.")
        m = self.model
        self._prepare_grad_buckets()
        if x.dim() != 4 or x.shape[2] % ROWS_MULTIPLE or x.shape[3] % ROWS_MULTIPLE or x.shape[1] != m.img_ch:
            raise ValueError(f"fastunet.parallel.spatial takes a stripe [N, {m.img_ch}, H_local, W] with H_local "
                             f"and W multiples of {ROWS_MULTIPLE}; got shape {tuple(x.shape)}")
        x1, pooled = self._double_block(m.Conv1, x, pool=True)
        x2, pooled = self._double_block(m.Conv2, pooled, pool=True)
        x3, pooled = self._double_block(m.Conv3, pooled, pool=True)
        x4, pooled = self._double_block(m.Conv4, pooled, pool=True)
        d = self._double_block(m.Conv5, pooled)
        for skip, up, block in ((x4, m.Up5, m.Up_conv5), (x3, m.Up4, m.Up_conv4), (x2, m.Up3, m.Up_conv3),
                                (x1, m.Up2, m.Up_conv2)):
            d = self._double_block(block, torch.cat((skip, self._up_block(up, d)), dim=1))
        out = self._conv(m.Conv_1x1, d)
        if self.grad_buckets is not None and out.requires_grad:
            out.register_hook(self.grad_buckets.start)
        return out


def spatial(model, group=None, *, whole_images=False, bn_group=None, sum_grads=True, bucket_cap_mb=BUCKET_CAP_MB):
    """``model`` (a fastunet.U_Net) as a SpatialUNet over the ranks of ``group`` (default: the world); see
    SpatialUNet for the other arguments."""
    return SpatialUNet(model, group, whole_images=whole_images, bn_group=bn_group, sum_grads=sum_grads,
                       bucket_cap_mb=bucket_cap_mb)


class StripesAndReplicas(NamedTuple):
    """sum_over_stripes_hook's state: the group of every stripe of every replica, and the number of replicas."""

    group: object
    replicas: int


def sum_over_stripes_hook(state, bucket):
    """A DistributedDataParallel communication hook for DDP over replicas of a SpatialUNet built with
    ``sum_grads=False``: each bucket of gradients summed over ``state.group`` (every stripe of every replica) and
    divided by ``state.replicas``: summed over the stripes, averaged over the replicas, in one all-reduce."""
    tensor = bucket.buffer().div_(state.replicas)
    return dist.all_reduce(tensor, group=state.group, async_op=True).get_future().then(lambda fut: fut.value()[0])

