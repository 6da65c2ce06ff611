"""fastunet.U_Net: the seed U-Net's module tree and parameters, with a forward through the fused blocks.

The submodules are the seed's (``nn.Sequential`` of ``nn.Conv2d``/``nn.BatchNorm2d``/``nn.ReLU``), so
``state_dict`` keys, parameter initialisation, ``init_weights``-style visitors and ``.to()`` behave as on
the reference; only ``forward`` differs. Where a fused kernel does not apply (float64, a non-default
BatchNorm, an empty batch), the block runs the pure-PyTorch path of the same modules.
"""

import threading

import torch
import torch.nn as nn
import torch.nn.functional as F
import torch.utils.checkpoint

from . import _ext, functional
from . import ops as fastunet_ops
from . import reference
from .sync_batchnorm import SyncBatchNorm, sync_group, update_running_stats

_FUSED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


class _Recomputing(threading.local):
    """``active`` while activation checkpointing recomputes a level in backward (per thread: nn.DataParallel
    runs its replicas in threads)."""

    active = False


_recomputing = _Recomputing()


def _checkpoint(fn, *args, **kwargs):
    """``fn(*args, **kwargs)`` under activation checkpointing (non-reentrant). The recomputation in backward
    leaves the BN running stats and num_batches_tracked alone: they were updated by the forward."""
    calls = []

    def run(*a, **k):
        outer, _recomputing.active = _recomputing.active, bool(calls)
        calls.append(None)
        try:
            return fn(*a, **k)
        finally:
            _recomputing.active = outer

    return torch.utils.checkpoint.checkpoint(run, *args, use_reentrant=False, preserve_rng_state=False, **kwargs)


def _call(fn, *args, **kwargs):
    return fn(*args, **kwargs)


def _bn_call_args(bn):
    """BN tensors, momentum factor and process group for this call, as nn.BatchNorm2d / nn.SyncBatchNorm
    compute them (and count); a checkpointing recomputation counts nothing and moves no running stat."""
    factor = 0.0
    if bn.training and bn.track_running_stats and not _recomputing.active:
        bn.num_batches_tracked.add_(1)
        factor = 1.0 / float(bn.num_batches_tracked) if bn.momentum is None else bn.momentum
    return (bn.weight, bn.bias, bn.running_mean, bn.running_var, factor, bn.eps, sync_group(bn))


def _fusable_bn(bn):
    return type(bn) in (nn.BatchNorm2d, nn.SyncBatchNorm, SyncBatchNorm) and bn.affine and bn.track_running_stats


def _runs_fused(block, x, *bns):
    """Whether ``block`` runs its fused kernels on ``x``; else it runs the pure-PyTorch path of its modules,
    with one warning per reason where that is a fallback (an unsupported dtype or layer), not a choice (an empty
    batch, export, exact-mode synchronized BN)."""
    if x.shape[0] == 0 or exporting() or not _fusable_in_mode(block.exact, *bns):
        return False
    if x.dtype not in _FUSED_DTYPES:
        _ext.warn_once(("dtype", x.dtype), f"fastunet: {x.dtype} input runs the pure-PyTorch path of the U-Net (the "
                                           "fused kernels take float32, bfloat16 and float16)")
        return False
    if not block.fusable():
        _ext.warn_once(("layers", type(block).__name__), f"fastunet: a {type(block).__name__} holds a layer the fused "
                       f"kernels do not take (they take {block.fused_layers}); such blocks run the pure-PyTorch path")
        return False
    return True


def exporting():
    """True while torch.export, torch.onnx.export or torch.jit.trace records the model: fastunet then runs the
    seed's pure-PyTorch graph, so the exported program holds only standard operators."""
    return torch.compiler.is_exporting() or torch.onnx.is_in_onnx_export() or torch.jit.is_tracing()


def _fusable_in_mode(exact, *bns):
    """Exact mode leaves synchronized BN to nn.SyncBatchNorm itself (its rounding is the reference)."""
    return not (exact and any(sync_group(bn) is not None for bn in bns))


def _fusable_conv(conv):
    return (type(conv) is nn.Conv2d and conv.kernel_size == (3, 3) and conv.padding == (1, 1)
            and conv.stride == (1, 1) and conv.dilation == (1, 1) and conv.groups == 1
            and conv.padding_mode == "zeros")


class conv_block(reference.conv_block):
    """(Conv3x3 + BN + ReLU) x 2 through the fused double block: ``[N, ch_in, H, W] -> [N, ch_out, H, W]``.

    ``forward(x)`` returns what the seed's conv_block returns. The U-Net calls it with ``cat_channels``
    (the output lands in the first ch_out channels of a ``[N, ch_out + cat_channels, H, W]`` buffer)
    and ``pool`` (also returns the 2x2 max-pool), see fastunet.functional.double_conv_bn_relu.
    """

    def __init__(self, ch_in, ch_out):
        super().__init__(ch_in, ch_out)
        self.exact = False

    fused_layers = ("3x3 convs with padding 1, stride 1, no dilation or groups, zero padding; affine BatchNorm2d or "
                    "SyncBatchNorm tracking running stats")

    def fusable(self):
        """Whether the layers are those the fused kernels take (``fused_layers``)."""
        c1, b1, _, c2, b2, _ = self.conv
        return _fusable_conv(c1) and _fusable_conv(c2) and _fusable_bn(b1) and _fusable_bn(b2)

    def forward(self, x, cat_channels=0, pool=False, fold=False):
        c1, b1, _, c2, b2, _ = self.conv
        if not _runs_fused(self, x, b1, b2):
            return _unfused_block(self.conv(x), cat_channels, pool)
        bn1, bn2 = _bn_call_args(b1), _bn_call_args(b2)
        buf, pooled, stats = functional.double_conv_bn_relu(
            x, (c1.weight, c1.bias), bn1, (c2.weight, c2.bias), bn2, training=self.training, exact=self.exact,
            fold=fold, cat_channels=cat_channels, pool=pool,
        )
        if stats and not _recomputing.active:
            update_running_stats(b1.running_mean, b1.running_var, stats[0], stats[1], bn1[4])
            update_running_stats(b2.running_mean, b2.running_var, stats[2], stats[3], bn2[4])
        return (buf, pooled) if pool else buf


class up_conv(reference.up_conv):
    """Nearest upsample x2 + Conv3x3 + BN + ReLU through the fused up block: ``[N, ch_in, h, w] -> [N, ch_out, 2h, 2w]``.

    ``forward(x)`` returns what the seed's up_conv returns; ``forward(x, buf)`` writes the result into
    the channels after the skip in the concat buffer ``buf`` and returns ``buf`` (= torch.cat((skip, up), 1)).
    """

    def __init__(self, ch_in, ch_out):
        super().__init__(ch_in, ch_out)
        self.exact = False

    @property
    def out_channels(self):
        return self.up[1].out_channels

    fused_layers = ("a nearest 2x Upsample; a 3x3 conv with padding 1, stride 1, no dilation or groups, zero "
                    "padding; an affine BatchNorm2d or SyncBatchNorm tracking running stats")

    def fusable(self):
        """Whether the layers are those the fused kernels take (``fused_layers``)."""
        up, conv, bn, _ = self.up
        return (type(up) is nn.Upsample and up.mode == "nearest" and up.scale_factor in (2, 2.0, (2.0, 2.0))
                and _fusable_conv(conv) and _fusable_bn(bn))

    def forward(self, x, buf=None, fold=False):
        if not _runs_fused(self, x, self.up[2]):
            up = self.up(x)
            return up if buf is None else torch.cat((buf.narrow(1, 0, buf.shape[1] - up.shape[1]), up), dim=1)
        _, conv, bn, _ = self.up
        bn_args = _bn_call_args(bn)
        if buf is None:
            buf = _empty_buffer(x, self.out_channels)
        buf, stats = functional.upsample_conv_cat(x, buf, (conv.weight, conv.bias), bn_args, training=self.training,
                                                  exact=self.exact, fold=fold)
        if stats and not _recomputing.active:
            update_running_stats(bn.running_mean, bn.running_var, stats[0], stats[1], bn_args[4])
        return buf


def _empty_buffer(x, channels):
    """The output buffer of a standalone up_conv call ``[N, channels, 2h, 2w]``, in the conv output's dtype."""
    dtype = x.dtype if x.dtype == torch.float64 else (functional._autocast_dtype(x.device.type) or x.dtype)
    n, _, h, w = x.shape
    return torch.empty((n, channels, 2 * h, 2 * w), dtype=dtype, device=x.device,
                       memory_format=fastunet_ops.memory_format_of(x))


def _unfused_block(y, cat_channels, pool):
    """The pure-PyTorch path's output in the fused path's shape: padded buffer and pool as asked."""
    buf = y
    if cat_channels:
        buf = torch.cat((y, y.new_empty((y.shape[0], cat_channels, *y.shape[2:]))), dim=1)
    if pool:
        return buf, nn.functional.max_pool2d(y, 2, 2)
    return buf


class U_Net(reference.U_Net):
    """Drop-in fastunet replacement of the seed's U-Net: ``[N, img_ch, H, W] -> [N, output_ch, H, W]``.

    Same positional signature, parameters, buffers, ``state_dict`` keys and BatchNorm semantics as
    ``fastunet.reference.U_Net``; H and W must be multiples of 16. ``exact=True`` makes the forward and
    every gradient and BN buffer bit-identical to the reference on the same device and dtype; the default
    fast mode re-associates arithmetic (sub-pixel up-conv, own BN, BN folded into the convs in inference)
    and stays within 2x of the reference's float32 error against a float64 run.
    Input: float32, or bfloat16/float16 under autocast or with a model converted by ``.to(dtype)``;
    NCHW or channels_last. float64 runs the pure-PyTorch path (so gradcheck works). Under DDP,
    ``convert_sync_batchnorm`` synchronizes the BatchNorm statistics across ranks.

    ``checkpointing=True``: in training, each double block (the five encoder levels and the four decoder ones)
    keeps only its input and recomputes the rest in backward (``torch.utils.checkpoint``, non-reentrant):
    less activation memory for large images, one more forward of compute; results are unchanged, and the BN
    running stats are updated once per step as without it.
    ``pad_to_multiple=True``: H and W that are not multiples of 16 are zero-padded at the bottom and right
    to the next multiple, and the output is cropped back to H x W (off by default: the default is the
    drop-in, which asks for multiples of 16).
    """

    block_types = (conv_block, up_conv)

    def __init__(self, img_ch=3, output_ch=1, *, exact=False, checkpointing=False, pad_to_multiple=False):
        super().__init__(img_ch, output_ch)
        self.img_ch, self.output_ch = img_ch, output_ch
        self.exact = exact
        self.checkpointing = checkpointing
        self.pad_to_multiple = pad_to_multiple

    @property
    def exact(self):
        return self._exact

    @exact.setter
    def exact(self, value):
        self._exact = bool(value)
        for m in self.modules():
            if isinstance(m, (conv_block, up_conv)):
                m.exact = self._exact

    def forward(self, x):
        if self.pad_to_multiple and isinstance(x, torch.Tensor) and x.dim() == 4:
            h, w = x.shape[2], x.shape[3]
            if h % 16 or w % 16:
                return self._forward(F.pad(x, (0, -w % 16, 0, -h % 16)))[:, :, :h, :w]
        return self._forward(x)

    def _forward(self, x):
        _check_input(x, self.img_ch, self.Conv_1x1.weight)
        if exporting():
            return super().forward(x)
        if self.training and _one_value_per_channel(x):
            if not any(sync_group(m) is not None for m in self.modules()):  # synchronized BN counts every rank's
                _check_bn_batch(x)
        fold = not self.training and not self.exact and not self._grad_needed(x)
        run = _checkpoint if self.checkpointing and self.training and self._grad_needed(x) else _call
        x1, p = run(self.Conv1, x, cat_channels=self.Up2.out_channels, pool=True, fold=fold)
        x2, p = run(self.Conv2, p, cat_channels=self.Up3.out_channels, pool=True, fold=fold)
        x3, p = run(self.Conv3, p, cat_channels=self.Up4.out_channels, pool=True, fold=fold)
        x4, p = run(self.Conv4, p, cat_channels=self.Up5.out_channels, pool=True, fold=fold)
        d = run(self.Conv5, p, fold=fold)
        # The up blocks write into the skip buffers in place, so they stay outside the checkpointed regions.
        d = run(self.Up_conv5, self.Up5(d, x4, fold=fold), fold=fold)
        d = run(self.Up_conv4, self.Up4(d, x3, fold=fold), fold=fold)
        d = run(self.Up_conv3, self.Up3(d, x2, fold=fold), fold=fold)
        d = run(self.Up_conv2, self.Up2(d, x1, fold=fold), fold=fold)
        return self.Conv_1x1(d)

    def _grad_needed(self, x):
        if not torch.is_grad_enabled():
            return False
        return x.requires_grad or any(p.requires_grad for p in self.parameters())


def _check_input(x, img_ch, param):
    """Clear errors for inputs the U-Net cannot take (the reference fails deep inside, or silently)."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"fastunet.U_Net expects a torch.Tensor, got {type(x).__name__}")
    if x.dim() != 4:
        raise ValueError(f"fastunet.U_Net expects a 4-D input [N, C, H, W], got a {x.dim()}-D tensor of shape "
                         f"{tuple(x.shape)}" + (" (add a batch dimension with x.unsqueeze(0))" if x.dim() == 3 else ""))
    if not x.is_floating_point():
        raise TypeError(f"fastunet.U_Net expects a floating-point input (float32, bfloat16, float16 or float64), "
                        f"got {x.dtype}; convert it, e.g. x.float()")
    if x.shape[1] != img_ch:
        raise ValueError(f"fastunet.U_Net was built with img_ch={img_ch} but the input has {x.shape[1]} channels "
                         f"(shape {tuple(x.shape)})")
    h, w = x.shape[2], x.shape[3]
    if h % 16 or w % 16:
        raise ValueError(f"fastunet.U_Net needs H and W that are multiples of 16 (four 2x2 poolings, and the skip "
                         f"concatenations must line up); got {h}x{w}. Pad or resize the input, e.g. to "
                         f"{-(-h // 16) * 16}x{-(-w // 16) * 16}, or build the model with pad_to_multiple=True")
    if x.device != param.device:
        raise RuntimeError(f"fastunet.U_Net: the input is on {x.device} but the model's parameters are on "
                           f"{param.device}; move one of them with .to()")


def _one_value_per_channel(x):
    """Whether the bottleneck's BatchNorms would see one value per channel (a 1x1 bottleneck of one sample)."""
    n, _, h, w = x.shape
    return n * (h // 16) * (w // 16) == 1


def _check_bn_batch(x):
    """nn.BatchNorm2d's error for a training batch with one value per channel (the 1x1 bottleneck)."""
    n, _, h, w = x.shape
    if _one_value_per_channel(x):
        raise ValueError(f"Expected more than 1 value per channel when training, got input size "
                         f"{torch.Size([n, 1024, h // 16, w // 16])}")
