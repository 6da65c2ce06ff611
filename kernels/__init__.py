"""Triton kernels of the fastunet fused ops, registered as ``torch.ops.fastunet_triton.<op>``.

The five fused ops have the signatures and semantics of their references in fastunet/ops.py (``<op>_ref``);
``conv3x3_bn_relu_stats`` (a double block's second conv with the first BN+ReLU folded into its input load and
the second BN's statistics in its epilogue) has its specification beside it.
They run on CUDA, and on the CPU under Triton's interpreter when TRITON_INTERPRET=1 was set before this
package was imported. Without triton (or with a torch older than 2.6, which has no
``torch.library.triton_op``) nothing is registered and ``available()`` is False.
"""

import torch

try:
    import triton  # noqa: F401
except ImportError:
    triton = None

__all__ = [
    "available",
    "bn_stats",
    "bn_relu_pool",
    "relu_pool_backward",
    "bn_relu_backward_reduce",
    "bn_relu_backward_apply",
    "conv3x3_bn_relu_stats",
]

_ENABLED = triton is not None and hasattr(torch.library, "triton_op")

if _ENABLED:
    from .bn_relu_backward import bn_relu_backward_apply, bn_relu_backward_reduce, relu_pool_backward
    from .bn_relu_pool import bn_relu_pool
    from .bn_stats import bn_stats
    from .conv3x3_bn_relu import conv3x3_bn_relu_stats
    from .utils import INTERPRET


def available():
    """Whether the Triton ops can run here: triton is importable and there is a CUDA GPU, or the kernels
    were built for the interpreter (TRITON_INTERPRET=1 when this package was imported)."""
    return _ENABLED and (torch.cuda.is_available() or bool(INTERPRET))
