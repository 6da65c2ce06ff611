"""fastunet: a drop-in, faster U-Net for PyTorch.

``fastunet.U_Net(img_ch=3, output_ch=1, *, exact=False)`` replaces the classic U-Net (the seed's
``U_Net``; its pure-PyTorch twin is ``fastunet.reference.U_Net``) with fused conv+BN+ReLU and
upsample+conv+concat blocks backed by CUDA, Triton and CPU kernels. ``convert_sync_batchnorm`` synchronizes
its BatchNorm under DDP; ``info()`` says what was built and what runs where, ``explain(model, x)``
which algorithm each conv layer runs for an input and why, ``tune(model, x)`` times them on this machine and
keeps the fastest, ``optimize_for_inference(model)`` makes an inference-only snapshot with its derived weights
prepacked; ``python -m fastunet.bench`` and
``python -m fastunet.train`` benchmark and train it against the reference.
"""

from . import _ext, conv, functional, ops, reference  # noqa: F401  (loads the compiled ops; submodules as attributes)
from .environment import info
from .explain import explain
from .inference import InferenceU_Net, optimize_for_inference
from .model import U_Net, conv_block, up_conv
from .sync_batchnorm import SyncBatchNorm, convert_sync_batchnorm
from .tune import tune

__version__ = "0.1.0"
__all__ = ["U_Net", "SyncBatchNorm", "conv", "conv_block", "convert_sync_batchnorm", "explain", "functional", "info",
           "InferenceU_Net", "ops", "optimize_for_inference", "reference", "tune", "up_conv"]
