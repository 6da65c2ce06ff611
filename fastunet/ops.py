"""The fused memory-bound ops around a U-Net block's convolutions: their one registry, ``FUSED_OPS``, and the
dispatcher as their one door (``torch.ops.fastunet.<op>``; the functions of the same name here call it).

Each op has, under its one name:
  * its schema, ``FUSED_OPS[<op>].schema`` (the compiled library declares the same in csrc/ops.cpp, for
    libtorch users; tests/test_ops.py holds the two equal);
  * its specification ``<op>_ref`` here: pure PyTorch, what the kernels are tested against, and the kernel of
    every device that has no other (registered under CompositeExplicitAutograd);
  * its fake ``<op>_fake`` here (output shapes for torch.compile and torch.export);
  * its kernels: on the CPU the compiled one (csrc/ops_host.h ``CellOps::<op>``, csrc/ops.cpp); on CUDA the
    Triton one (``fastunet.kernels.<op>``, in kernels/``FUSED_OPS[<op>].triton_module``.py) or, with
    FASTUNET_CUDA_BACKEND=cuda, the compiled CUDA one (csrc/ops_cuda.cu). The per-element math is defined
    once per language: csrc/fastunet_math.h, kernels/utils.py, and the helpers above the references here.
Which kernel serves which device is registered with the dispatcher once, at import (environment variables are
read then; ``select_cuda_kernels`` and ``set_conv3x3_mode`` change the choice later).

Geometry (see csrc/fastunet_math.h): ``z`` is a conv output ``[N, S*S*C, H+S-1, W+S-1]`` with
``upscale`` S = 1 (plain block) or 2 (sub-pixel up block, phase p = 2a+b in channel block p); the
logical BN+ReLU output is ``[N, C, S*H, S*W]``, pixel ``(S*i+a, S*j+b)`` reading ``z[:, p*C+c, i+a, j+b]``.
Per-channel vectors (scale, shift, mean, ...) are float32 (float64 for float64 activations).
Activations may be NCHW-contiguous, channels_last or any strided view (e.g. a concat-buffer slice).
"""

import contextlib
import functools
import importlib.util
import os
import sys
from typing import Callable, NamedTuple

import torch
import torch.nn.functional as F

from . import _ext

__all__ = [
    "bn_stats",
    "bn_relu_pool",
    "relu_pool_backward",
    "bn_relu_backward_reduce",
    "bn_relu_backward_apply",
    "FUSED_OPS",
    "backend_for",
    "select_cuda_kernels",
    "conv3x3_backend",
    "conv3x3_mode",
    "set_conv3x3_mode",
]


# ----------------------------------------------------------------------------------------------------
# Geometry helpers and pure-PyTorch references
# ----------------------------------------------------------------------------------------------------


def acc_dtype(dtype):
    """dtype of the per-channel vectors for activations of ``dtype``."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def logical_shape(z, upscale):
    """Shape ``[N, C, S*H, S*W]`` of the BN+ReLU output read from conv output ``z``."""
    s = upscale
    n, q, hz, wz = z.shape
    return (n, q // (s * s), s * (hz - s + 1), s * (wz - s + 1))


def to_logical(z, upscale):
    """The logical ``[N, C, S*H, S*W]`` view of conv output ``z`` (a copy when upscale is 2)."""
    if upscale == 1:
        return z
    n, c, oh, ow = logical_shape(z, upscale)
    h, w = oh // 2, ow // 2
    z6 = z.reshape(n, 2, 2, c, h + 1, w + 1)
    rows = []
    for a in range(2):
        cols = [z6[:, a, b, :, a : a + h, b : b + w] for b in range(2)]
        rows.append(torch.stack(cols, dim=-1))  # [N, C, H, W, 2(b)]
    y = torch.stack(rows, dim=3)  # [N, C, H, 2(a), W, 2(b)]
    return y.reshape(n, c, oh, ow)


def from_logical(y, z_like, upscale):
    """Scatters a logical ``[N, C, S*H, S*W]`` tensor back to ``z_like``'s layout; unread entries are 0."""
    if upscale == 1:
        return y.to(z_like.dtype).contiguous(memory_format=memory_format_of(z_like))
    n, c, oh, ow = y.shape
    h, w = oh // 2, ow // 2
    out = torch.zeros(z_like.shape, dtype=z_like.dtype, device=z_like.device)  # NCHW: its 6-D view is plain
    o6 = out.view(n, 2, 2, c, h + 1, w + 1)
    y6 = y.reshape(n, c, h, 2, w, 2)
    for a in range(2):
        for b in range(2):
            o6[:, a, b, :, a : a + h, b : b + w] = y6[:, :, :, a, :, b].to(z_like.dtype)
    return out.contiguous(memory_format=memory_format_of(z_like))


def memory_format_of(t):
    """channels_last for an NHWC-dense 4-D tensor, else contiguous_format (the layout to allocate alike)."""
    if t.dim() == 4 and t.is_contiguous(memory_format=torch.channels_last) and not t.is_contiguous():
        return torch.channels_last
    return torch.contiguous_format


def _relu_out(z, scale, shift, upscale, out_dtype):
    """relu(z*scale + shift) in the accumulation dtype, rounded through ``out_dtype``."""
    acc = acc_dtype(z.dtype)
    zl = to_logical(z, upscale).to(acc)
    v = zl * scale.view(1, -1, 1, 1) + shift.view(1, -1, 1, 1)
    return torch.relu(v).to(out_dtype).to(acc)


def _relu_pool_dy(grad, grad_pooled, z, scale, shift, upscale):
    """Gradient reaching the pre-ReLU values, logical layout, accumulation dtype."""
    acc = acc_dtype(z.dtype)
    y = _relu_out(z, scale, shift, upscale, grad.dtype)
    g = grad.to(acc)
    if grad_pooled is not None:
        _, idx = F.max_pool2d(y, 2, 2, return_indices=True)
        g = g + torch.ops.aten.max_pool2d_with_indices_backward(
            grad_pooled.to(acc), y, [2, 2], [2, 2], [0, 0], [1, 1], False, idx
        )
    return torch.where(y > 0, g, torch.zeros((), dtype=acc, device=g.device))


def bn_stats_ref(z, upscale):
    acc = acc_dtype(z.dtype)
    zl = to_logical(z, upscale).to(acc)
    return zl.mean(dim=(0, 2, 3)), zl.var(dim=(0, 2, 3), unbiased=False)


def bn_relu_pool_ref(z, scale, shift, upscale, out, pooled=None):
    y = _relu_out(z, scale, shift, upscale, out.dtype)
    out.copy_(y)
    if pooled is not None:
        pooled.copy_(F.max_pool2d(y, 2, 2))


def relu_pool_backward_ref(grad, grad_pooled, z, scale, shift, upscale):
    return from_logical(_relu_pool_dy(grad, grad_pooled, z, scale, shift, upscale), z, upscale)


def bn_relu_backward_reduce_ref(grad, grad_pooled, z, scale, shift, mean, upscale):
    acc = acc_dtype(z.dtype)
    d = _relu_pool_dy(grad, grad_pooled, z, scale, shift, upscale)
    xmu = to_logical(z, upscale).to(acc) - mean.view(1, -1, 1, 1)
    return d.sum(dim=(0, 2, 3)), (d * xmu).sum(dim=(0, 2, 3))


def bn_backward_dz(dy, xmu, scale, invstd, sum_dy, sum_dy_xmu, count):
    """BatchNorm's training-mode input gradient from the gradient ``dy`` of its output and ``xmu = x - mean``
    (``[N, C, H, W]``), given the per-channel ``[C]`` sums over ``count`` values: ``sum(dy)``, ``sum(dy * xmu)``:
    ``scale * (dy - sum_dy/count - xmu * invstd^2 * sum_dy_xmu/count)``, with ``scale = weight * invstd``."""
    v = lambda t: t.view(1, -1, 1, 1)  # noqa: E731
    return v(scale) * (dy - v(sum_dy) / count - xmu * v(invstd) * v(invstd) * v(sum_dy_xmu) / count)


def bn_relu_backward_apply_ref(grad, grad_pooled, z, scale, shift, mean, invstd, sum_dy, sum_dy_xmu, upscale):
    acc = acc_dtype(z.dtype)
    d = _relu_pool_dy(grad, grad_pooled, z, scale, shift, upscale)
    xmu = to_logical(z, upscale).to(acc) - mean.view(1, -1, 1, 1)
    count = d.shape[0] * d.shape[2] * d.shape[3]
    return from_logical(bn_backward_dz(d, xmu, scale, invstd, sum_dy, sum_dy_xmu, count), z, upscale)


def _check_geometry(z, upscale):
    torch._check(upscale in (1, 2), lambda: f"upscale must be 1 or 2, got {upscale}")
    torch._check(z.dim() == 4, lambda: f"expected a 4-D conv output, got {z.dim()}-D")
    torch._check(z.shape[1] % (upscale * upscale) == 0, lambda: "conv channels not a multiple of upscale^2")


def bn_stats_fake(z, upscale):
    _check_geometry(z, upscale)
    c = z.shape[1] // (upscale * upscale)
    return z.new_empty(c, dtype=acc_dtype(z.dtype)), z.new_empty(c, dtype=acc_dtype(z.dtype))


def bn_relu_pool_fake(z, scale, shift, upscale, out, pooled):
    _check_geometry(z, upscale)
    torch._check(tuple(out.shape) == logical_shape(z, upscale), lambda: "out has the wrong shape")


def relu_pool_backward_fake(grad, grad_pooled, z, scale, shift, upscale):
    _check_geometry(z, upscale)
    return torch.empty_like(z)


def bn_relu_backward_reduce_fake(grad, grad_pooled, z, scale, shift, mean, upscale):
    _check_geometry(z, upscale)
    return torch.empty_like(mean), torch.empty_like(mean)


def bn_relu_backward_apply_fake(grad, grad_pooled, z, scale, shift, mean, invstd, sum_dy, sum_dy_xmu, upscale):
    _check_geometry(z, upscale)
    return torch.empty_like(z)


# ----------------------------------------------------------------------------------------------------
# The registry
# ----------------------------------------------------------------------------------------------------


class FusedOp(NamedTuple):
    """One fused op: ``torch.ops.fastunet.<name>`` with ``schema``, specified by ``reference`` (its ``<name>_ref``),
    shaped by ``fake``; its Triton kernel is ``<name>`` in kernels/``triton_module``.py."""

    name: str
    schema: str
    reference: Callable
    fake: Callable
    triton_module: str


FUSED_OPS = {op.name: op for op in (
    FusedOp("bn_stats", "bn_stats(Tensor z, int upscale) -> (Tensor mean, Tensor var)",
            bn_stats_ref, bn_stats_fake, "bn_stats"),
    FusedOp("bn_relu_pool",
            "bn_relu_pool(Tensor z, Tensor scale, Tensor shift, int upscale, Tensor(a!) out, Tensor(b!)? pooled) -> ()",
            bn_relu_pool_ref, bn_relu_pool_fake, "bn_relu_pool"),
    FusedOp("relu_pool_backward",
            "relu_pool_backward(Tensor grad, Tensor? grad_pooled, Tensor z, Tensor scale, Tensor shift, int upscale) "
            "-> Tensor",
            relu_pool_backward_ref, relu_pool_backward_fake, "bn_relu_backward"),
    FusedOp("bn_relu_backward_reduce",
            "bn_relu_backward_reduce(Tensor grad, Tensor? grad_pooled, Tensor z, Tensor scale, Tensor shift, "
            "Tensor mean, int upscale) -> (Tensor sum_dy, Tensor sum_dy_xmu)",
            bn_relu_backward_reduce_ref, bn_relu_backward_reduce_fake, "bn_relu_backward"),
    FusedOp("bn_relu_backward_apply",
            "bn_relu_backward_apply(Tensor grad, Tensor? grad_pooled, Tensor z, Tensor scale, Tensor shift, "
            "Tensor mean, Tensor invstd, Tensor sum_dy, Tensor sum_dy_xmu, int upscale) -> Tensor",
            bn_relu_backward_apply_ref, bn_relu_backward_apply_fake, "bn_relu_backward"),
)}


# ----------------------------------------------------------------------------------------------------
# Which kernel serves which device: registered with the dispatcher at import
# ----------------------------------------------------------------------------------------------------

MIN_CUDA_CAPABILITY = (8, 0)
CUDA_KERNELS = ("triton", "compiled", "reference")

# Schemas (without the compiled library), fakes, the references as the fallback kernels.
_LIBRARY = torch.library.Library("fastunet", "FRAGMENT")
_cuda_library = None  # the CUDA kernels registered from Python (Triton or the references), or None: compiled
_cuda_kernels = None  # what serves CUDA: one of CUDA_KERNELS
_forced_reference = os.environ.get("FASTUNET_BACKEND", "").strip().lower() == "reference"


def _triton_installed():
    """Whether the Triton kernels can be registered: triton is installed and torch can launch it (2.6+)."""
    return importlib.util.find_spec("triton") is not None and hasattr(torch.library, "triton_op")


def _register_ops():
    for op in FUSED_OPS.values():
        if not _ext.available():
            _LIBRARY.define(op.schema)
        torch.library.register_fake(f"fastunet::{op.name}", op.fake, lib=_LIBRARY)
        _LIBRARY.impl(op.name, op.reference, "CompositeExplicitAutograd")
        if _forced_reference and _ext.available():
            _LIBRARY.impl(op.name, op.reference, "CPU")


def select_cuda_kernels(kernels):
    """Registers which kernels serve the fused ops on CUDA tensors and returns the choice made: "triton" (the
    default; a GPU below sm_80 runs the references, with one warning), "compiled" (csrc/ops_cuda.cu; "cuda" is
    taken for it, as in FASTUNET_CUDA_BACKEND=cuda) or "reference". A choice this install cannot serve gives way,
    with one warning: compiled to Triton, Triton to compiled, either to the references."""
    global _cuda_library, _cuda_kernels
    kernels = {"cuda": "compiled"}.get(kernels, kernels)
    if kernels not in CUDA_KERNELS:
        raise ValueError(f"fastunet: the CUDA kernels are one of {', '.join(CUDA_KERNELS)} ('cuda' = compiled); "
                         f"got {kernels!r}")
    available = {"triton": _triton_installed(), "compiled": _ext.has_cuda_kernels(), "reference": True}
    if not available[kernels]:
        fallback = next(k for k in ("compiled", "triton", "reference") if k != kernels and available[k])
        _ext.warn_once(("cuda-kernels", kernels), f"fastunet: the {kernels} CUDA kernels are not in this install "
                                                  f"({_ext.built_info()['error'] or 'not built'}); the {fallback} "
                                                  "kernels serve CUDA instead")
        kernels = fallback
    if _cuda_library is not None:
        _cuda_library._destroy()
    _cuda_library = None
    if kernels != "compiled":
        _cuda_library = torch.library.Library("fastunet", "FRAGMENT")
        for op in FUSED_OPS.values():
            _cuda_library.impl(op.name, _triton_kernel(op) if kernels == "triton" else op.reference, "CUDA")
    _cuda_kernels = kernels
    _gpu_runs_triton.cache_clear()
    return kernels


def _triton_kernel(op):
    """The CUDA kernel registered for ``op`` with the Triton kernels: Triton's, or the reference on a GPU below
    sm_80 (decided once per GPU)."""

    def run(*args):
        if _gpu_runs_triton(args[0].device.index):
            from . import kernels

            with launch_device(args[0]):
                return getattr(kernels, op.name)(*args)
        return op.reference(*args)

    return run


@contextlib.contextmanager
def launch_device(tensor):
    """Makes ``tensor``'s CUDA device the current one inside the block (nothing for other devices). Triton launches
    on torch.cuda.current_device() and that device's current stream, whatever device the tensors are on; as
    csrc's CUDAGuard and getCurrentCUDAStream do for the compiled kernels, every Triton launch (and timing) runs in
    it, so a model on cuda:1 while cuda:0 is current runs on cuda:1's memory and cuda:1's current stream."""
    if tensor.device.type == "cuda":
        with torch.cuda.device(tensor.device):
            yield
    else:
        yield


def constant_for_compile(fn):
    """``torch.compiler.assume_constant_result(fn)`` without importing torch._dynamo at fastunet's import (it costs
    about 3 s, in every process a user or torchrun starts): where Dynamo is not loaded yet, ``fn`` gets the mark that
    function sets and Dynamo reads when it traces a call of ``fn`` (tests/test_compat.py checks the two agree)."""
    if "torch._dynamo" in sys.modules:
        return torch.compiler.assume_constant_result(fn)
    fn._dynamo_marked_constant = True
    return fn


@constant_for_compile
@functools.lru_cache(maxsize=None)
def _gpu_runs_triton(index):
    """Whether the Triton kernels run on CUDA device ``index`` (compute capability 8.0 or newer); decided at the
    first call on it (asking at import would initialise CUDA), a constant for torch.compile."""
    capability = tuple(torch.cuda.get_device_capability(index))
    if capability >= MIN_CUDA_CAPABILITY:
        return True
    gpu = f"{torch.cuda.get_device_name(index)} (sm_{capability[0]}{capability[1]})"
    _ext.warn_once(("old-gpu", capability), f"fastunet's kernels need a GPU of compute capability 8.0 or newer; "
                                            f"{gpu} runs fastunet's pure-PyTorch ops")
    return False


def backend_for(device):
    """Which kernels serve the fused ops on ``device``: "compiled" (csrc/), "triton" or "reference" (pure PyTorch).

    The CPU: the compiled kernels, or the references without the compiled library or with
    ``FASTUNET_BACKEND=reference``. CUDA: ``select_cuda_kernels``'s choice (at import: FASTUNET_CUDA_BACKEND,
    default triton; the references with FASTUNET_BACKEND=reference); with Triton, the references on a GPU below
    sm_80. Other devices: the references.
    """
    device = torch.device(device)
    if device.type == "cpu":
        return "compiled" if _ext.available() and not _forced_reference else "reference"
    if device.type != "cuda":
        return "reference"
    if _cuda_kernels != "triton":
        return _cuda_kernels
    index = device.index if device.index is not None else torch.cuda.current_device()
    return "triton" if _gpu_runs_triton(index) else "reference"


def _triton_usable():
    """Whether the Triton kernels run here (fastunet.kernels.available())."""
    if not _triton_installed():
        return False
    from . import kernels

    return kernels.available()


_register_ops()
select_cuda_kernels(
    "reference" if _forced_reference else os.environ.get("FASTUNET_CUDA_BACKEND", "triton").strip().lower()
)


# ----------------------------------------------------------------------------------------------------
# The second conv of a fast-mode double block
# ----------------------------------------------------------------------------------------------------


def cudnn_conv_tf32():
    """Whether ATen runs float32 convolutions on CUDA in TF32 (torch's default): cuDNN's conv precision,
    ``torch.backends.cudnn.conv.fp32_precision``, resolved as ATen does (an unset "none" defers to
    ``torch.backends.cudnn.fp32_precision``, then to ``torch.backends.fp32_precision``; the legacy
    ``torch.backends.cudnn.allow_tf32`` sets the conv's). It is the switch for convolutions, not the matmul one
    (``torch.backends.cuda.matmul``): what follows it (the Triton conv, the bench's peak) stands in for a conv."""
    cudnn = torch.backends.cudnn
    if not hasattr(cudnn, "conv"):  # torch before the fp32_precision settings
        return bool(cudnn.allow_tf32)
    for precision in (cudnn.conv.fp32_precision, cudnn.fp32_precision, torch.backends.fp32_precision):
        if precision != "none":
            return precision == "tf32"
    return False

CONV3X3_MODES = ("aten", "triton", "auto")
_CONV_CHOICES = {}


def conv3x3_mode():
    """What runs a fast-mode double block's second conv: "aten" (the default), "triton" or "auto" (see
    conv3x3_backend): the policy's ``second_conv_mode`` (FASTUNET_CONV at import, ``set_conv3x3_mode`` or
    ``fastunet.conv.policy.override``)."""
    from .conv import policy

    return policy.value("second_conv_mode")


def set_conv3x3_mode(mode):
    """Sets conv3x3_mode() to ``mode`` (one of CONV3X3_MODES) and returns the previous mode."""
    from .conv import policy

    if mode not in CONV3X3_MODES:
        raise ValueError(f"fastunet: the second conv's mode is one of {', '.join(CONV3X3_MODES)}, got {mode!r}")
    return policy.set_default("second_conv_mode", mode)


def conv3x3_backend(x, weight, stats=True):
    """What runs a fast-mode double block's second 3x3 conv on ``x`` (layer 1's pre-BN output) with ``weight``,
    with (``stats``, training) or without (inference) layer 2's batch statistics:
    "aten" (a BN-apply + ReLU pass writing layer 1's activation, then ATen's convolution: cuDNN on CUDA) or
    "triton" (fastunet.kernels.conv3x3_bn_relu_stats: the activation is formed in the conv's input load and
    never written, and layer 2's BN statistics come from the conv's epilogue).

    The rule is fastunet.conv.policy.second_conv's, by conv3x3_mode(): ``aten`` (default until the Triton conv is
    measured at parity), ``triton`` (wherever the Triton kernels run), or ``auto``: on CUDA, both are timed on the
    first call of each shape and the faster is kept (``conv3x3_choices()`` lists the picks).
    """
    from .conv import policy

    layer = policy.Layer.of(x, weight, train=stats)
    return policy.second_conv(layer, conv3x3_mode(), lambda: _timed_pick(x, weight, stats)).algorithm


def _timed_pick(x, weight, stats):
    """The ``auto`` pick of conv3x3_backend for this shape: timed at its first eager call, None where untimed."""
    key = (tuple(x.shape), weight.shape[0], x.dtype, memory_format_of(x) == torch.channels_last, x.device.index,
           stats)
    if key not in _CONV_CHOICES and not torch.compiler.is_compiling():
        _CONV_CHOICES[key] = _time_conv3x3(x, weight, stats)
    return _CONV_CHOICES.get(key)


def conv3x3_choices():
    """The ``FASTUNET_CONV=auto`` picks so far: {(x shape, Cout, dtype, channels_last, device, stats): backend}."""
    return dict(_CONV_CHOICES)


def _time_conv3x3(x, weight, stats, reps=5):
    """The faster of "aten" and "triton" for conv3x3_backend on CUDA: median of ``reps`` CUDA-event timings, on
    x's device and its current stream."""
    with launch_device(x):
        return _time_conv3x3_on_its_device(x, weight, stats, reps)


def _time_conv3x3_on_its_device(x, weight, stats, reps):
    from . import kernels

    c = x.shape[1]
    scale, shift = torch.ones(c, device=x.device), torch.zeros(c, device=x.device)

    def unfused():
        a = torch.empty_like(x)
        bn_relu_pool(x, scale, shift, 1, a, None)
        z = torch.nn.functional.conv2d(a, weight, padding=1)
        return bn_stats(z, 1) if stats else z

    candidates = {"aten": unfused, "triton": lambda: kernels.conv3x3_bn_relu_stats(x, scale, shift, weight, stats)}
    times = {}
    for name, fn in candidates.items():
        fn()
        events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(reps)]
        for start, end in events:
            start.record()
            fn()
            end.record()
        torch.cuda.synchronize(x.device)
        times[name] = sorted(start.elapsed_time(end) for start, end in events)[reps // 2]
    return min(times, key=times.get)


# ----------------------------------------------------------------------------------------------------
# The ops, through the dispatcher
# ----------------------------------------------------------------------------------------------------


def bn_stats(z, upscale):
    """Per-channel batch mean and biased variance of the logical BN input read from ``z``.

    z: ``[N, S*S*C, H+S-1, W+S-1]`` float32/bfloat16/float16/float64, any layout. Returns two ``[C]``
    tensors in float32 (float64 for float64 input). Needs at least one element per channel.
    """
    return torch.ops.fastunet.bn_stats(z, upscale)


def bn_relu_pool(z, scale, shift, upscale, out, pooled=None):
    """Writes ``out = relu(z*scale + shift)`` (logical layout) and, if given, ``pooled = maxpool2x2(out)``.

    out: ``[N, C, S*H, S*W]`` of z's dtype, any strides (a concat-buffer slice works);
    pooled: ``[N, C, S*H/2, S*W/2]`` or None. Max-pool ties and NaNs follow ATen's max_pool2d.
    """
    torch.ops.fastunet.bn_relu_pool(z, scale, shift, upscale, out, pooled)


def relu_pool_backward(grad, grad_pooled, z, scale, shift, upscale):
    """Gradient w.r.t. the pre-ReLU values, laid out like ``z``: ``(grad + unpool(grad_pooled)) * (y > 0)``.

    ``y`` is recomputed from z, scale, shift (rounded to grad's dtype, as the forward stored it).
    z entries no output pixel reads get 0.
    """
    return torch.ops.fastunet.relu_pool_backward(grad, grad_pooled, z, scale, shift, upscale)


def bn_relu_backward_reduce(grad, grad_pooled, z, scale, shift, mean, upscale):
    """Per-channel ``sum(dy)`` and ``sum(dy * (z - mean))`` of the pre-ReLU gradient dy (float32 ``[C]``)."""
    return torch.ops.fastunet.bn_relu_backward_reduce(grad, grad_pooled, z, scale, shift, mean, upscale)


def bn_relu_backward_apply(grad, grad_pooled, z, scale, shift, mean, invstd, sum_dy, sum_dy_xmu, upscale):
    """Gradient w.r.t. ``z`` of BN (+ReLU, +max-pool) given the reductions of bn_relu_backward_reduce.

    ``dz = scale * (dy - sum_dy/M - (z-mean) * invstd^2 * sum_dy_xmu/M)``, M = N*(S*H)*(S*W); with zero
    sums it is the eval-mode gradient ``scale * dy``. Laid out like z; unread z entries get 0.
    """
    return torch.ops.fastunet.bn_relu_backward_apply(grad, grad_pooled, z, scale, shift, mean, invstd, sum_dy,
                                                     sum_dy_xmu, upscale)
