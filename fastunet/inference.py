"""``fastunet.optimize_for_inference(model)``: an inference-only snapshot of a fastunet U-Net for the CPU, its
derived weights made once and held (prepacked) instead of at every call.

A U-Net in eval makes its derived weights (BN folded into the convs, Winograd's transformed weights, the sub-pixel
up-conv's phase weights) at every call and keeps nothing between calls, so every write to a weight or running stat
is seen. A snapshot makes them once, from the weights and BN statistics at the moment it is made (like
``torch.jit.freeze``): later writes to the model do not reach it, and it cannot be trained. It holds no parameters
and no mutable state, so any number of threads may call it at once, without a lock.

float32 snapshot: the same algorithms as the model's CPU inference (fastunet.conv.policy), Winograd's weights
prepacked for the layers where the policy picks Winograd at ``example_input``'s size (with them kept, it pays at
fewer pixels), the folded weights for the layers that fold; its output has the model's bits wherever the two pick
the same algorithm. bfloat16 snapshot: every conv is oneDNN's in bfloat16 channels_last with the BN folded into
weights packed in oneDNN's own layout for ``example_input``'s size (AMX or AVX512-BF16 where the CPU has them),
the up-convs in the sub-pixel form where the policy picks it there; it takes float32 or bfloat16 input and returns
bfloat16, as the seed under bfloat16 autocast does.
"""

from typing import NamedTuple

import torch
from torch import nn

from . import model as fastunet_model
from . import ops
from .blocks.bn import _eval_bn_vectors
from .blocks.inference import (
    _CPU_INFERENCE,
    InferenceConv,
    _double_block_inference,
    _inference_conv_choice,
    _subpixel_inference,
    _up_block_inference,
)
from .conv import aten as conv_aten
from .conv import subpixel, winograd

__all__ = ["optimize_for_inference", "InferenceU_Net"]

_DTYPES = (torch.float32, torch.bfloat16)
_DEFAULT_SIZE = 256  # example_input's H and W where none is given: one image of 256 x 256


class DecoderLevel(NamedTuple):
    """One decoder level of a snapshot: its up-conv and its double block's two convs."""

    up: InferenceConv
    conv1: InferenceConv
    conv2: InferenceConv


class InferenceU_Net(nn.Module):
    """An inference-only snapshot of a fastunet.U_Net (``optimize_for_inference`` makes it):
    ``[N, img_ch, H, W] -> [N, output_ch, H, W]`` on the CPU, H and W multiples of 16, NCHW or channels_last (the
    output in the input's layout). ``dtype``: float32 or bfloat16 (see the module's docstring). It has no
    parameters or buffers: ``train()``, ``.to()`` and the other casts are errors (make a new snapshot instead), and
    ``state_dict()`` is empty (save the model it was made from)."""

    def __init__(self, encoder, bottleneck, decoder, final, dtype, img_ch, pad_to_multiple, finite_weights):
        super().__init__()
        self.encoder, self.bottleneck, self.decoder = tuple(encoder), bottleneck, tuple(decoder)
        self.final = final  # the 1x1 conv's (weight, bias), in ``dtype``
        self.dtype, self.img_ch, self.pad_to_multiple = dtype, img_ch, pad_to_multiple
        # oneDNN's fused ReLU (one pass less) turns a NaN into 0: taken only where the weights and the input are
        # finite, and a NaN can then only come from an overflow inside.
        self.finite_weights = finite_weights
        super().train(False)

    def train(self, mode=True):
        if mode:
            raise RuntimeError("fastunet: an inference snapshot (optimize_for_inference) cannot be trained; train the "
                               "U_Net it was made from, then make a new snapshot")
        return self

    def _apply(self, fn, recurse=True):
        raise RuntimeError("fastunet: an inference snapshot cannot be moved or cast (its weights are prepacked for "
                           "its device and dtype); move or cast the U_Net, then make a new snapshot of it")

    def extra_repr(self):
        return f"img_ch={self.img_ch}, output_ch={self.final[0].shape[0]}, dtype={self.dtype}"

    def forward(self, x):
        if self.pad_to_multiple and isinstance(x, torch.Tensor) and x.dim() == 4:
            h, w = x.shape[2], x.shape[3]
            if h % 16 or w % 16:
                return self._forward(nn.functional.pad(x, (0, -w % 16, 0, -h % 16)))[:, :, :h, :w]
        return self._forward(x)

    def _check_input(self, x):
        fastunet_model._check_input(x, self.img_ch, None)
        if x.device.type != "cpu":
            raise RuntimeError(f"fastunet: an inference snapshot runs on the CPU; the input is on {x.device}")
        allowed = (torch.float32,) if self.dtype == torch.float32 else _DTYPES
        if x.dtype not in allowed:
            raise RuntimeError(f"fastunet: a {self.dtype} inference snapshot takes "
                               f"{' or '.join(map(str, allowed))} input, got {x.dtype}; convert it, e.g. x.float()")
        if torch.is_grad_enabled() and x.requires_grad:
            raise RuntimeError("fastunet: an inference snapshot computes no gradients (its weights are a snapshot); "
                               "run the U_Net it was made from for gradients, or call it under torch.no_grad()")

    def _forward(self, x):
        self._check_input(x)
        with torch.no_grad():
            return self._run(x)

    def _run(self, x):
        nan_safe = not (self.finite_weights and bool(torch.isfinite(x).all()))
        h = x.to(self.dtype).contiguous(memory_format=torch.channels_last)
        skips = []
        for (conv1, conv2), level in zip(self.encoder, reversed(self.decoder)):
            buf, h = _double_block_inference(h, conv1, conv2, level.up.shift.shape[0], True, False, nan_safe)
            skips.append(buf)
        h, _ = _double_block_inference(h, *self.bottleneck, 0, False, False, nan_safe)
        for level in self.decoder:
            buf = _up_block_inference(h, skips.pop(), level.up, False, nan_safe)
            h, _ = _double_block_inference(buf, level.conv1, level.conv2, 0, False, False, nan_safe)
        out = conv_aten.conv1x1(h, *self.final)
        return out.contiguous(memory_format=ops.memory_format_of(x))


def optimize_for_inference(model, example_input=None, *, dtype=torch.float32):
    """An inference-only snapshot (``InferenceU_Net``) of the fastunet.U_Net ``model`` in eval, for the CPU: its BN
    folded into the convs and the derived weights made now and held, from the weights and BN running statistics
    as they are now (later writes to ``model`` do not reach it). ``example_input`` (default: one ``img_ch x 256 x
    256`` image) is the size the weights are prepacked for; any size runs, a layer deriving at the call what it
    picks there and was not prepacked for. ``dtype``: float32 or torch.bfloat16 (see the module's docstring).

    Memory: for float32 a copy of each conv's weights, plus the forms prepacked: Winograd's transformed weights (16/9
    of a layer's), the folded weights (1x) or the sub-pixel phases (16/9); for bfloat16 the packed weights only (half
    the parameters' bytes, the sub-pixel up-convs' 16/9 of that). ``model`` is not changed."""
    _check_model(model, dtype)
    n, h, w = (1, _DEFAULT_SIZE, _DEFAULT_SIZE) if example_input is None else _example_size(model, example_input)
    prepare = _float32_layer if dtype == torch.float32 else _bfloat16_layer
    with torch.no_grad():
        blocks = [_double_block(getattr(model, f"Conv{k + 1}").conv, n, h >> k, w >> k, prepare) for k in range(5)]
        decoder = []
        for k in range(5, 1, -1):  # Up5 (its input at 1/16 of the image) to Up2 (at 1/2)
            up = getattr(model, f"Up{k}").up
            shape = (n, up[1].in_channels, h >> (k - 1), w >> (k - 1))  # the up-conv's low-resolution input
            decoder.append(DecoderLevel(_up_layer(up, shape, prepare), *_double_block(
                getattr(model, f"Up_conv{k}").conv, n, h >> (k - 2), w >> (k - 2), prepare)))
        final = model.Conv_1x1
        final = (final.weight.detach().to(dtype, copy=True), None if final.bias is None else
                 final.bias.detach().to(dtype, copy=True))
        layers = [layer for level in (*blocks, *decoder) for layer in level]
        finite = all(bool(torch.isfinite(t).all()) for t in (*model.parameters(), *(
            t for layer in layers for t in (layer.scale, layer.shift))))
    return InferenceU_Net(blocks[:4], blocks[4], decoder, final, dtype, model.img_ch, model.pad_to_multiple, finite)


def _check_model(model, dtype):
    """Clear errors for a model a snapshot cannot stand in for."""
    if not isinstance(model, fastunet_model.U_Net):
        raise TypeError(f"fastunet.optimize_for_inference takes a fastunet.U_Net, got {type(model).__name__}; load "
                        "a seed U-Net's state_dict into fastunet.U_Net first")
    if dtype not in _DTYPES:
        raise ValueError(f"fastunet.optimize_for_inference: dtype must be torch.float32 or torch.bfloat16, got {dtype}")
    if not _CPU_INFERENCE:
        raise RuntimeError("fastunet.optimize_for_inference needs torch with oneDNN (torch.backends.mkldnn)")
    if model.training:
        raise RuntimeError("fastunet.optimize_for_inference: the model is in training mode; call model.eval() first "
                           "(a snapshot uses the BatchNorm running statistics)")
    if model.exact:
        raise ValueError("fastunet.optimize_for_inference: the model has exact=True, whose promise is the seed's bits; "
                         "a snapshot folds BN into the convs (fast mode's arithmetic): run the model itself")
    params = list(model.parameters())
    if any(p.device.type != "cpu" for p in params) or any(p.dtype != torch.float32 for p in params):
        raise RuntimeError("fastunet.optimize_for_inference takes a float32 model on the CPU (dtype= picks the "
                           "snapshot's); move it with model.float().cpu()")
    reason = _modules_refusal(model)
    if reason:
        raise RuntimeError(f"fastunet.optimize_for_inference: {reason}, which a snapshot would not run; call the "
                           "model itself (under torch.no_grad())")


def _modules_refusal(model):
    """Why ``model``'s modules are not the seed's plain U-Net that a snapshot replaces, or None."""
    if fastunet_model.global_hooks():
        return "global module hooks are registered"
    for name, module in model.named_modules():
        if fastunet_model.has_hooks(module):
            return f"{name or 'the model'} has hooks"
    for name in fastunet_model.LEVELS + tuple(f"Up_conv{k}" for k in range(2, 6)):
        block = getattr(model, name)
        if type(block) not in model.block_types:
            return f"{name} is a {type(block).__name__}"
        reason = block.layers_refusal()
        if reason:
            return f"{name}'s {reason}"
    if not fastunet_model.is_plain_maxpool(model.Maxpool):
        return "Maxpool is not the seed's nn.MaxPool2d(2, 2)"
    final = model.Conv_1x1
    if fastunet_model._plain_class(final) is not nn.Conv2d or final.kernel_size != (1, 1) or final.groups != 1:
        return "Conv_1x1 is not the seed's 1x1 nn.Conv2d"
    return None


def _example_size(model, x):
    """(N, H, W) of ``example_input`` as the snapshot runs it (padded to multiples of 16 where the model pads),
    checked as the model would check it."""
    if model.pad_to_multiple and isinstance(x, torch.Tensor) and x.dim() == 4:
        x = x.new_empty((*x.shape[:2], -(-x.shape[2] // 16) * 16, -(-x.shape[3] // 16) * 16))
    fastunet_model._check_input(x, model.img_ch, None)
    n, _, h, w = x.shape
    return n, h, w


def _double_block(sequence, n, h, w, prepare):
    """The two InferenceConvs of a double block's ``conv`` Sequential, at an ``[n, Cin, h, w]`` input."""
    conv1, bn1, _, conv2, bn2, _ = sequence
    return (prepare(conv1, bn1, (n, conv1.in_channels, h, w), "conv"),
            prepare(conv2, bn2, (n, conv2.in_channels, h, w), "conv"))


def _up_layer(sequence, shape, prepare):
    """The InferenceConv of an up_conv's ``up`` Sequential, at its low-resolution input ``shape``."""
    _, conv, bn, _ = sequence
    return prepare(conv, bn, shape, "up")


def _folding(conv, bn):
    """(weight copy, scale, shift) of a conv + eval BN, float32, as the model's CPU inference makes them."""
    weight = conv.weight.detach().clone(memory_format=torch.preserve_format)
    bias = None if conv.bias is None else conv.bias.detach()
    _, _, scale, shift = _eval_bn_vectors(fastunet_model.batch_norm_args(bn), bias, weight.dtype)
    return weight, scale, shift


def _stand_in(shape, like):
    """An empty channels_last CPU tensor of ``shape`` with ``like``'s dtype: the facts of a layer's input."""
    return torch.empty(shape, dtype=like.dtype, memory_format=torch.channels_last)


def _float32_layer(conv, bn, shape, kind):
    """A float32 snapshot's InferenceConv: Winograd's weights prepacked where policy.inference_conv picks Winograd at
    ``shape`` with them kept; the folded weights where it folds, or, for an up-conv, the sub-pixel phase weights
    where policy.up_conv picks that form there."""
    weight, scale, shift = _folding(conv, bn)
    n, c, h, w = shape
    layer = InferenceConv(weight, scale, shift)
    if kind == "up":
        if _subpixel_inference(_stand_in(shape, weight), layer, False):
            return layer._replace(subpixel=subpixel.phase_weights(conv_aten.folded_weight(weight, scale)))
        shape = (n, c, 2 * h, 2 * w)
    choice = _inference_conv_choice(_stand_in(shape, weight), weight, False, kept=True).algorithm
    if choice == "winograd":
        return layer._replace(winograd=winograd.weights(weight, scale))
    if choice in ("folded", "unfolded"):
        return layer._replace(folded=conv_aten.folded_weight(weight, scale))
    return layer


def _bfloat16_layer(conv, bn, shape, kind):
    """A bfloat16 snapshot's InferenceConv: the folded weights (made in float32, rounded once) packed by oneDNN for
    ``shape``; an up-conv's as sub-pixel phases where policy.up_conv picks that form at ``shape``."""
    weight, scale, shift = _folding(conv, bn)
    n, c, h, w = shape
    stand_in = torch.empty(weight.shape, dtype=torch.bfloat16, device="meta")
    folded = conv_aten.folded_weight(weight, scale)
    facts = _stand_in(shape, stand_in)
    if kind == "up" and _subpixel_inference(facts, InferenceConv(weight, scale, shift), False):
        return InferenceConv(stand_in, scale, shift, subpixel=conv_aten.packed(subpixel.phase_weights(folded), shape))
    if kind == "up":
        shape = (n, c, 2 * h, 2 * w)
    return InferenceConv(stand_in, scale, shift, packed=conv_aten.packed(folded, shape))

