"""Each U-Net block at its level's shape, called as the U-Nets' forwards call it; one group per block
and phase comparing the reference's modules with fastunet's fused blocks (exact and fast).

Encoder blocks Conv1-4: reference conv_block + 2x2 max-pool vs fastunet conv_block writing into the
concat buffer and pooling in the same pass. Conv5 and the decoder blocks Up_conv5-2: conv_block vs
conv_block. On CUDA the fast double blocks are also timed with FASTUNET_CONV=triton (their second conv in
Triton, layer 1's BN+ReLU in its input load, layer 2's statistics in its epilogue). Up blocks Up5-2:
``torch.cat((skip, up_conv(d)), 1)`` vs fastunet ``up_conv(d, buf)``
writing into the buffer that already holds the skip (made untimed, as the encoder makes it in the U-Net).
"""

import pytest
import torch
import torch.nn.functional as F

from fastunet.bench import N_BATCHES
from fastunet.conv import policy

VARIANTS = ("reference_eager", "fastunet_exact", "fastunet_fast", "fastunet_fast_triton_conv")
BLOCKS = (
    [f"Conv{level}" for level in range(1, 6)]
    + [f"Up{level}" for level in range(5, 1, -1)]
    + [f"Up_conv{level}" for level in range(5, 1, -1)]
)


def block_kind(name):
    """"encoder" (ConvK with a pool after it), "up" (UpK) or "double" (Conv5, Up_convK)."""
    if name.startswith("Up_conv") or name == "Conv5":
        return "double"
    return "up" if name.startswith("Up") else "encoder"


def block_call(model, name, variant):
    """``call(*inputs) -> outputs`` of block ``name`` as the variant's U-Net forward runs it."""
    block, kind = getattr(model, name), block_kind(name)
    if variant == "reference_eager":
        if kind == "encoder":
            return lambda x: (lambda y: (y, F.max_pool2d(y, 2, 2)))(block(x))
        if kind == "up":
            return lambda d, skip: torch.cat((skip, block(d)), dim=1)
        return block
    if kind == "encoder":
        cat_channels = getattr(model, f"Up{int(name[-1]) + 1}").out_channels
        return lambda x: block(x, cat_channels=cat_channels, pool=True)
    if kind == "up":
        return lambda d, buf: block(d, buf)
    return block


def block_input_shapes(model, name, batch, size):
    """Input shapes of block ``name`` in a U-Net run on ``batch`` x img_ch x ``size`` x ``size``."""
    side = size >> (int(name[-1]) - 1)
    if block_kind(name) != "up":
        return [(batch, getattr(model, name).conv[0].in_channels, side, side)]
    conv = getattr(model, name).up[1]
    return [(batch, conv.in_channels, side, side), (batch, conv.out_channels, 2 * side, 2 * side)]


def inference_step(call):
    def step(*inputs):
        with torch.no_grad():
            call(*inputs)

    return step


def training_step(call):
    """Forward and backward of random upstream gradients (drawn once per output shape, in warm-up)."""
    upstream = {}

    def step(*inputs):
        outputs = call(*inputs)
        outputs = outputs if isinstance(outputs, tuple) else (outputs,)
        for out in outputs:
            if out.shape not in upstream:
                upstream[out.shape] = torch.randn_like(out)
        torch.autograd.backward(outputs, [upstream[out.shape] for out in outputs])

    return step


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("phase", ["train", "inference"])
@pytest.mark.parametrize("name", BLOCKS)
def test_block(timed, benchmark, models, device, shape, name, phase, variant):
    if variant == "fastunet_fast_triton_conv":
        if block_kind(name) == "up" or device.type != "cuda":
            pytest.skip("the Triton conv is a double block's second conv, on CUDA")
        with policy.override(second_conv_mode="triton"):  # fast mode with fastunet's Triton second conv
            _time_block(timed, benchmark, models, device, shape, name, phase, variant)
    else:
        _time_block(timed, benchmark, models, device, shape, name, phase, variant)


def _time_block(timed, benchmark, models, device, shape, name, phase, variant):
    """Times block ``name`` of ``variant`` in ``phase``."""
    model = models("fastunet_fast" if variant == "fastunet_fast_triton_conv" else variant)
    benchmark.group = f"{name} {phase}"
    training = phase == "train"
    block = getattr(model, name)
    block.train(training)
    input_sets = [
        [torch.randn(s, device=device, requires_grad=training and name != "Conv1")
         for s in block_input_shapes(model, name, *shape)]
        for _ in range(N_BATCHES)
    ]
    fast_up = variant != "reference_eager" and block_kind(name) == "up"

    def prepare(*inputs):
        """Fresh parameter gradients; for fastunet's up block, the concat buffer holding the skip."""
        block.zero_grad(set_to_none=True)
        if not fast_up:
            return inputs
        d, skip = inputs
        return d, torch.cat((skip, torch.empty_like(skip)), dim=1)

    call = block_call(model, name, variant)
    timed(training_step(call) if training else inference_step(call), input_sets, prepare)
