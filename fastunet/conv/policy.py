"""Every algorithm choice of fast mode's convolutions, CPU and CUDA: one table of thresholds and one chooser per
decision.

The table holds each threshold or rule with its value on this CPU (from what the CPU reports at import), its unit
and the machine and command that measured it. ``value(name)`` reads one; ``override(name=value, ...)`` sets some
for a ``with`` block (the tests force every branch of every choice through it; users can too).

A chooser takes the facts of one layer (``Layer``: what it computes, N/C/H/W, dtypes, layouts, train, exact) and
returns a ``Choice``: the algorithm and the rule that picked it, a short string. The forward runs what the chooser
says and ``fastunet.explain`` prints the same answer, so the two cannot drift apart.

A tuned plan overrides choices per layer: ``use_plan(plan)`` (a ``with`` block, this thread) where ``plan`` maps
``(decision, Layer.key())`` to an algorithm of that decision's ``ALGORITHMS``; a chooser consults the plan first and
answers its entry with the rule ``"plan"``. An entry the layer cannot run (say Winograd for a 2x2 conv) is an
error naming the layer. Empty by default.
"""

import contextlib
import os
import threading
from typing import NamedTuple

import torch

from .. import ops
from . import plan as stored_plan


class Entry(NamedTuple):
    """One threshold or rule: its value on this CPU, the unit, and where the rule behind the default was measured."""

    value: object
    unit: str
    measured: str


def onednn_isa():
    """The widest instruction set oneDNN's float32 convolutions use here: "avx512" or "avx2" (or older, "other").
    ``ONEDNN_MAX_CPU_ISA`` caps it as it caps oneDNN (AVX2, AVX, SSE41 and the like name an older set)."""
    cap = os.environ.get("ONEDNN_MAX_CPU_ISA", "").upper()
    if cap and not cap.startswith(("AVX512", "AVX10", "AMX", "ALL", "DEFAULT")):
        return "avx2" if cap.startswith("AVX2") else "other"
    capability = torch.backends.cpu.get_cpu_capability()
    return {"AVX512": "avx512", "AVX2": "avx2"}.get(capability, "other")


def _has_native_dot(dtype):
    """Whether this CPU has dot-product instructions for ``dtype`` (bfloat16: AVX-512 BF16 or AMX; float16:
    AMX-FP16), which oneDNN's convolutions of that dtype use; without them it emulates them. A torch without the
    probe (private API) answers False."""
    names = ("_is_avx512_bf16_supported", "_is_amx_tile_supported") if dtype == torch.bfloat16 else (
        "_is_amx_fp16_supported",)
    return any(getattr(torch.cpu, name, lambda: False)() for name in names)


# The few-pixel GEMMs' threshold where oneDNN's float32 kernels are AVX2-class (gemm_train_max_pixels below).
GEMM_TRAIN_MAX_PIXELS_AVX2 = 64

_EPYC = "2-core AVX2 EPYC"
_SPR = "2-core Xeon (Sapphire Rapids, AVX-512)"
_RESULTS = "benchmarks/RESULTS.md"

_TABLE = {
    # Training (fast mode, CPU, float32).
    "gemm_train_max_pixels": Entry(
        0 if onednn_isa() == "avx512" else GEMM_TRAIN_MAX_PIXELS_AVX2, "pixels per image",
        f"{_EPYC}, {_RESULTS} (convolution measurements): at 1024 -> 1024, 2 x 8 x 8 the GEMMs took 137 vs oneDNN's "
        f"AVX2 183 ms forward + backward, forward error 1.8e-7 vs 5.7e-7-1.0e-6; {_SPR}, {_RESULTS} 'Issue 31': "
        "oneDNN's AVX-512 kernels as fast and 1.2-1.6x more accurate (forward 1.5-2.0e-7, input gradient 2.0-2.2e-7 "
        "vs 3.3e-7): 0 there; ONEDNN_MAX_CPU_ISA=AVX2 for the AVX2 column"),
    "gemm_train_where_aten_im2col": Entry(
        True, "bool",
        f"{_SPR}, {_RESULTS} 'Where ATen runs its im2col conv': where ATen's own conv is its slow im2col path "
        "(float32, one image of at most 20480 input values), the GEMMs are the same products bit for bit without its "
        "zero-filled weight gradient: 1024 -> 1024 at 1 x 4 x 4 forward + backward 6.95 against 10.2 ms"),
    "winograd_train": Entry(
        onednn_isa() != "avx512", "bool",
        f"speed: {_EPYC}, {_RESULTS}; accuracy: {_SPR}, 'Issue 31': oneDNN's AVX-512 NCHW kernels 2-2.6x more "
        "accurate than Winograd (a step's gradients over twice the seed's error): off on AVX-512"),
    "channels_last_train": Entry(
        onednn_isa() != "avx512", "bool",
        f"speed: {_EPYC}, {_RESULTS} (a step 1.2x faster); accuracy: {_SPR}, 'Issue 31': oneDNN's AVX-512 "
        "channels_last kernels 2-5x less accurate than its NCHW ones: off on AVX-512"),
    "subpixel_train_min_pixels": Entry(
        1024, "low-resolution pixels per batch",
        f"{_EPYC}, {_RESULTS}: below, the 3x3 conv on the upsampled input: 1 x 3 x 64^2 step 0.81x -> 0.95x eager, "
        "2 x 3 x 128^2 1.39x -> 1.51x"),
    "aten_conv_in_weights_layout": Entry(
        True, "bool (where the weights outnumber the activations in and out)",
        f"{_EPYC}, {_RESULTS}: 1024 -> 1024 channels at 1 x 16 x 16, 352 ms forward + backward against 176 ms in "
        "the weights' layout (oneDNN lays a weight of the other layout out anew at every call)"),
    "native_dot_bfloat16": Entry(
        _has_native_dot(torch.bfloat16), "bool (lscpu: avx512_bf16 or amx_bf16)",
        f"{_EPYC}, {_RESULTS} (bfloat16 autocast on the CPU): emulated bfloat16 convs made a 1 x 3 x 64^2 training "
        "step 26x as slow as float32"),
    "native_dot_float16": Entry(
        _has_native_dot(torch.float16), "bool (lscpu: amx_fp16)", "as native_dot_bfloat16"),
    "channels_last_bfloat16_autocast": Entry(
        _has_native_dot(torch.bfloat16), "bool",
        f"{_SPR}, AMX, {_RESULTS} 'CPU targets on SPR': oneDNN's bfloat16 convs are fastest in channels_last (the "
        "seed under bfloat16 autocast: 1 x 3 x 256^2 inference 105 ms against 253 in NCHW, a 2 x 3 x 128^2 training "
        "step 258 against 336); fast mode's NCHW inference 2.08x the seed's with it, training 1.37x; off without "
        "bfloat16 dot products (the convs then run in float32)"),
    # Inference (fast mode, CPU, float32, eval BN).
    "gemm_max_pixels": Entry(
        256, "pixels per batch",
        f"{_EPYC}, benchmarks/cpu_inference.py, {_RESULTS}: im2col + one GEMM 1.75-2.3x oneDNN at 1024 channels, "
        "1.5x at 512"),
    "subpixel_min_pixels": Entry(
        1024, "low-resolution pixels per batch",
        f"{_EPYC}, benchmarks/cpu_inference.py, {_RESULTS}: the 2x2 sub-pixel conv about half the 3x3 one's time "
        "from 32 x 32 up"),
    "subpixel_min_pixels_bfloat16": Entry(
        0, "low-resolution pixels per batch",
        f"{_SPR}, AMX, the bfloat16 inference snapshot at 1 x 3 x 256^2: every up-conv sub-pixel 62-66 ms, from "
        "subpixel_min_pixels 67-77 ms, none 83 ms (oneDNN's packed bfloat16 convs)"),
    "fold_min_pixels_per_input_channel": Entry(
        4.5, "pixels per batch / input channels",
        "folding (a pass over the weights) against the BN and ReLU passes it saves (two per output value)"),
    "fold_nchw": Entry(
        False, "bool",
        f"{_SPR}, eight seeds: folded NCHW convs 2.1-2.5x the seed's error against float64 (channels_last "
        "0.97-1.0x), over fast mode's 2x rule"),
    "channels_last_inference": Entry(
        True, "bool",
        f"{_EPYC}, benchmarks/cpu_inference.py, {_RESULTS}: oneDNN's convs 10-20% faster in channels_last, which "
        "takes the folded BN"),
    # Inference under lower-precision CPU autocast (fast mode, eval BN): autocast_inference_conv.
    "autocast_gemm_max_pixels": Entry(
        128, "pixels per batch",
        f"{_SPR}, AMX, bfloat16 autocast, the 512 -> 1024 -> 1024 block: float32 GEMMs on the float32 weights "
        "3.3-4.3x autocast's casts and oneDNN's bfloat16 convs at 16 pixels, 1.9-2.2x at 64, 1.25-1.4x at 128, "
        "0.6-0.8x at 256"),
    "autocast_gemm_min_weights": Entry(
        4 << 20, "weights per conv",
        f"{_SPR}, AMX, bfloat16 autocast at 64 pixels: 256 -> 512 -> 512 (1.2M and 2.4M weights) 0.8x, "
        "1024 -> 512 -> 512 (4.7M and 2.4M) 0.9x (weights that stay in cache are cast and laid out cheaply)"),
    # Training under CPU autocast (fast mode, the double blocks' convs): autocast_train_conv.
    "autocast_train_float32_max_pixels": Entry(
        16, "pixels per batch",
        f"{_SPR}, AMX, {_RESULTS} 'bf16 training at the bottleneck': a conv's forward + backward on a bfloat16 input, "
        "float32 weights as they lie against autocast's bfloat16 copy: 1024 -> 1024 at 1 x 4 x 4 7.5 against 15.4 ms, "
        "512 -> 1024 3.5 / 7.6 (one image: the im2col GEMMs); at 64 pixels per batch slower or no faster in the whole "
        "step (1024 -> 512 at 1 x 8 x 8 8.9 / 7.0; a 4 x 3 x 64^2 step 0.90x / 0.96x of the seed in channels_last); "
        "native_dot_bfloat16=False forced: a 1 x 3 x 64^2 step 205.3 against 223.5 ms"),
    "autocast_train_float32_min_weights": Entry(
        4 << 20, "weights per conv", f"{_SPR}: the bottleneck's 4.7M and 9.4M measured; smaller convs were not"),
    # CUDA: what runs a fast double block's second conv (second_conv).
    "second_conv_mode": Entry(
        os.environ.get("FASTUNET_CONV", "aten").strip().lower(), "aten, triton or auto (FASTUNET_CONV)",
        "aten until the Triton conv is measured at parity on a GPU (benchmarks/run_gpu.sh)"),
    # Winograd F(2x2, 3x3) (CPU, float32): where it pays, and its chunks.
    "winograd_min_channels": Entry(
        64, "channels (both sides)", f"{_EPYC}, {_RESULTS}: the first layer's 3 input channels lose"),
    "winograd_max_channels": Entry(1024, "channels (either side)", f"{_EPYC}, {_RESULTS}: the widest measured"),
    "winograd_min_pixels": Entry(512, "pixels per batch", f"{_EPYC}, {_RESULTS}: weights transformed at every call"),
    "winograd_inference": Entry(
        onednn_isa() != "avx512", "bool (weights transformed at every call)",
        f"{_EPYC}: on ({_RESULTS}); {_SPR}, fast mode's float32 eval at 1 x 64^2 to 2 x 256^2, both layouts: "
        "without Winograd 2-10% faster a forward (1 x 3 x 256^2 channels_last 450 against 495 ms, 2 x 256^2 901 "
        "against 997): off on AVX-512; an inference snapshot's kept weights follow winograd_kept_min_pixels"),
    "winograd_kept_min_pixels": Entry(
        128, "pixels per batch", f"{_EPYC}, {_RESULTS}: weights kept (an inference snapshot)"),
    "winograd_kept_min_channels": Entry(
        256, "channels (both sides)", f"{_EPYC}, {_RESULTS}: with winograd_kept_min_pixels"),
    "winograd_chunk_floats": Entry(
        1 << 18, "floats of V and M per chunk", f"{_EPYC}, {_RESULTS}: a core's cache, below winograd_wide_channels"),
    "winograd_min_chunk_tiles": Entry(63, "tiles", f"{_EPYC}, {_RESULTS}: each chunk reads all of U"),
    "winograd_wide_channels": Entry(
        256, "channels (both sides)", f"{_EPYC}, {_RESULTS}: from here U outweighs the tiles: one chunk, every thread"),
    "winograd_wide_chunk_floats": Entry(1 << 23, "floats", f"{_EPYC}, {_RESULTS}: the one chunk's cap"),
}

# name: the algorithms a decision answers (a plan's entries are checked against them).
ALGORITHMS = {
    "train_conv": ("winograd", "gemm", "shifted_gemm", "aten"),
    "inference_conv": ("winograd", "gemm", "folded", "unfolded"),
    "up_conv": ("subpixel", "upsampled"),
    "second_conv": ("triton", "aten"),
}

_local = threading.local()


def value(name):
    """The value of ``name`` now: the innermost ``override`` of this thread, else the table's."""
    for layer in reversed(getattr(_local, "stack", ())):
        if name in layer:
            return layer[name]
    return _TABLE[name].value


def table():
    """``{name: Entry}`` with the values in force now (overrides included)."""
    return {name: entry._replace(value=value(name)) for name, entry in _TABLE.items()}


def set_default(name, new):
    """Sets the table's value of ``name`` (for all threads, until set again); returns the previous one."""
    previous = _TABLE[name].value
    _TABLE[name] = _TABLE[name]._replace(value=new)
    return previous


@contextlib.contextmanager
def _pushed(stack_name, layer):
    """Pushes ``layer`` on this thread's stack ``stack_name`` for the ``with`` block."""
    stack = _local.__dict__.setdefault(stack_name, [])
    stack.append(layer)
    try:
        yield
    finally:
        stack.pop()


def override(**choices):
    """Sets the named entries for the ``with`` block in this thread (an unknown name is an error)."""
    unknown = sorted(set(choices) - set(_TABLE))
    if unknown:
        raise KeyError(f"fastunet.conv.policy: no choice named {', '.join(unknown)}; the choices are "
                       f"{', '.join(sorted(_TABLE))}")
    return _pushed("stack", dict(choices))


def use_plan(plan):
    """Consults ``plan`` (``{(decision, Layer.key()): algorithm}``) before the rules, for the ``with`` block in this
    thread; an inner plan's entries come before an outer one's. Unknown decisions or algorithms are errors."""
    for (decision, _), algorithm in plan.items():
        if algorithm not in ALGORITHMS.get(decision, ()):
            raise ValueError(f"fastunet.conv.policy: a plan entry {algorithm!r} for decision {decision!r}; the "
                             f"decisions and their algorithms are {ALGORITHMS}")
    return _pushed("plans", dict(plan))


@contextlib.contextmanager
def recording():
    """Records, in this thread for the ``with`` block, every decision a chooser makes that a plan could change: a
    list of ``(decision, layer, candidates)``, the algorithms that keep fast mode's error rule on this CPU (what
    ``fastunet.tune`` times)."""
    previous = getattr(_local, "recorder", None)
    _local.recorder = []
    try:
        yield _local.recorder
    finally:
        _local.recorder = previous


def _planned(decision, layer, allowed, candidates=None):
    """The plan's Choice for ``layer``'s ``decision``, or None: a ``use_plan`` plan's (an entry outside ``allowed``
    is an error), else this machine's tuned plan's (fastunet.conv.plan; an entry outside ``candidates``, default
    ``allowed``, is passed over: a plan from other rules)."""
    candidates = tuple(allowed if candidates is None else candidates)
    recorder = getattr(_local, "recorder", None)
    if recorder is not None:
        recorder.append((decision, layer, candidates))
    plans = getattr(_local, "plans", ())
    tuned = {} if torch.compiler.is_compiling() else stored_plan.current()
    if not plans and not tuned:  # the common case: no layer key to make
        return None
    key = (decision, layer.key())
    for plan in reversed(plans):
        if key in plan:
            if plan[key] not in allowed:
                raise ValueError(f"fastunet.conv.policy: the plan's {plan[key]!r} for {decision} of {layer} is not "
                                 f"one this layer can run ({', '.join(allowed)})")
            return Choice(plan[key], "plan")
    if tuned.get(key) in candidates:
        return Choice(tuned[key], "tuned on this machine")
    return None


class Layer(NamedTuple):
    """The facts of one conv a choice reads (stand-in fake tensors give them as well as real ones).

    kernel: the conv's size (3, or 2 for the up-conv's sub-pixel form); n, cin, h, w: its input's ``[N, C, H, W]``,
    cout its output channels; dtype / weight_dtype; device; layout: the input's memory format
    (``ops.memory_format_of``), nhwc_dense: whether it is channels_last-contiguous (a tensor of one pixel is both);
    weight_layout: the weight's memory format; train: a training step (else inference); exact: exact mode."""

    kernel: int
    n: int
    cin: int
    cout: int
    h: int
    w: int
    dtype: torch.dtype
    weight_dtype: torch.dtype
    device: torch.device
    layout: torch.memory_format
    nhwc_dense: bool
    weight_layout: torch.memory_format
    train: bool
    exact: bool

    @classmethod
    def of(cls, x, weight, train, exact=False):
        """The facts of the conv of ``x`` by ``weight`` ``[Cout, Cin, k, k]``. Compiling, no layout is read (Dynamo
        cannot speculate a layout test in a backward; no choice reads one there)."""
        n, cin, h, w = x.shape
        if torch.compiler.is_compiling():
            layouts = torch.contiguous_format, False, torch.contiguous_format
        else:
            layouts = (ops.memory_format_of(x), x.is_contiguous(memory_format=torch.channels_last),
                       ops.memory_format_of(weight))
        return cls(weight.shape[2], n, cin, weight.shape[0], h, w, x.dtype, weight.dtype, x.device, *layouts, train,
                   exact)

    def key(self):
        """The layer's key in a plan: its facts, the device as its type."""
        return self._replace(device=self.device.type)

    @property
    def pixels(self):
        return self.n * self.h * self.w


class Choice(NamedTuple):
    """A chooser's answer: the algorithm, and the rule that picked it."""

    algorithm: object
    rule: str


def native_dot(dtype):
    """Whether fast mode's CPU convolutions of ``dtype`` (bfloat16 or float16) stay in it."""
    return value("native_dot_bfloat16" if dtype == torch.bfloat16 else "native_dot_float16")


def upcast(layer):
    """Choice(True) where fast mode runs a CPU conv of bfloat16/float16 in float32 on the (exactly) upcast inputs,
    its output rounded back: the CPU has no dot products of that dtype (the float32 product of the rounded inputs
    is at least as accurate as the half-precision conv, which accumulates in float32 too), or the weights are
    float32 (a double block kept them under autocast: autocast_train_conv)."""
    if layer.device.type != "cpu" or layer.dtype not in (torch.bfloat16, torch.float16):
        return Choice(False, "")
    name = str(layer.dtype).removeprefix("torch.")
    if layer.weight_dtype == torch.float32:
        return Choice(True, autocast_train_conv(layer).rule or f"float32 on the upcast {name}: float32 weights")
    if native_dot(layer.dtype):
        return Choice(False, f"policy native_dot_{name}=True")
    return Choice(True, f"float32 on the upcast {name}: policy native_dot_{name}=False")


def _cpu_float32(layer):
    return layer.device.type == "cpu" and layer.dtype == torch.float32 and layer.weight_dtype == torch.float32


def winograd_pays(layer, kept=False):
    """Choice(True) where a float32 CPU 3x3 conv runs faster as Winograd F(2x2, 3x3) than oneDNN's direct conv and the
    GEMMs of few pixels: channels on both sides within [winograd_min_channels, winograd_max_channels], and
    winograd_min_pixels pixels per batch, or with ``kept`` weights (prepacked in an inference snapshot)
    winograd_kept_min_pixels where both sides have winograd_kept_min_channels. Needs the compiled ops, eager."""
    if not (layer.device.type == "cpu" and layer.dtype == torch.float32) or torch.compiler.is_compiling():
        return Choice(False, "winograd: float32 CPU eager only")
    low, high, pixels = min(layer.cin, layer.cout), max(layer.cin, layer.cout), layer.pixels
    where = f"{layer.cin}->{layer.cout} channels, {pixels} pixels per batch"
    if ops.backend_for(layer.device) != "compiled":
        return Choice(False, "winograd: needs the compiled ops")
    if not value("winograd_min_channels") <= low or high > value("winograd_max_channels"):
        return Choice(False, f"winograd does not pay at {where} (policy winograd_min/max_channels)")
    enough = pixels >= value("winograd_min_pixels") or (
        kept and pixels >= value("winograd_kept_min_pixels") and low >= value("winograd_kept_min_channels"))
    if not enough:
        return Choice(False, f"winograd does not pay at {where} (policy winograd_min_pixels)")
    return Choice(True, f"winograd pays at {where}" + " (weights kept)" * (pixels < value("winograd_min_pixels")))


def _gemm_train(layer):
    """Whether a training conv runs as im2col GEMMs: float32 CPU, up to gemm_train_max_pixels pixels per image; eager
    only (Dynamo cannot speculate the GEMM backward's reshapes of gradients of unknown layout)."""
    return (_cpu_float32(layer) and layer.h * layer.w <= value("gemm_train_max_pixels")
            and not torch.compiler.is_compiling())


_IM2COL_MAX_VALUES = 1 << 15  # above any input ATen's convolution has sent to its im2col path (20480 in torch 2.14)


def aten_runs_im2col(layer):
    """Whether ATen's own convolution of ``layer`` (k x k, padding 1) runs its slow im2col path (ConvBackend.Slow2d:
    float32 on the CPU, one image of few values), whose products the GEMMs compute bit for bit. ATen is asked
    (torch._C._select_conv_backend) on zero-stride stand-ins of the layer's shapes, which allocate nothing; past a
    cheap bound first (torch 2.14 takes the path up to 20480 input values), as every training conv comes here. A
    torch without the probe (private API) answers False."""
    if (not _cpu_float32(layer) or layer.n != 1 or layer.cin * layer.h * layer.w > _IM2COL_MAX_VALUES
            or torch.compiler.is_compiling() or not hasattr(torch._C, "_select_conv_backend")):
        return False
    stand_in = torch.empty((), dtype=layer.dtype).expand(layer.n, layer.cin, layer.h, layer.w)
    weight = torch.empty((), dtype=layer.weight_dtype).expand(layer.cout, layer.cin, layer.kernel, layer.kernel)
    backend = torch._C._select_conv_backend(stand_in, weight, None, [1, 1], [1, 1], [1, 1], False, [0, 0], 1, None)
    return backend == torch._C._ConvBackend.Slow2d


def train_conv(layer):
    """How fast mode's training conv (3x3, or the sub-pixel 2x2; forward and backward) runs, after ``upcast``:
    "winograd" (3x3 float32 where winograd_train allows it and it pays, not where the GEMMs run), "gemm" (im2col,
    up to gemm_train_max_pixels pixels per image, or where ATen's own conv is im2col), "shifted_gemm" (ATen's
    forward; the channels_last sub-pixel conv's backward by shifted GEMMs, which oneDNN's channels_last backward took
    1.1-2.7x as long as) or "aten"."""
    if torch.compiler.is_compiling():
        return Choice("aten", "compiled: ATen's conv")
    im2col = value("gemm_train_where_aten_im2col") and aten_runs_im2col(layer)
    gemm = _gemm_train(layer) or im2col
    allowed = ["aten"]
    if layer.kernel == 3 and layer.weight_dtype == torch.float32 and not gemm:
        pays = winograd_pays(layer)
        if pays.algorithm:
            allowed.append("winograd")
    if _cpu_float32(layer):
        allowed.append("gemm")
    shifted = _cpu_float32(layer) and layer.kernel == 2 and layer.nhwc_dense and not gemm
    if shifted:
        allowed.append("shifted_gemm")
    # Tuning times only what keeps fast mode's error rule on this CPU: Winograd where winograd_train, the GEMMs where
    # gemm_train_max_pixels is not 0 (both off on AVX-512 for accuracy, 'Issue 31') or ATen's conv is im2col too.
    candidates = [name for name in allowed if not (name == "winograd" and not value("winograd_train"))
                  and not (name == "gemm" and not value("gemm_train_max_pixels") and not im2col)]
    planned = _planned("train_conv", layer, allowed, candidates)
    if planned is not None:
        return planned
    gemm_rule = f"policy gemm_train_max_pixels={value('gemm_train_max_pixels')}"
    if "winograd" in allowed and value("winograd_train"):
        return Choice("winograd", f"policy winograd_train=True; {pays.rule}")
    if im2col:
        return Choice("gemm", "ATen's conv here is im2col (Slow2d): the same GEMMs without its zero-filled weight "
                              "gradient (policy gemm_train_where_aten_im2col=True)")
    if gemm:
        return Choice("gemm", f"{gemm_rule} >= {layer.h * layer.w} pixels per image")
    notes = []
    if layer.kernel == 3:
        notes.append("policy winograd_train=False" if not value("winograd_train") else winograd_pays(layer).rule)
    if _cpu_float32(layer):
        notes.append(f"{gemm_rule} < {layer.h * layer.w} pixels per image")
    rule = "; ".join(n for n in notes if n)
    return Choice("shifted_gemm" if shifted else "aten", rule)


def conv_layout(layer):
    """Choice(memory format or None) of fast mode's ATen training conv: the weight's where the two differ on the CPU
    and the weights outnumber the activations in and out (a model's NCHW weights at the deep levels, whose
    activations are channels_last inside; policy aten_conv_in_weights_layout), else None: as they lie."""
    if torch.compiler.is_compiling() or layer.device.type != "cpu" or not value("aten_conv_in_weights_layout"):
        return Choice(None, "")
    weights = layer.cout * layer.cin * layer.kernel * layer.kernel
    activations = layer.n * layer.cin * layer.h * layer.w + layer.n * layer.cout * layer.h * layer.w
    if layer.weight_layout != layer.layout and weights > activations:
        return Choice(layer.weight_layout, "moved to the weights' layout (the weights outnumber the activations)")
    return Choice(None, "")


def inference_conv(layer, kept):
    """How CPU inference runs a conv + eval BN + ReLU: "unfolded" (the seed's ops: exact mode), "winograd" (where it
    pays, ``kept``: weights prepacked in an inference snapshot), "gemm" (up to gemm_max_pixels pixels per batch),
    "folded" (BN folded into oneDNN's conv where folding costs less than the passes it saves:
    fold_min_pixels_per_input_channel, and channels_last unless fold_nchw) or "unfolded"."""
    if layer.exact:
        return Choice("unfolded", "exact mode: the seed's ops")
    pays = winograd_pays(layer, kept)
    allowed = ["gemm", "folded", "unfolded"] + ["winograd"] * bool(pays.algorithm)
    if pays.algorithm and not kept and not value("winograd_inference"):
        pays = Choice(False, "winograd: policy winograd_inference=False (weights transformed at every call)")
    # BN folded into NCHW convs is over the error rule (fold_nchw): not a candidate for tuning there.
    candidates = [name for name in allowed if name != "folded" or layer.nhwc_dense or value("fold_nchw")]
    planned = _planned("inference_conv", layer, allowed, candidates)
    if planned is not None:
        return planned
    if pays.algorithm:
        return Choice("winograd", pays.rule)
    pixels = layer.pixels
    if pixels <= value("gemm_max_pixels"):
        return Choice("gemm", f"policy gemm_max_pixels={value('gemm_max_pixels')} >= {pixels} pixels per batch")
    if pixels < value("fold_min_pixels_per_input_channel") * layer.cin:
        return Choice("unfolded", f"{pixels} pixels per batch, {layer.cin} input channels: BN and ReLU passes "
                                  "cheaper than folding (policy fold_min_pixels_per_input_channel)")
    if not layer.nhwc_dense and not value("fold_nchw"):
        return Choice("unfolded", "NCHW: not folded (policy fold_nchw=False)")
    return Choice("folded", f"{pixels} pixels per batch: BN folded into the weights")


def autocast_inference_conv(layer):
    """How fast mode runs a CPU conv + eval BN + ReLU in inference under lower-precision autocast: "gemm" (im2col and
    one float32 GEMM on the input upcast and the float32 weights as they lie, instead of autocast's cast of the
    weights and oneDNN's re-layout of them at every call) where the weights outweigh the pixels: at most
    autocast_gemm_max_pixels pixels per batch and at least autocast_gemm_min_weights weights; else "autocast" (the
    Function: autocast's casts, the conv in autocast's dtype). Exact mode: "autocast". A block runs its GEMMs only
    where each of its convs picks them."""
    if layer.exact:
        return Choice("autocast", "exact mode: the seed's ops")
    weights, limit = layer.cout * layer.cin * layer.kernel * layer.kernel, value("autocast_gemm_max_pixels")
    if layer.pixels > limit:
        return Choice("autocast", f"{layer.pixels} pixels per batch > policy autocast_gemm_max_pixels={limit}")
    if weights < value("autocast_gemm_min_weights"):
        return Choice("autocast", f"{weights} weights < policy autocast_gemm_min_weights="
                                  f"{value('autocast_gemm_min_weights')}")
    return Choice("gemm", f"float32 GEMM under autocast: {layer.pixels} pixels per batch <= policy "
                          f"autocast_gemm_max_pixels={limit}, {weights} weights")


def autocast_train_conv(layer):
    """Whether fast mode's CPU conv of a bfloat16/float16 input under autocast (a double block's, whose Function runs
    it) keeps its float32 weights as they lie, the input upcast exactly and the output rounded once ("float32"), or
    takes autocast's copy of them ("autocast"): float32 where the weights outweigh the pixels, at most
    autocast_train_float32_max_pixels pixels per batch and at least autocast_train_float32_min_weights weights.
    There autocast's cast of the weights and of their gradient back (6 bytes a weight each way) and oneDNN's
    low-precision kernels at a few pixels cost more than the float32 products. Exact mode, compiling, or weights
    that are not float32: "autocast"."""
    if layer.exact or layer.device.type != "cpu" or torch.compiler.is_compiling():
        return Choice("autocast", "")
    if layer.weight_dtype != torch.float32 or layer.dtype not in (torch.bfloat16, torch.float16):
        return Choice("autocast", "")
    weights = layer.cout * layer.cin * layer.kernel * layer.kernel
    limit = value("autocast_train_float32_max_pixels")
    if layer.pixels > limit or weights < value("autocast_train_float32_min_weights"):
        return Choice("autocast", "")
    return Choice("float32", f"float32 weights under autocast: {layer.pixels} pixels per batch <= policy "
                             f"autocast_train_float32_max_pixels={limit}, {weights} weights")


def up_conv(layer):
    """How the up block runs its conv of the low-resolution ``layer`` input: "subpixel" (one 2x2 conv to 4x the
    channels on it) or "upsampled" (the 3x3 conv on the nearest-upsampled input). Exact mode: upsampled. Training:
    sub-pixel on CUDA, on the CPU from subpixel_train_min_pixels low-resolution pixels per batch (below, the weights
    outweigh the pixels and the four phase kernels cost more than the multiplies they save). Inference (CPU): from
    subpixel_min_pixels, in bfloat16 (the inference snapshot's oneDNN convs) from subpixel_min_pixels_bfloat16."""
    if layer.exact:
        return Choice("upsampled", "exact mode: the seed's ops")
    planned = _planned("up_conv", layer, ("subpixel", "upsampled"))
    if planned is not None:
        return planned
    if layer.train and layer.device.type != "cpu":
        return Choice("subpixel", "sub-pixel: on CUDA")
    name = ("subpixel_train_min_pixels" if layer.train else
            "subpixel_min_pixels_bfloat16" if layer.dtype == torch.bfloat16 else "subpixel_min_pixels")
    if torch.compiler.is_compiling():  # no rule text from shapes Dynamo may trace as symbols
        return Choice("subpixel" if layer.pixels >= value(name) else "upsampled", "")
    pixels = f"{layer.pixels} low-resolution pixels per batch"
    if layer.pixels >= value(name):
        return Choice("subpixel", f"sub-pixel: policy {name}={value(name)} <= {pixels}")
    return Choice("upsampled", f"upsampled: {pixels} < policy {name}={value(name)}")


def model_layout(train, cpu_inference, bfloat16_autocast=False):
    """Choice(True) where a plain fast U-Net (every block fused; checked by the caller, U_Net._channels_last_inside)
    runs a float32 NCHW CPU input in channels_last inside: under bfloat16 autocast where
    channels_last_bfloat16_autocast, else in training where channels_last_train, in eval where every block runs CPU
    inference (``cpu_inference``) and channels_last_inference."""
    if bfloat16_autocast:
        on = value("channels_last_bfloat16_autocast")
        return Choice(on, f"bfloat16 autocast: policy channels_last_bfloat16_autocast={on}")
    if train:
        on = value("channels_last_train")
        return Choice(on, f"policy channels_last_train={on}")
    if not cpu_inference:
        return Choice(False, "not CPU inference")
    on = value("channels_last_inference")
    return Choice(on, f"CPU inference: policy channels_last_inference={on}")


def second_conv(layer, mode, timed_pick):
    """What runs a fast-mode double block's second 3x3 conv (``layer.train``: with layer 2's batch statistics): "aten"
    (a BN-apply + ReLU pass, then ATen's conv) or "triton" (the activation formed in the conv's input load).
    ``mode`` is ops.conv3x3_mode(): "aten", "triton" (wherever the Triton kernels run) or "auto": on CUDA the faster
    of the two at the first call of each shape, ``timed_pick()`` (None where untimed: aten), eager and
    nondeterministic algorithms only (a pick by timing could differ from run to run)."""
    if (mode not in ("triton", "auto") or layer.dtype == torch.float64 or not ops._triton_usable()
            or ops.backend_for(layer.device) == "reference"):
        return Choice("aten", f"FASTUNET_CONV={mode}")
    planned = _planned("second_conv", layer, ("triton", "aten"))
    if planned is not None:
        return planned
    if mode == "triton":
        return Choice("triton", "FASTUNET_CONV=triton: BN+ReLU in the conv's input load")
    if layer.device.type != "cuda" or torch.are_deterministic_algorithms_enabled():
        return Choice("aten", "FASTUNET_CONV=auto: aten off CUDA or under deterministic algorithms")
    pick = timed_pick()
    return Choice(pick or "aten", "FASTUNET_CONV=auto: the faster at the first call")


def chunk_tiles(tiles, cin, cout, threads):
    """Tiles per chunk of the Winograd conv for ``tiles`` tiles of ``cin`` to ``cout`` channels: below
    winograd_wide_channels chunks of about winograd_chunk_floats floats of V and M (at least winograd_min_chunk_tiles
    tiles), one per thread; from there on both sides one chunk of all the tiles up to winograd_wide_chunk_floats.
    Odd where there are several, so that the 16 planes of V and M are not a power of two apart (the same cache
    sets)."""
    per_tile = 16 * (cin + cout)
    if min(cin, cout) >= value("winograd_wide_channels"):
        chunk = min(tiles, max(1, value("winograd_wide_chunk_floats") // per_tile))
    else:
        chunk = min(max(value("winograd_min_chunk_tiles"), value("winograd_chunk_floats") // per_tile),
                    -(-tiles // threads))
    return chunk if chunk == tiles or chunk % 2 else max(1, chunk - 1)
