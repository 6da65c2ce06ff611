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
               pixels, the sub-pixel up-conv where that pays, Winograd for the wide convs (all in
               _cpu_inference); every derived weight is made at the call and nothing is kept between calls
               (fastunet.optimize_for_inference makes a snapshot that keeps them); a plain U-Net runs it in
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

The code lives in fastunet.blocks, a module per concern: bn (BN arithmetic), casts (autocast's casts), concat (the
concat buffer), function_io (the Functions' inputs, outputs and saved tensors), recompute (the differentiable
backward), inference (CPU inference), double and up (the two blocks). This module keeps the public names. A patch
of a name here reaches only the code that looks it up here (fastunet.model, spatial, explain); the blocks' own calls
look names up in their fastunet.blocks module, so patch it there.
"""

from .blocks.bn import BatchNormArgs, BatchNormSettings, _fast_bn, _fast_bn_backward, _sync_of  # noqa: F401
from .blocks.casts import _autocast_dtype, _cast_dtype  # noqa: F401
from .blocks.concat import concat_parts  # noqa: F401
from .blocks.double import DoubleConvBNReLU, double_conv_bn_relu  # noqa: F401
from .blocks.inference import (  # noqa: F401
    _cpu_inference,
    _gemm_conv_bn_relu,
    _inference_conv_choice,
    _unfolded_conv_bn_relu,
    _winograd_conv_bn_relu,
)
from .blocks.up import UpsampleConvCat, _subpixel_train, upsample_conv_cat  # noqa: F401
from .conv.subpixel import conv_relu_into, phase_weights, phase_weights_backward  # noqa: F401  (public names)
