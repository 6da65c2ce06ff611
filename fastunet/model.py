"""fastunet.U_Net: the seed U-Net's module tree and parameters, with a forward through the fused blocks.

The submodules are the seed's (``nn.Sequential`` of ``nn.Conv2d``/``nn.BatchNorm2d``/``nn.ReLU``), so
``state_dict`` keys, parameter initialisation, ``init_weights``-style visitors and ``.to()`` behave as on
the reference; only ``forward`` differs. ``fused_refusal`` is the one place that decides whether a block runs
its fused kernels; where it says no, the block runs its own modules, as the seed does.
"""

import os
import threading
from typing import NamedTuple, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
import torch.utils.checkpoint
from torch.nn.modules import module as _module

from . import _ext, functional, reference
from . import ops as fastunet_ops
from .conv import policy
from .sync_batchnorm import SyncBatchNorm, sync_group

_FUSED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)

# Exact mode on the CPU runs the seed's modules. Its fused path makes the same ATen convolution and BN calls there,
# plus Python and glue that no fusion pays back: it measured 0.87-1.04x eager (benchmarks/RESULTS.md, issue 14).
# FASTUNET_CPU_EXACT=fused runs the fused path's exact twins on the CPU (CUDA's exact path; the test suite's).
_EXACT_CPU_RUNS_MODULES = os.environ.get("FASTUNET_CPU_EXACT", "modules").strip().lower() != "fused"


class _Recomputing(threading.local):
    """``active`` while activation checkpointing recomputes a level in backward (per thread: nn.DataParallel
    runs its replicas in threads)."""

    active = False


_recomputing = _Recomputing()


def _bn_buffers(module):
    """The running stats and batch counts of the BatchNorms in ``module``."""
    return [t for m in module.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)
            for t in (m.running_mean, m.running_var, m.num_batches_tracked) if t is not None]


def _checkpoint(fn, *args, **kwargs):
    """``fn(*args, **kwargs)`` under activation checkpointing (non-reentrant); ``fn`` a block. The recomputation in
    backward leaves the BN running stats and num_batches_tracked alone: they were updated by the forward (a fused
    block moves none of them then; a block running its own modules has them put back)."""
    calls = []

    def run(*a, **k):
        outer, _recomputing.active = _recomputing.active, bool(calls)
        kept = [(t, t.clone()) for t in _bn_buffers(fn)] if calls else []
        calls.append(None)
        try:
            return fn(*a, **k)
        finally:
            _recomputing.active = outer
            for t, value in kept:
                t.copy_(value)

    return torch.utils.checkpoint.checkpoint(run, *args, use_reentrant=False, preserve_rng_state=False, **kwargs)


def _call(fn, *args, **kwargs):
    return fn(*args, **kwargs)


def batch_norm_args(bn):
    """``functional.BatchNormArgs`` for this call of BN module ``bn``, counting the batch in
    ``num_batches_tracked`` as nn.BatchNorm2d's forward does; a checkpointing recomputation counts nothing and
    moves no running stat. The module's own ``training`` flag decides batch or running statistics."""
    factor = None
    if bn.training and not _recomputing.active:
        bn.num_batches_tracked.add_(1)
        factor = 1.0 / float(bn.num_batches_tracked) if bn.momentum is None else bn.momentum
    return functional.BatchNormArgs(bn.weight, bn.bias, bn.running_mean, bn.running_var, bn.eps, factor, bn.training,
                                    sync_group(bn))


# ----------------------------------------------------------------------------------------------------
# Whether a block runs fused: the one place that decides
# ----------------------------------------------------------------------------------------------------


def global_hooks():
    """Whether global module hooks (torch.nn.modules.module.register_module_*_hook) are registered."""
    return bool(_module._global_forward_hooks or _module._global_forward_pre_hooks
                or _module._global_backward_hooks or _module._global_backward_pre_hooks)


def has_hooks(module):
    """Whether calling ``module`` would run hooks (its own forward/backward hooks or global module hooks)."""
    return bool(module._forward_hooks or module._forward_pre_hooks or module._backward_hooks
                or module._backward_pre_hooks or global_hooks())


def _is_parametrized(layer):
    """parametrize.is_parametrized(layer), read from the submodule it registers (its getattr of a missing attribute
    costs a raised AttributeError, and every block call asks for each of its layers)."""
    parametrizations = layer._modules.get("parametrizations")
    return isinstance(parametrizations, nn.ModuleDict) and len(parametrizations) > 0


def _plain_class(layer):
    """The layer's class, seen through torch.nn.utils.parametrize (which subclasses it)."""
    cls = type(layer)
    return cls.__bases__[0] if _is_parametrized(layer) else cls


def _parametrization_refusal(layer):
    """Parametrizations of a conv's or BN's weight and bias are honoured (the fused path reads each once per
    call, as the layer's forward does); of anything else they are not."""
    if not _is_parametrized(layer):
        return None
    others = sorted(set(layer.parametrizations) - {"weight", "bias"})
    return f"has a parametrization of {', '.join(others)}" if others else None


def _conv_refusal(layer):
    if _plain_class(layer) is not nn.Conv2d:
        return f"is a {type(layer).__name__}, not an nn.Conv2d"
    settings = (layer.kernel_size, layer.stride, layer.padding, layer.dilation, layer.groups, layer.padding_mode)
    if settings != ((3, 3), (1, 1), (1, 1), (1, 1), 1, "zeros"):
        return ("is not a 3x3 conv with stride 1, padding 1, no dilation or groups and zero padding (kernel_size="
                f"{layer.kernel_size}, stride={layer.stride}, padding={layer.padding}, dilation={layer.dilation}, "
                f"groups={layer.groups}, padding_mode={layer.padding_mode!r})")
    return _parametrization_refusal(layer)


def _bn_refusal(layer):
    if _plain_class(layer) not in (nn.BatchNorm2d, nn.SyncBatchNorm, SyncBatchNorm):
        return f"is a {type(layer).__name__}, not an nn.BatchNorm2d or SyncBatchNorm"
    if not (layer.affine and layer.track_running_stats):
        return (f"has affine={layer.affine}, track_running_stats={layer.track_running_stats} (the fused BN takes an "
                "affine BatchNorm that tracks running stats)")
    return _parametrization_refusal(layer)


def _relu_refusal(layer):
    return None if type(layer) is nn.ReLU else f"is a {type(layer).__name__}, not an nn.ReLU"


def _upsample_refusal(layer):
    if type(layer) is not nn.Upsample:
        return f"is a {type(layer).__name__}, not an nn.Upsample"
    if layer.mode != "nearest" or layer.size is not None or layer.scale_factor not in (2, 2.0, (2, 2), (2.0, 2.0)):
        return (f"is not a nearest 2x upsample (mode={layer.mode!r}, size={layer.size}, "
                f"scale_factor={layer.scale_factor})")
    return None


def is_plain_maxpool(layer):
    """Whether ``layer`` is the seed's nn.MaxPool2d(2, 2), without hooks (the encoder blocks then pool fused)."""
    return (type(layer) is nn.MaxPool2d and not has_hooks(layer)
            and (layer.kernel_size, layer.stride, layer.padding, layer.dilation) in {(2, 2, 0, 1), ((2, 2), (2, 2),
                                                                                                   (0, 0), (1, 1))}
            and not layer.ceil_mode and not layer.return_indices)


def _describe(kind, layers):
    """``kind(Cin -> Cout)`` from the first and last convs among ``layers``' modules, as warnings name a block."""
    convs = [m for m in layers.modules() if isinstance(m, nn.Conv2d)]
    return f"{kind}({convs[0].in_channels} -> {convs[-1].out_channels})" if convs else f"a {kind}"


def _layers_refusal(sequence, name, checks):
    """Why the layers of ``sequence`` (``name``) are not the ones the fused kernels replace, or None: each layer's
    type and settings (``checks``), hooks on it or on the sequence, parametrizations."""
    if type(sequence) is not nn.Sequential or len(sequence) != len(checks):
        return f"{name} is not the seed's nn.Sequential of {len(checks)} layers"
    if has_hooks(sequence):
        return f"{name} has hooks"
    for i, (layer, check) in enumerate(zip(sequence, checks)):
        reason = check(layer) or ("has hooks" if has_hooks(layer) else None)
        if reason:
            return f"{name}[{i}] {reason}"
    return None


class Refusal(NamedTuple):
    """Why a block runs its own modules instead of its fused kernels. ``warn``: a fallback the user is told about
    once per reason (an unsupported layer, hook, dtype or transform), not a choice (an empty batch, export)."""

    reason: str
    warn: bool = True


@fastunet_ops.constant_for_compile
def _transform_refusal():
    """A torch.func transform or forward-mode AD the fused Functions do not take, or None (a constant for
    torch.compile, which traces a call under the transforms it runs under)."""
    stack = torch._C._functorch.get_interpreter_stack() or ()
    keys = {interpreter.key() for interpreter in stack}
    if torch._C._functorch.TransformType.Vmap in keys:
        return "it runs under torch.func.vmap (the fused ops have no batching rule)"
    if torch._C._functorch.TransformType.Jvp in keys or torch.autograd.forward_ad._current_level >= 0:
        return "it runs under forward-mode AD (torch.func.jvp, jacfwd, hessian or torch.autograd.forward_ad)"
    return None


def fused_refusal(block, x) -> Optional[Refusal]:
    """Why fastunet ``block`` (a conv_block or up_conv) cannot run its fused kernels on ``x`` now, or None where it
    can. The one place that decides: the input's dtype (an input whose dtype differs from the weights' outside
    autocast is an error, as in the seed), torch.func transforms, the block's layers (type, settings, hooks,
    parametrizations: ``block.layers_refusal()``), an empty batch, export, exact-mode synchronized BN."""
    if x.shape[0] == 0:
        return Refusal("the batch is empty", warn=False)
    if exporting():
        return Refusal("the model is being exported", warn=False)
    check_dtypes(x, next(block.parameters(), None))
    if block.exact and _exact_runs_modules(x):
        return Refusal("exact mode on the CPU runs the seed's modules", warn=False)
    if x.dtype not in _FUSED_DTYPES:
        return Refusal(f"a {x.dtype} input runs the pure-PyTorch path (the fused kernels take float32, bfloat16 and "
                       "float16)")
    reason = _transform_refusal() or ("global module hooks are registered (they fire on every layer)"
                                      if global_hooks() else None)
    if reason:
        return Refusal(f"the blocks run their own modules because {reason}")
    reason = block.layers_refusal()
    if reason:
        return Refusal(f"{block.describe()} runs its own modules instead of its fused kernels: its {reason}")
    if block.exact and any(sync_group(bn) is not None for bn in block.batch_norms()):
        return Refusal("exact mode leaves synchronized BatchNorm to nn.SyncBatchNorm itself", warn=False)
    return None


def _exact_runs_modules(x):
    """Whether exact mode runs the seed's modules on ``x`` rather than its fused path (on the CPU; see
    _EXACT_CPU_RUNS_MODULES)."""
    return _EXACT_CPU_RUNS_MODULES and x.device.type == "cpu"


def _runs_fused(block, x):
    """Whether ``block`` runs its fused kernels on ``x``; a refusal that is a fallback warns once per reason (a
    reason of a block's layers names the block)."""
    refusal = fused_refusal(block, x)
    if refusal is None:
        return True
    if refusal.warn:
        _ext.warn_once(("unfused", refusal.reason), f"fastunet: {refusal.reason}")
    return False


def check_dtypes(x, param):
    """The seed's error, worded to say what to do, for an input whose dtype is not the parameters' outside
    autocast (a conv would fail on it deep inside)."""
    if param is None or x.dtype == param.dtype or functional._autocast_dtype(x.device.type) is not None:
        return
    raise RuntimeError(f"fastunet: Input type ({x.dtype}) and weight type ({param.dtype}) should be the same: "
                       f"convert the input (x.to({param.dtype})) or the model (model.to({x.dtype})), or run the "
                       "model under torch.autocast")


def exporting():
    """True while torch.export, torch.onnx.export or torch.jit.trace records the model: fastunet then runs the
    seed's pure-PyTorch graph, so the exported program holds only standard operators."""
    return torch.compiler.is_exporting() or torch.onnx.is_in_onnx_export() or torch.jit.is_tracing()


_NOT_SCRIPTABLE = ("fastunet cannot be compiled by torch.jit.script: its forward dispatches to fused autograd "
                   "Functions in Python. Use torch.jit.trace(model.eval(), x) or torch.export.export(model.eval(), "
                   "(x,)) (both record the seed's pure-PyTorch graph), or script fastunet.reference.U_Net loaded "
                   "with the same state_dict")


class _NotScriptable:
    def __prepare_scriptable__(self):
        """Called by torch.jit.script before compiling: says at once that scripting is not supported."""
        raise RuntimeError(_NOT_SCRIPTABLE)


# ----------------------------------------------------------------------------------------------------
# Blocks
# ----------------------------------------------------------------------------------------------------


class conv_block(_NotScriptable, reference.conv_block):
    """(Conv3x3 + BN + ReLU) x 2 through the fused double block: ``[N, ch_in, H, W] -> [N, ch_out, H, W]``.

    ``forward(x)`` returns what the seed's conv_block returns. The U-Net calls it with ``cat_channels``
    (the output lands in the first ch_out channels of a ``[N, ch_out + cat_channels, H, W]`` buffer)
    and ``pool`` (also returns the 2x2 max-pool), see fastunet.functional.double_conv_bn_relu.
    """

    _LAYER_CHECKS = (_conv_refusal, _bn_refusal, _relu_refusal, _conv_refusal, _bn_refusal, _relu_refusal)

    def __init__(self, ch_in, ch_out):
        super().__init__(ch_in, ch_out)
        self.exact = False

    def describe(self):
        """``conv_block(Cin -> Cout)`` (Conv2: ``conv_block(64 -> 128)``), as warnings name it."""
        return _describe("conv_block", self.conv)

    def layers_refusal(self):
        """Why ``self.conv`` is not (Conv3x3 + BN + ReLU) x 2 as the fused kernels take it, or None."""
        return _layers_refusal(self.conv, "conv", self._LAYER_CHECKS)

    def batch_norms(self):
        return self.conv[1], self.conv[4]

    def forward(self, x, cat_channels=0, pool=False):
        if not _runs_fused(self, x):
            return _unfused_block(self.conv(x), cat_channels, pool)
        c1, b1, _, c2, b2, _ = self.conv
        buf, pooled = functional.double_conv_bn_relu(
            x, (c1.weight, c1.bias), batch_norm_args(b1), (c2.weight, c2.bias), batch_norm_args(b2),
            exact=self.exact, cat_channels=cat_channels, pool=pool,
        )
        return (buf, pooled) if pool else buf


class up_conv(_NotScriptable, reference.up_conv):
    """Nearest upsample x2 + Conv3x3 + BN + ReLU through the fused up block:
    ``[N, ch_in, h, w] -> [N, ch_out, 2h, 2w]``.

    ``forward(x)`` returns what the seed's up_conv returns; ``forward(x, buf)`` writes the result into
    the channels after the skip in the concat buffer ``buf`` and returns ``buf`` (= torch.cat((skip, up), 1)).
    """

    _LAYER_CHECKS = (_upsample_refusal, _conv_refusal, _bn_refusal, _relu_refusal)

    def __init__(self, ch_in, ch_out):
        super().__init__(ch_in, ch_out)
        self.exact = False

    @property
    def out_channels(self):
        return self.up[1].out_channels

    def describe(self):
        """``up_conv(Cin -> Cout)`` (Up2: ``up_conv(128 -> 64)``), as warnings name it."""
        return _describe("up_conv", self.up)

    def layers_refusal(self):
        """Why ``self.up`` is not nearest-upsample x2 + Conv3x3 + BN + ReLU as the fused kernels take it, or None."""
        return _layers_refusal(self.up, "up", self._LAYER_CHECKS)

    def batch_norms(self):
        return (self.up[2],)

    def forward(self, x, buf=None):
        if not _runs_fused(self, x):
            up = self.up(x)
            return up if buf is None else torch.cat((buf.narrow(1, 0, buf.shape[1] - up.shape[1]), up), dim=1)
        _, conv, bn, _ = self.up
        if buf is None:
            buf = _empty_buffer(x, self.out_channels)
        return functional.upsample_conv_cat(x, buf, (conv.weight, conv.bias), batch_norm_args(bn), exact=self.exact)


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


def _fused_glue(block, kind):
    """Whether the U-Net may call ``block`` with the fused glue's extra arguments (a concat buffer, the pool):
    a fastunet block of ``kind`` without hooks of its own. Otherwise it is called as the seed calls it, so its
    hooks see (and may replace) exactly the seed's inputs and outputs."""
    return type(block) is kind and not has_hooks(block)


# ----------------------------------------------------------------------------------------------------
# U-Net
# ----------------------------------------------------------------------------------------------------


# The U-Net's levels in the order its forward runs them: four encoder levels (each a double block and the max-pool
# after it), the bottleneck, four decoder levels (each an up block and a double block; the last also the 1x1 conv).
LEVELS = ("Conv1", "Conv2", "Conv3", "Conv4", "Conv5", "Up5", "Up4", "Up3", "Up2")
BOTTLENECK = LEVELS.index("Conv5")


def level_modules(level):
    """The names of the U-Net's children that level ``level`` runs, in order."""
    if level < BOTTLENECK:
        return LEVELS[level], "Maxpool"
    if level == BOTTLENECK:
        return (LEVELS[level],)
    k = LEVELS[level].removeprefix("Up")
    return (f"Up{k}", f"Up_conv{k}") + (("Conv_1x1",) if level == len(LEVELS) - 1 else ())


def skip_partner(level):
    """The decoder level that takes encoder level ``level``'s skip, or the encoder level whose skip decoder level
    ``level`` takes."""
    return len(LEVELS) - 1 - level


# The module types of the seed U-Net with fastunet's blocks (a subclass, a parametrized layer or a swapped one is
# none of them).
_SEED_MODULE_TYPES = (conv_block, up_conv, nn.Sequential, nn.Conv2d, nn.BatchNorm2d, nn.ReLU, nn.MaxPool2d,
                      nn.Upsample)


class U_Net(_NotScriptable, reference.U_Net):
    """Drop-in fastunet replacement of the seed's U-Net: ``[N, img_ch, H, W] -> [N, output_ch, H, W]``.

    Same positional signature, parameters, buffers, ``state_dict`` keys and BatchNorm semantics as
    ``fastunet.reference.U_Net``; H and W must be multiples of 16. ``exact=True`` makes the forward and
    every gradient and BN buffer bit-identical to the reference on the same device and dtype (on CUDA: with
    ``torch.backends.cudnn.deterministic = True`` and ``torch.backends.cudnn.benchmark = False``, or under
    ``torch.use_deterministic_algorithms(True)``, so that cuDNN gives both models' identical conv calls the same
    deterministic engines; otherwise it may pick other, non-deterministic ones from call to call); the default
    fast mode re-associates arithmetic (sub-pixel up-conv, own BN) and stays within 2x of the reference's
    float32 error against a float64 run.
    Input: float32, or bfloat16/float16 under autocast or with a model converted by ``.to(dtype)``;
    NCHW or channels_last. float64 runs the pure-PyTorch path (so gradcheck works). Under DDP,
    ``convert_sync_batchnorm`` synchronizes the BatchNorm statistics across ranks.

    What users do to an nn.Module is honoured: hooks on the U-Net, a block or a layer (a hooked block is
    called as the seed calls it; a hooked layer makes its block run its own modules), swapped layers or
    blocks, parametrizations, ``.data`` writes, double backward, torch.func (see ``fused_refusal``).

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
        _check_input(x, self.img_ch, next(self.parameters(), None))
        if exporting() or _transform_refusal() or (self.exact and _exact_runs_modules(x)
                                                   and not (self.checkpointing and self.training)):
            return super().forward(x)  # the seed's graph; each block still decides for itself
        self.check_training_batch(x.shape)
        to_nchw = self._channels_last_inside(x).algorithm
        h = x.contiguous(memory_format=torch.channels_last) if to_nchw else x
        out = self.run_levels(0, len(LEVELS), h, {})
        return out.clone(memory_format=torch.contiguous_format) if to_nchw else out

    def check_training_batch(self, shape):
        """nn.BatchNorm2d's error, before anything runs, where training on an image of ``shape`` ``[N, C, H, W]`` would
        give the bottleneck's BatchNorms one value per channel (unless synchronized BN counts every rank's)."""
        if self.training and _one_value_per_channel(shape):
            if not any(sync_group(m) is not None for m in self.modules()):
                _check_bn_batch(shape)

    def run_levels(self, first, end, h, skips):
        """Levels ``LEVELS[first:end]`` of the forward on ``h`` (the image at level 0, an encoder level's pooled output
        before an encoder level or the bottleneck, a decoder level's output before a decoder level). ``skips`` maps
        an encoder level's index to its skip: a tensor, or ``(buf, channels)`` (the skip in the first ``channels``
        channels of ``buf``, whose other channels are room for the up block to write into); it gains the skips made
        here and loses the ones used. Returns the new ``h``: after the last level, the logits. Where the up block
        that takes an encoder level's skip runs in these levels too, the encoder writes its skip into a concat
        buffer with room for the up block's output, else (a pipeline stage's boundary) into a tensor of its own."""
        run = _checkpoint if self.checkpointing and self.training and self._grad_needed(h) else _call
        pool = is_plain_maxpool(self.Maxpool)
        for level in range(first, end):
            if level < BOTTLENECK:
                up = self.decoder_level(skip_partner(level))[0] if skip_partner(level) < end else None
                skips[level], h = self._encode(run, getattr(self, LEVELS[level]), h, up, pool)
            elif level == BOTTLENECK:
                h = run(self.Conv5, h)
            else:
                up, decoder = self.decoder_level(level)
                skip = skips.pop(skip_partner(level))
                h = run(decoder, self._up_cat(up, h, skip if isinstance(skip, tuple) else (skip, skip.shape[1])))
        return self.Conv_1x1(h) if end == len(LEVELS) else h

    def decoder_level(self, level):
        """(up block, double block) of decoder level ``level`` (5: Up5 and Up_conv5, ..., 8: Up2 and Up_conv2)."""
        up, decoder = level_modules(level)[:2]
        return getattr(self, up), getattr(self, decoder)

    def _channels_last_inside(self, x):
        """policy.model_layout's Choice: whether a fast-mode float32 CPU forward on an NCHW ``x`` runs in
        channels_last inside, its output (and input gradient) coming back NCHW. Only where no layer could tell:
        every module the seed's own type, without hooks, every block fused (its modules would run on another layout
        than the seed's) and in fast mode, eager, no autocast or bfloat16 autocast; in eval without autocast, where
        every block runs CPU inference."""
        autocast = torch.is_autocast_enabled("cpu")
        bfloat16_autocast = autocast and torch.get_autocast_dtype("cpu") == torch.bfloat16
        if (x.device.type != "cpu" or x.dtype != torch.float32 or x.is_contiguous(memory_format=torch.channels_last)
                or not x.is_contiguous() or global_hooks() or (autocast and not bfloat16_autocast)
                or torch.compiler.is_compiling()):
            return policy.Choice(False, "not a float32 NCHW CPU input, eager")  # the cheap refusals first
        if bfloat16_autocast or self.training:  # the policy alone decides first: a refusal reads no layer
            chosen = policy.model_layout(self.training, False, bfloat16_autocast=bfloat16_autocast)
            if not chosen.algorithm:
                return chosen
        modules = tuple(self.modules())[1:]
        blocks = [m for m in modules if isinstance(m, (conv_block, up_conv))]
        parameters = tuple(self.parameters())
        if (any(type(m) not in _SEED_MODULE_TYPES or has_hooks(m) for m in modules) or any(b.exact for b in blocks)
                or any(p.dtype != torch.float32 for p in parameters)
                or any(b.layers_refusal() is not None for b in blocks)):
            return policy.Choice(False, "not a plain fast float32 U-Net")
        if bfloat16_autocast or self.training:
            return chosen
        bns = [m for m in modules if isinstance(m, nn.BatchNorm2d)]
        stats = [t for bn in bns for t in (bn.running_mean, bn.running_var)]
        inference = not self.training and functional._cpu_inference(x, (*parameters, *stats), bns)
        return policy.model_layout(self.training, inference)

    def _encode(self, run, encoder, x, up, pool):
        """One encoder level: (skip, pooled). The skip is ``(buf, channels)``: the level's output in the first
        ``channels`` channels of ``buf``, whose other channels are room for ``up`` to write into (none where ``up``
        is None)."""
        # Where the max-pool is not the fused one, it may save its input, which then must not share a buffer that
        # the up block writes into later.
        if not (pool and _fused_glue(encoder, conv_block)):
            y = run(encoder, x)
            return (y, y.shape[1]), self.Maxpool(y)
        room = up.out_channels if up is not None and _fused_glue(up, up_conv) and up.layers_refusal() is None else 0
        buf, pooled = run(encoder, x, cat_channels=room, pool=True)
        return (buf, buf.shape[1] - room), pooled

    def _up_cat(self, up, d, skip):
        """``torch.cat((skip, up(d)), 1)``: written into the skip's buffer by a fused up block where it has room."""
        buf, channels = skip
        if buf.shape[1] > channels and _fused_glue(up, up_conv):
            return up(d, buf)
        return torch.cat((buf if buf.shape[1] == channels else buf.narrow(1, 0, channels), up(d)), dim=1)

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
    if param is not None and x.device != param.device:
        raise RuntimeError(f"fastunet.U_Net: the input is on {x.device} but the model's parameters are on "
                           f"{param.device}; move one of them with .to()")
    check_dtypes(x, param)


def _one_value_per_channel(shape):
    """Whether an image of ``shape`` would give the bottleneck's BatchNorms one value per channel (a 1x1 bottleneck
    of one sample)."""
    n, _, h, w = shape
    return n * (h // 16) * (w // 16) == 1


def _check_bn_batch(shape):
    """nn.BatchNorm2d's error for a training batch with one value per channel (the 1x1 bottleneck)."""
    n, _, h, w = shape
    if _one_value_per_channel(shape):
        raise ValueError(f"Expected more than 1 value per channel when training, got input size "
                         f"{torch.Size([n, 1024, h // 16, w // 16])}")
