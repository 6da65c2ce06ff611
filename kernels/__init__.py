"""Triton kernels of the fastunet fused ops (``fastunet.kernels``).

For each op of fastunet.ops.FUSED_OPS, ``fastunet.kernels.<op>`` is its Triton launcher, with the op's signature
and the semantics of its specification ``fastunet.ops.<op>_ref``; it lives in kernels/<FUSED_OPS[op].triton_module>.py,
and fastunet.ops registers it as the op's CUDA kernel (``torch.ops.fastunet.<op>``). ``conv3x3_bn_relu_stats``
(a double block's second conv with the first BN+ReLU folded into its input load and the second BN's statistics in
its epilogue) is its own op, ``torch.ops.fastunet.conv3x3_bn_relu_stats``, with its specification beside it.
The kernels run on CUDA, and on the CPU under Triton's interpreter when TRITON_INTERPRET=1 was set before this
package was imported. Without triton (or with a torch older than 2.6) ``available()`` is False.
"""

import importlib

import torch

try:
    import triton  # noqa: F401
except ImportError:
    triton = None

_ENABLED = triton is not None and hasattr(torch.library, "triton_op")

if _ENABLED:
    from ..ops import FUSED_OPS
    from .conv3x3_bn_relu import conv3x3_bn_relu_stats  # noqa: F401
    from .utils import INTERPRET

    # fastunet.kernels.<op>: each fused op's launcher, from its module named in the registry.
    for _op in FUSED_OPS.values():
        globals()[_op.name] = getattr(importlib.import_module(f".{_op.triton_module}", __name__), _op.name)


def available():
    """Whether the Triton ops can run here: triton is importable and there is a CUDA GPU, or the kernels
    were built for the interpreter (TRITON_INTERPRET=1 when this package was imported)."""
    return _ENABLED and (torch.cuda.is_available() or bool(INTERPRET))
