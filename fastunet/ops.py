"""The fused memory-bound ops around a U-Net block's convolutions, and where each one runs.

Every op exists three times:
  * ``torch.ops.fastunet.<op>``: compiled CPU and CUDA kernels (csrc/), schema declared in C++;
  * ``fastunet.kernels``: Triton kernels (CUDA; CPU under TRITON_INTERPRET=1);
  * ``<op>_ref`` here: pure PyTorch, the specification the other two are tested against, and the
    fallback where neither is available.

Geometry (see csrc/fastunet_math.h): ``z`` is a conv output ``[N, S*S*C, H+S-1, W+S-1]`` with
``upscale`` S = 1 (plain block) or 2 (sub-pixel up block, phase p = 2a+b in channel block p); the
logical BN+ReLU output is ``[N, C, S*H, S*W]``, pixel ``(S*i+a, S*j+b)`` reading ``z[:, p*C+c, i+a, j+b]``.
Per-channel vectors (scale, shift, mean, ...) are float32 (float64 for float64 activations).
Activations may be NCHW-contiguous, channels_last or any strided view (e.g. a concat-buffer slice).
"""

import functools
import os

import torch
import torch.nn.functional as F

from . import _ext

# The five fused ops, each in three implementations (module docstring).
FUSED_OPS = ("bn_stats", "bn_relu_pool", "relu_pool_backward", "bn_relu_backward_reduce", "bn_relu_backward_apply")

__all__ = [
    "bn_stats",
    "bn_relu_pool",
    "relu_pool_backward",
    "bn_relu_backward_reduce",
    "bn_relu_backward_apply",
    "FUSED_OPS",
    "backend_for",
    "conv3x3_backend",
    "conv3x3_mode",
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
    out = torch.zeros(z_like.shape, dtype=z_like.dtype, device=z_like.device).contiguous(
        memory_format=memory_format_of(z_like)
    )
    o6 = out.view(n, 2, 2, c, h + 1, w + 1) if out.is_contiguous() else out.reshape(n, 2, 2, c, h + 1, w + 1)
    y6 = y.reshape(n, c, h, 2, w, 2)
    for a in range(2):
        for b in range(2):
            o6[:, a, b, :, a : a + h, b : b + w] = y6[:, :, :, a, :, b].to(z_like.dtype)
    if not out.is_contiguous():
        out.copy_(o6.reshape(z_like.shape))
    return out


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


def bn_relu_backward_apply_ref(grad, grad_pooled, z, scale, shift, mean, invstd, sum_dy, sum_dy_xmu, upscale):
    acc = acc_dtype(z.dtype)
    d = _relu_pool_dy(grad, grad_pooled, z, scale, shift, upscale)
    m = d.shape[0] * d.shape[2] * d.shape[3]
    v = lambda t: t.view(1, -1, 1, 1)  # noqa: E731
    xmu = to_logical(z, upscale).to(acc) - v(mean)
    dz = v(scale) * (d - v(sum_dy) / m - xmu * v(invstd) * v(invstd) * v(sum_dy_xmu) / m)
    return from_logical(dz, z, upscale)


# ----------------------------------------------------------------------------------------------------
# Fake (meta) kernels of the compiled ops, so torch.compile traces them without a graph break
# ----------------------------------------------------------------------------------------------------


def _check_geometry(z, upscale):
    torch._check(upscale in (1, 2), lambda: f"upscale must be 1 or 2, got {upscale}")
    torch._check(z.dim() == 4, lambda: f"expected a 4-D conv output, got {z.dim()}-D")
    torch._check(z.shape[1] % (upscale * upscale) == 0, lambda: "conv channels not a multiple of upscale^2")


def _register_fakes():
    lib = "fastunet::"

    @torch.library.register_fake(lib + "bn_stats")
    def _(z, upscale):
        _check_geometry(z, upscale)
        c = z.shape[1] // (upscale * upscale)
        return z.new_empty(c, dtype=acc_dtype(z.dtype)), z.new_empty(c, dtype=acc_dtype(z.dtype))

    @torch.library.register_fake(lib + "bn_relu_pool")
    def _(z, scale, shift, upscale, out, pooled):
        _check_geometry(z, upscale)
        torch._check(tuple(out.shape) == logical_shape(z, upscale), lambda: "out has the wrong shape")
        return None

    @torch.library.register_fake(lib + "relu_pool_backward")
    def _(grad, grad_pooled, z, scale, shift, upscale):
        _check_geometry(z, upscale)
        return torch.empty_like(z)

    @torch.library.register_fake(lib + "bn_relu_backward_reduce")
    def _(grad, grad_pooled, z, scale, shift, mean, upscale):
        _check_geometry(z, upscale)
        return torch.empty_like(mean), torch.empty_like(mean)

    @torch.library.register_fake(lib + "bn_relu_backward_apply")
    def _(grad, grad_pooled, z, scale, shift, mean, invstd, sum_dy, sum_dy_xmu, upscale):
        _check_geometry(z, upscale)
        return torch.empty_like(z)


if _ext.available():
    _register_fakes()


# ----------------------------------------------------------------------------------------------------
# Backend choice
# ----------------------------------------------------------------------------------------------------

_BACKENDS = ("compiled", "triton", "reference")


def _triton_usable():
    try:
        from . import kernels  # noqa: F401
    except ImportError:
        return False
    return kernels.available()


def backend_for(device):
    """Which implementation the ops use on ``device``: "compiled", "triton" or "reference".

    On CUDA: Triton by default, the compiled CUDA kernels with ``FASTUNET_CUDA_BACKEND=cuda``; on the
    CPU: the compiled kernels. Whatever is missing falls back, in that order, to pure PyTorch, with one
    warning where a GPU cannot run the kernels (below sm_80, or an arch the build lacks).
    ``FASTUNET_BACKEND=reference`` forces pure PyTorch everywhere.
    """
    device = torch.device(device)
    forced = os.environ.get("FASTUNET_BACKEND", "").strip().lower()
    if forced == "reference":
        return "reference"
    if device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
        return _cuda_backend(index, os.environ.get("FASTUNET_CUDA_BACKEND", "triton").strip().lower() == "cuda")
    if device.type == "cpu" and _ext.available():
        return "compiled"
    return "reference"


MIN_CUDA_CAPABILITY = (8, 0)


@torch.compiler.assume_constant_result
@functools.lru_cache(maxsize=None)
def _cuda_backend(index, prefer_compiled):
    """backend_for on CUDA device ``index``: decided once per device and preference (it is asked at every op
    call), a constant for torch.compile."""
    capability = tuple(torch.cuda.get_device_capability(index))
    gpu = f"{torch.cuda.get_device_name(index)} (sm_{capability[0]}{capability[1]})"
    if capability < MIN_CUDA_CAPABILITY:
        _ext.warn_once(("old-gpu", capability), f"fastunet's kernels need a GPU of compute capability 8.0 or newer; "
                                                f"{gpu} runs fastunet's pure-PyTorch path")
        return "reference"
    arch_problem = _ext.cuda_arch_problem(capability) if _ext.has_cuda_kernels() else "no compiled CUDA kernels"
    if prefer_compiled and arch_problem is None:
        return "compiled"
    if prefer_compiled and _ext.has_cuda_kernels():
        _ext.warn_once(("arch", capability), f"{arch_problem}. fastunet runs its Triton kernels on {gpu} instead")
    if _triton_usable():
        return "triton"
    if arch_problem is None:
        return "compiled"
    _ext.warn_once(("no-kernels", capability), f"fastunet has no kernels for {gpu}: triton is not usable and "
                                               f"{arch_problem[0].lower()}{arch_problem[1:]}; running its "
                                               "pure-PyTorch path")
    return "reference"


_CONV_CHOICES = {}


def conv3x3_mode():
    """``FASTUNET_CONV`` as read: "aten" (the default), "triton" or "auto" (see conv3x3_backend)."""
    return os.environ.get("FASTUNET_CONV", "aten").strip().lower()


def conv3x3_backend(x, weight, stats=True):
    """What runs a fast-mode double block's second 3x3 conv on ``x`` (layer 1's pre-BN output) with ``weight``,
    with (``stats``, training) or without (inference) layer 2's batch statistics:
    "aten" (a BN-apply + ReLU pass writing layer 1's activation, then ATen's convolution: cuDNN on CUDA) or
    "triton" (fastunet.kernels.conv3x3_bn_relu_stats: the activation is formed in the conv's input load and
    never written, and layer 2's BN statistics come from the conv's epilogue).

    ``FASTUNET_CONV=aten`` (default until the Triton conv is measured at parity), ``triton`` (wherever the
    Triton kernels run), or ``auto``: on CUDA, both are timed on the first call of each shape and the faster is
    kept (``conv3x3_choices()`` lists the picks; under torch.compile an untimed shape takes aten, and under
    torch.use_deterministic_algorithms(True) every shape does).
    """
    mode = conv3x3_mode()
    if (mode not in ("triton", "auto") or x.dtype == torch.float64 or not _triton_usable()
            or backend_for(x.device) == "reference"):  # forced, or a GPU the kernels do not run on
        return "aten"
    if mode == "triton":
        return "triton"
    if x.device.type != "cuda" or torch.are_deterministic_algorithms_enabled():
        return "aten"  # a pick by timing could differ from run to run
    key = (tuple(x.shape), weight.shape[0], x.dtype, memory_format_of(x) == torch.channels_last, x.device.index,
           stats)
    if key not in _CONV_CHOICES and not torch.compiler.is_compiling():
        _CONV_CHOICES[key] = _time_conv3x3(x, weight, stats)
    return _CONV_CHOICES.get(key, "aten")


def conv3x3_choices():
    """The ``FASTUNET_CONV=auto`` picks so far: {(x shape, Cout, dtype, channels_last, device, stats): backend}."""
    return dict(_CONV_CHOICES)


def _time_conv3x3(x, weight, stats, reps=5):
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


def _impl(name, device):
    backend = backend_for(device)
    if backend == "compiled":
        return getattr(torch.ops.fastunet, name)
    if backend == "triton":
        from . import kernels

        return getattr(kernels, name)
    return globals()[name + "_ref"]


def bn_stats(z, upscale):
    """Per-channel batch mean and biased variance of the logical BN input read from ``z``.

    z: ``[N, S*S*C, H+S-1, W+S-1]`` float32/bfloat16/float16/float64, any layout. Returns two ``[C]``
    tensors in float32 (float64 for float64 input). Needs at least one element per channel.
    """
    return _impl("bn_stats", z.device)(z, upscale)


def bn_relu_pool(z, scale, shift, upscale, out, pooled=None):
    """Writes ``out = relu(z*scale + shift)`` (logical layout) and, if given, ``pooled = maxpool2x2(out)``.

    out: ``[N, C, S*H, S*W]`` of z's dtype, any strides (a concat-buffer slice works);
    pooled: ``[N, C, S*H/2, S*W/2]`` or None. Max-pool ties and NaNs follow ATen's max_pool2d.
    """
    _impl("bn_relu_pool", z.device)(z, scale, shift, upscale, out, pooled)


def relu_pool_backward(grad, grad_pooled, z, scale, shift, upscale):
    """Gradient w.r.t. the pre-ReLU values, laid out like ``z``: ``(grad + unpool(grad_pooled)) * (y > 0)``.

    ``y`` is recomputed from z, scale, shift (rounded to grad's dtype, as the forward stored it).
    z entries no output pixel reads get 0.
    """
    return _impl("relu_pool_backward", z.device)(grad, grad_pooled, z, scale, shift, upscale)


def bn_relu_backward_reduce(grad, grad_pooled, z, scale, shift, mean, upscale):
    """Per-channel ``sum(dy)`` and ``sum(dy * (z - mean))`` of the pre-ReLU gradient dy (float32 ``[C]``)."""
    return _impl("bn_relu_backward_reduce", z.device)(grad, grad_pooled, z, scale, shift, mean, upscale)


def bn_relu_backward_apply(grad, grad_pooled, z, scale, shift, mean, invstd, sum_dy, sum_dy_xmu, upscale):
    """Gradient w.r.t. ``z`` of BN (+ReLU, +max-pool) given the reductions of bn_relu_backward_reduce.

    ``dz = scale * (dy - sum_dy/M - (z-mean) * invstd^2 * sum_dy_xmu/M)``, M = N*(S*H)*(S*W); with zero
    sums it is the eval-mode gradient ``scale * dy``. Laid out like z; unread z entries get 0.
    """
    return _impl("bn_relu_backward_apply", z.device)(
        grad, grad_pooled, z, scale, shift, mean, invstd, sum_dy, sum_dy_xmu, upscale
    )
